"""distrnn's Adam: the paper's update, each variable's arithmetic on its device, its checkpoint on every
TensorFlow, and the checkpoints of distrnn's earlier (Keras 2) Adam still resumed."""
import numpy as np
import pytest
import tensorflow as tf

from distrnn import compat
from distrnn.numerics.adam import Adam

B1, B2, EPS, LR = 0.9, 0.999, 1e-7, 0.01


def reference(theta, grads):
    """Kingma & Ba (2015), Algorithm 1 with the efficient form of section 2 (bias correction folded into
    the step size, epsilon-hat outside it), in float64."""
    theta, m, v = theta.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(grads, 1):
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        theta = theta - LR * np.sqrt(1 - B2 ** t) / (1 - B1 ** t) * m / (np.sqrt(v) + EPS)
    return theta


def gradients(steps, shape, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape).astype(np.float32) * (t + 1) for t in range(steps)]


def test_dense_steps_follow_the_paper():
    start = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)
    grads = gradients(7, start.shape)
    variable, adam = tf.Variable(start), Adam(LR, B1, B2, EPS)
    step = tf.function(lambda g: adam.apply_gradients([(g, variable)]))
    for g in grads:
        step(tf.constant(g))
    assert int(adam.iterations.numpy()) == 7
    unused = tf.Variable([1.0, 2.0])
    adam.apply_gradients([(None, unused)])  # a variable the loss does not use: untouched, no moments made
    assert unused.numpy().tolist() == [1.0, 2.0] and len(adam.variables) == 3
    # float32 arithmetic against float64: 7 steps of size ~LR each, rounding of one part in 10^6 of that.
    np.testing.assert_allclose(variable.numpy(), reference(start, grads), rtol=0, atol=1e-6)


def test_sparse_gradients_equal_dense_ones_with_zero_rows():
    """Rows an IndexedSlices gradient does not touch still have their moments decayed (and move), exactly as
    a dense gradient with zeros there would have them."""
    start = np.random.default_rng(2).normal(size=(5, 2)).astype(np.float32)
    rows = [np.array([0, 3]), np.array([3, 4]), np.array([1])]
    dense_var, sparse_var = tf.Variable(start), tf.Variable(start)
    dense, sparse, full_grads = Adam(LR), Adam(LR), []
    for i, r in enumerate(rows):
        values = gradients(1, (len(r), 2), seed=i)[0]
        full_grads.append(np.zeros_like(start))
        full_grads[-1][r] = values
        dense.apply_gradients([(tf.constant(full_grads[-1]), dense_var)])
        sparse.apply_gradients([(tf.IndexedSlices(tf.constant(values), tf.constant(r), tf.constant([5, 2])),
                                 sparse_var)])
    np.testing.assert_allclose(sparse_var.numpy(), dense_var.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(sparse_var.numpy(), reference(start, full_grads), rtol=0, atol=1e-6)


def test_adam_updates_each_variable_on_its_device():
    """Each update's arithmetic, not only the moments, runs beside its variable, so a layer on /gpu:2 is
    not updated on /gpu:0."""
    with tf.device("/device:CPU:2"):
        variable = tf.Variable(tf.ones([4, 4]))
    optimizer = Adam(0.001)
    optimizer.build([variable])
    assert all(slot.device.endswith("device:CPU:2") for slot in optimizer.variables[1:])
    step = tf.function(lambda g: optimizer.apply_gradients([(g, variable)]))
    graph = step.get_concrete_function(tf.TensorSpec([4, 4])).graph
    math = [op for op in graph.get_operations() if op.type in ("Mul", "Sub", "Sqrt", "RealDiv", "AddV2")]
    assert len(math) >= 10 and all(op.device.endswith("device:CPU:2") for op in math), \
        [(op.type, op.device) for op in math]
    step(tf.ones([4, 4]))
    # One step of Adam from zero moments moves every weight by the learning rate, against the gradient.
    np.testing.assert_allclose(variable.numpy(), np.full((4, 4), 1 - 0.001), rtol=1e-5)


def test_a_checkpoint_resumes_the_same_steps(tmp_path):
    start = np.arange(6, dtype=np.float32).reshape(3, 2)
    grads = gradients(6, start.shape)
    variable, adam = tf.Variable(start), Adam(LR)
    for g in grads[:3]:
        adam.apply_gradients([(tf.constant(g), variable)])
    path = tf.train.Checkpoint(v=variable, optimizer=adam).write(str(tmp_path / "ckpt"))
    for g in grads[3:]:
        adam.apply_gradients([(tf.constant(g), variable)])
    resumed_var, resumed = tf.Variable(tf.zeros_like(start)), Adam(0.5)
    resumed.build([resumed_var])
    tf.train.Checkpoint(v=resumed_var, optimizer=resumed).read(path).assert_consumed()
    assert int(resumed.iterations.numpy()) == 3 and float(resumed.learning_rate.numpy()) == np.float32(LR)
    for g in grads[3:]:
        resumed.apply_gradients([(tf.constant(g), resumed_var)])
    np.testing.assert_array_equal(resumed_var.numpy(), variable.numpy())


@pytest.mark.skipif(not (compat.version("keras") or "").startswith("2."),
                    reason="distrnn's earlier Adam was Keras 2's: its checkpoints come from the TensorFlow 2.15 stack")
def test_keras_2_adam_checkpoints_resume_and_steps_match_bit_for_bit(tmp_path):
    """A MNIST checkpoint written while distrnn's Adam was Keras's resumes, and the steps are Keras's to the bit."""
    start = np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32)
    grads = gradients(6, start.shape)
    theirs_var, theirs = tf.Variable(start), tf.keras.optimizers.Adam(LR)
    ours_var, ours = tf.Variable(start), Adam(LR)
    theirs.build([theirs_var])
    for g in grads[:3]:
        theirs.apply_gradients([(tf.constant(g), theirs_var)])
        ours.apply_gradients([(tf.constant(g), ours_var)])
    np.testing.assert_array_equal(ours_var.numpy(), theirs_var.numpy())
    path = tf.train.Checkpoint(v=theirs_var, optimizer=theirs).write(str(tmp_path / "keras"))
    resumed_var, resumed = tf.Variable(tf.zeros_like(start)), Adam(LR)
    resumed.build([resumed_var])
    tf.train.Checkpoint(v=resumed_var, optimizer=resumed).read(path).assert_consumed()
    for g in grads[3:]:
        theirs.apply_gradients([(tf.constant(g), theirs_var)])
        resumed.apply_gradients([(tf.constant(g), resumed_var)])
    np.testing.assert_array_equal(resumed_var.numpy(), theirs_var.numpy())
