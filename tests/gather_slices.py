"""One worker of tests/test_collective.py's check of the embedding rows' all-gather: each rank averages an
IndexedSlices gradient of its own (rows that say their rank, indices past 2^32), in float32, float16 and
float64, inside a tf.function as the training step does; rank 0 prints what it got as one JSON line.

    python -m distrnn.launch --nproc 2 -- tests/gather_slices.py
"""
import json
import os
import sys

# This checkout's distrnn, wherever an installed one points (a script's own directory comes first on sys.path).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distrnn import parallel  # noqa: E402


def main():
    world = parallel.init("tensorflow")
    import tensorflow as tf
    out = {}
    for dtype, fp16 in (("float32", False), ("float32", True), ("float64", False)):
        rows = tf.constant([[world.rank + 1.0, 0.5], [-2.0, world.rank * 4.0], [1.0, 1.0]], dtype)
        indices = tf.constant([2**40 + world.rank, 7, 2**33 - 1 - world.rank], tf.int64)
        grad = tf.IndexedSlices(rows, indices, tf.constant([2**41, 2], tf.int64))
        averaged = tf.function(lambda g: world.average_gradients([g], fp16=fp16)[0])(grad)
        out[f"{dtype}{'-fp16' if fp16 else ''}"] = {"rows": averaged.values.numpy().tolist(),
                                                   "indices": averaged.indices.numpy().tolist(),
                                                   "dtype": averaged.values.dtype.name}
    if world.is_chief:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
