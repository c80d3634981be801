"""Words/sec of `python -m distrnn.ptb --config small` in each rnn_mode against the
plain tf.keras baseline (../shared/bench/keras_ptb_baseline.py) on the same data, in one run.

    python bench/ptb_speed.py [--data_path DIR] [--epochs 1] [--repeats 3] [--modes auto static dynamic block]
                              [--extra "--hidden_size 300"] [--against OTHER_CHECKOUT]

Every configuration runs as a child process, in turn, `--repeats` times; the
median words/sec of each, its ratio to the baseline and the train perplexity
after the same number of epochs are printed (all use the reference's batch
20 x 20 steps, SGD lr 1, clip 5). words/sec leaves out the first 5 steps of
each process everywhere. cudnn is measured only where a GPU is visible. --against DIR also times the
distrnn of another checkout (an older commit, say: `git worktree add DIR REV`) in each mode, in the same
rounds, and prints this checkout's words/sec over it: whether a change made the job slower.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import machine

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BASELINE = os.path.join(ROOT, "..", "shared", "bench", "keras_ptb_baseline.py")


def run_distrnn(data_path, epochs, extra, tree=ROOT):
    """(words/sec, train perplexity) of the distrnn in checkout `tree` (a child run there imports its own)."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.json")
        subprocess.run([sys.executable, "-m", "distrnn.ptb", "--config", "small", "--data_path", data_path,
                        "--max_epochs", str(epochs), "--save_path", os.path.join(tmp, "run"),
                        "--metrics_json", metrics, *extra], cwd=tree, check=True, stdout=subprocess.DEVNULL,
                       env=machine.child_env())
        with open(metrics) as f:
            m = json.load(f)
    return m["words_per_sec"], m["train_perplexity"]


def run_baseline(data_path, epochs):
    out = subprocess.run([sys.executable, BASELINE, data_path, "--epochs", str(epochs)], check=True,
                         capture_output=True, text=True, env=machine.child_env()).stdout
    m = json.loads(out.strip().splitlines()[-1])
    return m["words_per_sec"], m["train_perplexity"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "ptb-mini"))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=["auto", "static", "dynamic", "block", "cudnn"],
                   help="rnn_modes to measure (cudnn only where a GPU is visible)")
    p.add_argument("--extra", default="", help="more flags for distrnn.ptb, e.g. '--hidden_size 300'")
    p.add_argument("--against", help="another checkout of distrnn to time in the same rounds")
    args = p.parse_args()
    host = machine.start()
    if not os.path.exists(BASELINE):
        sys.exit(f"ptb_speed: baseline not found at {BASELINE}")
    modes = [m for m in args.modes if m != "cudnn" or has_gpu()]
    runs = {m: [] for m in modes}
    other = {m: [] for m in modes}
    theirs = []
    for r in range(args.repeats):
        for mode in modes:
            flags = ["--rnn_mode", mode] + args.extra.split()
            runs[mode].append(run_distrnn(args.data_path, args.epochs, flags))
            if args.against:
                other[mode].append(run_distrnn(args.data_path, args.epochs, flags, args.against))
        theirs.append(run_baseline(args.data_path, args.epochs))
        print(f"run {r + 1}: " + ", ".join(f"{m} {runs[m][-1][0]:.0f}" + (f" (against {other[m][-1][0]:.0f})"
                                                                          if args.against else "") for m in modes) +
              f", keras {theirs[-1][0]:.0f} words/sec", flush=True)
    keras_wps = statistics.median(w for w, _ in theirs)
    result = {"keras_words_per_sec": round(keras_wps, 1), "keras_train_perplexity": round(theirs[0][1], 2),
              "modes": {}, "epochs": args.epochs, "repeats": args.repeats,
              "data_path": os.path.abspath(args.data_path), "against": args.against, "machine": host}
    for mode in modes:
        wps = statistics.median(w for w, _ in runs[mode])
        ppl = runs[mode][0][1]
        result["modes"][mode] = {"words_per_sec": round(wps, 1), "ratio": round(wps / keras_wps, 3),
                                 "train_perplexity": round(ppl, 2)}
        against = ""
        if args.against:
            theirs_wps = statistics.median(w for w, _ in other[mode])
            result["modes"][mode].update(against_words_per_sec=round(theirs_wps, 1),
                                         against_ratio=round(wps / theirs_wps, 3),
                                         against_train_perplexity=round(other[mode][0][1], 2))
            against = f"  against {theirs_wps:7.0f}: ratio {wps / theirs_wps:.3f} (train ppl {other[mode][0][1]:.2f})"
        print(f"distrnn --rnn_mode {mode:8s} {wps:7.0f} words/sec  ratio {wps / keras_wps:.3f}  "
              f"train ppl {ppl:.2f}{against}")
    print(f"keras baseline            {keras_wps:7.0f} words/sec  ratio 1.000  train ppl {theirs[0][1]:.2f}"
          f"   (median of {args.repeats})")
    print(json.dumps(result))


def has_gpu():
    out = subprocess.run([sys.executable, "-c", "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))"],
                         capture_output=True, text=True, env=machine.child_env()).stdout.strip()
    return out not in ("", "0")


if __name__ == "__main__":
    main()
