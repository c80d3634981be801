"""The word language model: embedding, dropout, stacked LSTM, softmax.

Shapes: B batch rows, T time steps, H hidden units, V vocabulary. The stack
runs time-major, (T, B, H), so each time step is a contiguous slice.
"""
import tensorflow as tf

from distrnn.ops import sparse_softmax_cross_entropy
from distrnn.rnn import CELLS, LSTMCell, unroll


def make_cell(config, initializer, name):
    size = config.hidden_size
    if config.cell == "lstm":  # forget_bias 0 as in the reference implementation
        return LSTMCell(size, size, forget_bias=0.0, use_peepholes=config.use_peepholes, initializer=initializer,
                        name=name)
    return CELLS[config.cell](size, size, initializer=initializer, name=name)


class PTBModel(tf.Module):
    """rnn_mode: the concrete unrolling mode (see distrnn.rnn.resolve_mode for `auto`)."""

    def __init__(self, config, vocab_size: int, seed: int = 0, rnn_mode: str = None, name: str = "ptb_lm"):
        super().__init__(name=name)
        self.config, self.vocab_size = config, vocab_size
        self.rnn_mode = rnn_mode or config.rnn_mode
        h, scale = config.hidden_size, config.init_scale
        # Every weight starts uniform in [-init_scale, init_scale] (LSTM biases at 0),
        # drawn from one seeded generator so a run is reproducible from --seed.
        init_rng = tf.random.Generator.from_seed(seed)

        def uniform(shape, dtype=tf.float32):
            return init_rng.uniform(shape, -scale, scale, dtype=dtype)

        with self.name_scope:
            self.embedding = tf.Variable(uniform([vocab_size, h]), name="embedding")
            self.cells = [make_cell(config, uniform, name=f"{config.cell}_{i}") for i in range(config.num_layers)]
            self.softmax_w = tf.Variable(uniform([h, vocab_size]), name="softmax_w")
            self.softmax_b = tf.Variable(uniform([vocab_size]), name="softmax_b")
            # Dropout masks come from a stateful generator that is checkpointed,
            # so a resumed run draws the masks the uninterrupted run would have.
            self.dropout_rng = tf.random.Generator.from_seed(seed + 1)

    def zero_state(self, batch_size: int):
        return tuple(cell.zero_state(batch_size) for cell in self.cells)

    def _dropout(self, x):
        seed = self.dropout_rng.make_seeds(1)[:, 0]
        return tf.nn.experimental.stateless_dropout(x, rate=1.0 - self.config.keep_prob, seed=seed)

    def __call__(self, x, state, training: bool):
        """x (B, T) word ids -> logits (T*B, V) in time-major order, new state."""
        dropout = training and self.config.keep_prob < 1.0
        h = tf.gather(self.embedding, tf.transpose(x))   # (T, B, H)
        if dropout:
            h = self._dropout(h)
        new_state = []
        for cell, layer_state in zip(self.cells, state):
            h, layer_state = unroll(cell, h, layer_state, mode=self.rnn_mode)
            if dropout:
                h = self._dropout(h)
            new_state.append(layer_state)
        logits = tf.matmul(tf.reshape(h, [-1, self.config.hidden_size]), self.softmax_w) + self.softmax_b
        return logits, tuple(new_state)


def token_losses(logits, y):
    """Cross-entropy per token, (T*B,), for targets y (B, T) matching time-major logits."""
    targets = tf.reshape(tf.transpose(y), [-1])
    return sparse_softmax_cross_entropy(logits, targets)
