"""Every unrolling mode against the formulas in NumPy and against TensorFlow's autodiff."""
import numpy as np
import pytest
import tensorflow as tf

from distrnn.rnn import BasicRNNCell, GRUCell, LSTMCell, Unrolling, resolve_mode, supported, unroll, unroll_autodiff
from distrnn.rnn.fused import _cudnn_lstm_params
from distrnn.rnn.lstm_sequence import KEEP, Memory, lstm_stack
from distrnn.rnn.unroll import lstm_layer

# The two-step example of the material distrnn grows from: input size 3, 5 units, batch 4.
X0 = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 1]], np.float32)
X1 = np.array([[9, 8, 7], [0, 0, 0], [6, 5, 4], [3, 2, 1]], np.float32)
CELL_KINDS = ["rnn", "gru", "lstm", "lstm_peep"]
MODES = ["static", "dynamic", "block"]


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_step(kind, cell, x, state):
    """The cell formulas written out; state is a tuple of arrays."""
    k, b = cell.kernel.numpy(), cell.bias.numpy()
    n = cell.input_size
    if kind == "rnn":
        h = np.tanh(np.concatenate([x, state[0]], 1) @ k + b)
        return h, (h,)
    if kind == "gru":
        h = state[0]
        xr, xu, xn = np.split(x @ k[:n] + b, 3, axis=1)
        hr, hu, hn = np.split(h @ k[n:] + cell.recurrent_bias.numpy(), 3, axis=1)
        r, u = sigmoid(xr + hr), sigmoid(xu + hu)
        h = u * h + (1 - u) * np.tanh(xn + r * hn)
        return h, (h,)
    c, h = state
    i, j, f, o = np.split(np.concatenate([x, h], 1) @ k + b, 4, axis=1)
    if cell.use_peepholes:
        i, f = i + cell.w_i_diag.numpy() * c, f + cell.w_f_diag.numpy() * c
    c = sigmoid(f + cell.forget_bias) * c + sigmoid(i) * np.tanh(j)
    if cell.use_peepholes:
        o = o + cell.w_o_diag.numpy() * c
    h = sigmoid(o) * np.tanh(c)
    return h, (c, h)


def numpy_unroll(kind, cell, xs, state, lengths=None):
    outputs = []
    for t, x in enumerate(xs):
        out, new = numpy_step(kind, cell, x, state)
        if lengths is not None:
            valid = (t < lengths)[:, None]
            out = np.where(valid, out, 0.0)
            new = tuple(np.where(valid, a, s) for a, s in zip(new, state))
        outputs.append(out)
        state = new
    return (np.stack(outputs) if outputs else None), state


def make_cell(kind, input_size=3, units=5, seed=3):
    init = tf.keras.initializers.RandomUniform(-0.5, 0.5, seed=seed)
    if kind == "rnn":
        cell = BasicRNNCell(input_size, units, initializer=init)
    elif kind == "gru":
        cell = GRUCell(input_size, units, initializer=init)
        cell.recurrent_bias.assign(tf.random.stateless_uniform([3 * units], seed=[seed, 2], minval=-0.5, maxval=0.5))
    else:
        cell = LSTMCell(input_size, units, forget_bias=1.0, use_peepholes=kind == "lstm_peep", initializer=init)
    cell.bias.assign(tf.random.stateless_uniform(cell.bias.shape, seed=[seed, 1], minval=-0.5, maxval=0.5))
    return cell


def initial_state(cell, batch):
    values = (np.full((batch, cell.units), 0.1, np.float32), np.full((batch, cell.units), -0.2, np.float32))
    return values[-cell.state_size:]


def cases():
    for kind in CELL_KINDS:
        for mode in MODES:
            cell = make_cell(kind)
            if supported(cell.kind, cell.use_peepholes, mode):
                yield kind, mode


@pytest.mark.parametrize("kind, mode", list(cases()))
def test_two_step_example_matches_numpy(kind, mode):
    cell = make_cell(kind)
    xs = np.stack([X0, X1])  # (T=2, B=4, I=3)
    state0 = initial_state(cell, 4)
    outputs, state = tf.function(lambda x: unroll(cell, x, tuple(map(tf.constant, state0)), mode))(xs)
    ref_out, ref_state = numpy_unroll(kind, cell, xs, state0)
    assert outputs.shape == (2, 4, 5)
    np.testing.assert_allclose(outputs.numpy(), ref_out, rtol=1e-5, atol=1e-6)
    for a, b in zip(state, ref_state):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind, mode", list(cases()))
@pytest.mark.parametrize("with_lengths", [False, True])
def test_outputs_states_and_gradients_match_autodiff(kind, mode, with_lengths):
    cell = make_cell(kind, input_size=4, units=6)
    xs = tf.random.stateless_normal([7, 5, 4], seed=[1, 2])
    state0 = tuple(tf.random.stateless_normal([5, 6], seed=[3, k]) for k in range(cell.state_size))
    lengths = tf.constant([7, 3, 0, 1, 5]) if with_lengths else None
    weights = tf.random.stateless_normal([7, 5, 6], seed=[4, 4])

    def run(fn):
        @tf.function
        def f(x, state):
            with tf.GradientTape() as tape:
                tape.watch([x, state])
                out, final = fn(cell, x, state, sequence_length=lengths)
                loss = tf.reduce_sum(out * weights) + sum(tf.reduce_sum(s * s) for s in final)
            return [out, *final] + tape.gradient(loss, [x, *state] + list(cell.trainable_variables))
        return [t.numpy() for t in f(xs, state0)]

    ours = run(lambda c, x, s, sequence_length: unroll(c, x, s, mode, sequence_length))
    reference = run(lambda c, x, s, sequence_length: unroll_autodiff(c, x, s, "static", sequence_length))
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


MEMORY_CASES = [(True, KEEP), (False, KEEP),
                # 7 steps: segments of 3, 3 and 1; of 1 each; one segment longer than the sequence
                (False, Memory(recompute=3)), (False, Memory(recompute=1)), (False, Memory(recompute=10)),
                (False, Memory(swap=True, segment=2)), (True, Memory(swap=True, segment=4))]


LAYER_BY_LAYER = {}  # (peepholes, with_lengths): the autodiff reference's outputs and gradients


@pytest.mark.parametrize("static, memory", MEMORY_CASES, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("peepholes", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_interleaved_lstm_stack_matches_layer_by_layer_autodiff(static, memory, peepholes, with_lengths):
    # Three layers of different widths (4 -> 6 -> 5 -> 3 units), dropout masks between them; every
    # memory mode gives the same outputs, states and gradients as keeping everything.
    sizes = [4, 6, 5, 3]
    cells = []
    for l in range(3):
        cell = make_cell("lstm_peep" if peepholes else "lstm", input_size=sizes[l], units=sizes[l + 1], seed=l)
        cell.forget_bias = 0.5 * l
        cells.append(cell)
    xs = tf.random.stateless_normal([7, 5, 4], seed=[1, 2])
    states = [tuple(tf.random.stateless_normal([5, sizes[l + 1]], seed=[3 + l, k]) for k in range(2))
              for l in range(3)]
    masks = [tf.cast(tf.random.stateless_uniform([7, 5, sizes[l + 1]], seed=[5, l]) < 0.7, tf.float32) / 0.7
             for l in range(3)]
    lengths = tf.constant([7, 3, 0, 1, 5]) if with_lengths else None
    weights = tf.random.stateless_normal([7, 5, 3], seed=[4, 4])
    variables = [v for cell in cells for v in cell.trainable_variables]

    def run(stack):
        @tf.function
        def f(x, states):
            with tf.GradientTape() as tape:
                tape.watch([x, states])
                out, finals = stack(x, states)
                loss = tf.reduce_sum(out * weights) + sum(tf.reduce_sum(s * s) for f in finals for s in f)
            flat = [s for f in finals for s in f]
            return [out, *flat] + tape.gradient(loss, [x, *tf.nest.flatten(states)] + variables)
        return [t.numpy() for t in f(xs, states)]

    def layer_by_layer(x, states):
        finals = []
        for cell, state, mask in zip(cells, states, masks):
            x, final = unroll_autodiff(cell, x, state, "static", lengths)
            x = x * mask
            finals.append(final)
        return x, finals

    def interleaved(x, states):
        layers = [lstm_layer(cell) for cell in cells]
        mask = None if lengths is None else tf.transpose(tf.sequence_mask(lengths, 7, tf.float32))[:, :, None]
        return lstm_stack(x, states, layers, dropout=masks, mask=mask, static=static, memory=memory)

    # The reference depends on neither memory nor static: computed once for the 7 cases that share it.
    key = (peepholes, with_lengths)
    if key not in LAYER_BY_LAYER:
        LAYER_BY_LAYER[key] = run(layer_by_layer)
    ours, reference = run(interleaved), LAYER_BY_LAYER[key]
    assert len(ours) == len(reference) == 1 + 6 + 1 + 6 + len(variables)
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind, mode", list(cases()))
def test_sequence_length_semantics(kind, mode):
    cell = make_cell(kind)
    xs = np.random.default_rng(0).normal(size=(4, 3, 3)).astype(np.float32)
    lengths = np.array([4, 2, 0])
    state0 = initial_state(cell, 3)
    outputs, state = unroll(cell, tf.constant(xs), tuple(map(tf.constant, state0)), mode, tf.constant(lengths))
    outputs = outputs.numpy()
    assert np.all(outputs[2:, 1] == 0) and np.all(outputs[:, 2] == 0)  # zero past each end
    for row, n in enumerate(lengths):  # final state = the state after the row's last valid step
        _, ref = numpy_unroll(kind, cell, xs[:n, row:row + 1], tuple(s[row:row + 1] for s in state0))
        for a, b in zip(state, ref):
            np.testing.assert_allclose(a.numpy()[row:row + 1], b, rtol=1e-5, atol=1e-6)


def test_cudnn_weights_compute_the_same_lstm_by_cudnns_formulas():
    """No GPU here to run cuDNN, so its inputs are checked instead: distrnn's weights converted to
    cuDNN's canonical list (gates i, f, c, o; input matrices W and recurrent matrices R, each
    (units, inputs); two biases) put through the formulas cuDNN documents give our LSTM's outputs."""
    cell = make_cell("lstm")
    weights, biases = (list(map(np.asarray, part)) for part in _cudnn_lstm_params(cell))
    assert [w.shape for w in weights] == [(5, 3)] * 4 + [(5, 5)] * 4 and [b.shape for b in biases] == [(5,)] * 8
    w, r = weights[:4], weights[4:]
    b = [biases[g] + biases[4 + g] for g in range(4)]
    xs = np.stack([X0, X1])
    c, h = initial_state(cell, 4)
    outputs = []
    for x in xs:
        gate = [x @ w[g].T + h @ r[g].T + b[g] for g in range(4)]   # i, f, c, o
        i, f, o = sigmoid(gate[0]), sigmoid(gate[1]), sigmoid(gate[3])
        c = f * c + i * np.tanh(gate[2])
        h = o * np.tanh(c)
        outputs.append(h)
    ref_out, (ref_c, ref_h) = numpy_unroll("lstm", cell, xs, initial_state(cell, 4))
    np.testing.assert_allclose(np.stack(outputs), ref_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c, ref_c, rtol=1e-5, atol=1e-6)


def test_state_carries_across_calls():
    # Unrolling 4 steps at once equals 2 + 2 with the state carried: what truncated BPTT relies on.
    cell = make_cell("lstm")
    xs = tf.random.stateless_normal([4, 2, 3], seed=[5, 6])
    out_all, state_all = unroll(cell, xs, cell.zero_state(2))
    out_a, state_a = unroll(cell, xs[:2], cell.zero_state(2))
    out_b, state_b = unroll(cell, xs[2:], state_a)
    np.testing.assert_allclose(np.concatenate([out_a, out_b]), out_all.numpy(), rtol=1e-6)
    np.testing.assert_allclose(state_b[0].numpy(), state_all[0].numpy(), rtol=1e-6)


def test_modes_that_do_not_fit_a_cell_are_refused():
    with pytest.raises(ValueError, match="^rnn_mode block runs LSTM cells only; use --rnn_mode auto, static or "
                                         "dynamic for gru$"):
        unroll(make_cell("gru"), tf.zeros([2, 1, 3]), (tf.zeros([1, 5]),), "block")
    with pytest.raises(ValueError, match="^cuDNN has no peephole LSTM; use --rnn_mode block, static or dynamic with "
                                         "--use_peepholes$"):
        unroll(make_cell("lstm_peep"), tf.zeros([2, 1, 3]), (tf.zeros([1, 5]),) * 2, "cudnn")


def test_a_cell_class_names_its_own_kind():
    """A subclass that changed the math and kept LSTMCell's kind would run the LSTM's fused and hand-written
    kernels, which do not have its change: it must name a kind of its own, listed in CELL_KINDS."""
    from distrnn.rnn.cells import LSTMCell
    with pytest.raises(TypeError, match="^LayerNormLSTMCell must name its own kind, a key of distrnn.names.CELL_KINDS"):
        class LayerNormLSTMCell(LSTMCell):
            pass
    with pytest.raises(TypeError, match="must name its own kind"):
        class Unlisted(LSTMCell):
            kind = "layer_norm_lstm"


def test_auto_picks_a_mode_and_says_why():
    assert resolve_mode("lstm", False, "auto", on_gpu=False, num_steps=20)[0] == "static"
    assert resolve_mode("gru", False, "auto", on_gpu=False, num_steps=1000)[0] == "dynamic"
    assert resolve_mode("lstm", True, "auto", on_gpu=True, num_steps=20)[0] == "dynamic"  # no cuDNN peepholes
    assert resolve_mode("lstm", False, "block", on_gpu=False) == ("block", "asked for")
    with pytest.raises(ValueError, match="rnn_mode cudnn needs a GPU with cuDNN and this process has none"):
        resolve_mode("lstm", False, "cudnn", on_gpu=False)


def test_the_mode_is_resolved_once_and_unroll_takes_it_concrete():
    # The pipeline interleaves the layers' steps: whole-sequence kernels become the dynamic loop, and say so.
    assert resolve_mode("lstm", False, "block", False, 20, placement="pipeline") == (
        "dynamic", "block runs whole sequences; the pipeline needs a step loop")
    assert resolve_mode("lstm", False, "auto", False, 20, placement="pipeline")[0] == "static"
    unrolling = Unrolling.resolve("gru", False, "auto", False, 100, "pipeline", KEEP)
    assert unrolling == Unrolling("dynamic", unrolling.reason, "pipeline", KEEP)
    with pytest.raises(ValueError, match="unroll runs a concrete mode: resolve_mode turns auto into one"):
        unroll(make_cell("lstm"), tf.zeros([2, 1, 3]), (tf.zeros([1, 5]),) * 2, "auto")


def test_memory_modes_resolve_and_grow_leaner():
    # After keep: recompute with segments of about sqrt(num_steps), then swap, then nothing left.
    assert KEEP.leaner(35) == Memory(recompute=6) and KEEP.leaner(1) == Memory(recompute=1)
    assert Memory(recompute=6).leaner(35) == Memory(swap=True) and Memory(swap=True).leaner(35) is None
    for mode in ("auto", "static", "dynamic"):
        assert resolve_mode("lstm", True, mode, True, 35, Memory(recompute=6)) == (
            "dynamic", "a memory mode runs segment by segment in while loops")
    for kind, mode in (("gru", "auto"), ("rnn", "dynamic"), ("lstm", "block"), ("lstm", "cudnn")):
        with pytest.raises(ValueError, match=f"needs LSTM cells and rnn_mode auto, static or dynamic .got the {kind} "
                                             f"cell, rnn_mode {mode}."):
            resolve_mode(kind, False, mode, False, 35, Memory(swap=True))
    assert resolve_mode("lstm", False, "auto", False, 35, KEEP)[0] == "static"
