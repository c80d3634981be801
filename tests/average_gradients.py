"""One worker of tests/test_collective.py's checks of how TensorFlow's engine sends gradients, inside a
tf.function as the training step does; rank 0 prints what it got as one JSON line:
- the embedding's IndexedSlices (rows that say their rank, indices past 2^32), gathered, in float32, float16
  on the wire and float64;
- dense gradients of several shapes sent as one vector in pieces (PIECE_BYTES made 16 bytes, 4 floats, so
  that 24 floats go as 6 pieces), in float32 and float16 on the wire: the sums and the collectives counted;
- broadcast_variables over variables of three types: every rank's values afterwards.

    python -m distrnn.launch --nproc 2 -- tests/average_gradients.py
"""
import json
import os
import sys

# This checkout's distrnn, wherever an installed one points (a script's own directory comes first on sys.path).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distrnn import parallel  # noqa: E402
from distrnn.parallel import collective  # noqa: E402


def gathered(world, tf):
    out = {}
    for dtype, fp16 in (("float32", False), ("float32", True), ("float64", False)):
        rows = tf.constant([[world.rank + 1.0, 0.5], [-2.0, world.rank * 4.0], [1.0, 1.0]], dtype)
        indices = tf.constant([2**40 + world.rank, 7, 2**33 - 1 - world.rank], tf.int64)
        grad = tf.IndexedSlices(rows, indices, tf.constant([2**41, 2], tf.int64))
        averaged = tf.function(lambda g: world.average_gradients([g], fp16=fp16)[0])(grad)
        out[f"{dtype}{'-fp16' if fp16 else ''}"] = {"rows": averaged.values.numpy().tolist(),
                                                   "indices": averaged.indices.numpy().tolist(),
                                                   "dtype": averaged.values.dtype.name}
    return out


def in_pieces(world, tf):
    collective.PIECE_BYTES = 16
    grads = [tf.reshape(tf.range(15, dtype=tf.float32) * (world.rank + 1), [3, 5]),
             tf.fill([7], 2.0 * world.rank), tf.constant([1.0, -3.0])]
    out = {}
    for fp16 in (False, True):
        step = tf.function(lambda *g: world.average_gradients(list(g), fp16=fp16))
        graph = step.get_concrete_function(*grads).graph
        out["fp16" if fp16 else "float32"] = {
            "sums": [g.numpy().tolist() for g in step(*grads)],
            "collectives": sum(op.type == "CollectiveReduceV2" for op in graph.get_operations())}
    return out


def broadcast(world, tf):
    variables = [tf.Variable(tf.fill([3, 5], 1.5 + world.rank)), tf.Variable(tf.constant(7 + world.rank, tf.int64)),
                 tf.Variable(tf.constant([0.25, world.rank], tf.float64))]
    world.broadcast_variables(variables)
    return world.allgather_object([v.numpy().tolist() for v in variables])


def main():
    world = parallel.init("tensorflow")
    import tensorflow as tf
    out = {"gathered": gathered(world, tf), "pieces": in_pieces(world, tf), "broadcast": broadcast(world, tf)}
    if world.is_chief:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
