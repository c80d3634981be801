"""Whole-sequence LSTM kernels that TensorFlow ships: BlockLSTM (CPU and GPU) and cuDNN (GPU).

Both take distrnn's kernel as it is stored (one matrix over [inputs, h], gates
i, j, f, o), so checkpoints move freely between modes.

BlockLSTM, not BlockLSTMV2: V2 stores gates as i, f, c, o, but TensorFlow 2.15
registers V1's gradient op (i, c, f, o layout) for it, so V2's weight and input
gradients come out permuted (measured: max error 3.9 on a 6-step, 5-unit
example, against 1e-6 for V1). V1 has our layout and a forget_bias attribute.
"""
import tensorflow as tf


def _gather_last(sequence, sequence_length, initial):
    """sequence (T, B, H) -> the entry at t = sequence_length - 1 per row, or `initial` where it is 0."""
    idx = tf.maximum(tf.cast(sequence_length, tf.int32) - 1, 0)
    last = tf.gather(tf.transpose(sequence, [1, 0, 2]), idx, axis=1, batch_dims=1)  # (B, H)
    return tf.where((sequence_length > 0)[:, None], last, initial)


def block_lstm(cell, inputs, state, sequence_length=None):
    """cell: an LSTMCell; inputs (T, B, I) time-major; state (c, h). Returns outputs, (c, h)."""
    c0, h0 = state
    dtype = inputs.dtype  # float32 or float16: BlockLSTM's op has no bfloat16 (unroll.supported)
    zeros = tf.zeros([cell.units], dtype)
    peep = [cell.w_i_diag, cell.w_f_diag, cell.w_o_diag] if cell.use_peepholes else [zeros] * 3
    _, cs, _, _, _, _, h = tf.raw_ops.BlockLSTM(
        seq_len_max=tf.cast(tf.shape(inputs)[0], tf.int64), x=inputs, cs_prev=c0, h_prev=h0,
        w=tf.cast(cell.kernel, dtype), wci=tf.cast(peep[0], dtype), wcf=tf.cast(peep[1], dtype),
        wco=tf.cast(peep[2], dtype), b=tf.cast(cell.bias, dtype),
        forget_bias=cell.forget_bias, cell_clip=-1.0, use_peephole=cell.use_peepholes)
    if sequence_length is None:
        return h, (cs[-1], h[-1])
    mask = tf.sequence_mask(sequence_length, tf.shape(inputs)[0], dtype=h.dtype)  # (B, T)
    outputs = h * tf.transpose(mask)[:, :, None]
    return outputs, (_gather_last(cs, sequence_length, c0), _gather_last(h, sequence_length, h0))


def built_with_cudnn() -> bool:
    """Whether this TensorFlow can run cuDNN; whether the stack runs on a GPU the job says."""
    return tf.test.is_built_with_cuda()


def _cudnn_lstm_params(cell, dtype=tf.float32):
    """distrnn's LSTM weights as cuDNN's canonical list of `dtype`: 8 weight matrices, then 8 biases.

    cuDNN orders gates i, f, c(j), o, keeps input and recurrent weights apart,
    each matrix as (units, inputs), and adds two biases; distrnn's forget_bias
    goes into the first forget-gate bias.
    """
    n = cell.input_size
    kernel = tf.cast(cell.kernel, dtype)
    w_x = tf.split(kernel[:n], 4, axis=1)   # i, j, f, o: (I, H) each
    w_h = tf.split(kernel[n:], 4, axis=1)   # (H, H) each
    b = tf.split(tf.cast(cell.bias, dtype), 4)
    order = (0, 2, 1, 3)                        # i, f, j, o
    weights = [tf.transpose(w_x[g]) for g in order] + [tf.transpose(w_h[g]) for g in order]
    b_f = b[2] + cell.forget_bias
    biases = [b[0], b_f, b[1], b[3]] + [tf.zeros_like(b[0])] * 4
    return weights, biases


def cudnn_lstm(cell, inputs, state, sequence_length=None):
    """cuDNN's fused LSTM on a GPU; same math as the other modes (no peepholes in cuDNN), in the inputs'
    dtype (float32, or float16 on tensor cores: cuDNN's RNN ops have no bfloat16, see unroll.supported)."""
    c0, h0 = state
    weights, biases = _cudnn_lstm_params(cell, inputs.dtype)
    params = tf.raw_ops.CudnnRNNCanonicalToParamsV2(
        num_layers=1, num_units=cell.units, input_size=cell.input_size, weights=weights, biases=biases,
        rnn_mode="lstm", input_mode="linear_input", direction="unidirectional")
    num_steps, batch = tf.shape(inputs)[0], tf.shape(inputs)[1]
    lengths = (tf.fill([batch], num_steps) if sequence_length is None
               else tf.cast(sequence_length, tf.int32))
    outputs, h, c, _, _ = tf.raw_ops.CudnnRNNV3(
        input=inputs, input_h=h0[None], input_c=c0[None], params=params, sequence_lengths=lengths,
        rnn_mode="lstm", input_mode="linear_input", direction="unidirectional", is_training=True,
        time_major=True)
    return outputs, (c[0], h[0])
