"""The one training loop every job plugs into.

A job supplies what is its own (distrnn.run.job.Job): its batches and step, its validation and test,
its figures. The loop owns the rest: epochs and steps, the learning rate's application, checkpoints
(the cadence, and the one saved on a stop), the stops every rank agrees on (signals, memory,
divergence), progress lines, TensorBoard, the end-of-run metrics, plots and the metrics file. It knows
no job, model or engine.

    job = PTBJob(...)                       # distrnn/ptb/job.py, made by distrnn.run.start.run
    metrics = loop.train(job, world, options, save_path, start_time)
"""
import math
import os
import platform
import time
from typing import Dict, Optional, Tuple

import numpy as np
import tensorflow as tf

from distrnn import compat, cpu, parallel
from distrnn.errors import OutOfMemory
from distrnn.memory import monitor
from distrnn.memory.monitor import ADVICE
from distrnn.run import faults, outputs, stops
from distrnn.run.checkpoints import Checkpoints
from distrnn.run.files import write_json
from distrnn.run.outputs import log
from distrnn.run.job import Job


def train(job: Job, world, options, save_path: str, started: float) -> dict:
    """Opens the run in save_path (rank 0 alone touches it and restores; its outcome, or its error,
    reaches every rank), shares rank 0's weights and position, logs the start and runs the loop."""
    checkpoints = Checkpoints(job.trainer.checkpoint_parts(), save_path, optional=job.trainer.optional_parts)

    def open_run():
        resumed = checkpoints.open_run(options.resume, job.saved_config, job.shape_fields, job.absent_fields)
        job.write_run_files(save_path)
        history = job.trainer.position().history
        best = job.measures.best_epoch(history)
        steps = epoch_steps(history, job.steps_per_epoch)
        return resumed, checkpoints.settle_best(None if best is None else steps[best], steps)

    resumed, best_step = parallel.on_chief(world, open_run)
    job.trainer.share_from_chief()
    if world.is_chief:
        _log_start(job, checkpoints, options.resume, resumed, save_path)
    return _Loop(job, world, options, checkpoints, save_path, best_step).train(started)


def _log_start(job: Job, checkpoints, resuming: bool, resumed: bool, save_path: str) -> None:
    """The start-up lines: the job's (its data, config, model and placement), the schedule, what was found
    in the save path."""
    for line in job.start_lines():
        log(line)
    log(f"{job.batch_text}: {job.units_per_step} {job.measures.unit} a step, {job.steps_per_epoch} steps an "
        f"epoch, {job.max_epochs} epochs, {job.total_steps} steps in all; save_path {save_path}")
    for note in checkpoints.notes:
        log(f"checkpoints: {note}")
    if resuming:
        pos = job.trainer.position()
        log(f"resumed from {checkpoints.latest} at epoch {pos.epoch + 1}, step {pos.step_in_epoch}" if resumed
            else f"--resume: no checkpoint in {save_path}, starting fresh")


class _Loop:
    """One run of the loop: epochs of steps, then the final figures. Every rank runs it in step with the
    others: each collective (the step's allreduce, a checkpoint's gather, an agreed stop) is met by all.
    `best_step`: the step whose checkpoint best/ holds (None: none), which every rank follows alike."""

    def __init__(self, job: Job, world, options, checkpoints: Checkpoints, save_path: str, best_step: Optional[int]):
        self.job, self.world, self.options = job, world, options
        self.checkpoints, self.save_path, self.best_step = checkpoints, save_path, best_step
        self.pos = job.trainer.position()
        before = self.pos.note_size(world.shape())
        if before and world.is_chief:
            log(f"the run goes on as {world.describe()} from step {self.pos.global_step}; it ran on "
                f"{before['world_size']} process(es) ({before['engine']}) before, with the same global batch of "
                f"{job.global_batch}")
        self.tensorboard = outputs.TensorBoard(save_path, world.is_chief)
        self.speed = outputs.Speed()
        self.watch = stops.Watch(world, options)

    def train(self, started: float) -> dict:
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
        parallel.on_chief(self.world, lambda: self.checkpoints.save(self.pos.global_step))

    def done(self) -> bool:
        pos, options = self.pos, self.options
        return (pos.epoch >= self.job.max_epochs or bool(options.max_steps and pos.global_step >= options.max_steps)
                or self.patience_spent())

    def patience_spent(self) -> bool:
        """--early_stopping N: N epochs have passed without a better validation figure (read from the
        history, so a resumed run knows it too)."""
        patience, history = self.options.early_stopping, self.pos.history
        best = self.job.measures.best_epoch(history)
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
                                       job.measures.unit, watch.monitor.summary()))
            self.tensorboard.scalars(pos.global_step, **scalars, learning_rate=lr,
                                     **{f"{job.measures.unit}_per_sec": self.speed.rate}, **watch.monitor.scalars())

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
        pos.next_epoch()
        self.save(end_of_epoch=True)
        if self.improves(entry[job.measures.best_key]):
            parallel.on_chief(self.world, lambda: self.checkpoints.save_best(pos.global_step))
            self.best_step = pos.global_step
        best = job.measures.best_epoch(pos.history)
        if self.patience_spent() and pos.epoch < job.max_epochs and self.world.is_chief:
            key = job.measures.best_key
            log(f"early stopping: no better {key} in the last {self.options.early_stopping} epochs (best "
                f"{pos.history[best][key]:.4g}, epoch {best + 1})")

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
        metrics.update(job.model_metrics())
        metrics.update({
            job.measures.rate_key: rate,
            f"{job.measures.rate_key}_per_rank": None if per_rank is None else [float(r) for r in per_rank],
            "steps": pos.global_step,
            "epochs": round(pos.global_step / job.steps_per_epoch, 4),
            "steps_per_epoch": job.steps_per_epoch,
            "world_size": world.size,
            "sizes": pos.sizes,  # every size the run had
            **world.report(),
            "global_batch_size": job.global_batch,
            # What each rank holds at the end, to see every node took part and the replicas agree.
            "ranks": world.allgather_object(dict(
                rank=world.rank, host=platform.node(), **rank_figures,
                weights_norm=job.trainer.weights_norm())),
            "history": pos.history,
            "stopped_early": self.patience_spent() and pos.epoch < job.max_epochs,
        })
        metrics.update(self.best_figures(own))
        metrics.update({"wall_time_sec": round(time.time() - started, 2), "versions": versions(),
                        "machine": cpu.machine()})
        if world.is_chief:
            shown = f"{rate:.0f}" if rate else "n/a"
            log(f"done: {pos.global_step} steps | {text} | {shown} {job.measures.unit}/sec | "
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
        return self.job.measures.better(figure, held[self.job.measures.best_key])

    def best_figures(self, last: Dict) -> Dict:
        """best_epoch (1-based), best_<validation figure> and the test figures of the weights best/ holds
        (restored from it; the last weights' when it holds them); all None while it holds none."""
        job, pos, measures = self.job, self.pos, self.job.measures
        keys = [f"best_{key}" for key in measures.test_keys]
        if self.best_step is None:
            return dict({"best_epoch": None, f"best_{measures.best_key}": None}, **dict.fromkeys(keys))
        best = epoch_steps(pos.history, job.steps_per_epoch).index(self.best_step)
        held = pos.history[best][measures.best_key]
        if self.best_step == pos.global_step and pos.step_in_epoch == 0:
            tested = {key: last[key] for key in measures.test_keys}
        else:
            parallel.on_chief(self.world, lambda: self.checkpoints.restore_best(self.best_step))
            job.trainer.share_from_chief()
            tested = job.test()
        if self.world.is_chief:
            figures = ", ".join(f"{key} {value:.4g}" for key, value in tested.items())
            log(f"best: epoch {best + 1}, {measures.best_key} {held:.4g}; test with its weights: {figures} (saved in "
                f"{self.checkpoints.best_directory})")
        return dict({"best_epoch": best + 1, f"best_{measures.best_key}": held},
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


def _step(job: Job, pos, i: int) -> Dict[str, float]:
    try:
        return job.step(pos, i)
    except tf.errors.ResourceExhaustedError as error:
        # A failed step changed no weight: every update comes after every gradient.
        raise OutOfMemory(f"step {pos.global_step + 1} ran out of memory ({monitor.oom_reason(error)})") from None


def versions() -> Dict[str, Optional[str]]:
    """The stack this run ran on; Horovod's version only where it loads."""
    return dict(compat.stack(), tensorflow=tf.__version__, **parallel.engine_versions())
