"""Which --lr_scaling to use when ranks grow the global batch: validation perplexity of each, in one run.

    python bench/lr_scaling.py [--data_path DIR] [--global_batch 40 80] [--epochs 4] [--warmup_steps 100]

N ranks with batch_size B train exactly what one process with B x N rows trains (tested in
tests/test_horovod.py), so each configuration runs as one process with `--global_batch_size`, PTB small
(reference batch 20, SGD at 1.0, clip 5). For every global batch: none, sqrt, linear, and linear with
`--lr_warmup_steps`; prints valid perplexity after each epoch and words/sec, and the reference batch
for comparison.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(data_path, epochs, global_batch, extra):
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.json")
        subprocess.run([sys.executable, "-m", "distrnn.ptb", "--config", "small", "--data_path", data_path,
                        "--global_batch_size", str(global_batch), "--max_epochs", str(epochs),
                        "--save_path", os.path.join(tmp, "run"), "--metrics_json", metrics, *extra],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env=machine.child_env())
        with open(metrics) as f:
            m = json.load(f)
    return [round(h["valid_perplexity"], 2) for h in m["history"]], m["words_per_sec"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "ptb-mini"))
    p.add_argument("--global_batch", type=int, nargs="+", default=[40, 80])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--warmup_steps", type=int, default=100)
    args = p.parse_args()
    host = machine.start()
    results = {"reference": {"global_batch": 20, "valid": run(args.data_path, args.epochs, 20, [])[0]}}
    print(f"global batch 20 (reference): valid ppl per epoch {results['reference']['valid']}", flush=True)
    for g in args.global_batch:
        for name, extra in (("none", []), ("sqrt", ["--lr_scaling", "sqrt"]), ("linear", ["--lr_scaling", "linear"]),
                            (f"linear+warmup{args.warmup_steps}",
                             ["--lr_scaling", "linear", "--lr_warmup_steps", str(args.warmup_steps)])):
            valid, wps = run(args.data_path, args.epochs, g, extra)
            results[f"{g}/{name}"] = {"global_batch": g, "scaling": name, "valid": valid, "words_per_sec": wps}
            print(f"global batch {g}, lr_scaling {name:18s}: valid ppl per epoch {valid}, best {min(valid)}",
                  flush=True)
    print(json.dumps(dict(results, machine=host)))


if __name__ == "__main__":
    main()
