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

Both passes compute in the dtype of the inputs and states (distrnn.numerics.precision): the weights, float32
variables, are cast to it once per call, and their gradients are returned as float32 (a memory
mode sums its segments' weight gradients in float32).
"""
import contextlib
from typing import Callable, List, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf

from distrnn.memory.estimates import KEEP, Memory
from distrnn.numerics.ops import matmul


class Layer(NamedTuple):
    """One layer's weights for `lstm_stack`, as LSTMCell stores them."""
    kernel: tf.Tensor                   # (I + H, 4H): input rows, then recurrent rows
    bias: tf.Tensor                     # (4H,)
    forget_bias: float
    peepholes: Optional[tf.Tensor] = None  # (3, H): i, f, o
    device: Optional[str] = None
    matmul: Callable = matmul            # the stack's (distrnn.rnn.Unrolling.matmul): every layer's the same


class State(NamedTuple):
    """One layer's recurrent state, (B, H) each; a gradient of it has the same form."""
    c: tf.Tensor
    h: tf.Tensor


class Params(NamedTuple):
    """One layer's weights as the passes use them (made once per call from its Layer)."""
    w_x: tf.Tensor               # (I, 4H): the kernel's input rows
    w_h: tf.Tensor               # (H, 4H): its recurrent rows
    bias_fb: tf.Tensor           # (4H,): the bias with the forget bias folded in
    peep: Optional[tf.Tensor]    # (3, H) or None
    units: object                # H: a Python int where the shape is known, else a scalar tensor
    device: Optional[str]


class Records(NamedTuple):
    """What the forward loop keeps of one layer, at one step or stacked over steps (n, B, ...);
    None where it keeps nothing (see Records.kept)."""
    out: Optional[tf.Tensor] = None  # the output: h, 0 past a sequence's end
    a: Optional[tf.Tensor] = None    # the gate activations (B, 4H)
    c: Optional[tf.Tensor] = None    # the cell state
    j: Optional[tf.Tensor] = None    # tanh(z_j), kept apart without peepholes
    y: Optional[tf.Tensor] = None    # the output times its dropout mask: what the layer above reads

    @staticmethod
    def kept(peepholes: bool, dropout: bool) -> tuple:
        """The fields a layer keeps, in the order the loops carry them."""
        return ("out", "a", "c") + (() if peepholes else ("j",)) + (("y",) if dropout else ())


class Grads(NamedTuple):
    """The gradients of one layer's weights: the kernel's two parts apart, then bias and peepholes."""
    w_x: tf.Tensor
    w_h: tf.Tensor
    bias: tf.Tensor
    peep: Optional[tf.Tensor] = None

    def present(self) -> list:
        return [g for g in self if g is not None]


def _pairs(flat: Sequence[tf.Tensor]) -> List[State]:
    """c0, h0, c1, h1, ... as one State per layer."""
    return [State(c, h) for c, h in zip(flat[0::2], flat[1::2])]


def _flat(states: Sequence[State]) -> list:
    return [t for state in states for t in state]


def _blocks(units, values, dtype):
    """A (4H,) vector of `dtype` with the given value on each of the i, j, f, o blocks."""
    if isinstance(units, int):
        return tf.constant(np.repeat(np.asarray(values, np.float32), units), dtype)
    return tf.concat([tf.fill([units], tf.constant(v, dtype)) for v in values], 0)


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
    """`tensors` (any nest) with these static shapes (of its flattened tensors): a loop's carry keeps
    its shape, also where it is computed from records whose length is unknown when the graph is built."""
    for t, shape in zip(tf.nest.flatten(tensors), shapes):
        t.set_shape(shape)
    return tensors


def _shapes(tensors):
    return [t.shape for t in tf.nest.flatten(tensors)]


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
    derivative = (1.0 - gates) * (gates + _blocks(units, (0, 1, 0, 0), gates.dtype))
    pd = tf.concat([j, i, c_prev, tanh_c], 2) * derivative       # (T, B, 4H)
    q = o * (1.0 - tanh_c * tanh_c)                              # dc += dh q
    fc = f                                                       # dc_prev = dc fc
    if peep is not None:
        pd_i, _, pd_f, pd_o = tf.split(pd, 4, axis=2)
        q += pd_o * peep[2]
        fc = f + pd_i * peep[0] + pd_f * peep[1]
    return pd, q, fc, c_prev


def _backward_step(d_out, q, pd, fc, m, dc_next, dh_next, w_h, matmul):
    """One step back through one layer; d_out, q, pd, fc, m: the step's slices.
    Returns dz (the gradient of the step's gate pre-activations), dc and dh of the state before."""
    dh = d_out + dh_next
    dc_in = dc_next
    if m is not None:
        dh, dc_in = m * dh, m * dc_next
    dc = dh * q + dc_in
    dz = tf.concat([dc, dc, dc, dh], 1) * pd
    dc_prev = dc * fc
    dh_prev = matmul(dz, w_h, transpose_b=True)
    if m is not None:
        dc_prev += (1.0 - m) * dc_next
        dh_prev += (1.0 - m) * dh_next
    return dz, dc_prev, dh_prev


class _Step(NamedTuple):
    """One time step's slices of the sequences a loop runs over (see _Passes.sequences)."""
    first: tf.Tensor                 # forward: layer 0's projected input; backward: the stack output's gradient
    drops: Optional[list]            # one dropout-mask slice per layer
    mask: Optional[tf.Tensor]        # (B, 1): 1 while t < sequence_length
    factors: list                    # backward: per layer (pd, q, fc), see _backward_factors


class _Passes:
    """The forward and backward passes of a stack over a run of time steps: the whole
    sequence, or in a memory mode one segment of it. `params`: one Params per layer;
    a carry is one State per layer."""

    def __init__(self, params: List[Params], has_drop: bool, has_mask: bool, static: bool, matmul):
        self.params, self.has_drop, self.has_mask, self.static = params, has_drop, has_mask, static
        self.matmul = matmul
        self.num_layers = len(params)
        self.kept = [Records.kept(p.peep is not None, has_drop) for p in params]
        self.output = "y" if has_drop else "out"  # the record a layer passes up (and the stack returns)

    def scope(self, l: int):
        return _layer_scope(l, self.num_layers, self.params[l].device)

    def sequences(self, first, drops, mask, factors=()):
        """The (T, ...) sequences of a loop, flat, in the order `step` reads them back."""
        flat_factors = [t for layer in factors for t in layer]
        return [first] + (list(drops) if self.has_drop else []) + ([mask] if self.has_mask else []) + flat_factors

    def step(self, slices) -> _Step:
        rest = slices[1:]
        drops, rest = (rest[:self.num_layers], rest[self.num_layers:]) if self.has_drop else (None, rest)
        mask, rest = (rest[0], rest[1:]) if self.has_mask else (None, rest)
        return _Step(slices[0], drops, mask, [rest[3 * l:3 * l + 3] for l in range(len(rest) // 3)])

    def record_shapes(self, batch) -> list:
        """The static shapes of the records forward keeps, flat in its order: (n, B, 4H) for the
        gate activations, (n, B, H) for the others, n unknown."""
        shapes = []
        for p, kept in zip(self.params, self.kept):
            units = p.units if isinstance(p.units, int) else None
            shapes += [tf.TensorShape([None, batch, 4 * units if units and name == "a" else units]) for name in kept]
        return shapes

    def to_records(self, flat, kept=None) -> List[Records]:
        """A flat list of records, in forward's order, as one Records per layer."""
        layers, flat = [], list(flat)
        for names in kept or self.kept:
            layers.append(Records(**dict(zip(names, flat[:len(names)]))))
            flat = flat[len(names):]
        return layers

    def forward(self, inputs, drops, mask, start: List[State], outputs_only: bool = False):
        """Runs the steps of `inputs` (n, B, I) from `start`; drops and mask: the same steps'.
        Returns the final carry and one Records per layer (n, B, ...): all it keeps, or with
        outputs_only just the last layer's output."""
        kept = self.kept if not outputs_only else [()] * (self.num_layers - 1) + [(self.output,)]
        first = self.params[0]
        with self.scope(0):  # the first layer's input matmul, once for all steps
            n, batch = tf.shape(inputs)[0], tf.shape(inputs)[1]
            x = tf.reshape(tf.nn.bias_add(self.matmul(tf.reshape(inputs, [n * batch, -1]), first.w_x),
                                          first.bias_fb), [n, batch, 4 * first.units])

        def step(slices, carry):
            now, new_carry, records = self.step(slices), [], []
            x_t = now.first
            for l, (p, state) in enumerate(zip(self.params, carry)):
                with self.scope(l):
                    if l:
                        x_t = tf.nn.bias_add(self.matmul(x_t, p.w_x), p.bias_fb)
                    z = x_t + self.matmul(state.h, p.w_h)
                    c, h, out, a, j = _forward_step(z, now.mask, state.c, state.h, p.peep, p.units)
                    new_carry.append(State(c, h))
                    x_t = out * now.drops[l] if self.has_drop else out
                    step_records = Records(out=out, a=a, c=c, j=j, y=x_t)
                    records += [getattr(step_records, name) for name in kept[l]]
            return new_carry, records

        final, records = _scan(step, self.sequences(x, drops, mask), list(start), sum(map(len, kept)), self.static)
        return final, self.to_records(records, kept)

    def backward(self, inputs, d_outputs, drops, mask, saved: List[Records], start: List[State],
                 d_final: List[State]):
        """Back through the steps whose records are `saved`, which began from carry `start`,
        given the gradients of their outputs and of their final carry. Returns the gradient
        of `start`, one Grads per layer and the gradient of `inputs`."""
        factors = []
        for l, (p, s) in enumerate(zip(self.params, saved)):
            with self.scope(l):
                factors.append(_backward_factors(s.a, s.j, s.c, start[l].c, p.peep, p.units))

        def step(slices, carry):
            now, d_carry, d_z = self.step(slices), list(carry), [None] * self.num_layers
            d_y = now.first
            for l in reversed(range(self.num_layers)):
                p = self.params[l]
                with self.scope(l):
                    d_out = d_y * now.drops[l] if self.has_drop else d_y
                    pd_t, q_t, fc_t = now.factors[l]
                    d_z[l], d_c, d_h = _backward_step(d_out, q_t, pd_t, fc_t, now.mask, d_carry[l].c, d_carry[l].h,
                                                      p.w_h, self.matmul)
                    d_carry[l] = State(d_c, d_h)
                    if l:  # the gradient of this step's input, for the layer below
                        d_y = self.matmul(d_z[l], p.w_x, transpose_b=True)
            return d_carry, d_z

        sequences = self.sequences(d_outputs, drops, mask, [(pd, q, fc) for pd, q, fc, _ in factors])
        d_start, d_z = _scan(step, sequences, list(d_final), self.num_layers, self.static, reverse=True)
        grads, d_inputs = [], None
        for l in range(self.num_layers):
            with self.scope(l):
                grad, d_in = self._weight_grads(l, d_z[l], inputs, mask, saved, start[l].h, factors[l][3])
            grads.append(grad)
            d_inputs = d_in if l == 0 else d_inputs
        return d_start, grads, d_inputs

    def _weight_grads(self, l: int, d_z, inputs, mask, saved: List[Records], h0, c_prev):
        """Layer l's Grads from its gate gradients d_z (n, B, 4H), each one matmul or sum over all
        steps, and for layer 0 the gradient of the stack's inputs (None for the others)."""
        p, s, units = self.params[l], saved[l], self.params[l].units
        flat_dz = tf.reshape(d_z, [-1, 4 * units])
        # h entering each step: the start's, then the carried h (== output where the mask is 1).
        h_carried = s.out if not self.has_mask else _carried_h(s.out, mask, h0)
        h_prev = tf.reshape(tf.concat([h0[None], h_carried[:-1]], 0), [-1, units])
        d_inputs = None
        if l == 0:
            below = tf.reshape(inputs, [-1, tf.shape(inputs)[2]])
            d_inputs = tf.reshape(self.matmul(flat_dz, p.w_x, transpose_b=True), tf.shape(inputs))
        else:
            below = tf.reshape(getattr(saved[l - 1], self.output), [-1, self.params[l - 1].units])
        d_peep = None
        if p.peep is not None:
            d_zi, _, d_zf, d_zo = tf.split(d_z, 4, axis=2)
            d_peep = tf.stack([tf.reduce_sum(d_zi * c_prev, [0, 1]), tf.reduce_sum(d_zf * c_prev, [0, 1]),
                               tf.reduce_sum(d_zo * s.c, [0, 1])])
        return Grads(self.matmul(below, flat_dz, transpose_a=True), self.matmul(h_prev, flat_dz, transpose_a=True),
                     tf.reduce_sum(flat_dz, 0), d_peep), d_inputs


class _Segments:
    """A memory mode's passes: forward segment by segment, keeping what `memory` says (each
    segment's starting state; with swap also every record, copied to the host as the segment
    ends), and backward segment by segment in reverse, each segment's records recomputed from
    its starting state (or fetched back from the host), the weight gradients summed over the
    segments. Both are tf.while_loops over segments of `memory.steps` time steps."""

    def __init__(self, passes: _Passes, memory: Memory, inputs, drops, mask):
        self.passes, self.memory, self.inputs, self.drops, self.mask = passes, memory, inputs, drops, mask
        self.num_steps = tf.shape(inputs)[0]
        self.num_segments = (self.num_steps + memory.steps - 1) // memory.steps
        self.flat_kept = [(l, name) for l, kept in enumerate(passes.kept) for name in kept]
        self.starts = self.host = None  # what forward keeps for backward

    def cut(self, s, *sequences):
        """Segment s of each (T, ...) sequence (or list of them, or None)."""
        t0 = s * self.memory.steps
        t1 = tf.minimum(t0 + self.memory.steps, self.num_steps)
        return [None if q is None else [p[t0:t1] for p in q] if isinstance(q, list) else q[t0:t1] for q in sequences]

    def arrays(self, count: int = 1, where=None, like=None) -> list:
        """TensorArrays of one element per segment: of `like`'s shapes, or `count` of varying length."""
        with tf.device(where) if where else contextlib.nullcontext():
            if like is not None:
                return [tf.TensorArray(self.inputs.dtype, size=self.num_segments, element_shape=t.shape)
                        for t in like]
            return [tf.TensorArray(self.inputs.dtype, size=self.num_segments, infer_shape=False)
                    for _ in range(count)]

    def forward(self, start: List[State]):
        """The outputs (T, B, H) and the final carry."""
        passes, memory = self.passes, self.memory

        def body(s, carry, starts, outputs, host):
            starts = [a.write(s, t) for a, t in zip(starts, _flat(carry))]
            x_s, drops_s, mask_s = self.cut(s, self.inputs, self.drops, self.mask)
            carry, saved = passes.forward(x_s, drops_s, mask_s, carry, outputs_only=not memory.swap)
            outputs = outputs.write(s, getattr(saved[-1], passes.output))
            if memory.swap:
                with tf.device(memory.host):  # the copy to the host, as soon as the segment is done
                    host = [a.write(s, getattr(saved[l], name)) for a, (l, name) in zip(host, self.flat_kept)]
            return s + 1, carry, starts, outputs, host

        host = self.arrays(len(self.flat_kept), memory.host) if memory.swap else []
        _, final, starts, outputs, self.host = tf.while_loop(
            lambda s, *_: s < self.num_segments, body,
            (tf.constant(0), list(start), self.arrays(like=_flat(start)), self.arrays()[0], host))
        self.starts = [a.stack() for a in starts]  # (segments, B, H) each
        outputs = outputs.concat()
        outputs.set_shape(self.inputs.shape[:2].concatenate(final[-1].h.shape[1:]))
        return outputs, final

    def backward(self, d_outputs, d_final: List[State]):
        """The gradients of the inputs, of the start and one Grads per layer."""
        passes, memory = self.passes, self.memory
        record_shapes = passes.record_shapes(self.inputs.shape[1])

        def body(s, d_carry, sums, d_inputs):
            x_s, drops_s, mask_s, d_out_s = self.cut(s, self.inputs, self.drops, self.mask, d_outputs)
            begin = _pairs([a[s] for a in self.starts])
            if memory.swap:
                with tf.device(memory.host):  # read on the host: the first use copies it back
                    saved = passes.to_records(_with_shapes([a.read(s) for a in self.host], record_shapes))
            else:
                saved = passes.forward(x_s, drops_s, mask_s, begin)[1]
            d_carry, grads, d_in = passes.backward(x_s, d_out_s, drops_s, mask_s, saved, begin, d_carry)
            new_sums = [a + tf.cast(g, a.dtype) for a, g in zip(sums, [g for layer in grads for g in layer.present()])]
            return s - 1, _with_shapes(d_carry, _shapes(d_final)), _with_shapes(new_sums, _shapes(sums)), \
                d_inputs.write(s, d_in)

        # One sum per gradient, the kernel's two parts apart: adding each segment's matmul to its
        # part needs no concatenated copy of the whole kernel per segment.
        weights = [Grads(p.w_x, p.w_h, p.bias_fb, p.peep) for p in passes.params]
        zeros = [tf.zeros_like(w, tf.float32) for layer in weights for w in layer.present()]
        _, d_start, sums, d_inputs = tf.while_loop(
            lambda s, *_: s >= 0, body, (self.num_segments - 1, list(d_final), zeros, self.arrays()[0]),
            parallel_iterations=2)
        grads = []
        for layer in weights:
            count = len(layer.present())
            grads.append(Grads(*sums[:count]))
            sums = sums[count:]
        d_inputs = d_inputs.concat()
        d_inputs.set_shape(self.inputs.shape)
        return d_inputs, d_start, grads


def _params(layer: Layer, l: int, num_layers: int, kernel, bias, peep, h0) -> Params:
    """The weights as the passes use them, cast to the states' dtype (the compute dtype)."""
    with _layer_scope(l, num_layers, layer.device):
        kernel, bias = tf.cast(kernel, h0.dtype), tf.cast(bias, h0.dtype)
        peep = None if peep is None else tf.cast(peep, h0.dtype)
        # A Python int where the shape is known, so that slices and constants built from
        # it are constants (the PTB small step's graph: 1,643 ops with a tensor, 1,335).
        units = h0.shape[1] if h0.shape[1] is not None else tf.shape(h0)[1]
        # One Split of the kernel (its gradient is one Concat), and the forget bias
        # folded into the bias once rather than added at every step.
        w_x, w_h = tf.split(kernel, [tf.shape(kernel)[0] - units, units], axis=0)
        bias_fb = bias + _blocks(units, (0, 0, layer.forget_bias, 0), h0.dtype)
    return Params(w_x, w_h, bias_fb, peep, units, layer.device)


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
        """The flat arguments as (inputs, the start State and Params of each layer, drops, mask)."""
        given = iter(args)
        inputs, start, params = next(given), [], []
        for l, layer in enumerate(layers):
            c0, h0, kernel, bias = next(given), next(given), next(given), next(given)
            peep = next(given) if layer.peepholes is not None else None
            start.append(State(c0, h0))
            params.append(_params(layer, l, num_layers, kernel, bias, peep, h0))
        rest = list(given)
        return inputs, start, params, rest[:num_layers] if has_drop else None, rest[-1] if has_mask else None

    @tf.custom_gradient
    def run(*args):
        inputs, start, params, drops, mask = unflatten(args)
        passes = _Passes(params, has_drop, has_mask, static and not memory.segmented, layers[0].matmul)
        if memory.segmented:
            segments = _Segments(passes, memory, inputs, drops, mask)
            outputs, final = segments.forward(start)
            backward = segments.backward
        else:
            final, saved = passes.forward(inputs, drops, mask, start)
            outputs = getattr(saved[-1], passes.output)

            def backward(d_outputs, d_final):
                d_start, grads, d_inputs = passes.backward(inputs, d_outputs, drops, mask, saved, start, d_final)
                return d_inputs, d_start, grads

        def grad(d_outputs, *d_final):
            with tf.name_scope("gradient"):  # so that graphs and tests can tell the backward pass apart
                d_inputs, d_start, weight_grads = backward(d_outputs, _pairs(d_final))
            grads = [d_inputs]
            for d_state, g in zip(d_start, weight_grads):
                grads += [d_state.c, d_state.h, tf.concat([g.w_x, g.w_h], 0), g.bias] + \
                         ([g.peep] if g.peep is not None else [])
            # Each in its argument's dtype: the weights' float32, the rest the compute dtype.
            return [tf.cast(g, a.dtype) for g, a in zip(grads, args)] + [None] * len(constants)

        return (outputs, *_flat(final)), grad

    outputs, *final = run(*flat, *constants)
    return outputs, [tuple(state) for state in _pairs(final)]


def _carried_h(outputs, mask, h0):
    """The h state after each step when outputs are zeroed past each sequence's end:
    past the end the state stays at the last valid step's h (or h0)."""
    def body(h, x):
        out, m = x
        return m * out + (1.0 - m) * h
    return tf.scan(body, (outputs, mask), initializer=h0)
