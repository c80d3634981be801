"""Plain SGD with gradient clipping folded into one update per variable (the PTB job's optimizer)."""
import tensorflow as tf


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
