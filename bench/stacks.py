"""The same PTB run on two stacks, side by side in one run: perplexities (equal, or how far apart) and
words/sec (median of --repeats, the stacks interleaved) with the ratio of the second to the first; then
the first stack's trained weights scored by both (distrnn.ptb.score on the test file), which separates
what each TensorFlow computes from how a training trajectory amplifies its round-off.

    python bench/stacks.py [--pythons .venv/bin/python .venv-tf2.21.0/bin/python] [--data_path DIR]
                           [--repeats 3] [--extra "--max_epochs 1"]

Default: PTB small, one epoch of ../shared/data/ptb-mini, seed 1, on the Horovod stack (.venv: TensorFlow
2.15.1) and the newest one (.venv-tf2.21.0: `DISTRNN_TF=2.21.0 bash launch/setup.sh`). Each run is a child
process of that stack's python with the same flags; words/sec leaves out each process's first 5 steps.
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile

import machine

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KEYS = ("train_perplexity", "valid_perplexity", "test_perplexity")


def run(python, data_path, extra, save_path):
    metrics = os.path.join(save_path + ".json")
    subprocess.run([python, "-m", "distrnn.ptb", "--config", "small", "--data_path", data_path, "--seed", "1",
                    "--save_path", save_path, "--metrics_json", metrics, *extra], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL, env=machine.child_env())
    with open(metrics) as f:
        return json.load(f)


def score(python, save_path, text):
    metrics = save_path + f".score-{abs(hash(python))}.json"
    subprocess.run([python, "-m", "distrnn.ptb.score", "--save_path", save_path, text, "--metrics_json", metrics],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env=machine.child_env())
    with open(metrics) as f:
        return json.load(f)["perplexity"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pythons", nargs=2, default=[os.path.join(ROOT, ".venv", "bin", "python"),
                                                  os.path.join(ROOT, ".venv-tf2.21.0", "bin", "python")])
    p.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "ptb-mini"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--extra", default="--max_epochs 1", help="more flags for distrnn.ptb")
    args = p.parse_args()
    host = machine.start()
    runs = {python: [] for python in args.pythons}
    tmp = tempfile.TemporaryDirectory()
    for round_ in range(args.repeats):
        for i, python in enumerate(args.pythons):
            m = run(python, args.data_path, args.extra.split(), os.path.join(tmp.name, f"run{round_}-{i}"))
            runs[python].append(m)
            print(f"round {round_ + 1}: {m['versions']['tensorflow']:8s} {m['words_per_sec']:8.0f} words/sec  "
                  + "  ".join(f"{k.split('_')[0]} {m[k]:.6f}" for k in KEYS), flush=True)
    result = {"machine": host, "flags": args.extra, "stacks": []}
    for python, ms in runs.items():
        result["stacks"].append({"python": python, "versions": ms[0]["versions"],
                                 "words_per_sec": round(statistics.median(m["words_per_sec"] for m in ms), 1),
                                 **{k: ms[0][k] for k in KEYS},
                                 "same_figures_every_repeat": all(m[k] == ms[0][k] for m in ms for k in KEYS)})
    first, second = result["stacks"]
    result["ratio_words_per_sec"] = round(second["words_per_sec"] / first["words_per_sec"], 3)
    result["relative_difference"] = {k: abs(second[k] - first[k]) / first[k] for k in KEYS}
    trained = os.path.join(tmp.name, "run0-0")  # the first stack's weights, round 1
    scored = [score(python, trained, os.path.join(args.data_path, "ptb.test.txt")) for python in args.pythons]
    result["same_weights_test_perplexity"] = scored
    result["same_weights_relative_difference"] = abs(scored[1] - scored[0]) / scored[0]
    for s in result["stacks"]:
        v = s["versions"]
        print(f"TensorFlow {v['tensorflow']} (Keras {v['keras']}, numpy {v['numpy']}, Python {v['python']}): "
              f"{s['words_per_sec']:,.0f} words/sec; " + ", ".join(f"{k} {s[k]:.6f}" for k in KEYS))
    print(f"{second['versions']['tensorflow']} / {first['versions']['tensorflow']}: "
          f"{result['ratio_words_per_sec']:.3f}x the words/sec; perplexities apart by "
          + ", ".join(f"{k.split('_')[0]} {d:.2e}" for k, d in result["relative_difference"].items()) + " (relative)")
    print(f"the first stack's trained weights scored by each: test perplexity {scored[0]:.8f} and "
          f"{scored[1]:.8f} ({result['same_weights_relative_difference']:.1e} relative)")
    tmp.cleanup()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
