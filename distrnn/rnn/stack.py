"""A stack of recurrent layers, each on its own device, run one layer after
another (sequential) or as a wavefront (pipeline).

Sequential: layer l runs its whole sequence, then layer l+1 starts; with
layers on different devices only one device works at a time.

Pipeline (as GNMT does): layer l computes time step t from layer l-1's output
at step t as soon as that exists, so all layers (and devices) work at once:

    iteration  0    1    2    3    4          T = 4 steps, L = 3 layers
    layer 0    t0   t1   t2   t3   .
    layer 1    .    t0   t1   t2   t3
    layer 2    .    .    t0   t1   t2   t3

For LSTM stacks in static or dynamic mode, `lstm_stack` runs all layers in one
loop, forward and backward, with its hand-written backward pass; the
dataflow executor then overlaps the layers by itself. Other cells get the
explicit schedule above: in loop iteration k, layer l computes step k - l;
T + L - 1 iterations in all. On a single device an LSTM stack always runs
interleaved, whatever the schedule: it computes the same and frees the
second core (see distrnn.rnn.lstm_sequence).

All give the same outputs, states and gradients. `masks` are dropout masks
(T, B, H) applied to each layer's output, drawn before the loop so that every
schedule uses the same ones.
"""
import tensorflow as tf

from distrnn.names import CELL_KINDS
from distrnn.parallel.placement import on_device
from distrnn.rnn.lstm_sequence import KEEP, lstm_stack
from distrnn.rnn.unroll import STEP_MODES, Unrolling, lstm_layer, unroll


def run_stack(cells, devices, inputs, states, unrolling: Unrolling, masks=None):
    """The stack's outputs (T, B, H) and new states, one tuple per layer, from time-major inputs
    (T, B, I): every model's one way to run its layers. devices: one per layer; unrolling: the
    mode, schedule and memory mode the job resolved (see distrnn.rnn.unroll.Unrolling)."""
    mode, memory = unrolling.mode, unrolling.memory
    lstm_loop = mode in STEP_MODES and all(CELL_KINDS[cell.kind].own_backward for cell in cells)
    # lstm_stack runs all layers in one loop; on one device it interleaves them whatever the schedule.
    if lstm_loop and (unrolling.placement == "pipeline" or len(set(devices)) == 1):
        layers = [lstm_layer(cell, device) for cell, device in zip(cells, devices)]
        outputs, new_states = lstm_stack(inputs, [tuple(s) for s in states], layers, dropout=masks,
                                         static=mode == "static", memory=memory)
        return outputs, tuple(new_states)
    if unrolling.placement == "pipeline":
        if mode not in STEP_MODES:
            raise ValueError(f"the pipeline runs a step loop (static or dynamic), not {mode}")
        return pipeline_stack(cells, devices, inputs, states, mode == "static", masks)
    return sequential_stack(cells, devices, inputs, states, mode, masks, memory)


def sequential_stack(cells, devices, inputs, states, mode: str, masks=None, memory=KEEP):
    """Layer after layer, each over its whole sequence on its device."""
    new_states = []
    h = inputs
    for l, (cell, device) in enumerate(zip(cells, devices)):
        def compute(h, mask, *state, cell=cell):
            out, state = unroll(cell, h, state, mode, memory=memory)
            return [out * mask, *state]

        with tf.device(device), tf.name_scope(f"layer_{l}"):
            mask = masks[l] if masks is not None else tf.ones([], inputs.dtype)
            h, *state = on_device(device, compute)(h, mask, *states[l])
        new_states.append(tuple(state))
    return h, tuple(new_states)


def pipeline_stack(cells, devices, inputs, states, static: bool, masks=None):
    """The wavefront of the explicit schedule above, for cells lstm_stack does not run (they keep every
    step's activations: TensorFlow differentiates them). Returns outputs of the last layer, states."""
    num_layers = len(cells)
    with tf.device(devices[0]), tf.name_scope("layer_0"):
        # Layer 0 sees all its inputs at once: (T, B, G*H).
        first, = on_device(devices[0], lambda x: [
            cells[0].project_inputs(x, cells[0].split_kernel(x.dtype)[0])])(inputs)

    def layer_step(l, x_t, state, t):
        """Layer l at time step t: x_t is layer l-1's output (layer 0: its projected input)."""
        cell = cells[l]

        # Everything the step differentiates enters as an argument or is a variable read
        # inside, so that on_device can build its gradient on the layer's device.
        def compute(x_t, mask_t, *state):
            w_x, w_h = cell.split_kernel(mask_t.dtype)
            z = x_t if l == 0 else cell.matmul(x_t, w_x) + tf.cast(cell.bias, x_t.dtype)
            out, state = cell.step(z, state, w_h)
            return [out * mask_t, *state]

        with tf.device(devices[l]), tf.name_scope(f"layer_{l}"):
            mask_t = masks[l][t] if masks is not None else tf.ones([], inputs.dtype)
            out, *state = on_device(devices[l], compute)(first[t] if l == 0 else x_t, mask_t, *state)
            return out, tuple(state)

    states = [tuple(s) for s in states]
    if static:
        num_steps = inputs.shape[0]
        outs = [[None] * num_steps for _ in range(num_layers)]
        for k in range(num_steps + num_layers - 1):
            for l in range(num_layers):
                t = k - l
                if 0 <= t < num_steps:
                    outs[l][t], states[l] = layer_step(l, None if l == 0 else outs[l - 1][t], states[l], t)
        return tf.stack(outs[-1]), tuple(states)

    num_steps = tf.shape(inputs)[0]
    batch = tf.shape(inputs)[1]

    def body(k, states, carry, outputs):
        states, carry = list(states), list(carry)
        new_carry = []
        for l in range(num_layers):
            t = k - l
            valid = tf.logical_and(t >= 0, t < num_steps)
            out, new = layer_step(l, None if l == 0 else carry[l - 1], states[l], tf.clip_by_value(t, 0, num_steps - 1))
            states[l] = tuple(tf.where(valid, a, b) for a, b in zip(new, states[l]))
            if l < num_layers - 1:
                new_carry.append(out)
            else:
                outputs = outputs.write(k, out)
        return k + 1, tuple(states), tuple(new_carry), outputs

    carry = tuple(tf.zeros([batch, cells[l].units], inputs.dtype) for l in range(num_layers - 1))
    total = num_steps + num_layers - 1
    _, states, _, outputs = tf.while_loop(
        lambda k, *_: k < total, body,
        (tf.constant(0), tuple(states), carry, tf.TensorArray(inputs.dtype, size=total)))
    return outputs.stack()[num_layers - 1:], tuple(states)
