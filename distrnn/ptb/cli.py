"""`python -m distrnn.ptb`: flags in, `job.run` out.

    python -m distrnn.ptb --config small --data_path DIR [--hidden_size 100 ...]
"""
from distrnn import cli


def build_parser():
    from distrnn.ptb.configs import PTBConfig
    return cli.job_parser(
        "distrnn.ptb", "Train the PTB word language model of Zaremba et al. 2014 with distrnn's stacked LSTM.",
        "small", "directory with ptb.train.txt, ptb.valid.txt, ptb.test.txt, read as it is; default: "
        "~/.cache/distrnn/ptb, downloaded and checksummed when missing", PTBConfig)


def describe(name: str) -> str:
    from distrnn.ptb.configs import PUBLISHED
    ppl, cost = PUBLISHED[name]
    return f"published test ppl {ppl if ppl else '-'}; {cost}"


def main(argv=None) -> int:
    return cli.train_main("distrnn.ptb", build_parser, describe, argv)
