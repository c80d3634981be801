"""Words/sec of `python -m distrnn.ptb --config small` against the plain tf.keras
baseline (../shared/bench/keras_ptb_baseline.py) on the same data, in one run.

    python bench/ptb_speed.py [--data_path DIR] [--epochs 1] [--repeats 3] [--extra "--rnn_mode static"]

Both run as child processes, alternating, `--repeats` times each; the median
words/sec of each and their ratio are printed, with train perplexity after the
same number of epochs (both use the reference's batch 20 x 20 steps, SGD lr 1,
clip 5). words/sec leaves out the first 5 steps of each process in both.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BASELINE = os.path.join(ROOT, "..", "shared", "bench", "keras_ptb_baseline.py")


def run_distrnn(data_path, epochs, extra):
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.json")
        subprocess.run([sys.executable, "-m", "distrnn.ptb", "--config", "small", "--data_path", data_path,
                        "--max_epochs", str(epochs), "--save_path", os.path.join(tmp, "run"),
                        "--metrics_json", metrics, *extra], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env=ENV)
        with open(metrics) as f:
            m = json.load(f)
    return m["words_per_sec"], m["train_perplexity"]


def run_baseline(data_path, epochs):
    out = subprocess.run([sys.executable, BASELINE, data_path, "--epochs", str(epochs)], check=True,
                         capture_output=True, text=True, env=ENV).stdout
    m = json.loads(out.strip().splitlines()[-1])
    return m["words_per_sec"], m["train_perplexity"]


ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "ptb-mini"))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--extra", default="", help="more flags for distrnn.ptb, e.g. '--rnn_mode static'")
    args = p.parse_args()
    if not os.path.exists(BASELINE):
        sys.exit(f"ptb_speed: baseline not found at {BASELINE}")
    ours, theirs = [], []
    for r in range(args.repeats):
        ours.append(run_distrnn(args.data_path, args.epochs, args.extra.split()))
        theirs.append(run_baseline(args.data_path, args.epochs))
        print(f"run {r + 1}: distrnn {ours[-1][0]:.0f} words/sec (train ppl {ours[-1][1]:.2f}), "
              f"keras {theirs[-1][0]:.0f} words/sec (train ppl {theirs[-1][1]:.2f})", flush=True)
    wps_ours = statistics.median(w for w, _ in ours)
    wps_theirs = statistics.median(w for w, _ in theirs)
    result = {
        "distrnn_words_per_sec": round(wps_ours, 1), "keras_words_per_sec": round(wps_theirs, 1),
        "ratio": round(wps_ours / wps_theirs, 3),
        "distrnn_train_perplexity": round(ours[0][1], 2), "keras_train_perplexity": round(theirs[0][1], 2),
        "epochs": args.epochs, "repeats": args.repeats, "data_path": os.path.abspath(args.data_path),
        "cpus": os.cpu_count(),
    }
    print(f"distrnn {wps_ours:.0f} words/sec, keras baseline {wps_theirs:.0f} words/sec: "
          f"ratio {result['ratio']:.3f} (median of {args.repeats})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
