"""Adam (Kingma & Ba 2015) as a tf.Module: the MNIST job's optimizer, each variable's update on its device.

distrnn's own rather than Keras's: Keras 3 (TensorFlow >= 2.16) changed its optimizers' update_step
signature, variables and checkpoint layout, and Keras 2's left the arithmetic of each update unplaced (with
layers on several GPUs every layer's update ran on the first one). This is Keras 2.15's update written
out, operation for operation, so a run gives the figures it gave with Keras's Adam, and it keeps the
attribute names Keras's checkpoints use (`_iterations`, `_learning_rate`, `_variables`: the step count, then
each variable's first and second moment), so a checkpoint written by distrnn's earlier Keras-based Adam
resumes. Checked against the paper's formulas in tests/test_adam.py.
"""
from typing import Iterable, List, Tuple

import tensorflow as tf


class _Moments:
    """Each variable's (m, v) by the variable's ref. Not a dict attribute: tf.Module would track it, and
    a tracked dict with non-string keys cannot be saved; the moments are tracked once, in `_variables`."""

    def __init__(self):
        self.of = {}


class Adam(tf.Module):
    def __init__(self, learning_rate: float, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7,
                 name: str = "adam"):
        super().__init__(name=name)
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon
        self._learning_rate = tf.Variable(float(learning_rate), trainable=False, name="learning_rate")
        self._iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iteration")
        self._variables = [self._iterations]
        self._moments = _Moments()

    @property
    def learning_rate(self) -> tf.Variable:
        return self._learning_rate

    @property
    def iterations(self) -> tf.Variable:
        return self._iterations

    @property
    def variables(self) -> List[tf.Variable]:
        """The step count and every moment, in checkpoint order."""
        return list(self._variables)

    def build(self, variables: Iterable[tf.Variable]) -> None:
        """Makes each variable's two moments (zero, beside it) before a restore fills them."""
        for variable in variables:
            if variable.ref() in self._moments.of:
                continue
            with tf.device(variable.device):
                base = variable.name.split(":")[0]
                m = tf.Variable(tf.zeros_like(variable), trainable=False, name=f"{base}/m")
                v = tf.Variable(tf.zeros_like(variable), trainable=False, name=f"{base}/v")
            self._moments.of[variable.ref()] = (m, v)
            self._variables += [m, v]

    def apply_gradients(self, grads_and_vars: Iterable[Tuple[tf.Tensor, tf.Variable]]) -> None:
        """One step over every (gradient, variable), dense or IndexedSlices, then the step count + 1. A
        variable whose gradient is None (not used by the loss) is left as it is, as Keras leaves it."""
        grads_and_vars = [(g, v) for g, v in grads_and_vars if g is not None]
        self.build(v for _, v in grads_and_vars)
        for gradient, variable in grads_and_vars:
            with tf.device(variable.device):
                self._update(gradient, variable)
        self._iterations.assign_add(1)

    def _update(self, gradient, variable: tf.Variable) -> None:
        """m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2; var <- var - lr_t m / (sqrt(v) + eps) with
        lr_t = lr sqrt(1 - b2^t) / (1 - b1^t): the paper's bias correction folded into the step size, the
        epsilon outside it, as Keras and TensorFlow 1's AdamOptimizer have it. Sparse gradients decay every
        row's moments and add to the rows they touch, as the dense update would."""
        m, v = self._moments.of[variable.ref()]
        dtype = variable.dtype
        step = tf.cast(self._iterations + 1, dtype)
        beta_1_power = tf.pow(tf.cast(self.beta_1, dtype), step)
        beta_2_power = tf.pow(tf.cast(self.beta_2, dtype), step)
        alpha = tf.cast(self._learning_rate, dtype) * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        if isinstance(gradient, tf.IndexedSlices):
            m.assign_add(-m * (1 - self.beta_1))
            m.scatter_add(tf.IndexedSlices(gradient.values * (1 - self.beta_1), gradient.indices))
            v.assign_add(-v * (1 - self.beta_2))
            v.scatter_add(tf.IndexedSlices(tf.square(gradient.values) * (1 - self.beta_2), gradient.indices))
        else:
            m.assign_add((gradient - m) * (1 - self.beta_1))
            v.assign_add((tf.square(gradient) - v) * (1 - self.beta_2))
        variable.assign_sub((m * alpha) / (tf.sqrt(v) + self.epsilon))
