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
step visible to the graph optimiser). What the backward pass keeps (outputs,
gates and cell states per step) is set by `Memory`: all of it on the layer's
device (the default), only every K-th state with each segment recomputed in
the backward pass, or all of it swapped to the host segment by segment.

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

from distrnn.placement import SWAP_SEGMENT, recompute_segment


class Layer(NamedTuple):
    """One layer's weights for `lstm_stack`, as LSTMCell stores them."""
    kernel: tf.Tensor                   # (I + H, 4H): input rows, then recurrent rows
    bias: tf.Tensor                     # (4H,)
    forget_bias: float
    peepholes: Optional[tf.Tensor] = None  # (3, H): i, f, o
    device: Optional[str] = None


class Memory(NamedTuple):
    """What `lstm_stack` keeps for its backward pass, and where.

    Default (keep): every step's activations, on the layer's device.
    recompute=K: only the state at the start of each K-step segment; the
        backward pass computes one segment's activations again from it, the
        segment it is about to need. Holds T/K states and about two segments
        of activations instead of T steps' worth; costs about one more forward
        pass.
    swap: every activation, copied to `host` as each `segment`-step segment
        finishes and copied back when the backward pass reaches it; the layer's
        device holds about two segments of activations at a time.

    Both run the sequence segment by segment in tf.while_loops, whatever the
    unrolling mode: in one Python-unrolled graph the optimiser may merge the
    recomputation with the forward pass (common subexpressions), and nothing
    would stop every segment's copy or recomputation from running at once.
    The backward loop runs at most two segments at once (parallel_iterations=2):
    the next one is fetched or recomputed while the current one runs.
    """
    recompute: int = 0                  # K > 0: keep every K-th state, recompute the rest
    swap: bool = False                  # keep the activations in host memory
    host: str = "/device:CPU:0"         # where swap keeps them
    segment: int = SWAP_SEGMENT         # time steps per swapped segment

    @property
    def segmented(self) -> bool:
        return self.swap or self.recompute > 0

    @property
    def steps(self) -> int:
        """Time steps per segment."""
        return self.recompute or self.segment

    def leaner(self, num_steps: int) -> Optional["Memory"]:
        """The next mode to try after running out of memory in this one: keep, then recompute
        with segments of about sqrt(num_steps) (the fewest states plus segment steps), then
        swap; None after swap."""
        if not self.segmented:
            return Memory(recompute=recompute_segment(num_steps), host=self.host)
        if self.recompute:
            return Memory(swap=True, host=self.host)
        return None

    def describe(self) -> str:
        if self.recompute:
            return f"recompute (one state in {self.recompute} kept)"
        if self.swap:
            return f"swap (activations on {self.host}, {self.segment} steps at a time on the device)"
        return "keep (all activations on the device)"


KEEP = Memory()


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
        new_carry, new = step([s[t] if s is not None else None for s in sequences], carry)
        arrays = [a.write(t, r) for a, r in zip(arrays, new)]
        return t + (-1 if reverse else 1), _with_shapes(new_carry, _shapes(carry)), arrays

    arrays = [tf.TensorArray(given.dtype, size=num_steps) for _ in range(num_records)]
    start = num_steps - 1 if reverse else tf.constant(0)
    cond = (lambda t, *_: t >= 0) if reverse else (lambda t, *_: t < num_steps)
    _, carry, arrays = tf.while_loop(cond, body, (start, carry, arrays))
    return carry, [a.stack() for a in arrays]


def _with_shapes(tensors, shapes):
    """`tensors` with these static shapes: a loop's carry keeps its shape, also where it
    is computed from records whose length is unknown when the graph is built."""
    for t, shape in zip(tensors, shapes):
        t.set_shape(shape)
    return tensors


def _shapes(tensors):
    return [t.shape for t in tensors]


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


def _record_names(peepholes: bool, dropout: bool):
    """What the forward loop keeps of a layer at each step, in order."""
    return ["out", "a", "c"] + ([] if peepholes else ["j"]) + (["y"] if dropout else [])


class _Passes:
    """The forward and backward passes of a stack over a run of time steps: the whole
    sequence, or in a memory mode one segment of it. `params`: one dict per layer
    (see lstm_stack's unflatten); carries are flat lists, c then h for each layer."""

    def __init__(self, params, has_drop: bool, has_mask: bool, static: bool):
        self.params, self.has_drop, self.has_mask, self.static = params, has_drop, has_mask, static
        self.num_layers = len(params)
        self.names = [_record_names(lp["peep"] is not None, has_drop) for lp in params]
        self.output = "y" if has_drop else "out"  # the record a layer passes up (and the stack returns)

    def scope(self, l: int):
        return _layer_scope(l, self.num_layers, self.params[l]["device"])

    def _sequences(self, first, drops, mask):
        return [first] + (list(drops) if self.has_drop else []) + ([mask] if self.has_mask else [])

    def forward(self, inputs, drops, mask, carry, outputs_only: bool = False):
        """Runs the steps of `inputs` (n, B, I) from `carry`; drops and mask: the same steps'.
        Returns the final carry and, per layer, its records (n, B, ...) by name: all of
        them, or with outputs_only just the last layer's output."""
        num_layers, has_drop, has_mask = self.num_layers, self.has_drop, self.has_mask
        names = self.names if not outputs_only else [[] for _ in range(num_layers - 1)] + [[self.output]]
        first = self.params[0]
        with self.scope(0):  # the first layer's input matmul, once for all steps
            n, batch = tf.shape(inputs)[0], tf.shape(inputs)[1]
            x = tf.reshape(tf.nn.bias_add(tf.matmul(tf.reshape(inputs, [n * batch, -1]), first["w_x"]),
                                          first["bias_fb"]), [n, batch, 4 * first["units"]])

        def step(slices, carry):
            x_t, drop_t, m = slices[0], slices[1:1 + num_layers] if has_drop else None, slices[-1] if has_mask else None
            carry, records = list(carry), []
            for l, lp in enumerate(self.params):
                with self.scope(l):
                    c, h = carry[2 * l:2 * l + 2]
                    if l:
                        x_t = tf.nn.bias_add(tf.matmul(x_t, lp["w_x"]), lp["bias_fb"])
                    z = x_t + tf.matmul(h, lp["w_h"])
                    c, h, out, a, j = _forward_step(z, m, c, h, lp["peep"], lp["units"])
                    carry[2 * l:2 * l + 2] = c, h
                    x_t = out * drop_t[l] if has_drop else out
                    kept = dict(out=out, a=a, c=c, j=j, y=x_t)
                    records += [kept[name] for name in names[l]]
            return carry, records

        final, records = _scan(step, self._sequences(x, drops, mask), list(carry), sum(map(len, names)), self.static)
        return final, self.by_layer(records, names)

    def by_layer(self, records, names=None):
        """A flat list of records, in forward's order, as one dict per layer."""
        saved, records = [], list(records)
        for layer_names in names or self.names:
            saved.append(dict(zip(layer_names, records[:len(layer_names)])))
            records = records[len(layer_names):]
        return saved

    def backward(self, inputs, d_outputs, drops, mask, saved, start, d_final):
        """Back through the steps whose records are `saved`, which began from carry `start`,
        given the gradients of their outputs and of their final carry. Returns the gradient
        of `start`, per layer the gradients of [input kernel rows, recurrent kernel rows, bias
        (, peepholes)], and the gradient of `inputs`."""
        num_layers, has_drop, has_mask, params = self.num_layers, self.has_drop, self.has_mask, self.params
        factors = []
        for l, (lp, s) in enumerate(zip(params, saved)):
            with self.scope(l):
                factors.append(_backward_factors(s["a"], s.get("j"), s["c"], start[2 * l], lp["peep"], lp["units"]))

        def step(slices, carry):
            d_y, drop_t = slices[0], slices[1:1 + num_layers] if has_drop else None
            m = slices[1 + (num_layers if has_drop else 0)] if has_mask else None
            per_layer = slices[-3 * num_layers:]
            carry, records = list(carry), [None] * num_layers
            for l in reversed(range(num_layers)):
                lp = params[l]
                with self.scope(l):
                    d_out = d_y * drop_t[l] if has_drop else d_y
                    pd_t, q_t, fc_t = per_layer[3 * l:3 * l + 3]
                    dz, carry[2 * l], carry[2 * l + 1] = _backward_step(
                        d_out, q_t, pd_t, fc_t, m, carry[2 * l], carry[2 * l + 1], lp["w_h"])
                    records[l] = dz
                    if l:  # the gradient of this step's input, for the layer below
                        d_y = tf.matmul(dz, lp["w_x"], transpose_b=True)
            return carry, records

        sequences = self._sequences(d_outputs, drops, mask) + [t for pd, q, fc, _ in factors for t in (pd, q, fc)]
        d_start, d_z = _scan(step, sequences, list(d_final), num_layers, self.static, reverse=True)
        weight_grads = []
        for l, (lp, s) in enumerate(zip(params, saved)):
            with self.scope(l):
                units = lp["units"]
                flat_dz = tf.reshape(d_z[l], [-1, 4 * units])
                # h entering each step: the start's, then the carried h (== output where the mask is 1).
                h0 = start[2 * l + 1]
                h_carried = s["out"] if not has_mask else _carried_h(s["out"], mask, h0)
                h_prev = tf.reshape(tf.concat([h0[None], h_carried[:-1]], 0), [-1, units])
                if l == 0:
                    below = tf.reshape(inputs, [-1, tf.shape(inputs)[2]])
                    d_inputs = tf.reshape(tf.matmul(flat_dz, lp["w_x"], transpose_b=True), tf.shape(inputs))
                else:
                    below = tf.reshape(saved[l - 1][self.output], [-1, params[l - 1]["units"]])
                # The kernel's input and recurrent rows, each one matmul for all steps.
                grads = [tf.matmul(below, flat_dz, transpose_a=True), tf.matmul(h_prev, flat_dz, transpose_a=True),
                         tf.reduce_sum(flat_dz, 0)]
                if lp["peep"] is not None:
                    d_zi, _, d_zf, d_zo = tf.split(d_z[l], 4, axis=2)
                    c_prev = factors[l][3]
                    grads.append(tf.stack([tf.reduce_sum(d_zi * c_prev, [0, 1]),
                                           tf.reduce_sum(d_zf * c_prev, [0, 1]),
                                           tf.reduce_sum(d_zo * s["c"], [0, 1])]))
                weight_grads.append(grads)
        return d_start, weight_grads, d_inputs


def _segmented(passes: _Passes, memory: Memory, inputs, drops, mask, start):
    """The forward pass segment by segment, keeping what `memory` says. Returns the
    outputs, the final carry, and the backward pass: (d_outputs, d_final) -> the
    gradients of inputs, of start, and per layer as _Passes.backward gives them, summed
    over the segments."""
    num_steps = tf.shape(inputs)[0]
    k = memory.steps
    num_segments = (num_steps + k - 1) // k
    flat_names = [(l, name) for l, names in enumerate(passes.names) for name in names]

    def cut(s, *sequences):
        """Segment s of each (T, ...) sequence (or list of them, or None)."""
        t0 = s * k
        t1 = tf.minimum(t0 + k, num_steps)
        sliced = []
        for q in sequences:
            sliced.append(None if q is None else [p[t0:t1] for p in q] if isinstance(q, list) else q[t0:t1])
        return sliced

    def arrays(size, where=None, like=None):
        """TensorArrays of one element per segment: of `like`'s shapes, or of varying length."""
        with tf.device(where) if where else contextlib.nullcontext():
            if like is not None:
                return [tf.TensorArray(inputs.dtype, size=num_segments, element_shape=t.shape) for t in like]
            return [tf.TensorArray(inputs.dtype, size=num_segments, infer_shape=False) for _ in range(size)]

    record_shapes = []  # the static shapes of the swapped records, (n, B, ...) with n unknown

    def forward(s, carry, starts, outputs, host):
        starts = [a.write(s, c) for a, c in zip(starts, carry)]
        x_s, drops_s, mask_s = cut(s, inputs, drops, mask)
        carry, saved = passes.forward(x_s, drops_s, mask_s, carry, outputs_only=not memory.swap)
        outputs = outputs.write(s, saved[-1][passes.output])
        if memory.swap:
            with tf.device(memory.host):  # the copy to the host, as soon as the segment is done
                host = [a.write(s, saved[l][name]) for a, (l, name) in zip(host, flat_names)]
            record_shapes[:] = [saved[l][name].shape for l, name in flat_names]
        return s + 1, carry, starts, outputs, host

    _, final, starts, outputs, host = tf.while_loop(
        lambda s, *_: s < num_segments, forward,
        (tf.constant(0), list(start), arrays(len(start), like=start), arrays(1)[0],
         arrays(len(flat_names), memory.host) if memory.swap else []))
    starts = [a.stack() for a in starts]  # (segments, B, H) each

    def backward(d_outputs, d_final):
        def body(s, d_carry, sums, d_inputs):
            x_s, drops_s, mask_s, d_out_s = cut(s, inputs, drops, mask, d_outputs)
            begin = [a[s] for a in starts]
            if memory.swap:
                with tf.device(memory.host):  # read on the host: the first use copies it back
                    saved = passes.by_layer(_with_shapes([a.read(s) for a in host], record_shapes))
            else:
                saved = passes.forward(x_s, drops_s, mask_s, begin)[1]
            d_carry, grads, d_in = passes.backward(x_s, d_out_s, drops_s, mask_s, saved, begin, d_carry)
            new_sums = _with_shapes([a + g for a, g in zip(sums, [g for layer in grads for g in layer])], _shapes(sums))
            return s - 1, _with_shapes(d_carry, _shapes(d_final)), new_sums, d_inputs.write(s, d_in)

        # One sum per gradient, the kernel's two parts apart: adding each segment's matmul to its
        # part needs no concatenated copy of the whole kernel per segment.
        weights = [[lp["w_x"], lp["w_h"], lp["bias_fb"]] + ([lp["peep"]] if lp["peep"] is not None else [])
                   for lp in passes.params]
        zeros = [tf.zeros_like(w) for layer in weights for w in layer]
        _, d_start, sums, d_inputs = tf.while_loop(
            lambda s, *_: s >= 0, body, (num_segments - 1, list(d_final), zeros, arrays(1)[0]),
            parallel_iterations=2)
        grads = []
        for layer in weights:
            grads.append(sums[:len(layer)])
            sums = sums[len(layer):]
        d_inputs = d_inputs.concat()
        d_inputs.set_shape(inputs.shape)
        return d_inputs, d_start, grads

    outputs = outputs.concat()
    outputs.set_shape(inputs.shape[:2].concatenate(final[-1].shape[1:]))
    return outputs, final, backward


def lstm_stack(inputs, states, layers, dropout=None, mask=None, static: bool = False, memory: Memory = KEEP):
    """inputs (T, B, I); states: one (c, h) per layer, (B, H) each; layers: one
    `Layer` per layer, each computed (forward and backward) on its `device` when
    it names one; dropout: one (T, B, H) multiplier per layer for its output, or
    None; mask (T, B, 1) float or None (1 while t < sequence_length); memory:
    what the backward pass keeps (see Memory; a memory mode runs tf.while_loops
    whatever `static` says).

    Returns the last layer's outputs (T, B, H), times its dropout, and one final
    (c, h) per layer.
    """
    num_layers = len(layers)
    has_drop, has_mask = dropout is not None, mask is not None
    # Differentiable inputs, flat: inputs, then per layer c0, h0, kernel, bias [, peepholes].
    flat = [inputs]
    for layer, (c0, h0) in zip(layers, states):
        flat += [c0, h0, layer.kernel, layer.bias] + ([layer.peepholes] if layer.peepholes is not None else [])
    constants = list(dropout or []) + ([mask] if has_mask else [])

    def unflatten(args):
        args = list(args)
        inputs, per_layer, start = args.pop(0), [], []
        for l, layer in enumerate(layers):
            c0, h0, kernel, bias = (args.pop(0) for _ in range(4))
            peep = args.pop(0) if layer.peepholes is not None else None
            start += [c0, h0]
            with _layer_scope(l, num_layers, layer.device):
                # A Python int where the shape is known, so that slices and constants built from
                # it are constants (the PTB small step's graph: 1,643 ops with a tensor, 1,335).
                units = h0.shape[1] if h0.shape[1] is not None else tf.shape(h0)[1]
                # One Split of the kernel (its gradient is one Concat), and the forget bias
                # folded into the bias once rather than added at every step.
                w_x, w_h = tf.split(kernel, [tf.shape(kernel)[0] - units, units], axis=0)
                bias_fb = bias + _blocks(units, (0, 0, layer.forget_bias, 0))
            per_layer.append(dict(w_x=w_x, w_h=w_h, bias_fb=bias_fb, peep=peep, units=units, device=layer.device))
        drops = args[:num_layers] if has_drop else None
        return inputs, start, per_layer, drops, (args[-1] if has_mask else None)

    @tf.custom_gradient
    def run(*args):
        inputs, start, params, drops, mask = unflatten(args)
        passes = _Passes(params, has_drop, has_mask, static and not memory.segmented)
        if memory.segmented:
            outputs, final, backward = _segmented(passes, memory, inputs, drops, mask, start)
        else:
            final, saved = passes.forward(inputs, drops, mask, start)
            outputs = saved[-1][passes.output]

            def backward(d_outputs, d_final):
                d_start, grads, d_inputs = passes.backward(inputs, d_outputs, drops, mask, saved, start, d_final)
                return d_inputs, d_start, grads

        def grad(d_outputs, *d_final):
            with tf.name_scope("gradient"):  # so that graphs and tests can tell the backward pass apart
                d_inputs, d_start, weight_grads = backward(d_outputs, list(d_final))
            grads = [d_inputs]
            for l in range(num_layers):
                d_w_x, d_w_h, *rest = weight_grads[l]
                grads += d_start[2 * l:2 * l + 2] + [tf.concat([d_w_x, d_w_h], 0)] + rest
            return grads + [None] * len(constants)

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
