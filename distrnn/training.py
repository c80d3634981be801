"""Pieces every training job shares: checkpoints that never clobber a run,
signal handling, progress lines, TensorBoard, plots and metrics files.

Only the chief process writes; callers pass `world.is_chief`.
"""
import datetime
import json
import math
import os
import platform
import signal
from typing import Dict, List, Optional

import tensorflow as tf

from distrnn import distributed
from distrnn.errors import UsageError


def log(message: str) -> None:
    print(message, flush=True)


def versions() -> Dict[str, Optional[str]]:
    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "horovod": distributed.horovod_version()}


def prepare_save_path(save_path: str) -> str:
    """Creates save_path and proves it writable, or raises UsageError."""
    try:
        os.makedirs(save_path, exist_ok=True)
        probe = os.path.join(save_path, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"cannot write to --save_path {save_path} ({e.strerror}); "
                         "pass a directory you can write to") from None
    return save_path


def check_metrics_path(path: Optional[str]) -> None:
    """Fails at start-up, not after hours of training, when --metrics_json cannot be written."""
    if not path:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise UsageError(f"cannot write --metrics_json {path}: {directory} is not a writable directory")


class Checkpoints:
    """tf.train.CheckpointManager with the rules that keep saved work safe.

    A fresh run refuses a save_path that already holds checkpoints (pass
    --resume to continue it); a restore whose shapes do not match the model
    fails with a UsageError and leaves the checkpoint untouched.
    """

    def __init__(self, checkpoint: tf.train.Checkpoint, save_path: str, max_to_keep: int = 3):
        self.directory = os.path.join(save_path, "checkpoints")
        self.manager = tf.train.CheckpointManager(checkpoint, self.directory, max_to_keep=max_to_keep)
        self.checkpoint = checkpoint

    @property
    def latest(self) -> Optional[str]:
        return self.manager.latest_checkpoint

    def restore_or_start(self, resume: bool, describe_mismatch=None) -> bool:
        """Restores the latest checkpoint when resuming; returns whether one was restored."""
        latest = self.latest
        if latest is None:
            return False
        if not resume:
            raise UsageError(f"--save_path already holds a checkpoint ({latest}); pass --resume to "
                             "continue it, or choose another --save_path for a new run")
        if describe_mismatch is not None:
            problem = describe_mismatch()
            if problem:
                raise UsageError(f"checkpoint {latest} is from another config ({problem}); resume with "
                                 "that config or choose another --save_path")
        try:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
        except (ValueError, AssertionError, tf.errors.InvalidArgumentError) as e:
            first = str(e).strip().splitlines()[0]
            # The half-restored checkpoint object warns about unrestored values when it
            # is collected; the one-line error below says all the user needs.
            tf.get_logger().setLevel("ERROR")
            raise UsageError(f"checkpoint {latest} does not fit this model ({first}); resume with the "
                             "config that wrote it or choose another --save_path") from None
        return True

    def save(self, step: int) -> str:
        return self.manager.save(checkpoint_number=step)


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
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_json(path: str, obj) -> None:
    """Writes atomically, so a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
