"""Presets of the PTB word language model (Zaremba, Sutskever & Vinyals 2014).

The hyperparameters are those of TensorFlow 1's ptb_word_lm.py. Published
perplexities are on the full PTB (929k training words, vocabulary 10,000) with
the reference implementation:

| preset | layers x units | steps | keep_prob | epochs | params | train | valid  | test   |
| ------ | -------------- | ----- | --------- | ------ | ------ | ----- | ------ | ------ |
| small  | 2 x 200        | 20    | 1.0       | 13     | 4.6M   | 37.99 | 121.39 | 115.91 |
| medium | 2 x 650        | 35    | 0.5       | 39     | 19.8M  | 48.45 |  86.16 |  82.07 |
| large  | 2 x 1500       | 35    | 0.35      | 55     | 66.0M  | 37.87 |  82.62 |  78.29 |

Expected cost: the paper trains medium in about half a day and large in about
a day on one NVIDIA K20 GPU. `small` on full PTB is 2,323 steps an epoch; at
the words/sec that `bench/ptb_speed.py` measures on the target machine, an
epoch takes (929,589 / words_per_sec) seconds (docs/measurements.md lists measured figures).
`test` is a two-unit model for smoke tests: seconds on any machine.
"""
import dataclasses

from distrnn.config import Registry, check, check_recurrence
from distrnn.options import MEMORY, RANKS, JobOptions, flag


@dataclasses.dataclass(frozen=True)
class PTBConfig:
    init_scale: float = 0.1      # weights start uniform in [-init_scale, init_scale]
    learning_rate: float = 1.0   # SGD learning rate before decay
    max_grad_norm: float = 5.0   # clip gradients to this global norm
    num_layers: int = 2          # stacked LSTM layers
    num_steps: int = 20          # truncated-backprop window (time steps per batch)
    hidden_size: int = 200       # LSTM units, also the embedding size
    max_epoch: int = 4           # epochs at the initial learning rate
    max_max_epoch: int = 13      # total epochs
    keep_prob: float = 1.0       # dropout keep probability on non-recurrent connections
    lr_decay: float = 0.5        # learning rate multiplier per epoch after max_epoch
    batch_size: int = 20         # rows of the token stream trained in parallel
    rnn_mode: str = "auto"       # how the recurrence runs: static, dynamic, block, cudnn or auto (fastest here)
    cell: str = "lstm"           # recurrent cell: lstm, gru or rnn (basic tanh RNN)
    use_peepholes: bool = False  # LSTM peephole connections (not with rnn_mode cudnn)
    tie_embeddings: bool = False  # the softmax weights are the embedding's (Press & Wolf 2017; Inan et al. 2017)

    def validate(self) -> None:
        for name in ("num_layers", "num_steps", "hidden_size", "max_epoch", "max_max_epoch", "batch_size"):
            value = getattr(self, name)
            check(value > 0, f"{name} must be positive, got {value}; pass --{name} N with N >= 1")
        for name in ("init_scale", "learning_rate", "max_grad_norm"):
            value = getattr(self, name)
            check(value > 0, f"{name} must be positive, got {value}; pass --{name} X with X > 0")
        # 1 - keep_prob must stay below 1 in float: 5e-324 is in (0, 1] but drops everything (rate 1.0).
        check(0.0 < self.keep_prob <= 1.0 and 1.0 - self.keep_prob < 1.0,
              f"keep_prob must be in (0, 1] and leave 1 - keep_prob below 1 in float, got {self.keep_prob}; pass "
              "--keep_prob 1.0 for no dropout")
        check(0.0 < self.lr_decay <= 1.0, f"lr_decay must be in (0, 1], got {self.lr_decay}")
        check_recurrence(self.cell, self.rnn_mode, self.use_peepholes, self.num_layers)

    def learning_rate_at(self, epoch: int) -> float:
        """The reference schedule: constant for max_epoch epochs, then decayed (epoch is 0-based)."""
        return self.learning_rate * self.lr_decay ** max(epoch + 1 - self.max_epoch, 0)


PRESETS = Registry()
PRESETS.register("small", PTBConfig())
PRESETS.register("medium", PTBConfig(
    init_scale=0.05, num_steps=35, hidden_size=650, max_epoch=6, max_max_epoch=39,
    keep_prob=0.5, lr_decay=0.8))
PRESETS.register("large", PTBConfig(
    init_scale=0.04, max_grad_norm=10.0, num_steps=35, hidden_size=1500, max_epoch=14,
    max_max_epoch=55, keep_prob=0.35, lr_decay=1 / 1.15))
PRESETS.register("test", PTBConfig(
    max_grad_norm=1.0, num_layers=1, num_steps=2, hidden_size=2, max_epoch=1, max_max_epoch=1))

# Published test perplexity on full PTB (reference implementation) and cost.
PUBLISHED = {
    "small": (115.91, "13 epochs; minutes per epoch on a GPU, see docs/measurements.md for CPU figures"),
    "medium": (82.07, "39 epochs; about half a day on one K20 GPU (paper)"),
    "large": (78.29, "55 epochs; about a day on one K20 GPU (paper)"),
    "test": (None, "smoke test; seconds"),
}


@dataclasses.dataclass
class RunOptions(JobOptions):
    """How a PTB job runs: the options every job has, and these."""
    sparse_as_dense: bool = flag(False, "allreduce the embedding gradient as a dense tensor instead of allgathering "
                                 "its rows", group=RANKS)
    on_oom: str = flag("stop", "a step that runs out of memory: stop (checkpoint, exit 76) or retry it with "
                       "--recompute, then --swap_memory, and go on (one process only)", group=MEMORY,
                       choices=("stop", "retry"))
