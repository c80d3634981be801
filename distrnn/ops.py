"""Numerical building blocks shared by the models."""
import tensorflow as tf


def sparse_softmax_cross_entropy(logits, labels):
    """Cross-entropy of each row of `logits` (N, V) against integer `labels` (N,).

    Same values and gradients as tf.nn.sparse_softmax_cross_entropy_with_logits,
    which on CPU spends as long as the (N, 200) x (200, V) logits matmul on a
    PTB-sized vocabulary (measured: 5.5 ms against 1.5 ms here for 400 x 6049),
    because it always computes the backward pass too and its kernel is slow.
    Here the forward is a stable log-sum-exp and the backward reuses its
    exponentials: d logits = softmax * d - onehot(labels) * d.
    """
    labels = tf.cast(labels, tf.int32)

    @tf.custom_gradient
    def xent(logits):
        row_max = tf.stop_gradient(tf.reduce_max(logits, axis=1, keepdims=True))
        exp = tf.exp(logits - row_max)                                     # (N, V)
        total = tf.reduce_sum(exp, axis=1, keepdims=True)                  # (N, 1)
        picked = tf.gather(logits, labels, axis=1, batch_dims=1)           # (N,)
        loss = tf.squeeze(tf.math.log(total) + row_max, axis=1) - picked

        def grad(d_loss):
            d_logits = exp * (d_loss[:, None] / total)
            rows_and_labels = tf.stack([tf.range(tf.shape(labels)[0]), labels], axis=1)
            return tf.tensor_scatter_nd_sub(d_logits, rows_and_labels, d_loss)

        return loss, grad

    return xent(logits)
