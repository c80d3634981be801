import dataclasses
import itertools

import numpy as np
import pytest
import tensorflow as tf

from distrnn.numerics import ops
from distrnn.numerics.ops import matmul, softmax_cross_entropy


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


def test_float16_matmul_sums_in_float32_on_cpu():
    """What a GPU's cuBLAS does with half inputs: 4096 ones sum to 4096 (TensorFlow 2.15's CPU kernel for half
    gives 2048: past 2048, adding 1 is below half's spacing; 2.21's gives 4096)."""
    ones = tf.ones([1, 4096], tf.float16)
    total = matmul(ones, tf.transpose(ones))
    assert total.dtype == tf.float16 and float(total[0, 0]) == 4096.0
    on_gpu = ops.matmul_for(True)  # a stack on GPUs: TensorFlow's kernel itself
    assert float(on_gpu(ones, tf.transpose(ones))[0, 0]) == float(tf.matmul(ones, tf.transpose(ones))[0, 0])
    assert ops.matmul_for(False) is matmul


def test_the_unrolling_carries_the_matmul_to_every_cell_and_the_output_layer():
    """Where float16 sums is part of the unrolling a model is given, not of the process: two models in one
    process, one resolved for GPUs and one for CPUs, each use their own, cells and output layer alike."""
    from distrnn.mnist.configs import PRESETS
    from distrnn.mnist.model import RowClassifier
    from distrnn.rnn import Unrolling
    config = dataclasses.replace(PRESETS.get("test"), num_layers=2)
    for on_gpu in (False, True):
        model = RowClassifier(config, (6, 5), Unrolling.for_config(config, 6, on_gpu=on_gpu, precision="float16"))
        assert model.unrolling.matmul is ops.matmul_for(on_gpu)
        assert {cell.matmul for cell in model.cells} == {ops.matmul_for(on_gpu)}


@pytest.mark.parametrize("transpose_a, transpose_b", list(itertools.product([False, True], repeat=2)))
def test_float16_matmul_gradients_are_matmuls(transpose_a, transpose_b):
    """Values and both gradients against float64 products of the same float16 numbers, for every pair of
    transpositions: within float16's rounding of each result (2^-11 relative, a few units), and float16."""
    rng = np.random.default_rng(0)
    a = tf.constant(rng.normal(size=(7, 5) if transpose_a else (5, 7)), tf.float16)
    b = tf.constant(rng.normal(size=(3, 7) if transpose_b else (7, 3)), tf.float16)
    upstream = tf.constant(rng.normal(size=(5, 3)))
    results = []
    for x, y, fn in ((a, b, matmul), (tf.cast(a, tf.float64), tf.cast(b, tf.float64), tf.matmul)):
        with tf.GradientTape() as tape:
            tape.watch([x, y])
            product = fn(x, y, transpose_a=transpose_a, transpose_b=transpose_b)
            total = tf.reduce_sum(tf.cast(product, tf.float64) * upstream)
        results.append([product, *tape.gradient(total, [x, y])])
    for half, exact in zip(*results):
        assert half.dtype == tf.float16
        scale = float(tf.reduce_max(tf.abs(exact)))
        assert float(tf.reduce_max(tf.abs(tf.cast(half, tf.float64) - exact))) <= 4 * 2.0 ** -11 * scale
