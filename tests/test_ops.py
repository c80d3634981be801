import numpy as np
import pytest
import tensorflow as tf

from distrnn.ops import softmax_cross_entropy


def reference(features, weights, bias, labels):
    logits = tf.matmul(features, weights) + bias
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


@pytest.mark.parametrize("underflow", [False, True])
def test_softmax_cross_entropy_matches_tensorflow_values_and_gradients(underflow):
    features = tf.random.stateless_normal([7, 5], seed=[1, 2]) * 2.0
    weights = tf.random.stateless_normal([5, 11], seed=[1, 3])
    bias = tf.random.stateless_normal([11], seed=[1, 4])
    labels = tf.constant([0, 3, 10, 3, 5, 0, 1])
    # A large logit must stay finite; with `underflow`, row 2's target gets a probability of
    # about e^-200, which float32 cannot hold, so its loss must come from the log-sum-exp.
    bias = tf.tensor_scatter_nd_update(bias, [[0]], [80.0])
    if underflow:
        bias = tf.tensor_scatter_nd_update(bias, [[10]], [-120.0])
    upstream = tf.range(1.0, 8.0)  # a non-uniform upstream gradient
    results = []
    for fn in (softmax_cross_entropy, reference):
        with tf.GradientTape() as tape:
            tape.watch([features, weights, bias])
            loss = fn(features, weights, bias, labels)
            total = tf.reduce_sum(loss * upstream)
        results.append([loss.numpy()] + [g.numpy() for g in tape.gradient(total, [features, weights, bias])])
    ours, ref = results
    assert np.all(np.isfinite(ours[0]))
    if underflow:
        assert ours[0][2] > 150
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_softmax_cross_entropy_by_hand():
    # features @ weights = [0, log 3]: softmax = [1/4, 3/4]
    loss = softmax_cross_entropy(tf.constant([[1.0]]), tf.constant([[0.0, np.log(3.0)]], tf.float32),
                                 tf.zeros([2]), tf.constant([1])).numpy()
    np.testing.assert_allclose(loss, [-np.log(0.75)], rtol=1e-6)
