"""Recurrent cells with one fused gate matmul per step.

A cell splits its work in two so that the unrolling loop stays small: the
input half of every gate is computed for all time steps in one large matmul
before the loop (`project_inputs`), and each step adds only the recurrent half
(`step`). Weights are one kernel over [inputs, h] (gates side by side), the
layout of TensorFlow 1's cells and of the fused BlockLSTM kernel, so a
checkpoint has one shape whichever mode computes the recurrence.

States are tuples: (c, h) for the LSTM, (h,) for the others.

A cell computes in the dtype of its inputs (distrnn.numerics.precision): its float32 variables are cast to
it where they are read, and the cast's gradient is float32 again.
"""
import tensorflow as tf

from distrnn.names import CELL_KINDS
from distrnn.numerics.ops import matmul


class RecurrentCell(tf.Module):
    """Common parts: `gates` blocks of `units` columns in one kernel over [inputs, h]."""

    kind = None  # its CellKind's name (distrnn.names.CELL_KINDS): every class names its own
    use_peepholes = False
    matmul = staticmethod(matmul)  # the stack's (distrnn.rnn.Unrolling.matmul): make_cell sets it

    def __init_subclass__(cls, **kwargs):
        # A subclass that changes the math (a layer-normalised LSTM, say) and kept its parent's kind would
        # run the parent's fused and hand-written kernels, silently computing something else.
        super().__init_subclass__(**kwargs)
        if "kind" not in cls.__dict__ or cls.kind not in CELL_KINDS:
            raise TypeError(f"{cls.__name__} must name its own kind, a key of distrnn.names.CELL_KINDS (add one "
                            f"there saying what kernels can run it)")
        cls.gates = CELL_KINDS[cls.kind].gates

    def __init__(self, input_size: int, units: int, initializer=None, name: str = None):
        super().__init__(name=name)
        self.input_size, self.units = input_size, units
        self._init = initializer or tf.keras.initializers.GlorotUniform()
        with self.name_scope:
            self.kernel = tf.Variable(self._init([input_size + units, self.gates * units]), name="kernel")
            self.bias = tf.Variable(tf.zeros([self.gates * units]), name="bias")

    @property
    def state_size(self) -> int:
        return 1

    def zero_state(self, batch_size: int, dtype=tf.float32):
        zeros = tf.zeros([batch_size, self.units], dtype)
        return (zeros,) * self.state_size

    def output(self, state):
        """The output h of a state."""
        return state[-1]

    def split_kernel(self, dtype=tf.float32):
        """(input rows, recurrent rows) of the kernel as `dtype`, taken once per sequence.

        One Split rather than two slices: the gradient of a Split is one Concat
        of its parts' gradients, while each slice's gradient is a zero-padded
        copy of the whole kernel, and the two are then added (measured on the
        PTB small step: the pads and the add cost about 1 ms).
        """
        return tf.split(tf.cast(self.kernel, dtype), [self.input_size, self.units], axis=0)

    def project_inputs(self, inputs, input_kernel):
        """inputs (T, B, I) -> the input half of every gate, (T, B, G*H), bias included."""
        t, b = tf.shape(inputs)[0], tf.shape(inputs)[1]
        flat = tf.reshape(inputs, [-1, self.input_size])                 # (T*B, I)
        z = self.matmul(flat, input_kernel) + tf.cast(self.bias, inputs.dtype)  # (T*B, G*H)
        return tf.reshape(z, [t, b, self.gates * self.units])


class BasicRNNCell(RecurrentCell):
    """h' = tanh([x, h] @ kernel + bias)."""

    kind = "rnn"

    def step(self, projected, state, recurrent_kernel):
        h = tf.tanh(projected + self.matmul(state[0], recurrent_kernel))
        return h, (h,)


class LSTMCell(RecurrentCell):
    """LSTM (Hochreiter & Schmidhuber 1997), gates in i, j, f, o order, optional peepholes
    (Gers & Schmidhuber 2000, as TensorFlow 1's LSTMCell(use_peepholes=True)):

        [i, j, f, o] = [x, h] @ kernel + bias
        i = sigmoid(i + w_i_diag * c)        f = sigmoid(f + forget_bias + w_f_diag * c)
        c' = f * c + i * tanh(j)
        o = sigmoid(o + w_o_diag * c')       h' = o * tanh(c')
    """

    kind = "lstm"

    def __init__(self, input_size: int, units: int, forget_bias: float = 1.0, use_peepholes: bool = False,
                 initializer=None, name: str = None):
        super().__init__(input_size, units, initializer, name)
        self.forget_bias, self.use_peepholes = forget_bias, use_peepholes
        if use_peepholes:
            with self.name_scope:
                self.w_i_diag = tf.Variable(self._init([units]), name="w_i_diag")
                self.w_f_diag = tf.Variable(self._init([units]), name="w_f_diag")
                self.w_o_diag = tf.Variable(self._init([units]), name="w_o_diag")

    @property
    def state_size(self) -> int:
        return 2

    def peepholes(self):
        """(3, H): the i, f, o peephole weights, or None."""
        return tf.stack([self.w_i_diag, self.w_f_diag, self.w_o_diag]) if self.use_peepholes else None

    def step(self, projected, state, recurrent_kernel):
        c, h = state
        z = projected + self.matmul(h, recurrent_kernel)
        i, j, f, o = tf.split(z, 4, axis=1)
        if self.use_peepholes:
            w_i, w_f, w_o = (tf.cast(w, c.dtype) for w in (self.w_i_diag, self.w_f_diag, self.w_o_diag))
            i, f = i + w_i * c, f + w_f * c
        c = tf.sigmoid(f + self.forget_bias) * c + tf.sigmoid(i) * tf.tanh(j)
        if self.use_peepholes:
            o = o + w_o * c
        h = tf.sigmoid(o) * tf.tanh(c)
        return h, (c, h)


class GRUCell(RecurrentCell):
    """GRU (Cho et al. 2014) in the form cuDNN computes, with the reset gate applied
    after the recurrent matmul, so that each step needs one fused matmul:

        [r, u, n]_x = x @ kernel_x + bias          [r, u, n]_h = h @ kernel_h + recurrent_bias
        r = sigmoid(r_x + r_h)    u = sigmoid(u_x + u_h)    n = tanh(n_x + r * n_h)
        h' = u * h + (1 - u) * n
    """

    kind = "gru"

    def __init__(self, input_size: int, units: int, initializer=None, name: str = None):
        super().__init__(input_size, units, initializer, name)
        with self.name_scope:
            self.recurrent_bias = tf.Variable(tf.zeros([3 * units]), name="recurrent_bias")

    def step(self, projected, state, recurrent_kernel):
        h = state[0]
        xr, xu, xn = tf.split(projected, 3, axis=1)
        hr, hu, hn = tf.split(self.matmul(h, recurrent_kernel) + tf.cast(self.recurrent_bias, h.dtype), 3, axis=1)
        r, u = tf.sigmoid(xr + hr), tf.sigmoid(xu + hu)
        h = u * h + (1.0 - u) * tf.tanh(xn + r * hn)
        return h, (h,)


CELLS = {cls.kind: cls for cls in (LSTMCell, GRUCell, BasicRNNCell)}
if set(CELLS) != set(CELL_KINDS):  # the command line offers CELL_KINDS before TensorFlow loads
    raise ImportError("distrnn.names.CELL_KINDS does not list the cells of distrnn.rnn.cells")


def make_cell(kind: str, input_size: int, units: int, forget_bias: float, use_peepholes: bool = False,
              initializer=None, name: str = None, matmul=matmul) -> RecurrentCell:
    """A cell of `kind`, given a forget bias and peepholes where its kind has them; matmul: its stack's
    (distrnn.rnn.Unrolling.matmul)."""
    extra = {}
    if CELL_KINDS[kind].forget_gate:
        extra["forget_bias"] = forget_bias
    if CELL_KINDS[kind].peepholes:
        extra["use_peepholes"] = use_peepholes
    cell = CELLS[kind](input_size, units, initializer=initializer, name=name, **extra)
    cell.matmul = matmul
    return cell
