"""Presets of the row-by-row image classifier.

Each 28 x 28 image is read as 28 time steps of 28 pixels (one row a step); the
class comes from the top layer's output after the last row, through one dense
layer. Adam at 0.001 with the batch sizes of the material it comes from:

| preset      | cells x units     | batch | from                                                       |
| ----------- | ----------------- | ----- | ---------------------------------------------------------- |
| `basic_rnn` | 1 basic RNN x 150 | 150   | Hands-On Machine Learning (Géron), chapter 14              |
| `lstm`      | 1 LSTM x 128      | 128   | the TensorFlow 1 LSTM-on-MNIST examples                    |
| `stacked`   | 3 LSTM x 128      | 128   | the same, one layer on each GPU (DeviceCellWrapper)        |
| `test`      | 1 LSTM x 8        | 16    | smoke tests: seconds                                       |

Accuracy and time per preset on this project's reference machine are in the
docs/measurements.md; `--list_configs` prints them.
"""
import dataclasses

from distrnn import names
from distrnn.config import Registry, check, check_recurrence
from distrnn.options import JobOptions, flag


@dataclasses.dataclass(frozen=True)
class MNISTConfig:
    cell: str = "lstm"            # recurrent cell: lstm, gru or rnn (basic tanh RNN)
    num_layers: int = 1           # stacked recurrent layers
    hidden_size: int = 128        # units of every layer
    rnn_mode: str = "auto"        # how the recurrence runs: static, dynamic, block, cudnn or auto (fastest here)
    use_peepholes: bool = False   # LSTM peephole connections (not with rnn_mode cudnn)
    learning_rate: float = 0.001  # Adam's step size
    batch_size: int = 128         # images a step (on each rank)
    num_epochs: int = 10          # passes over the training images
    validation_size: int = 5000   # training images held out for validation (the first ones of the file)
    spread_layers: bool = False   # no device flag and several GPUs: each layer on its own GPU

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "batch_size", "num_epochs"):
            value = getattr(self, name)
            check(value > 0, f"{name} must be positive, got {value}; pass --{name} N with N >= 1")
        check(self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}")
        check(self.validation_size >= 0, f"validation_size must be >= 0, got {self.validation_size}")
        check_recurrence(self.cell, self.rnn_mode, self.use_peepholes, self.num_layers)


PRESETS = Registry()
PRESETS.register("basic_rnn", MNISTConfig(cell="rnn", hidden_size=150, batch_size=150))
PRESETS.register("lstm", MNISTConfig())
PRESETS.register("stacked", MNISTConfig(num_layers=3, spread_layers=True))
PRESETS.register("test", MNISTConfig(hidden_size=8, batch_size=16, num_epochs=1, validation_size=32))

# What each preset reaches and costs (docs/measurements.md has the commands).
MEASURED = {
    "basic_rnn": "Fashion-MNIST test accuracy 85.57% after 10 epochs; 1 min 27 s on 2 CPU cores (6,800 images/sec)",
    "lstm": "Fashion-MNIST test accuracy 88.66% after 10 epochs (seeds 2, 3: 89.17%, 88.95%); 2 min 27 s on 2 "
            "CPU cores (4,000 images/sec)",
    "stacked": "Fashion-MNIST test accuracy 89.45% after 10 epochs; 6 min 26 s on 2 CPU cores, one device "
               "(1,500 images/sec)",
    "test": "smoke test; seconds",
}


@dataclasses.dataclass
class RunOptions(JobOptions):
    """How an image-classifier job runs: the options every job has, and this."""
    dataset: str = flag("mnist", "what to download without --data_path (mnist: the digits)", choices=names.DATASETS)
