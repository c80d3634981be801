"""The PTB model as it trains: its Trainer (model, optimizer, the position a checkpoint holds), the
step, exact evaluation, the learning-rate schedule and the placement plan."""
import dataclasses
import math
from typing import Optional

import tensorflow as tf

from distrnn import parallel
from distrnn.errors import OutOfMemory, UsageError
from distrnn.memory import estimates, monitor
from distrnn.names import CELL_KINDS
from distrnn.numerics import sgd
from distrnn.parallel import placement
from distrnn.ptb import reader
from distrnn.ptb.model import PTBModel
from distrnn.rnn import KEEP, Memory, Unrolling
from distrnn.run import outputs
from distrnn.run import trainer as base


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
class Position(base.Position):
    """Where a PTB run stands (step_in_epoch: the next training window); history: perplexities, lr."""
    epoch_cost: float = 0.0   # sum of step losses this epoch (for train perplexity)
    epoch_iters: int = 0      # time steps trained this epoch

    @property
    def train_perplexity(self) -> Optional[float]:
        if self.epoch_iters:
            return perplexity(self.epoch_cost / self.epoch_iters)
        return self.history[-1]["train_perplexity"] if self.history else None


class Trainer(base.Trainer):
    """The model, SGD and everything a checkpoint must hold to resume exactly, the carried LSTM state
    included."""

    position_cls = Position

    def __init__(self, config, vocab_size: int, seed: int, unrolling: Unrolling = None, plan=None, world=None,
                 sparse_as_dense: bool = False, fp16_allreduce: bool = False):
        world = world or parallel.OneProcess()
        unrolling = unrolling or Unrolling.for_config(config, config.num_steps)
        model = PTBModel(config, vocab_size, unrolling, seed=seed, plan=plan, replica=(world.rank, world.size))
        super().__init__(model, sgd.SGD(config.learning_rate), world)
        self.config = config
        self.sparse_as_dense, self.fp16_allreduce = sparse_as_dense, fp16_allreduce
        self.train_step = tf.function(self._train_step)
        # The carried LSTM state of the whole global batch (every rank's rows): resuming mid-epoch continues
        # from the state the last window left. float32 in every precision, so that a checkpoint resumes in any.
        self._carried = [tf.Variable(tf.cast(t, tf.float32), trainable=False)
                         for t in tf.nest.flatten(self.model.zero_state(config.batch_size * world.size))]

    def own_parts(self) -> dict:
        return {"carried_state": self._carried}

    def shared_variables(self) -> list:
        return [self.model.dropout_rng.state] + self._carried

    def record_state(self, state) -> None:
        """Copies the carried state into the checkpointed variables. A collective: every rank calls it (each
        contributes its rows of the state)."""
        for variable, value in zip(self._carried, tf.nest.flatten(state)):  # float32 in every precision
            variable.assign(self.world.allgather(tf.cast(value, tf.float32)))

    def carried_state(self):
        """This rank's rows of the LSTM state saved with the run, structured as the model's state."""
        return tf.nest.pack_sequence_as(self.model.zero_state(1), [
            tf.cast(self.world.stripe(v.numpy()), self.model.dtype) for v in self._carried])

    def rewind_point(self):
        """A function that puts the dropout generator back where it stands now, so that a step run again
        (after running out of memory, or float16's overflow) draws the same masks."""
        if self.config.keep_prob >= 1.0:
            return lambda: None
        rng = self.model.dropout_rng.state
        before = tf.identity(rng)
        return lambda: rng.assign(before)

    def set_unrolling(self, unrolling: Unrolling) -> None:
        """Switches how the stack runs (--on_oom retry: a leaner memory mode); the next train_step is
        traced anew. The weights are untouched."""
        self.model.unrolling = unrolling
        self.train_step = tf.function(self._train_step)

    def _train_step(self, x, y, state):
        """One window: x, y (B, T). Returns the loss (sum over time of the batch mean), the gradient's
        global norm before clipping, whether the step overflowed and was skipped (float16's loss scale;
        LeanerOnOOM runs it again) and the new state. Run as the tf.function `train_step`."""
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            features, state = self.model(x, state, training=True)
            # Averaged over the batch, summed over time steps, as the reference.
            loss = tf.reduce_sum(self.model.token_losses(features, y)) / tf.cast(tf.shape(x)[0], tf.float32)
        # Averaged over ranks: the global batch's mean.
        grads, finite = self.loss_scale.gradients(tape, loss, variables, lambda grads: self.world.average_gradients(
            grads, self.sparse_as_dense, self.fp16_allreduce))
        grads = [sum_duplicate_rows(g) for g in grads]
        norm, skipped = self.loss_scale.apply_if(
            finite, lambda: self.optimizer.apply(grads, variables, clip_norm=self.config.max_grad_norm),
            lambda: tf.linalg.global_norm(grads))
        return self.world.average(loss), norm, skipped, state

    @tf.function
    def eval_step(self, x, y, weights, state):
        """Sum of token losses where weights is 1 (padding has weight 0), and new state."""
        features, state = self.model(x, state, training=False)
        return tf.reduce_sum(self.model.token_losses(features, y, weights)), state


class LeanerOnOOM:
    """trainer.train_step, run again where it fails: a float16 overflow at the halved loss scale
    (distrnn.numerics.precision.LossScale.until_applied), and a step that runs out of memory in the next leaner
    memory mode (--on_oom retry) while there is one, else OutOfMemory is raised. A failed step has
    changed no weight: every update waits for the clipping factor, which needs every gradient. The
    dropout generator, which the forward pass advances, is put back."""

    def __init__(self, trainer: Trainer, on_gpu: bool, world, retry: bool):
        if retry and world.size > 1:
            raise UsageError("--on_oom retry needs a single process (the other ranks would wait in the failed "
                             "step's allreduce); under horovodrun pass --recompute K or --swap_memory from the start")
        self.trainer, self.on_gpu, self.world, self.retry = trainer, on_gpu, world, retry
        self.changes = []  # each switch to a leaner memory mode

    def leaner(self) -> Optional[Unrolling]:
        config, unrolling = self.trainer.config, self.trainer.unrolling
        leaner = self.retry and CELL_KINDS[config.cell].own_backward
        keeps = unrolling.memory.leaner(config.num_steps) if leaner else None
        # A memory mode runs the dynamic loop, whatever rnn_mode asked for.
        return keeps and Unrolling.for_config(config, config.num_steps, self.on_gpu, unrolling.placement, keeps,
                                              unrolling.precision, mode="auto")

    def __call__(self, step: int, x, y, state):
        trainer = self.trainer
        rewind = trainer.rewind_point()
        while True:
            try:  # train_step is looked up at each attempt: set_unrolling replaces it
                return trainer.loss_scale.until_applied(lambda: trainer.train_step(x, y, state),
                                                        lambda outputs: bool(outputs[2]), rewind)
            except tf.errors.ResourceExhaustedError as error:
                rewind()
                what = f"step {step} ran out of memory ({monitor.oom_reason(error)})"
                leaner = self.leaner()
                if leaner is None:
                    raise OutOfMemory(what) from None
                was, now = trainer.unrolling.memory.describe(), leaner.memory.describe()
                outputs.say(self.world, f"{what} in memory mode {was}; running it again in memory mode {now}")
                self.changes.append({"step": step, "from": was, "to": now})
                trainer.set_unrolling(leaner)


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
    """The reference schedule, times parallel.lr_factor for a larger global batch."""
    return config.learning_rate_at(epoch) * parallel.lr_factor(batch_ratio, scaling, step, warmup_steps)


def make_model_plan(config, vocab_size: int, devices, strategy: str, precision: str = "float32", keeps: Memory = KEEP):
    """The placement plan of the model's parts over `devices` (one device, TensorFlow's choice, if none)."""
    return placement.job_plan(config.num_layers, devices, strategy, lambda: estimates.lm_costs(
        vocab_size, config.hidden_size, config.num_layers, config.batch_size, config.num_steps,
        cell_gates=CELL_KINDS[config.cell].gates, precision=precision, keeps=keeps, dropout=config.keep_prob < 1))
