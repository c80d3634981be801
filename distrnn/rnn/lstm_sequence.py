"""A whole LSTM sequence as one differentiable function with a hand-written backward pass.

Autodiff through the unrolled steps replays every forward op of every step in
reverse; on CPU, with batch-20 tensors, the per-op overhead of those ops
dominates (about 60 ops a step). Here the loops carry only what is truly
sequential, and everything else is done for all time steps at once:

  forward, per step:  z = x_t + h W_h (forget bias folded into x before the loop);
                      a = activations(z);  c = f c + i j;  h = o tanh(c)
  backward, before the loop, for all steps at once: the activation derivatives
      and the factors that multiply dh and dc;
  backward, per step: dh = d_out_t + dh';  dc = dh Q_t + dc';  dz = [dc, dc, dc, dh] * PD_t;
                      dc' = dc F_t;  dh' = dz W_h^T                  (one matmul, six small ops)
  backward, after the loop: dW_h = sum_t h_{t-1}^T dz_t as one matmul, peephole gradients as sums.

Both passes run either as tf.while_loop (`static=False`: graph size
independent of the sequence length) or as a Python loop (`static=True`: every
step visible to the graph optimiser). The saved activations (gates and cell
states per step) are what a later memory mode can swap to the host or
recompute.

Gates are in i, j, f, o order:
    i = sigmoid(z_i + p_i c_prev)   j = tanh(z_j)   f = sigmoid(z_f + forget_bias + p_f c_prev)
    c_new = f c_prev + i j          o = sigmoid(z_o + p_o c_new)     h_new = o tanh(c_new)
With a mask m (1 while t < sequence_length): c_t = m c_new + (1 - m) c_prev, likewise h_t;
the output is m h_new.
"""
import tensorflow as tf


def _blocks(units, values):
    """A (4H,) vector with the given value on each of the i, j, f, o blocks."""
    return tf.concat([tf.fill([units], float(v)) for v in values], 0)


def _forward_step(x_t, m, c_prev, h_prev, w_h, peep):
    """x_t: the step's input half of the gates, bias and forget bias included."""
    zi, zj, zf, zo = tf.split(x_t + tf.matmul(h_prev, w_h), 4, axis=1)
    if peep is not None:
        zi, zf = zi + peep[0] * c_prev, zf + peep[1] * c_prev
    i, j, f = tf.sigmoid(zi), tf.tanh(zj), tf.sigmoid(zf)
    c = f * c_prev + i * j
    if peep is not None:
        zo = zo + peep[2] * c
    o = tf.sigmoid(zo)
    a = tf.concat([i, j, f, o], 1)
    h = o * tf.tanh(c)
    if m is None:
        return c, h, h, a
    return m * c + (1.0 - m) * c_prev, m * h + (1.0 - m) * h_prev, m * h, a


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
        x = projected + _blocks(units, (0, 0, forget_bias, 0))
        num_steps = tf.shape(projected)[0]
        ta = lambda: tf.TensorArray(projected.dtype, size=num_steps)
        m_at = (lambda t: mask[t]) if has_mask else (lambda t: None)

        if static:
            c, h, outs, gates, cells = c0, h0, [], [], []
            for t in range(projected.shape[0]):
                c, h, out, a = _forward_step(x[t], m_at(t), c, h, w_h, peep)
                outs.append(out), gates.append(a), cells.append(c)
            outputs, gates, cells = tf.stack(outs), tf.stack(gates), tf.stack(cells)
        else:
            def body(t, c, h, outs, gates, cells):
                c, h, out, a = _forward_step(x[t], m_at(t), c, h, w_h, peep)
                return t + 1, c, h, outs.write(t, out), gates.write(t, a), cells.write(t, c)

            _, c, h, outs, gates, cells = tf.while_loop(
                lambda t, *_: t < num_steps, body, (tf.constant(0), c0, h0, ta(), ta(), ta()))
            outputs, gates, cells = outs.stack(), gates.stack(), cells.stack()
        final_c, final_h = c, h
        # outputs, cells (T, B, H); gates (T, B, 4H) after their activations

        def grad(d_outputs, d_c, d_h):
            # For all steps at once: activation derivatives D (sigmoid' = a (1 - a),
            # tanh' = (1 - a)(1 + a)), what each gate's gradient multiplies (P), and the
            # factors of dh and dc in the recurrences (Q, F).
            i, j, f, o = tf.split(gates, 4, axis=2)
            c_prev = tf.concat([c0[None], cells[:-1]], 0)
            tanh_c = tf.tanh(cells)
            derivative = (1.0 - gates) * (gates + _blocks(units, (0, 1, 0, 0)))
            pd = tf.concat([j, i, c_prev, tanh_c], 2) * derivative       # (T, B, 4H)
            q = o * (1.0 - tanh_c * tanh_c)                              # dc += dh q
            fc = f                                                       # dc_prev = dc fc
            if has_peep:
                pd_i, _, pd_f, pd_o = tf.split(pd, 4, axis=2)
                q += pd_o * peep[2]
                fc = f + pd_i * peep[0] + pd_f * peep[1]

            def step(t, dc_next, dh_next):
                dh = d_outputs[t] + dh_next
                dc_in = dc_next
                if has_mask:
                    dh, dc_in = mask[t] * dh, mask[t] * dc_next
                dc = dh * q[t] + dc_in
                dz = tf.concat([dc, dc, dc, dh], 1) * pd[t]
                dc_prev = dc * fc[t]
                dh_prev = tf.matmul(dz, w_h, transpose_b=True)
                if has_mask:
                    dc_prev += (1.0 - mask[t]) * dc_next
                    dh_prev += (1.0 - mask[t]) * dh_next
                return dz, dc_prev, dh_prev

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
