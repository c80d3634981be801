"""The results table of full-PTB runs, from their metrics files, beside the published figures.

    python -m distrnn.ptb --config small --data_path ../shared/data/ptb --metrics_json small.json
    python bench/ptb_results.py small.json [medium.json ...] [--markdown]

Prints, a run a line: preset, epochs trained, train/valid/test perplexity of the last weights, the best
epoch's valid and test, words/sec, wall time, the machine, and the reference's test perplexity (Zaremba et
al. 2014 through tensorflow/models ptb_word_lm.py) with the ratio to it. --markdown: as table rows.
"""
import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distrnn.ptb.configs import PUBLISHED  # noqa: E402  (imports no TensorFlow)

REFERENCE = {"small": (37.99, 121.39, 115.91), "medium": (48.45, 86.16, 82.07), "large": (37.87, 82.62, 78.29)}


def row(metrics: dict) -> dict:
    name, config = metrics["config_name"], metrics["config"]
    reference = REFERENCE.get(name)
    tied = " tied" if config.get("tie_embeddings") else ""
    return {
        "preset": name + tied, "data": f"{metrics['words']['train']:,} training words",
        "epochs": metrics["epochs"], "of": config["max_max_epoch"],
        "train": metrics["train_perplexity"], "valid": metrics["valid_perplexity"],
        "test": metrics["test_perplexity"], "best_epoch": metrics.get("best_epoch"),
        "best_valid": metrics.get("best_valid_perplexity"), "best_test": metrics.get("best_test_perplexity"),
        "words_per_sec": metrics["words_per_sec"],
        "wall": str(datetime.timedelta(seconds=int(metrics["wall_time_sec"]))),
        "machine": f"{metrics['machine']['processor']}, {metrics['machine']['family_model']}, "
                   f"{metrics['machine']['cores']} cores",
        "reference_test": reference[2] if reference else PUBLISHED.get(name, (None,))[0],
        "vs_reference": metrics["test_perplexity"] / reference[2] if reference else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", nargs="+", help="--metrics_json files of PTB runs")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    for path in args.metrics:
        with open(path) as f:
            r = row(json.load(f))
        if args.markdown:
            print(f"| {r['preset']} | {r['data']} | {r['epochs']:g} of {r['of']} | {r['train']:.2f} / "
                  f"{r['valid']:.2f} / **{r['test']:.2f}** | {r['best_epoch']}: {r['best_valid']:.2f} / "
                  f"{r['best_test']:.2f} | {r['words_per_sec']:,.0f} | {r['wall']} | {r['machine']} | "
                  f"{r['reference_test']} |")
        else:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
