"""Unrolling a cell over time: a Python loop (static) or tf.while_loop (dynamic).

Both compute the same outputs, final state and gradients; `dynamic` keeps the
graph size independent of the sequence length, `static` lets the graph
optimiser see every step (useful for short sequences on CPU). LSTM cells run
through `lstm_sequence`, whose backward pass is written by hand; other cells
are differentiated by TensorFlow (`unroll_autodiff`, also the reference the
tests hold the LSTM path to).
"""
import tensorflow as tf

from distrnn.rnn.cells import LSTMCell
from distrnn.rnn.lstm_sequence import lstm_sequence

UNROLL_MODES = ("dynamic", "static")


def unroll(cell, inputs, state, mode: str = "dynamic"):
    """Runs `cell` over time-major `inputs` (T, B, I) from `state`.

    Returns (outputs (T, B, H), final state).
    """
    if mode not in UNROLL_MODES:
        raise ValueError(f"unknown unroll mode {mode!r}; use one of {UNROLL_MODES}")
    if not isinstance(cell, LSTMCell):
        return unroll_autodiff(cell, inputs, state, mode)
    projected = cell.project_inputs(inputs)  # (T, B, 4H): the input matmul, once for all steps
    c, h = state
    outputs, c, h = lstm_sequence(projected, c, h, cell.recurrent_kernel(), cell.forget_bias,
                                  static=(mode == "static"))
    return outputs, (c, h)


def unroll_autodiff(cell, inputs, state, mode: str = "dynamic"):
    """The generic loop over `cell.step`, differentiated by TensorFlow."""
    projected = cell.project_inputs(inputs)
    w_h = cell.recurrent_kernel()
    if mode == "static":
        outputs = []
        for t in range(inputs.shape[0]):
            out, state = cell.step(projected[t], state, w_h)
            outputs.append(out)
        return tf.stack(outputs), state

    num_steps = tf.shape(inputs)[0]
    outputs = tf.TensorArray(inputs.dtype, size=num_steps)

    def body(t, state, outputs):
        out, state = cell.step(projected[t], state, w_h)
        return t + 1, state, outputs.write(t, out)

    _, state, outputs = tf.while_loop(
        lambda t, *_: t < num_steps, body, (tf.constant(0), state, outputs))
    return outputs.stack(), state
