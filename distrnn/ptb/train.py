"""Training and evaluation of the PTB word language model.

`train_and_evaluate(config, options)` is the whole job; `python -m distrnn.ptb`
only parses flags and calls it, and the tests call it the same way.
"""
import dataclasses
import json
import math
import os
import time
from typing import Optional

import numpy as np
import tensorflow as tf

from distrnn import distributed, loop, memory, outputs, placement, sgd, training
from distrnn.checkpoints import Checkpoints
from distrnn.errors import OutOfMemory, UsageError
from distrnn.ptb import reader
from distrnn.ptb.model import PTBModel
from distrnn.rnn import CELLS, KEEP, Memory, resolve_mode
from distrnn.rnn.stack import stack_mode
from distrnn.outputs import log

# Fields that fix variable shapes or the meaning of a saved data position: a
# checkpoint cannot be resumed under different values.
SHAPE_FIELDS = ("num_layers", "hidden_size", "batch_size", "num_steps")


@dataclasses.dataclass
class RunOptions(training.JobOptions):
    sparse_as_dense: bool = False        # Horovod: allreduce the embedding gradient densified, not allgathered
    on_oom: str = "stop"                 # a step out of memory: stop (checkpoint, exit 76) or retry it leaner


def sum_duplicate_rows(grad):
    """Merges repeated rows of an embedding gradient.

    tf.gather's gradient is IndexedSlices with one row per looked-up word, so a
    word seen k times appears k times. Summing them first makes the global
    norm used for clipping the norm of the true gradient, and shrinks the
    sparse update.
    """
    if not isinstance(grad, tf.IndexedSlices):
        return grad
    ids, position = tf.unique(grad.indices)
    values = tf.math.unsorted_segment_sum(grad.values, position, tf.shape(ids)[0])
    return tf.IndexedSlices(values, ids, grad.dense_shape)


def perplexity(mean_loss: float) -> float:
    """exp(mean loss); inf where that is beyond float64 (a finite loss above 709.78 a word)."""
    return math.exp(mean_loss) if mean_loss < 709.78 else float("inf")


@dataclasses.dataclass
class Position:
    """Where a run stands; saved with every checkpoint so --resume continues exactly."""
    epoch: int = 0            # 0-based epoch in progress
    step_in_epoch: int = 0    # next training window of that epoch
    global_step: int = 0      # training steps done in all
    epoch_cost: float = 0.0   # sum of step losses this epoch (for train perplexity)
    epoch_iters: int = 0      # time steps trained this epoch
    history: list = dataclasses.field(default_factory=list)  # per finished epoch: perplexities, lr

    @property
    def train_perplexity(self) -> Optional[float]:
        if self.epoch_iters:
            return perplexity(self.epoch_cost / self.epoch_iters)
        return self.history[-1]["train_perplexity"] if self.history else None


class Trainer(tf.Module):
    """The model, its optimizer and everything a checkpoint must hold to resume exactly."""

    def __init__(self, config, vocab_size: int, seed: int, on_gpu: bool = False, plan=None,
                 placement: str = "sequential", world=None, sparse_as_dense: bool = False, memory: Memory = KEEP):
        super().__init__(name="trainer")
        self.config = config
        self.world = world or distributed.World()
        self.sparse_as_dense = sparse_as_dense
        self.on_gpu = on_gpu
        try:
            self.rnn_mode, self.rnn_mode_reason = stack_mode(config.cell, config.use_peepholes, config.rnn_mode,
                                                             on_gpu, config.num_steps, placement, memory)
        except ValueError as error:
            raise UsageError(str(error)) from None
        self.model = PTBModel(config, vocab_size, seed=seed, rnn_mode=self.rnn_mode, plan=plan, placement=placement,
                              memory=memory)
        self.train_step = tf.function(self._train_step)
        self.optimizer = sgd.SGD(config.learning_rate)
        # The Position as JSON, and the carried LSTM state of the whole global batch (every
        # rank's rows): resuming mid-epoch continues from the state the last window left.
        self._position = tf.Variable(json.dumps(dataclasses.asdict(Position())), dtype=tf.string, trainable=False)
        self._carried = [tf.Variable(t, trainable=False)
                         for t in tf.nest.flatten(self.model.zero_state(config.batch_size * self.world.size))]

    def checkpoint(self) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, position=self._position,
                                   carried_state=self._carried)

    def record(self, position: Position, state) -> None:
        """Copies the run's position and carried state into the checkpointed variables.
        A collective: every rank calls it (each contributes its rows of the state)."""
        self._position.assign(json.dumps(dataclasses.asdict(position)))
        for variable, value in zip(self._carried, tf.nest.flatten(state)):
            variable.assign(self.world.allgather(value))

    def position(self) -> Position:
        return Position(**json.loads(self._position.numpy().decode()))

    def carried_state(self):
        """This rank's rows of the LSTM state saved with the run, structured as the model's state."""
        return tf.nest.pack_sequence_as(self.model.zero_state(1),
                                        [self.world.stripe(v.numpy()) for v in self._carried])

    def share_from_chief(self) -> None:
        """After rank 0 restored (or initialised) the run: every rank takes its weights,
        optimizer slots, dropout generator, position and carried state."""
        if self.world.size == 1:
            return
        self.world.broadcast_variables(list(self.model.variables) + list(self.optimizer.variables) +
                                       [self.model.dropout_rng.state] + self._carried)
        self._position.assign(self.world.broadcast_object(self._position.numpy()))

    @property
    def memory(self) -> Memory:
        return self.model.memory

    def set_memory(self, memory: Memory) -> None:
        """Switches what the LSTM stack's backward pass keeps (a memory mode runs the dynamic
        loop); the next train_step is traced anew. The weights are untouched."""
        self.rnn_mode, self.rnn_mode_reason = resolve_mode(self.config.cell, self.config.use_peepholes, "auto",
                                                           self.on_gpu, self.config.num_steps, memory)
        self.model.rnn_mode, self.model.memory = self.rnn_mode, memory
        self.train_step = tf.function(self._train_step)

    def _train_step(self, x, y, state):
        """One window: x, y (B, T). Returns the loss (sum over time of the batch mean), the gradient's
        global norm before clipping and the new state. Run as the tf.function `train_step`."""
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            features, state = self.model(x, state, training=True)
            # Averaged over the batch, summed over time steps, as the reference.
            loss = tf.reduce_sum(self.model.token_losses(features, y)) / tf.cast(tf.shape(x)[0], tf.float32)
        tape = self.world.wrap_tape(tape, self.sparse_as_dense)  # averaged over ranks: the global batch's mean
        grads = [sum_duplicate_rows(g) for g in tape.gradient(loss, variables)]
        norm = self.optimizer.apply(grads, variables, clip_norm=self.config.max_grad_norm)
        return self.world.average(loss), norm, state

    @tf.function
    def eval_step(self, x, y, weights, state):
        """Sum of token losses where weights is 1 (padding has weight 0), and new state."""
        features, state = self.model(x, state, training=False)
        return tf.reduce_sum(self.model.token_losses(features, y, weights)), state


def rank_share(batches: reader.EvalBatches, world) -> reader.EvalBatches:
    """This rank's rows of a split laid out for the global batch."""
    return reader.EvalBatches(world.stripe(batches.inputs), world.stripe(batches.targets),
                              world.stripe(batches.weights), batches.num_steps)


def evaluate(trainer: Trainer, batches: reader.EvalBatches, world) -> float:
    """Exact perplexity over a whole split: exp(total loss / number of words), from the
    sums of every rank's losses and word counts."""
    state = trainer.model.zero_state(batches.inputs.shape[0])
    total = 0.0
    for i in range(batches.num_windows):
        x, y, w = batches.window(i)
        loss, state = trainer.eval_step(x, y, w, state)
        total += float(loss)
    total, count = world.allreduce_sum([total, float(batches.weights.sum())])
    return perplexity(total / count)


def learning_rate(config, epoch: int, step: int, batch_ratio: float, scaling: str = "none",
                  warmup_steps: int = 0) -> float:
    """The reference schedule, times distributed.lr_factor for a larger global batch."""
    return config.learning_rate_at(epoch) * distributed.lr_factor(batch_ratio, scaling, step, warmup_steps)


def make_model_plan(config, vocab_size: int, devices, strategy: str):
    """The placement plan of the model's parts over `devices` (one device, TensorFlow's choice, if none)."""
    if not devices:
        return placement.single_device(config.num_layers)
    costs = placement.lm_costs(vocab_size, config.hidden_size, config.num_layers, config.batch_size,
                               config.num_steps, cell_gates=CELLS[config.cell].gates)
    return placement.make_plan(config.num_layers, devices, strategy, costs)


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

    name, unit, rate_key = "PTB", "words", "words_per_sec"

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
        pos = self.trainer.position()
        # The last validation figure still describes the weights when the run stopped at an epoch's end.
        self.valid_ppl = pos.history[-1]["valid_perplexity"] if pos.history and pos.step_in_epoch == 0 else None
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
        self.valid_ppl = None
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
                log(message if self.world.size == 1 else f"rank {self.world.rank}: {message}")
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
        self.valid_ppl = evaluate(self.trainer, self.valid_batches, self.world)
        entry = {"epoch": pos.epoch + 1, "train_perplexity": pos.train_perplexity, "valid_perplexity": self.valid_ppl,
                 "learning_rate": lr}
        return (entry, f"train ppl {pos.train_perplexity:.2f} | valid ppl {self.valid_ppl:.2f}",
                {"valid_perplexity": self.valid_ppl})

    def end_epoch(self, pos) -> None:
        pos.epoch_cost, pos.epoch_iters = 0.0, 0

    def finish(self, pos, speed):
        valid_ppl = self.valid_ppl if self.valid_ppl is not None else evaluate(self.trainer, self.valid_batches,
                                                                               self.world)
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
