"""The one training loop every job plugs into.

A job supplies what is its own (see `Job`): its batches and step, its validation and test, its
figures. The loop owns the rest: epochs and steps, the learning rate's application, checkpoints
(the cadence, and the one saved on a stop), the stops every rank agrees on (signals, memory,
divergence), progress lines, TensorBoard, the end-of-run metrics, plots and the metrics file.

    job = PTBJob(...)                       # distrnn/ptb/train.py, made by distrnn.run.start.run_job
    metrics = loop.train(job, world, options, save_path, start_time)
"""
import dataclasses
import math
import os
import platform
import time
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np
import tensorflow as tf

from distrnn import compat, cpu, parallel
from distrnn.errors import OutOfMemory
from distrnn.memory import monitor
from distrnn.memory.monitor import ADVICE
from distrnn.numerics import ops
from distrnn.numerics.precision import LossScale
from distrnn.parallel import local_devices
from distrnn.rnn import Unrolling
from distrnn.run import faults, outputs, stops
from distrnn.run.checkpoints import Checkpoints
from distrnn.run.files import write_json
from distrnn.run.outputs import log
from distrnn.run.trainer import Trainer


class Curve(NamedTuple):
    """A plot the loop draws after a run, per epoch, from the history's train_<name> and valid_<name>."""
    name: str               # also the file: SAVE_PATH/<name>.png
    title: str
    log_scale: bool = True


class Job:
    """What a job gives the loop. `pos` is the job's Position (a dataclass saved with every checkpoint:
    epoch, step_in_epoch, global_step, history, and the job's own sums over the epoch)."""

    unit: str                # what the speed counts: "words", "images"
    rate_key: str            # the metrics key of the speed: "words_per_sec"
    shape_fields: tuple      # saved_config's keys a checkpoint cannot be resumed under other values of
    absent_fields: dict = {}  # the value of a shape field that an older config.json does not hold
    steps_per_epoch: int
    units_per_step: int      # over all ranks
    max_epochs: int
    global_batch: int
    batch_text: str          # "batch_size 128", for the start-up line
    saved_extra: dict        # what config.json holds besides the config's fields and name
    trainer: Trainer         # distrnn.run.trainer: what the loop asks of it (position, checkpoint parts,
                             # learning rate, weights' norm, loss scale, unrolling, sharing from the chief)
    plan: object             # the placement plan (describe, as_dict)
    best_key: str            # the validation figure that picks the best epoch: "valid_perplexity"
    higher_is_better: bool   # of best_key
    test_keys: tuple         # the figures `test` returns
    memory_note: str = ""    # said after the memory mode at start-up
    notes: tuple = ()        # start-up lines after the unrolling mode's
    curve: Optional[Curve] = None  # the per-epoch plot

    def __init__(self, config, options, world, devices, reference_batch: int):
        """config: this rank's (batch_size rows on each rank); options: the job's RunOptions (a
        distrnn.options.JobOptions); devices: the layers' ([]: TensorFlow's choice); reference_batch:
        the batch the config's learning rate was chosen for."""
        self.config, self.options, self.world, self.devices = config, options, world, devices
        # Once for the job: its models' matmuls (distrnn.numerics.ops), its unrolling mode and start-up note read it.
        self.on_gpu = local_devices.runs_on_gpu(devices)
        ops.float16_matmuls_on_gpu(self.on_gpu)
        self.global_batch = config.batch_size * world.size
        self.lr_ratio = self.global_batch / reference_batch
        self.on_ranks = f" on each of {world.size} ranks" if world.size > 1 else ""  # for batch_text

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

    def data_line(self) -> str:
        """The start-up line that describes the data."""
        raise NotImplementedError

    def write_run_files(self, save_path: str) -> None:
        """Files the job keeps beside config.json (the chief, once the run is open)."""

    def learning_rate(self, pos) -> float:
        """The rate for the next step (the loop asks at an epoch's start and during warm-up, and sets it)."""
        raise NotImplementedError

    def begin_epoch(self, pos) -> None:
        """Before the first step of an epoch, or of a resumed part of one."""

    def train_step(self, pos, i: int) -> Dict[str, float]:
        """Step i of the epoch; adds to pos's sums; returns the figures that must be finite. OutOfMemory
        (or TensorFlow's ResourceExhaustedError) when it cannot run: the loop saves the position before it
        and stops."""
        raise NotImplementedError

    def figures(self, pos) -> Tuple[str, Dict[str, float]]:
        """The progress line's figures and TensorBoard's scalars for the epoch so far."""
        raise NotImplementedError

    def divergence_advice(self, lr: float) -> str:
        raise NotImplementedError

    def record(self, pos, end_of_epoch: bool) -> None:
        """Copies what resumes the run into the checkpointed variables (a collective)."""
        raise NotImplementedError

    def validate(self, pos, lr: float) -> Tuple[Dict, str, Dict[str, float]]:
        """After an epoch: its history entry, the line's figures, TensorBoard's scalars."""
        raise NotImplementedError

    def end_epoch(self, pos) -> None:
        """Resets the job's sums for the next epoch."""

    def finish(self, pos, speed: outputs.Speed) -> Tuple[Dict, str, Dict, Dict]:
        """The final evaluation: (the job's metrics, the done line's figures, TensorBoard's scalars, the
        figure each rank reports in metrics["ranks"])."""
        raise NotImplementedError

    def test(self) -> Dict[str, float]:
        """The test figures (test_keys) of the weights the trainer holds now (a collective)."""
        raise NotImplementedError

    def plot(self, pos, save_path: str) -> None:
        """The job's own plots, after the metrics file (the loop draws `curve`)."""

    def memory_metrics(self, monitor: Dict) -> Dict:
        return monitor


def train(job: Job, world, options, save_path: str, started: float) -> dict:
    """Opens the run in save_path (rank 0 alone touches it and restores; its outcome, or its error,
    reaches every rank), shares rank 0's weights and position, logs the start and runs the loop."""
    # The loss scale came after runs were saved without one: those resume with its initial value.
    checkpoints = Checkpoints(job.trainer.checkpoint_parts(), save_path, optional=(LossScale.PART,))

    def open_run():
        resumed = checkpoints.open_run(options.resume, job.saved_config, job.shape_fields, job.absent_fields)
        job.write_run_files(save_path)
        history = job.trainer.position().history
        best = best_epoch(job, history)
        steps = epoch_steps(history, job.steps_per_epoch)
        return resumed, checkpoints.settle_best(None if best is None else steps[best], steps)

    resumed, best_step = parallel.on_chief(world, open_run)
    job.trainer.share_from_chief()
    if world.is_chief:
        _log_start(job, options, checkpoints, resumed, save_path)
    return _Run(job, world, options, checkpoints, save_path, best_step).run(started)


def _log_start(job: Job, options, checkpoints, resumed: bool, save_path: str) -> None:
    """The start-up lines every job logs: its data, config, unrolling and memory mode, placement, the
    schedule, what was found in the save path."""
    trainer = job.trainer
    log(job.data_line())
    log(f"config {options.config_name}: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(job.config).items()))
    log(f"rnn_mode {trainer.unrolling.mode} ({trainer.unrolling.reason}); precision {trainer.unrolling.precision}"
        + (f" (dynamic loss scale, now {float(trainer.loss_scale.scale.numpy()):g})" if trainer.loss_scale.enabled
           else "") + f"; memory mode {options.memory.describe()}" + job.memory_note)
    for note in job.notes:
        log(note)
    precision = trainer.unrolling.precision
    if not job.on_gpu and cpu.processor().lacks_native(precision):
        flags = cpu.NATIVE_16_BIT[precision]
        lacking = (f"this processor has no native {precision} arithmetic (flags {' or '.join(flags)})" if flags else
                   f"TensorFlow's CPU kernels have no native {precision} arithmetic on any processor")
        log(f"precision {precision}: {lacking}, so every kernel converts to float32 and back: expect it slower than "
            f"float32 here; the activations still take half the memory (docs/precision.md)")
    if job.devices:
        for line in job.plan.describe():
            log(line)
        log(f"placement {options.placement}")
    log(f"{job.batch_text}: {job.units_per_step} {job.unit} a step, {job.steps_per_epoch} steps an epoch, "
        f"{job.max_epochs} epochs, {job.total_steps} steps in all; save_path {save_path}")
    for note in checkpoints.notes:
        log(f"checkpoints: {note}")
    if options.resume:
        pos = trainer.position()
        log(f"resumed from {checkpoints.latest} at epoch {pos.epoch + 1}, step {pos.step_in_epoch}" if resumed
            else f"--resume: no checkpoint in {save_path}, starting fresh")


class _Run:
    """One run of the loop: epochs of steps, then the final figures. Every rank runs it in step with the
    others: each collective (the step's allreduce, a checkpoint's gather, an agreed stop) is met by all.
    `best_step`: the step whose checkpoint best/ holds (None: none), which every rank follows alike."""

    def __init__(self, job: Job, world, options, checkpoints: Checkpoints, save_path: str, best_step: Optional[int]):
        self.job, self.world, self.options = job, world, options
        self.checkpoints, self.save_path, self.best_step = checkpoints, save_path, best_step
        self.pos = job.trainer.position()
        self.tensorboard = outputs.TensorBoard(save_path, world.is_chief)
        self.speed = outputs.Speed()
        self.watch = stops.Watch(world, options)

    def run(self, started: float) -> dict:
        with self.watch:
            stop, out_of_memory = self.epochs()
        metrics = {"interrupted": stop, "save_path": self.save_path,
                   "memory": self.job.memory_metrics(self.watch.monitor.metrics())}
        if stop:
            self.watch.report_stop(stop, self.checkpoints, self.save_path, out_of_memory)
        else:
            self.finish(metrics, started)
        self.tensorboard.close()
        return metrics

    def save(self, end_of_epoch: bool = False) -> None:
        self.job.record(self.pos, end_of_epoch)  # every rank: PTB gathers the carried state
        if self.world.is_chief:
            self.checkpoints.save(self.pos.global_step)

    def done(self) -> bool:
        pos, options = self.pos, self.options
        return (pos.epoch >= self.job.max_epochs or bool(options.max_steps and pos.global_step >= options.max_steps)
                or self.patience_spent())

    def patience_spent(self) -> bool:
        """--early_stopping N: N epochs have passed without a better validation figure (read from the
        history, so a resumed run knows it too)."""
        patience, history = self.options.early_stopping, self.pos.history
        best = best_epoch(self.job, history)
        return bool(patience and best is not None and len(history) - 1 - best >= patience)

    def epochs(self) -> Tuple[Optional[int], Optional[str]]:
        """Epochs until the end, a stop every rank agreed on, or memory running short; returns (the stop's exit
        code or None, what ran out of memory or None)."""
        stop = None
        while not self.done() and not stop:
            stop, lr, out_of_memory = self.train_epoch()
            if out_of_memory:
                return stop, out_of_memory
            if self.pos.step_in_epoch < self.job.steps_per_epoch:
                break
            self.end_epoch(lr)
            stop = self.watch.stop_code()
        return stop, None

    def train_epoch(self) -> Tuple[Optional[int], Optional[float], Optional[str]]:
        """The steps of an epoch from where the position stands, until its end, the step limit or a stop;
        returns (the stop's exit code, the learning rate, what ran out of memory)."""
        job, pos, options, world = self.job, self.pos, self.options, self.world
        job.begin_epoch(pos)
        lr, stop = None, None
        for i in range(pos.step_in_epoch, job.steps_per_epoch):
            if lr is None or pos.global_step <= options.lr_warmup_steps:
                lr = job.learning_rate(pos)
                job.trainer.set_learning_rate(lr)
            t0 = time.perf_counter()
            faults.point("step")
            try:
                figures = _step(job, pos, i)
            except OutOfMemory as error:
                if world.size > 1:  # saving is collective, and the other ranks wait in this step's allreduce
                    raise OutOfMemory(f"rank {world.rank}: {error}; the checkpoints in {self.save_path} are intact. "
                                      f"{ADVICE} Then start the job again with --resume") from None
                self.save()  # the position before the failed step, which is still to do
                return OutOfMemory.exit_code, lr, str(error)
            stops.check_finite(pos.global_step + 1, figures, self.checkpoints, job.divergence_advice(lr))
            self.speed.add(job.units_per_step, time.perf_counter() - t0)
            pos.step_in_epoch, pos.global_step = i + 1, pos.global_step + 1
            self.watch.warn()
            self.progress(lr)
            stop = self.watch.stop_code()
            if pos.step_in_epoch == job.steps_per_epoch:
                break  # the epoch's checkpoint follows validation
            if stop or self.done() or pos.global_step % options.checkpoint_every == 0:
                self.save()
            if stop or self.done():
                break
        return stop, lr, None

    def progress(self, lr: float) -> None:
        job, pos, watch = self.job, self.pos, self.watch
        every = max(1, job.steps_per_epoch // 10)
        if self.world.is_chief and (pos.step_in_epoch % every == 0 or pos.step_in_epoch == job.steps_per_epoch):
            text, scalars = job.figures(pos)
            loss_scale = job.trainer.loss_scale
            if loss_scale.enabled:
                text += f" | {loss_scale.describe()}"
                scalars = dict(scalars, **loss_scale.scalars())
            log(outputs.progress_line(pos, job.max_epochs, job.steps_per_epoch, job.total_steps, text, lr, self.speed,
                                       job.unit, watch.monitor.summary()))
            self.tensorboard.scalars(pos.global_step, **scalars, learning_rate=lr,
                                     **{f"{job.unit}_per_sec": self.speed.rate}, **watch.monitor.scalars())

    def end_epoch(self, lr: float) -> None:
        """Validation, the epoch's checkpoint, then the best one when this epoch beats the one best/ holds (in
        that order: a failure or a kill between the two is repaired on resuming, Checkpoints.settle_best),
        early stopping."""
        job, pos = self.job, self.pos
        faults.point("eval")
        entry, text, scalars = job.validate(pos, lr)
        pos.history.append(dict(entry, step=pos.global_step))
        if self.world.is_chief:
            log(f"epoch {pos.epoch + 1}/{job.max_epochs} | {text}")
            if scalars:
                self.tensorboard.scalars(pos.global_step, **scalars)
        job.end_epoch(pos)
        pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
        self.save(end_of_epoch=True)
        if self.improves(entry[job.best_key]):
            if self.world.is_chief:
                self.checkpoints.save_best(pos.global_step)
            self.best_step = pos.global_step
        best = best_epoch(job, pos.history)
        if self.patience_spent() and pos.epoch < job.max_epochs and self.world.is_chief:
            log(f"early stopping: no better {job.best_key} in the last {self.options.early_stopping} epochs (best "
                f"{pos.history[best][job.best_key]:.4g}, epoch {best + 1})")

    def finish(self, metrics: Dict, started: float) -> None:
        """The final evaluation (of the last weights, then of the best epoch's), the metrics every job reports,
        the done line, the metrics file and plots."""
        job, pos, world, options, speed = self.job, self.pos, self.world, self.options, self.speed
        faults.point("eval")
        own, text, scalars, rank_figures = job.finish(pos, speed)
        rate = speed.rate if speed.seconds > 0 else None
        # Each rank's share of the speed (a collective: every rank has timed the same steps, or none).
        per_rank = world.allgather(np.array([speed.rate / world.size])) if speed.seconds > 0 else None
        metrics.update(own)
        metrics.update({
            "config": dataclasses.asdict(job.config),
            job.rate_key: rate,
            f"{job.rate_key}_per_rank": None if per_rank is None else [float(r) for r in per_rank],
            "steps": pos.global_step,
            "epochs": round(pos.global_step / job.steps_per_epoch, 4),
            "steps_per_epoch": job.steps_per_epoch,
            "world_size": world.size,
            "global_batch_size": job.global_batch,
            # What each rank holds at the end, to see every node took part and the replicas agree.
            "ranks": world.allgather_object(dict(
                rank=world.rank, host=platform.node(), **rank_figures,
                weights_norm=job.trainer.weights_norm())),
            "config_name": options.config_name,
            "rnn_mode": job.trainer.unrolling.mode,
            "precision": job.trainer.unrolling.precision,
            "loss_scale": job.trainer.loss_scale.metrics() if job.trainer.loss_scale.enabled else None,
            "fp16_allreduce": options.fp16_allreduce,
            "placement": dict(job.plan.as_dict(), schedule=options.placement),
            "history": pos.history,
            "stopped_early": self.patience_spent() and pos.epoch < job.max_epochs,
        })
        metrics.update(self.best_figures(own))
        metrics.update({"wall_time_sec": round(time.time() - started, 2), "versions": versions(),
                        "machine": cpu.machine()})
        if world.is_chief:
            shown = f"{rate:.0f}" if rate else "n/a"
            log(f"done: {pos.global_step} steps | {text} | {shown} {job.unit}/sec | "
                f"{outputs.format_duration(metrics['wall_time_sec'])}")
            faults.point("metrics")
            if options.metrics_json:  # first: the figures matter more than the plots
                write_json(options.metrics_json, {k: v for k, v in metrics.items() if k != "interrupted"})
            self.plot()
            self.tensorboard.scalars(pos.global_step, **scalars)

    def improves(self, figure: Optional[float]) -> bool:
        """Whether an epoch's validation figure beats that of the epoch best/ holds (the first of equals stays)."""
        if figure is None or not math.isfinite(figure):
            return False
        if self.best_step is None:
            return True
        held = self.pos.history[epoch_steps(self.pos.history, self.job.steps_per_epoch).index(self.best_step)]
        return figure > held[self.job.best_key] if self.job.higher_is_better else figure < held[self.job.best_key]

    def best_figures(self, last: Dict) -> Dict:
        """best_epoch (1-based), best_<validation figure> and the test figures of the weights best/ holds
        (restored from it; the last weights' when it holds them); all None while it holds none."""
        job, pos = self.job, self.pos
        keys = [f"best_{key}" for key in job.test_keys]
        if self.best_step is None:
            return dict({"best_epoch": None, f"best_{job.best_key}": None}, **dict.fromkeys(keys))
        best = epoch_steps(pos.history, job.steps_per_epoch).index(self.best_step)
        if self.best_step == pos.global_step and pos.step_in_epoch == 0:
            tested = {key: last[key] for key in job.test_keys}
        else:
            parallel.on_chief(self.world, lambda: self.checkpoints.restore_best(self.best_step))
            job.trainer.share_from_chief()
            tested = job.test()
        if self.world.is_chief:
            figures = ", ".join(f"{key} {value:.4g}" for key, value in tested.items())
            log(f"best: epoch {best + 1}, {job.best_key} {pos.history[best][job.best_key]:.4g}; test with its weights: "
                f"{figures} (saved in {self.checkpoints.best_directory})")
        return dict({"best_epoch": best + 1, f"best_{job.best_key}": pos.history[best][job.best_key]},
                    **{f"best_{key}": value for key, value in tested.items()})

    def plot(self) -> None:
        job, pos = self.job, self.pos
        job.plot(pos, self.save_path)
        if job.curve and pos.history:
            name = job.curve.name
            outputs.plot_curves(os.path.join(self.save_path, f"{name}.png"), job.curve.title, name,
                                {split: [h[f"{split}_{name}"] for h in pos.history] for split in ("train", "valid")},
                                log_scale=job.curve.log_scale)


def epoch_steps(history, steps_per_epoch: int):
    """The global step at the end of each epoch in `history` (the step its checkpoint has in its name); runs
    saved before history entries held it: the epoch times the steps of one."""
    return [h.get("step", h.get("epoch", i + 1) * steps_per_epoch) for i, h in enumerate(history)]


def best_epoch(job: Job, history) -> Optional[int]:
    """The index in `history` of the best validation figure (job.best_key; the first of equals), or None
    while there is none (no validation yet, no validation split, or only non-finite figures)."""
    scored = [(h[job.best_key], i) for i, h in enumerate(history)
              if h.get(job.best_key) is not None and math.isfinite(h[job.best_key])]
    if not scored:
        return None
    if job.higher_is_better:
        return max(scored, key=lambda s: (s[0], -s[1]))[1]
    return min(scored)[1]


def _step(job: Job, pos, i: int) -> Dict[str, float]:
    try:
        return job.train_step(pos, i)
    except tf.errors.ResourceExhaustedError as error:
        # A failed step changed no weight: every update comes after every gradient.
        raise OutOfMemory(f"step {pos.global_step + 1} ran out of memory ({monitor.oom_reason(error)})") from None


def versions() -> Dict[str, Optional[str]]:
    """The stack this run ran on; Horovod's version only where it loads."""
    return dict(compat.stack(), tensorflow=tf.__version__, **parallel.engine_versions())
