"""Recurrent cells with one fused gate matmul per step.

A cell splits its work in two so that the unrolling loop stays small: the
input half of every gate is computed for all time steps in one large matmul
before the loop (`project_inputs`), and each step adds only the recurrent half
(`step`). The weights are stored as one kernel over [inputs, h], the layout of
TensorFlow 1's LSTMCell and of the fused BlockLSTM kernel, so checkpoints keep
one shape whichever way the recurrence is computed.
"""
import tensorflow as tf


class LSTMCell(tf.Module):
    """LSTM (Hochreiter & Schmidhuber 1997) without peepholes; gates in i, j, f, o order.

        [i, j, f, o] = [x, h] @ kernel + bias
        c' = sigmoid(f + forget_bias) * c + sigmoid(i) * tanh(j)
        h' = sigmoid(o) * tanh(c')
    """

    def __init__(self, input_size: int, units: int, forget_bias: float = 0.0,
                 initializer=None, name: str = None):
        super().__init__(name=name)
        self.input_size, self.units, self.forget_bias = input_size, units, forget_bias
        init = initializer or tf.keras.initializers.GlorotUniform()
        with self.name_scope:
            self.kernel = tf.Variable(init([input_size + units, 4 * units]), name="kernel")
            self.bias = tf.Variable(tf.zeros([4 * units]), name="bias")

    def zero_state(self, batch_size: int):
        zeros = tf.zeros([batch_size, self.units])
        return (zeros, zeros)  # (c, h)

    def project_inputs(self, inputs):
        """inputs (T, B, I) -> the input half of every gate, (T, B, 4H), bias included."""
        t, b = tf.shape(inputs)[0], tf.shape(inputs)[1]
        flat = tf.reshape(inputs, [-1, self.input_size])                 # (T*B, I)
        z = tf.matmul(flat, self.kernel[:self.input_size]) + self.bias   # (T*B, 4H)
        return tf.reshape(z, [t, b, 4 * self.units])

    def recurrent_kernel(self):
        """The [h] rows of the kernel; taken once per sequence, outside the loop."""
        return self.kernel[self.input_size:]

    def step(self, projected, state, recurrent_kernel):
        """One time step: projected (B, 4H) from project_inputs, state (c, h)."""
        c, h = state
        z = projected + tf.matmul(h, recurrent_kernel)
        i, j, f, o = tf.split(z, 4, axis=1)
        c = tf.sigmoid(f + self.forget_bias) * c + tf.sigmoid(i) * tf.tanh(j)
        h = tf.sigmoid(o) * tf.tanh(c)
        return h, (c, h)
