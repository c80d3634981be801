"""`python -m distrnn.ptb`: flags in, `job.run` out.

    python -m distrnn.ptb --config small --data_path DIR [--hidden_size 100 ...]
"""
import os
import sys

from distrnn import cli


def build_parser():
    from distrnn.ptb.configs import PRESETS, PTBConfig, RunOptions
    parser = cli.ArgumentParser(
        prog="python -m distrnn.ptb",
        description="Train the PTB word language model of Zaremba et al. 2014 with distrnn's stacked LSTM.")
    cli.add_job_flags(
        parser, "ptb", PRESETS, "small",
        "directory with ptb.train.txt, ptb.valid.txt, ptb.test.txt, read as it is; default: ~/.cache/distrnn/ptb, "
        "downloaded and checksummed when missing", RunOptions)
    names = cli.add_config_flags(parser, PTBConfig, cli.field_comments(PTBConfig))
    return parser, names


def describe(name: str) -> str:
    from distrnn.ptb.configs import PUBLISHED
    ppl, cost = PUBLISHED[name]
    return f"published test ppl {ppl if ppl else '-'}; {cost}"


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # hide TensorFlow's C++ start-up chatter
    return cli.run_main("distrnn.ptb", lambda: cli.train_command(
        sys.argv[1:] if argv is None else argv, build_parser, describe, "distrnn.ptb"))
