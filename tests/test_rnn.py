import numpy as np
import pytest
import tensorflow as tf

from distrnn.rnn import LSTMCell, unroll

# The two-step example of the material distrnn grows from: input size 3, 5 units, batch 4.
X0 = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 1]], np.float32)
X1 = np.array([[9, 8, 7], [0, 0, 0], [6, 5, 4], [3, 2, 1]], np.float32)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_lstm(xs, kernel, bias, forget_bias, c, h):
    outputs = []
    for x in xs:
        z = np.concatenate([x, h], axis=1) @ kernel + bias
        i, j, f, o = np.split(z, 4, axis=1)
        c = sigmoid(f + forget_bias) * c + sigmoid(i) * np.tanh(j)
        h = sigmoid(o) * np.tanh(c)
        outputs.append(h)
    return np.stack(outputs), c, h


def make_cell(forget_bias=1.0, seed=3):
    init = tf.keras.initializers.RandomUniform(-0.5, 0.5, seed=seed)
    cell = LSTMCell(3, 5, forget_bias=forget_bias, initializer=init)
    cell.bias.assign(tf.random.stateless_uniform([20], seed=[seed, 1], minval=-0.5, maxval=0.5))
    return cell


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_two_step_example_matches_numpy(mode):
    cell = make_cell()
    xs = np.stack([X0, X1])  # (T=2, B=4, I=3)
    c0 = np.full((4, 5), 0.1, np.float32)
    h0 = np.full((4, 5), -0.2, np.float32)
    outputs, (c, h) = tf.function(lambda x: unroll(cell, x, (tf.constant(c0), tf.constant(h0)), mode))(xs)
    ref_out, ref_c, ref_h = numpy_lstm(xs, cell.kernel.numpy(), cell.bias.numpy(), 1.0, c0, h0)
    np.testing.assert_allclose(outputs.numpy(), ref_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c.numpy(), ref_c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h.numpy(), ref_h, rtol=1e-5, atol=1e-6)
    assert outputs.shape == (2, 4, 5)


def test_dynamic_and_static_agree_with_gradients():
    cell = make_cell(forget_bias=0.0)
    xs = tf.random.stateless_normal([7, 4, 3], seed=[1, 2])
    state = cell.zero_state(4)
    results = {}
    for mode in ("dynamic", "static"):
        @tf.function
        def run(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                out, (c, h) = unroll(cell, x, state, mode)
                loss = tf.reduce_sum(out * tf.range(1.0, 6.0)) + tf.reduce_sum(c * c)
            return [out, c, h] + tape.gradient(loss, [x, cell.kernel, cell.bias])
        results[mode] = [t.numpy() for t in run(xs)]
    for a, b in zip(results["dynamic"], results["static"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_state_carries_across_calls():
    # Unrolling 4 steps at once equals 2 + 2 with the state carried: what truncated BPTT relies on.
    cell = make_cell()
    xs = tf.random.stateless_normal([4, 2, 3], seed=[5, 6])
    out_all, state_all = unroll(cell, xs, cell.zero_state(2))
    out_a, state_a = unroll(cell, xs[:2], cell.zero_state(2))
    out_b, state_b = unroll(cell, xs[2:], state_a)
    np.testing.assert_allclose(np.concatenate([out_a, out_b]), out_all.numpy(), rtol=1e-6)
    np.testing.assert_allclose(state_b[0].numpy(), state_all[0].numpy(), rtol=1e-6)
