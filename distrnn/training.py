"""Pieces every training job shares: start-up (run_job), signal handling, the
stop for a diverged step, progress lines, TensorBoard, plots and metrics files
(the save path and its checkpoints are distrnn.checkpoints).

Only the chief process writes; callers pass `world.is_chief`.
"""
import dataclasses
import datetime
import math
import os
import platform
import signal
import threading
import time
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

from distrnn import checkpoints, cpu, distributed, memory, placement
from distrnn.checkpoints import Checkpoints
from distrnn.errors import Diverged, Interrupted, OutOfMemory, UsageError
from distrnn.rnn import Memory


@dataclasses.dataclass
class JobOptions:
    """How a training job runs, as opposed to what it trains (the config). Every entry point's
    RunOptions extends these; the flags of the same names are in distrnn.cli."""
    data_path: Optional[str] = None      # the data set's directory; None: download to the cache
    save_path: Optional[str] = None      # checkpoints, TensorBoard, plots; None: runs/<job>-<config>-<time>
    resume: bool = False                 # continue from the latest checkpoint in save_path
    max_epochs: int = 0                  # stop after this many epochs in all (0: the config's)
    max_steps: int = 0                   # stop after this many training steps in all (0: no limit)
    metrics_json: Optional[str] = None   # write the final figures here
    seed: int = 1                        # weights, dropout masks, shuffling
    checkpoint_every: int = 500          # steps between checkpoints (also saved after every epoch)
    devices: Optional[str] = None        # comma-separated devices for the layers, e.g. /gpu:0,/gpu:1
    num_gpus: int = 0                    # use /gpu:0 ... /gpu:N-1
    virtual_devices: int = 0             # split the CPU into N logical devices and use them
    strategy: str = "round_robin"        # placement strategy: round_robin or balanced
    placement: str = "sequential"        # sequential or pipeline (wavefront across the layers' devices)
    gpus_per_rank: int = 0               # rank r owns local GPUs r*K ... r*K+K-1 and places its layers on them
    global_batch_size: int = 0           # rows of one step over all ranks (0: batch_size x ranks)
    lr_scaling: str = "none"             # none, linear or sqrt in global batch / the config's batch_size
    lr_warmup_steps: int = 0             # ramp from the unscaled to the scaled learning rate over N steps
    mem_warn: float = 0.90               # warn once when device or host memory in use reaches this fraction
    mem_stop: float = 0.97               # checkpoint and exit (code 76) when it reaches this fraction
    mem_interval: float = 5.0            # seconds between memory samples
    recompute: int = 0                   # K > 0: backprop through time keeps every K-th LSTM state, recomputes the rest
    swap_memory: bool = False            # backprop through time keeps the LSTM activations in host memory
    config_name: str = "custom"

    @property
    def memory(self) -> Memory:
        return Memory(recompute=self.recompute, swap=self.swap_memory)


def default_save_path(job: str, config_name: str) -> str:
    return os.path.join("runs", f"{job}-{config_name}-{time.strftime('%Y%m%d-%H%M%S')}")


def run_job(job: str, config, options: JobOptions, body, world=None):
    """What starts every job: joins the World (distributed.init), sets up the devices asked for (before
    anything runs on TensorFlow's devices, which a collective does), agrees on the save path (a default
    has the start time in it: every rank takes rank 0's), gives each rank its share of
    --global_batch_size, checks that every rank runs the same config and options, takes the save path's
    lock (one run at a time), checks that --metrics_json can be written, and returns
    body(config for this rank, world, save_path, devices), a collective broken by a lost rank turned
    into RankLost and a signal outside the training loop's own handling (start-up, evaluation) into
    Interrupted."""
    world = world or distributed.init(options.gpus_per_rank)
    if world.is_chief:
        log(f"machine: {cpu.describe_machine()}")
    devices = placement.job_devices(options.devices, options.num_gpus, options.virtual_devices, options.gpus_per_rank)
    save_path = world.broadcast_object(options.save_path or default_save_path(job, options.config_name))
    locks = []
    with distributed.stop_if_a_rank_is_lost(
            world, f"the checkpoints in {save_path} are intact: start the whole job again with --resume"), \
            SignalsInterrupt(save_path):
        try:
            config = distributed.per_rank_config(config, options.global_batch_size, world)
            config.validate()
            distributed.check_same_run(world, config, options)
            distributed.on_chief(world, lambda: locks.append(checkpoints.SavePathLock(save_path)))
            distributed.on_chief(world, lambda: check_metrics_path(options.metrics_json))
            return body(config, world, save_path, devices)
        except tf.errors.ResourceExhaustedError as error:  # a training step's own is handled in the loop
            raise OutOfMemory(f"ran out of memory outside a training step ({memory.oom_reason(error)}): where the "
                              "model's weights do not fit, lower --hidden_size or --num_layers, or spread the layers "
                              "over more devices (--num_gpus N); python -m distrnn.devices --plan estimates what "
                              "each device needs") from None
        finally:
            for lock in locks:
                lock.release()


class _Signalled(BaseException):
    """SIGTERM or SIGUSR1 outside the training loop, raised where the program is (as SIGINT's
    KeyboardInterrupt is), so it ends in SignalsInterrupt's one line instead of a silent death."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class SignalsInterrupt:
    """Turns SIGINT, SIGTERM and SIGUSR1 that arrive outside the training loop (which saves and stops on
    its own: StopSignal) into Interrupted: one line saying what the save path holds, exit 128 + signal."""

    def __init__(self, save_path: str):
        self.save_path = save_path
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._previous[sig] = signal.signal(sig, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise _Signalled(signum)

    def __exit__(self, kind, error, tb):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if kind is KeyboardInterrupt or kind is _Signalled:
            signum = signal.SIGINT if kind is KeyboardInterrupt else error.signum
            raise Interrupted(interrupted_message(self.save_path, signum), 128 + signum) from None
        return False


def interrupted_message(save_path: str, signum: int) -> str:
    directory = os.path.join(save_path, "checkpoints")
    found = sorted(n for n, names in checkpoints.checkpoint_files(directory).items()
                   if checkpoints.incomplete_reason(names) is None)
    name = signal.Signals(signum).name
    if not found:
        return f"interrupted by {name} before the first checkpoint: nothing was saved"
    return (f"interrupted by {name} outside a training step; the checkpoints in {directory} are intact (newest "
            f"ckpt-{found[-1]}): continue with --resume --save_path {save_path}")


def check_finite(step: int, figures: Dict[str, float], checkpoints_: Checkpoints, advice: str) -> None:
    """Stops a run whose step `step` gave a figure (loss, perplexity, gradient norm) that is inf or nan
    (Diverged), before anything saves its weights, which that step's update has broken. Every rank sees
    the same figures (each is averaged over the ranks), so every rank stops at the same step."""
    bad = [f"{name} is {value}" for name, value in figures.items() if not math.isfinite(value)]
    if not bad:
        return
    what = " and the ".join(bad)
    if checkpoints_.manager is None:  # not the chief: only it knows which checkpoint is the last
        rest = f"its weights were not saved; the newest checkpoint in {checkpoints_.directory} is the last good one"
    elif checkpoints_.latest:
        rest = f"its weights were not saved; the last good checkpoint is {checkpoints_.latest}"
    else:
        rest = "nothing was saved before it"
    then = "continue with --resume" if checkpoints_.latest or checkpoints_.manager is None else "start again"
    raise Diverged(f"step {step}: the {what}, so training diverged; {rest}: {advice}, then {then}")


class Watch:
    """What a training loop watches besides its steps: signals (StopSignal) and memory (a
    MemoryMonitor from the job's --mem_* flags), with every decision to stop agreed by all ranks.

        with Watch(world, options) as watch:
            ... a step ...
            watch.warn()                   # a memory warning, once, on the rank it concerns
            code = watch.stop_code()       # a collective: None to go on
        if code:
            ... save ...
            watch.report_stop(code, ...)
    """

    def __init__(self, world, options: JobOptions):
        self.world = world
        self.signals = StopSignal()
        self.monitor = memory.MemoryMonitor(options.mem_warn, options.mem_stop, options.mem_interval,
                                            owned_gpus=world.owned_gpus)

    def __enter__(self) -> "Watch":
        self.signals.__enter__()
        self.monitor.start()
        return self

    def __exit__(self, *exc):
        self.monitor.close()
        return self.signals.__exit__(*exc)

    def say(self, message: str) -> None:
        """Logs on any rank (prefixed with the rank under Horovod): memory matters wherever it runs short."""
        log(message if self.world.size == 1 else f"rank {self.world.rank}: {message}")

    def warn(self) -> None:
        warning = self.monitor.take_warning()
        if warning:
            self.say(f"warning: {warning}")

    def stop_code(self) -> Optional[int]:
        return agreed_stop(self.world, self.signals.signum, self.monitor.stop_reason is not None)

    def report_stop(self, code: int, checkpoints: "Checkpoints", save_path: str, out_of_memory: str = None) -> None:
        """After every rank agreed to stop with `code` and the chief saved a checkpoint: keeps every rank
        until then (a launcher that sees one rank exit non-zero stops the others: srun --kill-on-bad-exit,
        horovodrun) and says why it stopped and how to continue. out_of_memory: what a failed step said."""
        if self.world.size > 1:
            self.world.allreduce_sum([0.0])  # the barrier
        where = f"checkpoint saved in {checkpoints.directory}"
        if code == OutOfMemory.exit_code:
            reason = out_of_memory or f"memory ran short ({self.monitor.stop_reason or 'on another rank'})"
            self.say(f"stopped: {reason}; {where}. {memory.ADVICE} Then continue with --resume --save_path {save_path}")
        elif self.world.is_chief:
            log(f"stopped by signal: {where}; continue with --resume --save_path {save_path}")


def agreed_stop(world, signum: Optional[int], memory_short: bool) -> Optional[int]:
    """The exit code every rank stops with after this step, or None to go on. A collective: every
    rank must stop at the same step, or the others wait forever in the next one. Memory running
    short on any rank (OutOfMemory's code) comes first, else the largest signal any rank got."""
    signum, short = signum or 0, int(memory_short)
    if world.size > 1:
        signum, short = (int(v) for v in world.allgather(np.array([[signum, short]])).max(axis=0))
    return OutOfMemory.exit_code if short else (StopSignal.exit_code(signum) if signum else None)


def log(message: str) -> None:
    print(message, flush=True)


def versions() -> Dict[str, Optional[str]]:
    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "horovod": distributed.horovod_version()}


def check_metrics_path(path: Optional[str]) -> None:
    """Fails at start-up, not after hours of training, when --metrics_json cannot be written (run after
    the save path exists, so --metrics_json SAVE_PATH/m.json is fine)."""
    if not path:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"--metrics_json {path} is a directory; name a file in it, e.g. "
                         f"{os.path.join(path, 'metrics.json')}")
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise UsageError(f"cannot write --metrics_json {path}: {directory} is not a writable directory")
    if os.path.lexists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"cannot write --metrics_json {path}: the file is not writable; make it writable or "
                         "name another file")


class StopSignal:
    """Turns the first SIGINT, SIGTERM or SIGUSR1 into a flag the training loop checks between
    steps, so it can save a checkpoint and exit cleanly; a second signal interrupts at once.
    SIGUSR1 is what Slurm sends ahead of a job's time limit (sbatch --signal=USR1@SECONDS);
    SIGTERM what it sends on scancel, requeue and preemption."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    @staticmethod
    def exit_code(signum: int) -> int:
        # The shell convention: 130 for SIGINT, 143 for SIGTERM, 138 for SIGUSR1.
        return 128 + signum


class SGD(tf.Module):
    """Plain stochastic gradient descent with gradient clipping folded in: one
    fused kernel per variable, var -= (learning_rate * clip_factor) * grad.

    tf.keras's SGD followed by tf.clip_by_global_norm passes over each dense
    gradient three times (scale by the clip factor, scale by the learning rate,
    add) and over the variable once more; on the PTB small step that is 1 ms
    of the softmax weights' 4.8 MB alone. Holds what a checkpoint needs to
    resume: the learning rate and the step count.
    """

    def __init__(self, learning_rate: float, name: str = "sgd"):
        super().__init__(name=name)
        self.learning_rate = tf.Variable(float(learning_rate), trainable=False, name="learning_rate")
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")

    def apply(self, grads, variables, clip_norm: float = None):
        """Updates `variables` with `grads` (dense or IndexedSlices), first scaling all
        of them by clip_norm / max(global norm, clip_norm) when clip_norm is given, as
        tf.clip_by_global_norm does. Returns the global norm (None without clipping)."""
        alpha = tf.convert_to_tensor(self.learning_rate)
        norm = None
        if clip_norm is not None:
            norm = tf.linalg.global_norm(grads)
            alpha = alpha * (clip_norm / tf.maximum(norm, clip_norm))
        for grad, variable in zip(grads, variables):
            if isinstance(grad, tf.IndexedSlices):
                variable.scatter_sub(tf.IndexedSlices(grad.values * alpha, grad.indices, grad.dense_shape))
            else:
                tf.raw_ops.ResourceApplyGradientDescent(var=variable.handle, alpha=alpha, delta=grad)
        self.iterations.assign_add(1)
        return norm


class Speed:
    """Words (or examples) per second over training steps, leaving out the first
    `warmup` steps of the process (tracing and graph building) and time spent
    outside training steps (evaluation, checkpoints)."""

    def __init__(self, warmup: int = 5):
        self.warmup, self.steps, self.units, self.seconds = warmup, 0, 0, 0.0

    def add(self, units: int, seconds: float) -> None:
        self.steps += 1
        if self.steps > self.warmup:
            self.units += units
            self.seconds += seconds

    @property
    def seconds_per_step(self) -> float:
        timed = self.steps - self.warmup
        return self.seconds / timed if timed > 0 else float("nan")

    @property
    def rate(self) -> float:
        return self.units / self.seconds if self.seconds > 0 else float("nan")


def progress_line(pos, max_epochs: int, steps_per_epoch: int, total_steps: int, figures: str, lr: float,
                  speed: Speed, unit: str, memory_summary: str = "") -> str:
    """`epoch E/N step S/M (P%) | FIGURES | lr | RATE UNIT/sec | eta | memory` for a Position-like `pos`
    (epoch, step_in_epoch, global_step)."""
    line = (f"epoch {pos.epoch + 1}/{max_epochs} step {pos.step_in_epoch}/{steps_per_epoch} "
            f"({100 * pos.step_in_epoch / steps_per_epoch:.0f}%) | {figures} | lr {lr:.4g}")
    if not speed.seconds:
        return f"{line} | {unit}/sec after {speed.warmup} steps"
    eta = (total_steps - pos.global_step) * speed.seconds_per_step
    line = f"{line} | {speed.rate:7.0f} {unit}/sec | eta {format_duration(eta)}"
    return f"{line} | {memory_summary}" if memory_summary else line


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


class TensorBoard:
    """Scalar summaries under save_path/tensorboard (chief only; a no-op elsewhere)."""

    def __init__(self, save_path: Optional[str], enabled: bool):
        self.writer = tf.summary.create_file_writer(os.path.join(save_path, "tensorboard")) \
            if enabled and save_path else None

    def scalars(self, step: int, **values: float) -> None:
        if self.writer is None:
            return
        with self.writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(path: str, title: str, ylabel: str, curves: Dict[str, List[float]], log_scale: bool = True) -> None:
    """One line per curve against epoch (1-based), saved as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, values in curves.items():
        points = [(i + 1, v) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if log_scale:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: str) -> None:
    """Saves a matplotlib figure as PNG and closes it; a plot that cannot be written (a full disk) is a
    warning, not the end of a run whose figures are already in its metrics file."""
    import matplotlib.pyplot as plt
    try:
        fig.savefig(path)
    except OSError as e:
        log(f"warning: could not write {path} ({e.strerror or e})")
    finally:
        plt.close(fig)
