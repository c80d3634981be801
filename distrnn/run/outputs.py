"""What a run shows and leaves behind besides its checkpoints: log and progress lines, its speed,
TensorBoard scalars, plots."""
import datetime
import math
import os
from typing import Dict, List, Optional

import tensorflow as tf

from distrnn import compat
from distrnn.run import files


def log(message: str) -> None:
    print(message, flush=True)


def say(world, message: str) -> None:
    """Logs on any rank, prefixed with the rank under Horovod (where the chief alone would not know)."""
    log(message if world.size == 1 else f"rank {world.rank}: {message}")


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
    """Scalar summaries under save_path/tensorboard (chief only; a no-op elsewhere). Where the tensorboard
    package is missing (tensorflow-cpu >= 2.20 no longer brings it, and a --no-deps install may lack it) the
    run says so once and writes no logs, rather than failing at its first summary."""

    def __init__(self, save_path: Optional[str], enabled: bool):
        self.writer = None
        if not (enabled and save_path):
            return
        missing = compat.tensorboard_missing()
        if missing:
            log(f"no TensorBoard logs: {missing}")
            return
        self.writer = tf.summary.create_file_writer(os.path.join(save_path, "tensorboard"))

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
    lines = {label: [(i + 1, v) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
             for label, values in curves.items()}
    files.save_lines(path, lines, title, "epoch", ylabel, log_y=log_scale)
