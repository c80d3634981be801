"""Reduced precision: what a model computes in, and float16's dynamic loss scaling.

The variables stay float32 (so do the optimizer's slots, and so checkpoints are the same in every
precision); a model casts what it reads of them to the compute dtype once a step, and the gradient
of that cast brings every gradient back to float32 before it reaches the optimizer. What sums over
many terms stays float32: the softmax's normaliser and the loss (distrnn.numerics.ops), the gradient norm
used for clipping, the weight gradients that a memory mode sums over segments.

float16 has 5 exponent bits: gradients below 6e-8 become 0. LossScale multiplies the loss by a
large factor before the backward pass and divides the gradients by it after, dynamically as in
Micikevicius et al. 2018 and Keras's LossScaleOptimizer: a step whose gradients are not all finite
changes no weight, slot or step count and halves the scale; GROWTH_STEPS finite steps in a row double
it. Unlike Keras, the overflowed step is then run again on the same batch (LossScale.until_applied):
the steps that overflow are those whose gradients are largest, which float32 clips and applies, and
skipping them costs more than the extra forward and backward pass (measured in docs/precision.md).
bfloat16 has float32's exponent range and needs none.
"""
import tensorflow as tf

DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16, "float16": tf.float16}


def compute_dtype(precision: str) -> tf.DType:
    """The dtype a model computes in for a --precision name."""
    return DTYPES[precision]


def values(grad):
    """The dense values of a gradient (an IndexedSlices' rows)."""
    return grad.values if isinstance(grad, tf.IndexedSlices) else grad


def map_values(fn, grad):
    """fn applied to a gradient's values, an IndexedSlices staying one."""
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(fn(grad.values), grad.indices, grad.dense_shape)
    return fn(grad)


class LossScale(tf.Module):
    """float16's dynamic loss scale, checkpointed with the run so that --resume continues exactly.

    Every job's trainer holds one, whatever its precision (`enabled` only for float16), so that a
    checkpoint restores into any precision: a float32 run resumed in float16 starts from INITIAL.
    The scale never goes below MINIMUM: a step whose gradients are not finite even then has
    diverged, and is reported as such (its gradient norm is not finite) instead of run again."""

    PART = "loss_scale"    # its name among a checkpoint's parts; runs saved before it existed have none
    INITIAL = 2.0 ** 15    # Keras's initial dynamic scale
    GROWTH_STEPS = 2000    # finite steps in a row before the scale doubles (Keras's default)
    MINIMUM = 1.0
    ATTEMPTS = 256         # of one step: halvings take float32's largest finite scale (below 2^128) to 1 in 128

    def __init__(self, enabled: bool, name: str = "loss_scale"):
        super().__init__(name=name)
        self.enabled = enabled
        self.scale = tf.Variable(self.INITIAL, trainable=False, name="scale")
        self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="good_steps")
        self.overflows = tf.Variable(0, dtype=tf.int64, trainable=False, name="overflows")

    @classmethod
    def for_precision(cls, precision: str) -> "LossScale":
        """Every trainer's: enabled for float16 alone."""
        return cls(precision == "float16")

    def scaled(self, loss):
        return loss * self.scale if self.enabled else loss

    def unscaled(self, grads):
        if not self.enabled:
            return grads
        inverse = 1.0 / self.scale
        return [None if g is None else map_values(lambda v: v * inverse, g) for g in grads]

    def gradients(self, tape, loss, variables, average=None):
        """The gradients of `loss`, averaged over ranks by `average` (a function of the list, as
        parallel.World.average_gradients) when given, unscaled, and whether they are all finite
        (always true without loss scaling: a float32 or bfloat16 step is never skipped)."""
        with tape:  # the scaling is part of what the tape differentiates
            target = self.scaled(loss)
        grads = tape.gradient(target, variables)
        if average is not None:
            grads = average(grads)  # inf on any rank is inf in the average: every rank skips together
        grads = self.unscaled(grads)
        if not self.enabled:
            return grads, tf.constant(True)
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(values(g))) for g in grads if g is not None])
        return grads, finite

    def apply_if(self, finite, apply, otherwise):
        """apply() when the gradients are finite, otherwise() instead; then the scale's update.
        Both return the same structure (the step's figures). Returns (that, whether the step was
        skipped: not finite while the scale could still be lowered; until_applied runs it again)."""
        if not self.enabled:
            return apply(), tf.constant(False)
        result = tf.cond(finite, apply, otherwise)
        skipped = tf.logical_and(tf.logical_not(finite), self.scale > self.MINIMUM)
        good = tf.where(finite, self.good_steps + 1, 0)
        grow = good >= self.GROWTH_STEPS
        doubled = tf.where(tf.math.is_finite(self.scale * 2.0), self.scale * 2.0, self.scale)
        with tf.control_dependencies([result] if isinstance(result, tf.Tensor) else tf.nest.flatten(result)):
            self.scale.assign(tf.where(finite, tf.where(grow, doubled, self.scale),
                                       tf.maximum(self.scale * 0.5, self.MINIMUM)))
            self.good_steps.assign(tf.where(grow, tf.constant(0, tf.int64), good))
            self.overflows.assign_add(tf.cast(skipped, tf.int64))
        return result, skipped

    def until_applied(self, attempt, skipped, rewind=lambda: None):
        """attempt(): one training step (a trainer's tf.function, whose update apply_if gates), returning
        its outputs; skipped(outputs): whether it overflowed and was skipped. Runs it again, with
        rewind() first (it puts the dropout generator back, so the same masks are drawn), until it is
        applied at the halved scale, or fails at MINIMUM (its norm is then not finite: diverged).
        Every rank agrees on the overflow (apply_if's gradients are averaged), so all run it again.
        At most ATTEMPTS: a scale that halving cannot bring down (inf, from a tampered checkpoint) ends
        as a diverged step instead of a loop for ever."""
        outputs = attempt()
        for _ in range(self.ATTEMPTS - 1):
            if not (self.enabled and skipped(outputs)):
                break
            rewind()
            outputs = attempt()
        return outputs

    def describe(self) -> str:
        """For the progress line: the scale and the overflows so far (each step run again)."""
        return f"loss scale {float(self.scale.numpy()):g}, {int(self.overflows.numpy())} overflows"

    def scalars(self) -> dict:
        """For TensorBoard."""
        return {"loss_scale": float(self.scale.numpy()), "overflows": int(self.overflows.numpy())}

    def metrics(self) -> dict:
        return {"scale": float(self.scale.numpy()), "overflows": int(self.overflows.numpy()),
                "good_steps": int(self.good_steps.numpy())}
