"""What a job is to the training loop: `Job`, which each job's module subclasses (distrnn/ptb/job.py,
distrnn/mnist/job.py) and runs through distrnn.run.start.run.

A job supplies what is its own: its data and batches, its learning rate, a training step, validation,
test and figures, and the frozen `Measures` that say what it counts and which figure picks the best
epoch. The base class holds what every distrnn job shares: a recurrent stack resolved for its devices
(the unrolling), the global batch, what config.json records, and the start-up lines and metrics that
describe the model (rnn_mode, precision, memory mode, placement). The loop (distrnn.run.loop) owns
epochs, checkpoints, stops and outputs, and knows no job.

    metrics = distrnn.ptb.job.run(config, options)     # = distrnn.run.start.run(PTBJob, config, options)
"""
import dataclasses
import math
from typing import Dict, NamedTuple, Optional, Tuple

from distrnn import cpu
from distrnn.parallel import local_devices
from distrnn.rnn import Unrolling
from distrnn.run import outputs
from distrnn.run.trainer import Trainer


class Measures(NamedTuple):
    """What a job counts and reports, for the loop's lines and metrics and its choice of the best epoch."""
    unit: str                # what the speed counts: "words", "images"
    rate_key: str            # the metrics key of the speed: "words_per_sec"
    best_key: str            # the validation figure that picks the best epoch: "valid_perplexity"
    higher_is_better: bool   # of best_key
    test_keys: tuple         # the figures `Job.test` returns

    def better(self, figure: float, than: float) -> bool:
        return figure > than if self.higher_is_better else figure < than

    def best_epoch(self, history) -> Optional[int]:
        """The index in `history` of the best validation figure (best_key; the first of equals), or None
        while there is none (no validation yet, no validation split, or only non-finite figures)."""
        scored = [(h[self.best_key], i) for i, h in enumerate(history)
                  if h.get(self.best_key) is not None and math.isfinite(h[self.best_key])]
        if not scored:
            return None
        if self.higher_is_better:
            return max(scored, key=lambda s: (s[0], -s[1]))[1]
        return min(scored)[1]


class Curve(NamedTuple):
    """A plot the loop draws after a run, per epoch, from the history's train_<name> and valid_<name>."""
    name: str               # also the file: SAVE_PATH/<name>.png
    title: str
    log_scale: bool = True


class Job:
    """A training job as the loop sees it. `pos` is the job's Position (distrnn.run.trainer: epoch,
    step_in_epoch, global_step, history, and the job's own sums over the epoch, which the loop resets
    when an epoch ends).

    A subclass sets, as class attributes, `name` (the default save path's prefix), `measures`,
    `shape_fields` (saved_config's keys a checkpoint cannot be resumed under other values of) and
    `absent_fields`; its __init__ sets `trainer`, `plan`, `steps_per_epoch`, `units_per_step`, `max_epochs`,
    `batch_text` and `saved_extra`, and it writes the methods that raise NotImplementedError here."""

    name: str
    measures: Measures
    shape_fields: tuple
    absent_fields: dict = {}  # the value of a shape field that an older config.json does not hold
    trainer: Trainer          # what the loop asks of it: position, checkpoint parts, learning rate, weights' norm
    plan: object              # the placement plan (describe, as_dict)
    steps_per_epoch: int
    units_per_step: int       # over all ranks
    max_epochs: int
    batch_text: str           # "batch_size 128", for the start-up line
    saved_extra: dict         # what config.json holds besides the config's fields and name
    notes: tuple = ()         # start-up lines after the unrolling mode's
    memory_note: str = ""     # said after the memory mode at start-up
    curve: Optional[Curve] = None  # the per-epoch plot

    def __init__(self, config, options, world, devices, reference_batch: int):
        """config: this rank's (batch_size rows on each rank); options: the job's RunOptions (a
        distrnn.options.JobOptions); devices: the layers' ([]: TensorFlow's choice); reference_batch:
        the batch the config's learning rate was chosen for."""
        self.config, self.options, self.world, self.devices = config, options, world, devices
        # Once for the job: its unrolling (the mode, and how float16 sums) and start-up note read it.
        self.on_gpu = local_devices.runs_on_gpu(devices)
        self.global_batch = config.batch_size * world.size
        self.lr_ratio = self.global_batch / reference_batch
        self.on_ranks = f" on each of {world.size} ranks" if world.size > 1 else ""  # for batch_text

    # What every job shares.

    def unrolling(self, num_steps: int) -> Unrolling:
        """How the job's stack runs over sequences of num_steps, from its config, devices and flags."""
        options = self.options
        return Unrolling.for_config(self.config, num_steps, self.on_gpu, options.placement, options.memory,
                                    options.compute_precision)

    @property
    def saved_config(self) -> dict:
        """What config.json holds; a run resumes only under the same shape_fields."""
        return dict(dataclasses.asdict(self.config), **self.saved_extra, name=self.options.config_name)

    @property
    def total_steps(self) -> int:
        steps = self.max_epochs * self.steps_per_epoch
        return min(steps, self.options.max_steps) if self.options.max_steps else steps

    def start_lines(self) -> list:
        """What the job says at start-up: its data, config, how the stack runs (mode, precision, memory),
        its notes, a 16-bit precision this processor only emulates, and where the layers are."""
        unrolling, loss_scale, options = self.trainer.unrolling, self.trainer.loss_scale, self.options
        lines = [self.data_line(),
                 f"config {options.config_name}: " + ", ".join(f"{k}={v}" for k, v in
                                                               dataclasses.asdict(self.config).items()),
                 f"rnn_mode {unrolling.mode} ({unrolling.reason}); precision {unrolling.precision}"
                 + (f" (dynamic loss scale, now {float(loss_scale.scale.numpy()):g})" if loss_scale.enabled else "")
                 + f"; memory mode {options.memory.describe()}" + self.memory_note, *self.notes]
        precision = unrolling.precision
        if not self.on_gpu and cpu.processor().lacks_native(precision):
            flags = cpu.NATIVE_16_BIT[precision]
            lacking = (f"this processor has no native {precision} arithmetic (flags {' or '.join(flags)})" if flags
                       else f"TensorFlow's CPU kernels have no native {precision} arithmetic on any processor")
            lines.append(f"precision {precision}: {lacking}, so every kernel converts to float32 and back: expect it "
                         f"slower than float32 here; the activations still take half the memory (docs/precision.md)")
        if self.devices:
            lines += [*self.plan.describe(), f"placement {options.placement}"]
        return lines

    def model_metrics(self) -> dict:
        """The end-of-run metrics that describe the model and how it ran."""
        trainer, options = self.trainer, self.options
        return {"config": dataclasses.asdict(self.config), "config_name": options.config_name,
                "rnn_mode": trainer.unrolling.mode, "precision": trainer.unrolling.precision,
                "loss_scale": trainer.loss_scale.metrics() if trainer.loss_scale.enabled else None,
                "fp16_allreduce": options.fp16_allreduce,
                "placement": dict(self.plan.as_dict(), schedule=options.placement)}

    # What a job writes.

    def data_line(self) -> str:
        """The start-up line that describes the data."""
        raise NotImplementedError

    def learning_rate(self, pos) -> float:
        """The rate for the next step (the loop asks at an epoch's start and during warm-up, and sets it)."""
        raise NotImplementedError

    def begin_epoch(self, pos) -> None:
        """Before the first step of an epoch, or of a resumed part of one."""

    def step(self, pos, i: int) -> Dict[str, float]:
        """Training step i of the epoch; adds to pos's sums; returns the figures that must be finite.
        OutOfMemory (or TensorFlow's ResourceExhaustedError) when it cannot run: the loop saves the position
        before it and stops."""
        raise NotImplementedError

    def figures(self, pos) -> Tuple[str, Dict[str, float]]:
        """The progress line's figures and TensorBoard's scalars for the epoch so far."""
        raise NotImplementedError

    def divergence_advice(self, lr: float) -> str:
        raise NotImplementedError

    def validate(self, pos, lr: float) -> Tuple[Dict, str, Dict[str, float]]:
        """After an epoch: its history entry, the line's figures, TensorBoard's scalars."""
        raise NotImplementedError

    def finish(self, pos, speed: outputs.Speed) -> Tuple[Dict, str, Dict, Dict]:
        """The final evaluation: (the job's metrics, the done line's figures, TensorBoard's scalars, the
        figure each rank reports in metrics["ranks"])."""
        raise NotImplementedError

    def test(self) -> Dict[str, float]:
        """The test figures (measures.test_keys) of the weights the trainer holds now (a collective)."""
        raise NotImplementedError

    # What a job may add.

    def record(self, pos, end_of_epoch: bool) -> None:
        """Copies what resumes the run into the checkpointed variables (every rank: it may be a collective)."""
        self.trainer.record(pos)

    def write_run_files(self, save_path: str) -> None:
        """Files the job keeps beside config.json (the chief, once the run is open)."""

    def plot(self, pos, save_path: str) -> None:
        """The job's own plots, after the metrics file (the loop draws `curve`)."""

    def memory_metrics(self, monitor: Dict) -> Dict:
        return monitor

