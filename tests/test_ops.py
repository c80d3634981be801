import numpy as np
import tensorflow as tf

from distrnn.ops import sparse_softmax_cross_entropy


def test_cross_entropy_matches_tensorflow_values_and_gradients():
    logits = tf.random.stateless_normal([7, 11], seed=[1, 2]) * 5.0
    logits = tf.tensor_scatter_nd_update(logits, [[0, 0]], [80.0])  # a large logit: must stay finite
    labels = tf.constant([0, 3, 10, 3, 5, 0, 1])
    weights = tf.range(1.0, 8.0)  # a non-uniform upstream gradient
    results = []
    for fn in (sparse_softmax_cross_entropy,
               lambda l, y: tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=l)):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = fn(logits, labels)
            total = tf.reduce_sum(loss * weights)
        results.append((loss.numpy(), tape.gradient(total, logits).numpy()))
    (ours, d_ours), (ref, d_ref) = results
    assert np.all(np.isfinite(ours))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d_ours, d_ref, rtol=1e-5, atol=1e-6)


def test_cross_entropy_by_hand():
    logits = np.array([[0.0, np.log(3.0)]], np.float32)  # softmax = [1/4, 3/4]
    loss = sparse_softmax_cross_entropy(tf.constant(logits), tf.constant([1])).numpy()
    np.testing.assert_allclose(loss, [-np.log(0.75)], rtol=1e-6)
