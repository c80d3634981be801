"""`python -m distrnn.mnist`: flags in, `job.run` out.

    python -m distrnn.mnist --config lstm --data_path DIR [--cell gru --num_layers 2 ...]
"""
import os
import sys

from distrnn import cli


def build_parser():
    from distrnn.mnist.configs import PRESETS, MNISTConfig, RunOptions
    parser = cli.ArgumentParser(
        prog="python -m distrnn.mnist",
        description="Classify MNIST or Fashion-MNIST images with a recurrent network that reads one row per time step.")
    cli.add_job_flags(
        parser, "mnist", PRESETS, "lstm",
        "directory with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz, read as it is; default: ~/.cache/distrnn/DATASET, downloaded and checksummed "
        "when missing", RunOptions)
    fields = cli.add_config_flags(parser, MNISTConfig, cli.field_comments(MNISTConfig))
    return parser, fields


def describe(name: str) -> str:
    from distrnn.mnist.configs import MEASURED
    return MEASURED[name]


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # hide TensorFlow's C++ start-up chatter
    return cli.run_main("distrnn.mnist", lambda: cli.train_command(
        sys.argv[1:] if argv is None else argv, build_parser, describe, "distrnn.mnist"))
