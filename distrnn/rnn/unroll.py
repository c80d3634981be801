"""Unrolling a cell over time: a Python loop (static) or tf.while_loop (dynamic).

Both compute the same outputs, final state and gradients; `dynamic` keeps the
graph size independent of the sequence length, `static` lets the graph
optimiser see every step (useful for short sequences on CPU).
"""
import tensorflow as tf

UNROLL_MODES = ("dynamic", "static")


def unroll(cell, inputs, state, mode: str = "dynamic"):
    """Runs `cell` over time-major `inputs` (T, B, I) from `state`.

    Returns (outputs (T, B, H), final state).
    """
    projected = cell.project_inputs(inputs)  # (T, B, 4H): the input matmul, once for all steps
    w_h = cell.recurrent_kernel()
    if mode == "static":
        outputs = []
        for t in range(inputs.shape[0]):
            out, state = cell.step(projected[t], state, w_h)
            outputs.append(out)
        return tf.stack(outputs), state
    if mode != "dynamic":
        raise ValueError(f"unknown unroll mode {mode!r}; use one of {UNROLL_MODES}")

    num_steps = tf.shape(inputs)[0]
    outputs = tf.TensorArray(inputs.dtype, size=num_steps)

    def body(t, state, outputs):
        out, state = cell.step(projected[t], state, w_h)
        return t + 1, state, outputs.write(t, out)

    _, state, outputs = tf.while_loop(
        lambda t, *_: t < num_steps, body, (tf.constant(0), state, outputs))
    return outputs.stack(), state
