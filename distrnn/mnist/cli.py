"""`python -m distrnn.mnist`: flags in, `job.run` out.

    python -m distrnn.mnist --config lstm --data_path DIR [--cell gru --num_layers 2 ...]
"""
from distrnn import cli


def build_parser():
    from distrnn.mnist.configs import MNISTConfig
    return cli.job_parser(
        "distrnn.mnist",
        "Classify MNIST or Fashion-MNIST images with a recurrent network that reads one row per time step.", "lstm",
        "directory with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz, read as it is; default: ~/.cache/distrnn/DATASET, downloaded and checksummed "
        "when missing", MNISTConfig)


def describe(name: str) -> str:
    from distrnn.mnist.configs import MEASURED
    return MEASURED[name]


def main(argv=None) -> int:
    return cli.train_main("distrnn.mnist", build_parser, describe, argv)
