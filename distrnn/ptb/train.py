"""Training and evaluation of the PTB word language model.

`train_and_evaluate(config, options)` is the whole job; `python -m distrnn.ptb`
only parses flags and calls it, and the tests call it the same way.
"""
import dataclasses
import os
import time

import numpy as np
import tensorflow as tf

from distrnn import distributed, loop, memory, outputs, training
from distrnn.checkpoints import Checkpoints
from distrnn.errors import OutOfMemory, UsageError
from distrnn.ptb import reader
from distrnn.ptb.trainer import Trainer, evaluate, learning_rate, make_model_plan, perplexity, rank_share
from distrnn.outputs import log

# Fields that fix variable shapes or the meaning of a saved data position: a
# checkpoint cannot be resumed under different values.
SHAPE_FIELDS = ("num_layers", "hidden_size", "batch_size", "num_steps")


@dataclasses.dataclass
class RunOptions(training.JobOptions):
    sparse_as_dense: bool = False        # Horovod: allreduce the embedding gradient densified, not allgathered
    on_oom: str = "stop"                 # a step out of memory: stop (checkpoint, exit 76) or retry it leaner


def train_and_evaluate(config, options: RunOptions, world=None) -> dict:
    """Trains, validates every epoch, tests at the end; returns the metrics dict.

    Returns early with metrics["interrupted"] set to the signal's exit code when
    SIGINT/SIGTERM arrives (after saving a checkpoint).
    """
    reference_batch = config.batch_size  # what the config's learning rate was tuned for
    return training.run_job("ptb", config, options, lambda config, world, save_path, devices: _run(
        config, reference_batch, options, world, save_path, devices), world)


def _run(config, reference_batch: int, options: RunOptions, world, save_path: str, devices) -> dict:
    started = time.time()
    if options.on_oom == "retry" and world.size > 1:
        raise UsageError("--on_oom retry needs a single process (the other ranks would wait in the failed step's "
                         "allreduce); under horovodrun pass --recompute K or --swap_memory from the start")
    job = PTBJob(config, reference_batch, options, world, devices)
    checkpoints = Checkpoints(job.trainer.checkpoint(), save_path)
    # Rank 0 alone touches save_path and restores; its outcome (or its error) reaches every rank.
    resumed = distributed.on_chief(world, lambda: checkpoints.open_run(options.resume, job.saved_config,
                                                                        SHAPE_FIELDS + ("vocab_size",)))
    job.trainer.share_from_chief()
    if world.is_chief:
        data = job.data
        log(f"data {job.data_path}: vocabulary {data.vocab_size}, words train {len(data.train)} "
            f"valid {len(data.valid)} test {len(data.test)}; words mapped to <unk>: "
            f"valid {data.oov['valid']}, test {data.oov['test']}")
        loop.log_start(job, options, checkpoints, resumed, save_path, memory_note=(
            ", leaner on running out of memory (--on_oom retry)" if options.on_oom == "retry" else ""))
    return loop.run(job, world, options, checkpoints, save_path, started)


class PTBJob(loop.Job):
    """The PTB language model as the training loop sees it: windows of the token stream, the LSTM state
    carried from one window to the next, perplexities."""

    unit, rate_key = "words", "words_per_sec"

    def __init__(self, config, reference_batch: int, options: RunOptions, world, devices):
        self.config, self.options, self.world = config, options, world
        self.data_path = distributed.chief_first(world, lambda: reader.resolve_data_path(options.data_path))
        self.data = data = reader.load(self.data_path)
        B, T = config.batch_size, config.num_steps  # B rows on each rank; B * world.size rows in all
        self.global_batch = B * world.size
        self.batch_text = (f"batch_size x num_steps = {B} x {T}" +
                           (f" on each of {world.size} ranks" if world.size > 1 else ""))
        self.steps_per_epoch = reader.epoch_size(len(data.train), self.global_batch, T)
        if self.steps_per_epoch < 1:
            raise UsageError(f"the train split has {len(data.train)} words, too few for {self.batch_text} (it needs "
                             f"more than {self.global_batch * (T + 1)}); lower --batch_size or --num_steps")
        self.units_per_step = self.global_batch * T
        self.lr_ratio = self.global_batch / reference_batch
        self.plan = make_model_plan(config, data.vocab_size, devices, options.strategy)
        self.devices = devices
        on_gpu = bool(tf.config.list_logical_devices("GPU"))
        self.trainer = Trainer(config, data.vocab_size, options.seed, on_gpu=on_gpu, plan=self.plan,
                               placement=options.placement, world=world, sparse_as_dense=options.sparse_as_dense,
                               memory=options.memory)
        self.saved_config = dict(dataclasses.asdict(config), vocab_size=data.vocab_size, name=options.config_name)
        self.max_epochs = min(options.max_epochs or config.max_max_epoch, config.max_max_epoch)
        self.total_steps = self.max_epochs * self.steps_per_epoch
        if options.max_steps:
            self.total_steps = min(self.total_steps, options.max_steps)
        eos = data.vocab[reader.EOS]
        self.valid_batches = rank_share(reader.eval_batches(data.valid, eos, self.global_batch, T), world)
        self.test_batches = rank_share(reader.eval_batches(data.test, eos, self.global_batch, T), world)
        self.rows = world.stripe(reader.train_rows(data.train, self.global_batch))  # (B, batch_len): this rank's
        self.memory_changes = []  # --on_oom retry: each switch to a leaner memory mode
        self.state, self.loss = None, None

    def learning_rate(self, pos) -> float:
        lr = learning_rate(self.config, pos.epoch, pos.global_step, self.lr_ratio, self.options.lr_scaling,
                           self.options.lr_warmup_steps)
        self.trainer.optimizer.learning_rate.assign(lr)
        return lr

    def begin_epoch(self, pos) -> None:
        self.state = (self.trainer.carried_state() if pos.step_in_epoch
                      else self.trainer.model.zero_state(self.config.batch_size))

    def train_step(self, pos, i: int):
        x, y = reader.train_window(self.rows, self.config.num_steps, i)
        loss, norm, self.state = self._step(pos, x, y)
        self.loss = loss = float(loss)
        pos.epoch_cost += loss
        pos.epoch_iters += self.config.num_steps
        return {"loss": loss, "perplexity": perplexity(loss / self.config.num_steps), "gradient norm": float(norm)}

    def _step(self, pos, x, y):
        """trainer.train_step; a step that runs out of memory is run again in the next leaner memory
        mode with --on_oom retry while there is one, else OutOfMemory is raised. A failed step has
        changed no weight: every update waits for the clipping factor, which needs every gradient.
        The dropout generator, which the forward pass advances, is put back."""
        trainer, T = self.trainer, self.config.num_steps
        rng = trainer.model.dropout_rng.state
        before = tf.identity(rng) if self.config.keep_prob < 1.0 else None
        while True:
            try:
                return trainer.train_step(x, y, self.state)
            except tf.errors.ResourceExhaustedError as error:
                if before is not None:
                    rng.assign(before)
                what = f"step {pos.global_step + 1} ran out of memory ({memory.oom_reason(error)})"
                leaner = (trainer.memory.leaner(T) if self.options.on_oom == "retry" and self.config.cell == "lstm"
                          else None)
                if leaner is None:
                    raise OutOfMemory(what) from None
                message = (f"{what} in memory mode {trainer.memory.describe()}; running it again in memory mode "
                           f"{leaner.describe()}")
                outputs.say(self.world, message)
                self.memory_changes.append({"step": pos.global_step + 1, "from": trainer.memory.describe(),
                                            "to": leaner.describe()})
                trainer.set_memory(leaner)

    def figures(self, pos):
        return (f"train ppl {pos.train_perplexity:8.2f}",
                {"loss": self.loss / self.config.num_steps, "perplexity": pos.train_perplexity})

    def divergence_advice(self, lr: float) -> str:
        c = self.config
        return (f"lower --learning_rate (now {lr:g}), --max_grad_norm ({c.max_grad_norm:g}) or --init_scale "
                f"({c.init_scale:g})")

    def record(self, pos, end_of_epoch: bool) -> None:
        self.trainer.record(pos, self.trainer.model.zero_state(self.config.batch_size) if end_of_epoch else self.state)

    def validate(self, pos, lr: float):
        valid_ppl = evaluate(self.trainer, self.valid_batches, self.world)
        entry = {"epoch": pos.epoch + 1, "train_perplexity": pos.train_perplexity, "valid_perplexity": valid_ppl,
                 "learning_rate": lr}
        text = f"train ppl {pos.train_perplexity:.2f} | valid ppl {valid_ppl:.2f}"
        return entry, text, {"valid_perplexity": valid_ppl}

    def end_epoch(self, pos) -> None:
        pos.epoch_cost, pos.epoch_iters = 0.0, 0

    def finish(self, pos, speed):
        # At an epoch's end (this run's, or the checkpoint's it resumed from) the last validation figure
        # describes these weights; after a part of an epoch they have moved on.
        valid_ppl = (pos.history[-1]["valid_perplexity"] if pos.history and pos.step_in_epoch == 0
                     else evaluate(self.trainer, self.valid_batches, self.world))
        test_ppl = evaluate(self.trainer, self.test_batches, self.world)
        train_ppl, data = pos.train_perplexity, self.data
        per_rank = self.world.allgather(np.array([speed.rate / self.world.size])) if speed.seconds > 0 else None
        own = {"train_perplexity": train_ppl, "valid_perplexity": valid_ppl, "test_perplexity": test_ppl,
               "words_per_sec_per_rank": None if per_rank is None else [float(w) for w in per_rank],
               "config": dataclasses.asdict(self.config), "vocab_size": data.vocab_size,
               "words": {"train": len(data.train), "valid": len(data.valid), "test": len(data.test)}, "oov": data.oov}
        text = f"train ppl {train_ppl:.2f} | valid ppl {valid_ppl:.2f} | test ppl {test_ppl:.2f}"
        return own, text, {"test_perplexity": test_ppl}, {"test_perplexity": test_ppl}

    def plot(self, pos, save_path: str) -> None:
        if pos.history:
            outputs.plot_curves(os.path.join(save_path, "perplexity.png"), f"PTB {self.options.config_name}",
                                 "perplexity", {"train": [h["train_perplexity"] for h in pos.history],
                                                "valid": [h["valid_perplexity"] for h in pos.history]})

    def memory_metrics(self, monitor):
        return dict(monitor, mode=self.trainer.memory.describe(), changes=self.memory_changes)
