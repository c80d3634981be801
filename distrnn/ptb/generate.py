"""`python -m distrnn.ptb.generate` (also `distrnn-generate`): text sampled from a trained PTB model.

    python -m distrnn.ptb.generate --save_path RUN [--checkpoint best|last] [--words 100]
                                   [--temperature 1.0] [--prompt "the company said"] [--seed N]

Prints the prompt and what follows it, one sentence a line (a line ends where the model draws <eos>).
Prompt words outside the run's vocabulary are read as <unk>, and said so on stderr.
"""
import os
import sys

from distrnn import cli, options
from distrnn.errors import UsageError


def build_parser():
    parser = cli.ArgumentParser(prog="python -m distrnn.ptb.generate", description=__doc__.split("\n\n")[0])
    cli.add_saved_run_flags(parser)
    parser.add_argument("--words", type=options.number(int, positive=True, maximum=1_000_000), default=100,
                        help="words to draw, <eos> included, at most a million (default 100)")
    parser.add_argument("--temperature", type=options.number(float, positive=True), default=1.0,
                        help="the logits are divided by it: below 1 safer, above 1 more varied (default 1.0)")
    parser.add_argument("--prompt", default="", help="words the text starts with (default: a sentence's start)")
    parser.add_argument("--seed", type=options.number(int, minimum=0, maximum=2**32 - 1), default=None,
                        help="seed of the draws (default: a different text every time)")
    return parser


def generate(args) -> str:
    from distrnn.ptb import reader, saved_run
    run = saved_run.load(args.save_path, args.checkpoint, args.data_path, num_steps=1)
    saved_run.say_notes(run, "distrnn.ptb.generate")
    prompt = args.prompt.split()
    unknown = sorted({w for w in prompt if w not in run.vocab})
    if prompt and len(unknown) == len(set(prompt)):
        raise UsageError(f"every word of --prompt is outside the run's vocabulary ({', '.join(unknown[:5])}); the "
                         f"vocabulary is lowercase PTB text, e.g. --prompt \"the company said\"")
    if unknown:
        print(f"distrnn.ptb.generate: read as {reader.UNK}: {', '.join(unknown)}", file=sys.stderr)
    ids = [run.vocab.get(w, run.vocab[reader.UNK]) for w in prompt]
    drawn = saved_run.sample(run, ids, args.words, args.temperature, args.seed)
    return sentences([run.words[i] for i in ids + drawn], reader.EOS)


def sentences(words, eos: str) -> str:
    """The words one sentence a line: a line ends at each `eos`."""
    lines, line = [], []
    for word in words:
        if word == eos:
            lines.append(" ".join(line))
            line = []
        else:
            line.append(word)
    return "\n".join(lines + ([" ".join(line)] if line else []))


def main(argv=None) -> int:
    def run():
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        cli.load_tensorflow()
        print(generate(args))
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return cli.run_main("distrnn.ptb.generate", run)


if __name__ == "__main__":
    sys.exit(main())
