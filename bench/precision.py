"""PTB in each precision side by side in one run: train, valid and test perplexity (each precision's
own figures, and how far from float32's), words/sec (median of --repeats, the precisions interleaved)
and its ratio to float32's, float16's skipped steps and final loss scale.

    python bench/precision.py [--data_path DIR] [--repeats 3] [--precisions float32 bfloat16 float16]
                              [--extra "--max_epochs 1"] [--seeds 2 3]

Default: PTB small, one epoch of ../shared/data/ptb-mini, seed 1, this checkout's stack. Each run is a
child process with the same flags but --precision; words/sec leaves out each process's first 5 steps.
--seeds: float32 also runs once with each of these seeds, and the line "float32, seed to seed" gives how
far their perplexities fall from seed 1's: the scale against which a precision's difference reads.
Which processors run 16-bit arithmetic natively is in docs/precision.md: on one without it, bfloat16
and float16 are converted to float32 around every kernel and run slower than float32.
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
KEYS = ("train_perplexity", "valid_perplexity", "test_perplexity")
WITHIN = 0.03  # issue 19: bfloat16 and float16 within 3% of float32 after one epoch


def run(precision, data_path, extra, save_path, seed=1):
    metrics = save_path + ".json"
    subprocess.run([sys.executable, "-m", "distrnn.ptb", "--config", "small", "--data_path", data_path,
                    "--seed", str(seed),
                    "--precision", precision, "--save_path", save_path, "--metrics_json", metrics, *extra],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env=machine.child_env())
    with open(metrics) as f:
        return json.load(f)


def summary(precision, ms, reference=None) -> dict:
    first = ms[0]
    row = {"precision": precision, "words_per_sec": round(statistics.median(m["words_per_sec"] for m in ms), 1),
           **{k: first[k] for k in KEYS}, "loss_scale": first["loss_scale"],
           "same_figures_every_repeat": all(m[k] == first[k] for m in ms for k in KEYS)}
    if reference is not None:
        row["ratio_words_per_sec"] = round(row["words_per_sec"] / reference["words_per_sec"], 3)
        row["relative_difference"] = {k: round(abs(row[k] - reference[k]) / reference[k], 5) for k in KEYS}
        row["within_3_percent"] = all(row["relative_difference"][k] <= WITHIN for k in KEYS[:2])
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "ptb-mini"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precisions", nargs="+", default=["float32", "bfloat16", "float16"])
    p.add_argument("--extra", default="--max_epochs 1", help="more flags for distrnn.ptb")
    p.add_argument("--seeds", type=int, nargs="*", default=[], help="float32 once more with each of these seeds")
    args = p.parse_args()
    if args.precisions[0] != "float32":
        p.error("the first of --precisions is the reference: float32")
    host = machine.start()
    runs = {precision: [] for precision in args.precisions}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            for precision in args.precisions:
                m = run(precision, args.data_path, args.extra.split(), os.path.join(tmp, f"{precision}-{round_}"))
                runs[precision].append(m)
                print(f"round {round_ + 1}: {precision:8s} {m['words_per_sec']:8.0f} words/sec  "
                      + "  ".join(f"{k.split('_')[0]} {m[k]:.4f}" for k in KEYS), flush=True)
        spread = [run("float32", args.data_path, args.extra.split(), os.path.join(tmp, f"seed-{seed}"), seed)
                  for seed in args.seeds]
    reference = summary("float32", runs["float32"])
    if spread:
        apart = {k: max(abs(m[k] - reference[k]) / reference[k] for m in spread) for k in KEYS}
        print(f"float32, seed to seed (seeds {', '.join(map(str, args.seeds))} against 1): perplexity apart by up to "
              + ", ".join(f"{k.split('_')[0]} {100 * v:.2f}%" for k, v in apart.items()))
    rows = [reference] + [summary(precision, runs[precision], reference) for precision in args.precisions[1:]]
    for row in rows:
        line = f"{row['precision']:8s} {row['words_per_sec']:8,.0f} words/sec"
        if "ratio_words_per_sec" in row:
            d = row["relative_difference"]
            line += (f" ({row['ratio_words_per_sec']:.3f}x float32's); perplexity apart from float32's by "
                     + ", ".join(f"{k.split('_')[0]} {100 * v:.2f}%" for k, v in d.items())
                     + ("; within 3%" if row["within_3_percent"] else "; NOT within 3%"))
        if row["loss_scale"]:
            line += f"; loss scale {row['loss_scale']['scale']:g}, {row['loss_scale']['overflows']} overflows run again"
        print(line + "  (" + ", ".join(f"{k.split('_')[0]} {row[k]:.4f}" for k in KEYS) + ")")
    print(json.dumps({"machine": host, "flags": args.extra, "precisions": rows,
                      "float32_seeds": {seed: {k: m[k] for k in KEYS} for seed, m in zip(args.seeds, spread)}}))


if __name__ == "__main__":
    main()
