"""`python -m distrnn.ptb.score` (also `distrnn-score`): the perplexity of text files under a trained PTB model.

    python -m distrnn.ptb.score --save_path RUN FILE [FILE ...] [--checkpoint best|last]
                                [--per_line OUT.jsonl] [--metrics_json M]

Each file is read as training reads a split (one sentence a line, <eos> at each line's end, words outside
the run's vocabulary as <unk>, counted) and scored as training evaluates one: every word predicted once,
the state carried from line to line. On the run's own test file it gives the test perplexity the run
reported. --per_line writes one JSON object a line: file, line number, natural-log probability, words.
"""
import json
import os
import sys

from distrnn import cli


def build_parser():
    parser = cli.ArgumentParser(prog="python -m distrnn.ptb.score", description=__doc__.split("\n\n")[0])
    cli.add_saved_run_flags(parser)
    parser.add_argument("files", nargs="+", metavar="FILE", help="text files, one sentence a line")
    parser.add_argument("--per_line", metavar="OUT.jsonl", help="write each line's log-probability and word count")
    parser.add_argument("--metrics_json", help="write every file's figures and the total to this JSON file")
    return parser


def score(args) -> dict:
    from distrnn.run.files import check_output, write_json, write_text
    from distrnn.ptb import reader, saved_run
    from distrnn.ptb.trainer import perplexity
    check_output(args.per_line, "--per_line", "lines.jsonl")
    check_output(args.metrics_json, "--metrics_json")
    words = {path: reader.read_words(path, "give text files, one sentence a line") for path in args.files}
    run = saved_run.load(args.save_path, args.checkpoint, args.data_path, num_steps=None)
    saved_run.say_notes(run, "distrnn.ptb.score")
    results, lines = {}, []
    for path in args.files:
        scored = saved_run.score_words(run, words[path])
        results[path] = {"perplexity": scored.perplexity, "words": scored.words, "log_prob": scored.log_prob,
                         "oov": scored.oov}
        lines += [json.dumps({"file": path, "line": i + 1, "log_prob": lp, "words": n})
                  for i, (lp, n) in enumerate(scored.lines)]
        print(f"{path}: perplexity {scored.perplexity:.4f} over {scored.words} words ({scored.oov} read as "
              f"{reader.UNK})")
    words_in_all = sum(r["words"] for r in results.values())
    log_prob = sum(r["log_prob"] for r in results.values())
    figures = {"files": results, "perplexity": perplexity(-log_prob / words_in_all), "words": words_in_all,
               "log_prob": log_prob, "checkpoint": run.checkpoint, "save_path": args.save_path,
               "checkpoint_step": run.position["global_step"], "checkpoint_epochs": len(run.position["history"])}
    if len(results) > 1:
        print(f"all {len(results)} files: perplexity {figures['perplexity']:.4f} over {words_in_all} words")
    if args.per_line:
        write_text(args.per_line, "".join(line + "\n" for line in lines))
    if args.metrics_json:
        write_json(args.metrics_json, figures)
    return figures


def main(argv=None) -> int:
    def run():
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        cli.load_tensorflow()
        score(args)
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return cli.run_main("distrnn.ptb.score", run)


if __name__ == "__main__":
    sys.exit(main())
