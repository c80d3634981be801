"""The word language model: embedding, dropout, stacked recurrent layers, softmax.

Shapes: B batch rows, T time steps, H hidden units, V vocabulary. The stack
runs time-major, (T, B, H), so each time step is a contiguous slice.

The model takes a placement Plan (distrnn.parallel.placement): each part's variables
are created, and its computation runs, on the plan's device for it.

It computes in its Unrolling's precision (distrnn.numerics.precision): the embedding's rows are cast after
the lookup (only the rows a step reads), the layers and the softmax cast their weights, and the
softmax's normaliser and the loss are float32 (distrnn.numerics.ops).
"""
from typing import Tuple

import tensorflow as tf

from distrnn.numerics.ops import softmax_cross_entropy
from distrnn.parallel.placement import on_device, single_device
from distrnn.rnn import Unrolling
from distrnn.rnn.cells import make_cell
from distrnn.rnn.stack import run_stack


class PTBModel(tf.Module):
    """unrolling: how the stack runs (distrnn.rnn.Unrolling, resolved by the job), read when a step
    is traced; plan: the device of each part (distrnn.parallel.placement)."""

    def __init__(self, config, vocab_size: int, unrolling: Unrolling, seed: int = 0, plan=None, name: str = "ptb_lm",
                 replica: Tuple[int, int] = (0, 1)):
        super().__init__(name=name)
        self.config, self.vocab_size, self.unrolling = config, vocab_size, unrolling
        self.replica = replica  # (rank, ranks): this model trains the rank-th of `ranks` equal shares of the batch
        self.plan = plan or single_device(config.num_layers)
        h, scale = config.hidden_size, config.init_scale
        # Every weight starts uniform in [-init_scale, init_scale] (recurrent biases at 0),
        # drawn from one seeded generator so a run is reproducible from --seed.
        init_rng = tf.random.Generator.from_seed(seed)

        def uniform(shape, dtype=tf.float32):
            return init_rng.uniform(shape, -scale, scale, dtype=dtype)

        with self.name_scope:
            with tf.device(self.plan.embedding):
                self.embedding = tf.Variable(uniform([vocab_size, h]), name="embedding")
                # Dropout masks come from a stateful generator that is checkpointed,
                # so a resumed run draws the masks the uninterrupted run would have.
                self.dropout_rng = tf.random.Generator.from_seed(seed + 1)
            self.cells = []
            for i, device in enumerate(self.plan.layers):
                with tf.device(device):
                    # forget_bias 0 as in the reference implementation
                    self.cells.append(make_cell(config.cell, config.hidden_size, config.hidden_size, forget_bias=0.0,
                                                use_peepholes=config.use_peepholes, initializer=uniform,
                                                name=f"{config.cell}_{i}", matmul=unrolling.matmul))
            with tf.device(self.plan.softmax):
                if not config.tie_embeddings:  # tied: the softmax reads the embedding's rows
                    self.softmax_w = tf.Variable(uniform([h, vocab_size]), name="softmax_w")
                self.softmax_b = tf.Variable(uniform([vocab_size]), name="softmax_b")

    @property
    def dtype(self) -> tf.DType:
        """What the model computes in."""
        return self.unrolling.dtype

    def zero_state(self, batch_size: int):
        return tuple(cell.zero_state(batch_size, self.dtype) for cell in self.cells)

    def _dropout_mask(self, shape):
        """keep/keep_prob where kept, 0 elsewhere, for activations (T, B, H); drawn in float32 (the same masks in
        every precision), then cast. Drawn for the whole global batch, of which this replica keeps its rows:
        a row's mask depends on its place in the global batch alone, so N ranks of B rows train what one
        process of N x B does, dropout included, and a run resumed on another number of ranks draws what it
        would have (each rank draws N times the masks it uses: O(B H) against the step's O(B H^2))."""
        rank, ranks = self.replica
        seed = self.dropout_rng.make_seeds(1)[:, 0]
        rows = shape[1]
        mask = tf.nn.experimental.stateless_dropout(tf.ones([shape[0], rows * ranks, shape[2]]),
                                                    rate=1.0 - self.config.keep_prob, seed=seed)
        return tf.cast(mask[:, rank * rows:(rank + 1) * rows], self.dtype)

    def __call__(self, x, state, training: bool):
        """x (B, T) word ids -> the last layer's outputs (T*B, H) in time-major order, which
        `token_losses` turns into losses through the softmax, and the new state."""
        dropout = training and self.config.keep_prob < 1.0
        with tf.device(self.plan.embedding), tf.name_scope("embedding"):
            h = tf.cast(tf.gather(self.embedding, tf.transpose(x)), self.dtype)   # (T, B, H)
            if dropout:
                h = h * self._dropout_mask(tf.shape(h))
        masks = None
        if dropout:  # one mask per layer output, drawn on the layer's device
            masks = []
            for device in self.plan.layers:
                with tf.device(device):
                    masks.append(self._dropout_mask(tf.shape(h)))
        h, new_state = run_stack(self.cells, self.plan.layers, h, state, self.unrolling, masks)
        return tf.reshape(h, [-1, self.config.hidden_size]), new_state

    def token_losses(self, features, y, weights=None):
        """Cross-entropy per token (T*B,) of the softmax over `features` (the model's output)
        for targets y (B, T), on the softmax's device; times `weights` (B, T) when given."""
        targets = tf.reshape(tf.transpose(y), [-1])

        def compute(features):
            tied = self.config.tie_embeddings
            kernel = tf.cast(self.embedding if tied else self.softmax_w, features.dtype)
            loss = softmax_cross_entropy(features, kernel, tf.cast(self.softmax_b, features.dtype), targets,
                                         class_rows=tied, matmul=self.unrolling.matmul)
            return [loss if weights is None else loss * tf.reshape(tf.transpose(weights), [-1])]

        with tf.device(self.plan.softmax), tf.name_scope("softmax"):
            return on_device(self.plan.softmax, compute)(features)[0]

    def logits(self, features):
        """The softmax layer's logits (T*B, V) for the model's output, for inspection: float32."""
        with tf.device(self.plan.softmax):
            features = tf.cast(features, tf.float32)
            if self.config.tie_embeddings:
                return tf.nn.bias_add(tf.matmul(features, self.embedding, transpose_b=True), self.softmax_b)
            return tf.nn.bias_add(tf.matmul(features, self.softmax_w), self.softmax_b)
