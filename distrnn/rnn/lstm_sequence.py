"""A whole LSTM sequence as one differentiable function with a hand-written backward pass.

Autodiff through the unrolled steps replays every forward op of every step in
reverse; on CPU, with batch-20 tensors, the per-op overhead of those ops
dominates. Here the forward pass keeps the activated gates and cell states,
and the backward pass does only what the math needs per step (one matmul and
a few elementwise ops); the recurrent weight gradient is one large matmul
after the loop instead of one small matmul per step. The same structure is
where saved activations can later be swapped to the host or recomputed.

Both passes run either as tf.while_loop (`static=False`: graph size
independent of the sequence length) or as a Python loop (`static=True`: every
step visible to the graph optimiser).
"""
import tensorflow as tf


def _forward_step(x_t, c, h, w_h, shift):
    z = x_t + tf.matmul(h, w_h) + shift
    i, j, f, o = tf.split(z, 4, axis=1)
    i, j, f, o = tf.sigmoid(i), tf.tanh(j), tf.sigmoid(f), tf.sigmoid(o)
    c = f * c + i * j
    h = o * tf.tanh(c)
    return c, h, tf.concat([i, j, f, o], 1)


def _backward_step(d_out, dc_next, dh_next, gates, c, c_prev, w_h, jmask):
    """Gradients through one step: returns (d gate pre-activations, dc_prev, dh_prev)."""
    i, j, f, o = tf.split(gates, 4, axis=1)
    tanh_c = tf.tanh(c)
    dh = d_out + dh_next
    dc = dh * o * (1.0 - tanh_c * tanh_c) + dc_next
    d_a = tf.concat([dc * j, dc * i, dc * c_prev, dh * tanh_c], 1)
    # sigmoid' = a (1 - a) and tanh' = (1 - a)(1 + a): one expression for all four blocks.
    dz = d_a * (1.0 - gates) * (gates + jmask)
    return dz, dc * f, tf.matmul(dz, w_h, transpose_b=True)


def lstm_sequence(projected, c0, h0, w_h, forget_bias: float, static: bool = False):
    """projected (T, B, 4H): input half of the gates with bias; c0, h0 (B, H); w_h (H, 4H).

    Returns outputs (T, B, H), final c, final h.
    """

    @tf.custom_gradient
    def run(projected, c0, h0, w_h):
        units = tf.shape(h0)[1]
        zeros = tf.zeros([units])
        shift = tf.concat([zeros, zeros, tf.fill([units], forget_bias), zeros], 0)  # forget bias on f
        jmask = tf.concat([zeros, tf.ones([units]), zeros, zeros], 0)                # 1 on the tanh block

        if static:
            c, h, outs, gates, cells = c0, h0, [], [], []
            for t in range(projected.shape[0]):
                c, h, a = _forward_step(projected[t], c, h, w_h, shift)
                outs.append(h), gates.append(a), cells.append(c)
            outputs, gates, cells = tf.stack(outs), tf.stack(gates), tf.stack(cells)
        else:
            num_steps = tf.shape(projected)[0]
            ta = lambda: tf.TensorArray(projected.dtype, size=num_steps)

            def body(t, c, h, outs, gates, cells):
                c, h, a = _forward_step(projected[t], c, h, w_h, shift)
                return t + 1, c, h, outs.write(t, h), gates.write(t, a), cells.write(t, c)

            _, c, h, outs, gates, cells = tf.while_loop(
                lambda t, *_: t < num_steps, body, (tf.constant(0), c0, h0, ta(), ta(), ta()))
            outputs, gates, cells = outs.stack(), gates.stack(), cells.stack()
        # outputs, cells (T, B, H); gates (T, B, 4H) after their activations

        def grad(d_outputs, d_c, d_h):
            c_prev = tf.concat([c0[None], cells[:-1]], 0)
            if static:
                dzs = []
                for t in reversed(range(projected.shape[0])):
                    dz, d_c, d_h = _backward_step(d_outputs[t], d_c, d_h, gates[t], cells[t], c_prev[t], w_h, jmask)
                    dzs.append(dz)
                d_z = tf.stack(dzs[::-1])
            else:
                def back(t, dc_next, dh_next, d_z):
                    dz, dc, dh = _backward_step(d_outputs[t], dc_next, dh_next, gates[t], cells[t], c_prev[t],
                                                w_h, jmask)
                    return t - 1, dc, dh, d_z.write(t, dz)

                _, d_c, d_h, d_z = tf.while_loop(
                    lambda t, *_: t >= 0, back,
                    (tf.shape(projected)[0] - 1, d_c, d_h, tf.TensorArray(projected.dtype, size=tf.shape(projected)[0])))
                d_z = d_z.stack()                                       # (T, B, 4H)
            h_prev = tf.concat([h0[None], outputs[:-1]], 0)             # (T, B, H)
            d_w_h = tf.matmul(tf.reshape(h_prev, [-1, units]), tf.reshape(d_z, [-1, 4 * units]),
                              transpose_a=True)                         # (H, 4H): one matmul for all steps
            return d_z, d_c, d_h, d_w_h

        return (outputs, c, h), grad

    return run(projected, c0, h0, w_h)
