"""The options of a training run, as opposed to what it trains (the config): one dataclass field per
flag, with the flag's value type, group and help, so that distrnn.cli generates the flags, their
defaults and their help from here (TensorFlow-free: flags are parsed before TensorFlow loads).
"""
import argparse
import dataclasses
from typing import Optional

from distrnn import names
from distrnn.config import read_number, shown
from distrnn.errors import UsageError
from distrnn.memory.estimates import Memory


def number(kind=float, minimum=None, positive: bool = False, maximum=None):
    """An argparse type for a finite int or float in range: nan, inf, a negative count or a fraction
    above 1 stops at parsing, in one line, before anything runs (float('nan') compares false with
    everything, so a later `value <= 0` check would let it through)."""
    def parse(text: str):
        try:
            return read_number(text, kind, minimum, positive, maximum)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


COUNT = number(int, minimum=0)             # 0 meaning none, or not set
POSITIVE_INT = number(int, positive=True)
FRACTION = number(float, positive=True, maximum=1)  # of memory in use: (0, 1]
# Shorter would keep a core busy sampling; longer than an hour samples nothing worth having (and 1e300 s
# overflows the wait of the sampling thread).
SAMPLE_SECONDS = number(float, minimum=0.1, maximum=3600)
# Devices of one process: more GPUs than any machine holds (16), more logical devices than are worth
# their start-up (100,000 took 100 s to create); a typo's two billion would be listed until memory ran out.
MAX_DEVICES = 64
DEVICE_COUNT = number(int, minimum=0, maximum=MAX_DEVICES)


# The groups flags are shown in (None: the parser's top level).
DEVICES, RANKS, MEMORY = ("devices (model parallelism)", "several processes (horovodrun, TF_CONFIG, srun, "
                           "launch/one_node.sh)", "memory")
PRECISION = "precision"


def precision_of(precision: Optional[str], use_fp16: bool) -> str:
    """What a model computes in, from --precision (None: not given) and TensorFlow 1's --use_fp16, refused
    where they disagree (every entry point and library caller goes through here)."""
    if use_fp16 and precision not in (None, "float16"):
        raise UsageError(f"--use_fp16 means --precision float16, and --precision {precision} was given too; pass one "
                         "of them")
    return "float16" if use_fp16 else precision or "float32"


def check_field(name: str, value, meta, kind) -> None:
    """A run option's value as the flag --NAME would take it (its parser's range, its choices)."""
    if kind in (bool, "bool"):
        if not isinstance(value, bool):
            raise UsageError(f"--{name} is a switch (True or False), got {shown(repr(value))}")
        return
    if meta["choices"] is not None and value not in meta["choices"]:
        raise UsageError(f"--{name} must be one of {', '.join(meta['choices'])}, got {shown(repr(value))}")
    if meta["type"] is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UsageError(f"--{name} takes a number, got {shown(repr(value))}")
        try:
            meta["type"](str(value))
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"--{name} {e}") from None


def flag(default, help: str, type=None, group: Optional[str] = None, choices=None, metavar: Optional[str] = None,
         default_text: Optional[str] = None):
    """A field of a run's options that is also a flag --NAME: `type` parses its value (bool fields are
    switches); help ends with the default, or with default_text when given ("" for none)."""
    return dataclasses.field(default=default, metadata=dict(help=help, type=type, group=group, choices=choices,
                                                            metavar=metavar, default_text=default_text))


@dataclasses.dataclass
class JobOptions:
    """How a training job runs. Every job's RunOptions extends these with its own."""
    data_path: Optional[str] = flag(None, "{data_help}", default_text="")
    save_path: Optional[str] = flag(None, "where checkpoints, TensorBoard logs, plots and config.json go",
                                    default_text="runs/{job}-CONFIG-TIME")
    resume: bool = flag(False, "continue from the latest checkpoint in --save_path (starts fresh when there is none)")
    max_epochs: int = flag(0, "stop after N epochs in all", COUNT, default_text="the preset's")
    max_steps: int = flag(0, "stop after N training steps in all", COUNT, default_text="no limit")
    metrics_json: Optional[str] = flag(None, "write the final figures to this JSON file", default_text="")
    seed: int = flag(1, "seed for weights, dropout and shuffling", number(int, minimum=0, maximum=2**31 - 1))
    checkpoint_every: int = flag(500, "steps between checkpoints; one is also saved after every epoch", POSITIVE_INT)
    early_stopping: int = flag(0, "stop after N epochs without a better validation figure (perplexity, accuracy); "
                               "the best epoch's weights are kept in SAVE_PATH/best either way", COUNT,
                               metavar="N", default_text="off")
    devices: Optional[str] = flag(None, "comma-separated devices for the model's parts, e.g. /gpu:0,/gpu:1",
                                  group=DEVICES, default_text="")
    num_gpus: int = flag(0, "use /gpu:0 ... /gpu:N-1", DEVICE_COUNT, DEVICES, default_text="")
    virtual_devices: int = flag(0, "split the CPU into N logical devices (at most 64) and place the model on them",
                                DEVICE_COUNT, DEVICES, default_text="")
    strategy: str = flag("round_robin", "how parts are mapped to devices", group=DEVICES, choices=names.STRATEGIES)
    placement: str = flag("sequential", "sequential: one layer after another; pipeline: a wavefront so all devices "
                          "work at once", group=DEVICES, choices=names.PLACEMENTS)
    engine: str = flag("auto", "what joins the processes and runs their collectives: horovod (horovodrun, MPI, srun "
                       "where Horovod loads), tensorflow (TensorFlow's own collectives: TF_CONFIG, srun, "
                       "launch/one_node.sh; every TensorFlow version), auto: horovod where it launched the processes "
                       "or runs the srun step, tensorflow where TF_CONFIG is set or Horovod does not load "
                       "(docs/engines.md)", group=RANKS, choices=names.ENGINES)
    gpus_per_rank: int = flag(0, "GPUs each rank owns (rank r: local GPUs r*K ... r*K+K-1), its layers placed across "
                              "them", DEVICE_COUNT, RANKS, default_text="one GPU per rank")
    global_batch_size: int = flag(0, "rows of one step over all ranks, split evenly", COUNT, RANKS,
                                  default_text="batch_size x ranks")
    lr_scaling: str = flag("none", "scale the learning rate with global batch / batch_size (see docs/horovod.md)",
                           group=RANKS, choices=names.LR_SCALINGS)
    lr_warmup_steps: int = flag(0, "reach the scaled learning rate linearly over N steps", COUNT, RANKS,
                                default_text="")
    mem_warn: float = flag(0.90, "warn once when a GPU's or the host's memory in use reaches this fraction",
                           FRACTION, MEMORY)
    mem_stop: float = flag(0.97, "save a checkpoint and exit with code 76 when it reaches this fraction", FRACTION,
                           MEMORY)
    mem_interval: float = flag(5.0, "seconds between memory samples", SAMPLE_SECONDS, MEMORY)
    recompute: int = flag(0, "backprop through time keeps every K-th LSTM state and recomputes the rest (K near "
                          "sqrt(num_steps): least memory; about one more forward pass of time)", COUNT, MEMORY,
                          metavar="K", default_text="")
    swap_memory: bool = flag(False, "backprop through time keeps the LSTM activations in host memory, fetched back "
                             "segment by segment (GPU memory of about two segments)", group=MEMORY)
    precision: Optional[str] = flag(None, "what the model computes in; the weights and optimizer state stay float32, "
                                    "the loss and the softmax's normaliser are float32; float16 scales the loss "
                                    "dynamically (docs/precision.md)", group=PRECISION, choices=names.PRECISIONS,
                                    default_text="float32")
    use_fp16: bool = flag(False, "TensorFlow 1's ptb_word_lm.py spelling of --precision float16", group=PRECISION)
    fp16_allreduce: bool = flag(False, "send gradients between ranks in float16 (Horovod's fp16 compression, the "
                                "embedding's rows included), whatever --precision", group=RANKS)
    config_name: str = "custom"  # from --config

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """The one check of a run's options, for the command line and library callers alike (a dataclass
        made or replaced runs it): each value as its flag would parse it, then what they mean together.
        UsageError (exit 2) naming the flags, before anything runs."""
        for field in dataclasses.fields(self):
            value, meta = getattr(self, field.name), field.metadata
            if meta and value is not None:
                check_field(field.name, value, meta, field.type)
        if self.mem_warn > self.mem_stop:
            raise UsageError(f"--mem_warn {self.mem_warn:g} is above --mem_stop {self.mem_stop:g}: the warning must "
                             "come first; lower --mem_warn")
        if self.recompute and self.swap_memory:
            raise UsageError("--recompute and --swap_memory are alternatives: recompute keeps less, swap keeps all "
                             "of it on the host; pass one of them")
        precision_of(self.precision, self.use_fp16)

    @property
    def compute_precision(self) -> str:
        """--precision, or float16 for --use_fp16 (validate refuses the two disagreeing)."""
        return precision_of(self.precision, self.use_fp16)

    @property
    def memory(self) -> Memory:
        return Memory(recompute=self.recompute, swap=self.swap_memory)
