"""A whole LSTM sequence as one differentiable function with a hand-written backward pass.

Autodiff through the unrolled steps replays every forward op of every step in
reverse; on CPU, with batch-20 tensors, the per-op overhead of those ops
dominates. Here the forward pass keeps the activated gates and cell states,
and the backward pass does only what the math needs per step (one matmul and
a few elementwise ops); the recurrent and peephole weight gradients are large
reductions after the loop instead of small ones per step. The same structure
is where saved activations can later be swapped to the host or recomputed.

Both passes run either as tf.while_loop (`static=False`: graph size
independent of the sequence length) or as a Python loop (`static=True`: every
step visible to the graph optimiser).

Notation per step, gates in i, j, f, o order (a = activated gates):
    i = sigmoid(z_i + p_i c_prev)   j = tanh(z_j)   f = sigmoid(z_f + forget_bias + p_f c_prev)
    c_new = f c_prev + i j          o = sigmoid(z_o + p_o c_new)     h_new = o tanh(c_new)
With a mask m (1 while t < sequence_length): c_t = m c_new + (1 - m) c_prev, likewise h_t;
the output is m h_new.
"""
import tensorflow as tf


def _forward_step(x_t, m, c_prev, h_prev, w_h, shift, peep):
    z = x_t + tf.matmul(h_prev, w_h) + shift
    zi, zj, zf, zo = tf.split(z, 4, axis=1)
    if peep is not None:
        zi, zf = zi + peep[0] * c_prev, zf + peep[1] * c_prev
    i, j, f = tf.sigmoid(zi), tf.tanh(zj), tf.sigmoid(zf)
    c = f * c_prev + i * j
    if peep is not None:
        zo = zo + peep[2] * c
    o = tf.sigmoid(zo)
    h = o * tf.tanh(c)
    gates = tf.concat([i, j, f, o], 1)
    if m is None:
        return c, h, h, gates
    return m * c + (1.0 - m) * c_prev, m * h + (1.0 - m) * h_prev, m * h, gates


def _backward_step(d_out, m, dc_next, dh_next, gates, c, c_prev, w_h, jmask, peep):
    """Gradients through one step: (d gate pre-activations, dc_prev, dh_prev).

    `c` is the stored cell state; where m is 0 it differs from c_new, but there
    every gradient into the step is 0, so it is never used.
    """
    i, j, f, o = tf.split(gates, 4, axis=1)
    tanh_c = tf.tanh(c)
    dh = d_out + dh_next
    dc_in = dc_next
    if m is not None:
        dh, dc_in = m * dh, m * dc_next
    d_zo = dh * tanh_c * o * (1.0 - o)
    dc = dh * o * (1.0 - tanh_c * tanh_c) + dc_in
    if peep is not None:
        dc += d_zo * peep[2]
    d_a = tf.concat([dc * j, dc * i, dc * c_prev], 1)
    # sigmoid' = a (1 - a) and tanh' = (1 - a)(1 + a): one expression for the i, j, f blocks.
    a = gates[:, :-tf.shape(o)[1]]
    dz = tf.concat([d_a * (1.0 - a) * (a + jmask), d_zo], 1)
    dc_prev = dc * f
    if peep is not None:
        d_zi, _, d_zf, _ = tf.split(dz, 4, axis=1)
        dc_prev += d_zi * peep[0] + d_zf * peep[1]
    dh_prev = tf.matmul(dz, w_h, transpose_b=True)
    if m is not None:
        dc_prev += (1.0 - m) * dc_next
        dh_prev += (1.0 - m) * dh_next
    return dz, dc_prev, dh_prev


def lstm_sequence(projected, c0, h0, w_h, forget_bias: float, peepholes=None, mask=None, static: bool = False):
    """projected (T, B, 4H): input half of the gates with bias; c0, h0 (B, H); w_h (H, 4H);
    peepholes (3, H) or None; mask (T, B, 1) float or None.

    Returns outputs (T, B, H), final c, final h.
    """
    extra = [t for t in (peepholes, mask) if t is not None]
    has_peep, has_mask = peepholes is not None, mask is not None

    @tf.custom_gradient
    def run(projected, c0, h0, w_h, *extra):
        peep = extra[0] if has_peep else None
        mask = extra[-1] if has_mask else None
        units = tf.shape(h0)[1]
        zeros = tf.zeros([units])
        shift = tf.concat([zeros, zeros, tf.fill([units], forget_bias), zeros], 0)  # forget bias on f
        jmask = tf.concat([zeros, tf.ones([units]), zeros], 0)                       # 1 on the tanh block
        num_steps = tf.shape(projected)[0]
        ta = lambda: tf.TensorArray(projected.dtype, size=num_steps)
        m_at = (lambda t: mask[t]) if has_mask else (lambda t: None)

        if static:
            c, h, outs, gates, cells = c0, h0, [], [], []
            for t in range(projected.shape[0]):
                c, h, out, a = _forward_step(projected[t], m_at(t), c, h, w_h, shift, peep)
                outs.append(out), gates.append(a), cells.append(c)
            outputs, gates, cells = tf.stack(outs), tf.stack(gates), tf.stack(cells)
        else:
            def body(t, c, h, outs, gates, cells):
                c, h, out, a = _forward_step(projected[t], m_at(t), c, h, w_h, shift, peep)
                return t + 1, c, h, outs.write(t, out), gates.write(t, a), cells.write(t, c)

            _, c, h, outs, gates, cells = tf.while_loop(
                lambda t, *_: t < num_steps, body, (tf.constant(0), c0, h0, ta(), ta(), ta()))
            outputs, gates, cells = outs.stack(), gates.stack(), cells.stack()
        final_c, final_h = c, h
        # outputs, cells (T, B, H); gates (T, B, 4H) after their activations

        def grad(d_outputs, d_c, d_h):
            c_prev = tf.concat([c0[None], cells[:-1]], 0)
            step = lambda t, dc, dh: _backward_step(d_outputs[t], m_at(t), dc, dh, gates[t], cells[t], c_prev[t],
                                                    w_h, jmask, peep)
            if static:
                dzs = []
                for t in reversed(range(projected.shape[0])):
                    dz, d_c, d_h = step(t, d_c, d_h)
                    dzs.append(dz)
                d_z = tf.stack(dzs[::-1])
            else:
                def back(t, dc_next, dh_next, d_z):
                    dz, dc, dh = step(t, dc_next, dh_next)
                    return t - 1, dc, dh, d_z.write(t, dz)

                _, d_c, d_h, d_z = tf.while_loop(lambda t, *_: t >= 0, back, (num_steps - 1, d_c, d_h, ta()))
                d_z = d_z.stack()                                       # (T, B, 4H)
            # h entering each step: h0, then the carried h (== output where the mask is 1).
            h_carried = outputs if not has_mask else _carried_h(outputs, mask, h0)
            h_prev = tf.concat([h0[None], h_carried[:-1]], 0)           # (T, B, H)
            d_w_h = tf.matmul(tf.reshape(h_prev, [-1, units]), tf.reshape(d_z, [-1, 4 * units]),
                              transpose_a=True)                         # (H, 4H): one matmul for all steps
            grads = [d_z, d_c, d_h, d_w_h]
            if has_peep:
                d_zi, _, d_zf, d_zo = tf.split(d_z, 4, axis=2)
                grads.append(tf.stack([tf.reduce_sum(d_zi * c_prev, [0, 1]), tf.reduce_sum(d_zf * c_prev, [0, 1]),
                                       tf.reduce_sum(d_zo * cells, [0, 1])]))
            if has_mask:
                grads.append(None)
            return grads

        return (outputs, final_c, final_h), grad

    return run(projected, c0, h0, w_h, *extra)


def _carried_h(outputs, mask, h0):
    """The h state after each step when outputs are zeroed past each sequence's end:
    past the end the state stays at the last valid step's h (or h0)."""
    def body(h, x):
        out, m = x
        return m * out + (1.0 - m) * h
    return tf.scan(body, (outputs, mask), initializer=h0)
