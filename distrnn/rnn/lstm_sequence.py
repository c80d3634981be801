"""LSTM sequences -- one layer or a stack -- as one differentiable function with a hand-written backward pass.

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

In a stack, layer l > 0 computes its step t from layer l-1's output at step t
(times that layer's dropout mask) inside the same loop step, and passes the
gradient of that input back inside the same backward step. Nothing waits for
a whole layer, so the dataflow executor runs layer l's step t beside layer
l-1's step t+1 -- the wavefront GNMT builds by hand -- forward and backward
(measured on 2 CPU cores, 2 layers of 200 units, 20 steps, batch 20: forward
3.8 ms one layer after the other, 2.0 ms interleaved).

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
import contextlib
from typing import NamedTuple, Optional

import numpy as np
import tensorflow as tf


class Layer(NamedTuple):
    """One layer's weights for `lstm_stack`, as LSTMCell stores them."""
    kernel: tf.Tensor                   # (I + H, 4H): input rows, then recurrent rows
    bias: tf.Tensor                     # (4H,)
    forget_bias: float
    peepholes: Optional[tf.Tensor] = None  # (3, H): i, f, o
    device: Optional[str] = None


def _blocks(units, values):
    """A (4H,) vector with the given value on each of the i, j, f, o blocks."""
    if isinstance(units, int):
        return tf.constant(np.repeat(np.asarray(values, np.float32), units))
    return tf.concat([tf.fill([units], float(v)) for v in values], 0)


@contextlib.contextmanager
def _layer_scope(l: int, num_layers: int, device):
    """Layer l's ops under its device and, in a stack, a name scope of its own."""
    with tf.device(device) if device else contextlib.nullcontext():
        with tf.name_scope(f"layer_{l}") if num_layers > 1 else contextlib.nullcontext():
            yield


def _scan(step, sequences, carry, num_records: int, static: bool, reverse: bool = False):
    """Runs `step(slices, carry) -> (carry, records)` over the time steps of
    `sequences` (each (T, ...) or None; slices hold None for those), forward or
    in reverse. Returns the final carry and the `num_records` records stacked
    in time order, (T, ...) each.

    static: a Python loop whose slices come from one Unpack per sequence (a
    slice per step costs an op each); otherwise a tf.while_loop over TensorArrays.
    """
    given = next(s for s in sequences if s is not None)
    if static:
        num_steps = given.shape[0]
        slices = [tf.unstack(s) if s is not None else [None] * num_steps for s in sequences]
        records = [[None] * num_steps for _ in range(num_records)]
        for t in (reversed(range(num_steps)) if reverse else range(num_steps)):
            carry, new = step([s[t] for s in slices], carry)
            for k, r in enumerate(new):
                records[k][t] = r
        return carry, [tf.stack(r) for r in records]

    num_steps = tf.shape(given)[0]

    def body(t, carry, arrays):
        carry, new = step([s[t] if s is not None else None for s in sequences], carry)
        return t + (-1 if reverse else 1), carry, [a.write(t, r) for a, r in zip(arrays, new)]

    arrays = [tf.TensorArray(given.dtype, size=num_steps) for _ in range(num_records)]
    start = num_steps - 1 if reverse else tf.constant(0)
    cond = (lambda t, *_: t >= 0) if reverse else (lambda t, *_: t < num_steps)
    _, carry, arrays = tf.while_loop(cond, body, (start, carry, arrays))
    return carry, [a.stack() for a in arrays]


def _forward_step(z, m, c_prev, h_prev, peep, units):
    """z: the step's gate pre-activations, bias and forget bias included.

    Returns c, h, the output and what the backward pass keeps: the activations
    `a` (B, 4H) and, without peepholes, tanh(z_j) apart. Without peepholes one
    sigmoid over all four blocks (its j block unused) replaces three, and no
    concat is needed: on CPU each op's fixed cost outweighs its arithmetic here.
    """
    if peep is None:
        a = tf.sigmoid(z)
        i, _, f, o = tf.split(a, 4, axis=1)
        j = tf.tanh(z[:, units:2 * units])
        c = f * c_prev + i * j
    else:
        zi, zj, zf, zo = tf.split(z, 4, axis=1)
        i, j, f = tf.sigmoid(zi + peep[0] * c_prev), tf.tanh(zj), tf.sigmoid(zf + peep[1] * c_prev)
        c = f * c_prev + i * j
        o = tf.sigmoid(zo + peep[2] * c)
        a, j = tf.concat([i, j, f, o], 1), None
    h = o * tf.tanh(c)
    if m is None:
        return c, h, h, a, j
    return m * c + (1.0 - m) * c_prev, m * h + (1.0 - m) * h_prev, m * h, a, j


def _backward_factors(acts, js, cells, c0, peep, units):
    """For all steps at once: what each gate's gradient multiplies (PD: the activation
    derivative, sigmoid' = a (1 - a), tanh' = (1 - a)(1 + a), times the gate's partner),
    and the factors of dh and dc in the recurrences (Q, F). Also c_prev (T, B, H)."""
    i, j, f, o = tf.split(acts, 4, axis=2)
    if js is not None:
        j = js
    gates = tf.concat([i, j, f, o], 2)
    c_prev = tf.concat([c0[None], cells[:-1]], 0)
    tanh_c = tf.tanh(cells)
    derivative = (1.0 - gates) * (gates + _blocks(units, (0, 1, 0, 0)))
    pd = tf.concat([j, i, c_prev, tanh_c], 2) * derivative       # (T, B, 4H)
    q = o * (1.0 - tanh_c * tanh_c)                              # dc += dh q
    fc = f                                                       # dc_prev = dc fc
    if peep is not None:
        pd_i, _, pd_f, pd_o = tf.split(pd, 4, axis=2)
        q += pd_o * peep[2]
        fc = f + pd_i * peep[0] + pd_f * peep[1]
    return pd, q, fc, c_prev


def _backward_step(d_out, q, pd, fc, m, dc_next, dh_next, w_h):
    """One step back through one layer; d_out, q, pd, fc, m: the step's slices.
    Returns dz (the gradient of the step's gate pre-activations), dc and dh of the state before."""
    dh = d_out + dh_next
    dc_in = dc_next
    if m is not None:
        dh, dc_in = m * dh, m * dc_next
    dc = dh * q + dc_in
    dz = tf.concat([dc, dc, dc, dh], 1) * pd
    dc_prev = dc * fc
    dh_prev = tf.matmul(dz, w_h, transpose_b=True)
    if m is not None:
        dc_prev += (1.0 - m) * dc_next
        dh_prev += (1.0 - m) * dh_next
    return dz, dc_prev, dh_prev


def _record_names(layer: Layer, dropout: bool):
    """What the forward loop keeps of a layer at each step, in order."""
    return ["out", "a", "c"] + ([] if layer.peepholes is not None else ["j"]) + (["y"] if dropout else [])


def lstm_stack(inputs, states, layers, dropout=None, mask=None, static: bool = False):
    """inputs (T, B, I); states: one (c, h) per layer, (B, H) each; layers: one
    `Layer` per layer, each computed (forward and backward) on its `device` when
    it names one; dropout: one (T, B, H) multiplier per layer for its output, or
    None; mask (T, B, 1) float or None (1 while t < sequence_length).

    Returns the last layer's outputs (T, B, H), times its dropout, and one final
    (c, h) per layer.
    """
    num_layers = len(layers)
    has_drop, has_mask = dropout is not None, mask is not None
    names = [_record_names(layer, has_drop) for layer in layers]
    # Differentiable inputs, flat: inputs, then per layer c0, h0, kernel, bias [, peepholes].
    flat = [inputs]
    for layer, (c0, h0) in zip(layers, states):
        flat += [c0, h0, layer.kernel, layer.bias] + ([layer.peepholes] if layer.peepholes is not None else [])
    constants = list(dropout or []) + ([mask] if has_mask else [])

    def unflatten(args):
        args = list(args)
        inputs, per_layer = args.pop(0), []
        for l, layer in enumerate(layers):
            c0, h0, kernel, bias = (args.pop(0) for _ in range(4))
            peep = args.pop(0) if layer.peepholes is not None else None
            with _layer_scope(l, num_layers, layer.device):
                # A Python int where the shape is known, so that slices and constants built from
                # it are constants (the PTB small step's graph: 1,643 ops with a tensor, 1,335).
                units = h0.shape[1] if h0.shape[1] is not None else tf.shape(h0)[1]
                # One Split of the kernel (its gradient is one Concat), and the forget bias
                # folded into the bias once rather than added at every step.
                w_x, w_h = tf.split(kernel, [tf.shape(kernel)[0] - units, units], axis=0)
                bias_fb = bias + _blocks(units, (0, 0, layer.forget_bias, 0))
            per_layer.append(dict(c0=c0, h0=h0, w_x=w_x, w_h=w_h, bias_fb=bias_fb, peep=peep, units=units,
                                  device=layer.device))
        drops = args[:num_layers] if has_drop else None
        return inputs, per_layer, drops, (args[-1] if has_mask else None)

    @tf.custom_gradient
    def run(*args):
        inputs, params, drops, mask = unflatten(args)
        num_steps, batch = tf.shape(inputs)[0], tf.shape(inputs)[1]
        with _layer_scope(0, num_layers, params[0]["device"]):  # the first layer's input matmul, once for all steps
            flat_x = tf.reshape(inputs, [num_steps * batch, -1])
            x = tf.reshape(tf.nn.bias_add(tf.matmul(flat_x, params[0]["w_x"]), params[0]["bias_fb"]),
                           [num_steps, batch, 4 * params[0]["units"]])

        def forward(slices, carry):
            x_t, drop_t, m = slices[0], slices[1:1 + num_layers] if has_drop else None, slices[-1] if has_mask else None
            carry, records = list(carry), []
            for l, lp in enumerate(params):
                with _layer_scope(l, num_layers, lp["device"]):
                    c, h = carry[2 * l:2 * l + 2]
                    if l:
                        x_t = tf.nn.bias_add(tf.matmul(x_t, lp["w_x"]), lp["bias_fb"])
                    z = x_t + tf.matmul(h, lp["w_h"])
                    c, h, out, a, j = _forward_step(z, m, c, h, lp["peep"], lp["units"])
                    carry[2 * l:2 * l + 2] = c, h
                    x_t = out * drop_t[l] if has_drop else out
                    kept = dict(out=out, a=a, c=c, j=j, y=x_t)
                    records += [kept[n] for n in names[l]]
            return carry, records

        sequences = [x] + (list(drops) if has_drop else []) + ([mask] if has_mask else [])
        carry = [s for lp in params for s in (lp["c0"], lp["h0"])]
        final, records = _scan(forward, sequences, carry, sum(map(len, names)), static)
        saved = []
        for l in range(num_layers):  # per layer, its records by name: (T, B, ...) each
            saved.append(dict(zip(names[l], records[:len(names[l])])))
            records = records[len(names[l]):]
        outputs = saved[-1]["y" if has_drop else "out"]

        def grad(d_outputs, *d_final):
            with tf.name_scope("gradient"):  # so that graphs and tests can tell the backward pass apart
                return backward_pass(d_outputs, d_final)

        def backward_pass(d_outputs, d_final):
            factors = []
            for l, (lp, s) in enumerate(zip(params, saved)):
                with _layer_scope(l, num_layers, lp["device"]):
                    factors.append(_backward_factors(s["a"], s.get("j"), s["c"], lp["c0"], lp["peep"], lp["units"]))

            def backward(slices, carry):
                d_y, drop_t = slices[0], slices[1:1 + num_layers] if has_drop else None
                m = slices[1 + (num_layers if has_drop else 0)] if has_mask else None
                per_layer = slices[-3 * num_layers:]
                carry, records = list(carry), [None] * num_layers
                for l in reversed(range(num_layers)):
                    lp = params[l]
                    with _layer_scope(l, num_layers, lp["device"]):
                        d_out = d_y * drop_t[l] if has_drop else d_y
                        pd_t, q_t, fc_t = per_layer[3 * l:3 * l + 3]
                        dz, carry[2 * l], carry[2 * l + 1] = _backward_step(
                            d_out, q_t, pd_t, fc_t, m, carry[2 * l], carry[2 * l + 1], lp["w_h"])
                        records[l] = dz
                        if l:  # the gradient of this step's input, for the layer below
                            d_y = tf.matmul(dz, lp["w_x"], transpose_b=True)
                return carry, records

            sequences = ([d_outputs] + (list(drops) if has_drop else []) + ([mask] if has_mask else [])
                         + [t for pd, q, fc, _ in factors for t in (pd, q, fc)])
            d_initial, d_z = _scan(backward, sequences, list(d_final), num_layers, static, reverse=True)
            grads = []
            for l, (lp, s) in enumerate(zip(params, saved)):
                with _layer_scope(l, num_layers, lp["device"]):
                    units = lp["units"]
                    flat_dz = tf.reshape(d_z[l], [-1, 4 * units])
                    # h entering each step: h0, then the carried h (== output where the mask is 1).
                    h_carried = s["out"] if not has_mask else _carried_h(s["out"], mask, lp["h0"])
                    h_prev = tf.reshape(tf.concat([lp["h0"][None], h_carried[:-1]], 0), [-1, units])
                    below = flat_x if l == 0 else tf.reshape(saved[l - 1]["y" if has_drop else "out"],
                                                               [-1, params[l - 1]["units"]])
                    if l == 0:
                        d_inputs = tf.reshape(tf.matmul(flat_dz, lp["w_x"], transpose_b=True), tf.shape(inputs))
                    # The kernel's input and recurrent rows, each one matmul for all steps.
                    d_kernel = tf.concat([tf.matmul(below, flat_dz, transpose_a=True),
                                          tf.matmul(h_prev, flat_dz, transpose_a=True)], 0)
                    grads += [d_initial[2 * l], d_initial[2 * l + 1], d_kernel, tf.reduce_sum(flat_dz, 0)]
                    if lp["peep"] is not None:
                        d_zi, _, d_zf, d_zo = tf.split(d_z[l], 4, axis=2)
                        c_prev = factors[l][3]
                        grads.append(tf.stack([tf.reduce_sum(d_zi * c_prev, [0, 1]),
                                               tf.reduce_sum(d_zf * c_prev, [0, 1]),
                                               tf.reduce_sum(d_zo * s["c"], [0, 1])]))
            return [d_inputs] + grads + [None] * len(constants)

        return (outputs, *final), grad

    outputs, *final = run(*flat, *constants)
    return outputs, [tuple(final[2 * l:2 * l + 2]) for l in range(num_layers)]


def _carried_h(outputs, mask, h0):
    """The h state after each step when outputs are zeroed past each sequence's end:
    past the end the state stays at the last valid step's h (or h0)."""
    def body(h, x):
        out, m = x
        return m * out + (1.0 - m) * h
    return tf.scan(body, (outputs, mask), initializer=h0)
