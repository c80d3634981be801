"""One process of bench/engines.py's collective timing: joins the job its launcher started (parallel.init,
either engine) and times World.average_gradients on gradients shaped as a PTB preset's (the LSTM kernels and
biases, the softmax, and the embedding's rows as IndexedSlices of batch x steps rows), inside a tf.function
as the training step calls it. Prints one JSON line on rank 0: milliseconds per all-reduce (median of the
timed repeats after 3 warm-ups).

    <launcher> python bench/allreduce_step.py --config small [--repeats 20] [--engine auto]
    <launcher> python bench/allreduce_step.py --floats 1     (one dense tensor of that many floats: the latency)
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def gradients(config, vocab: int = 10000):
    """Random tensors of a PTB model's gradient shapes (vocab as the full PTB's)."""
    import tensorflow as tf
    h, rows = config.hidden_size, config.batch_size * config.num_steps
    dense = [tf.random.normal([2 * h, 4 * h]) for _ in range(config.num_layers)]
    dense += [tf.random.normal([4 * h]) for _ in range(config.num_layers)]
    dense += [tf.random.normal([h, vocab]), tf.random.normal([vocab])]
    embedding = tf.IndexedSlices(tf.random.normal([rows, h]), tf.random.uniform([rows], 0, vocab, tf.int64),
                                 tf.constant([vocab, h], tf.int64))
    return dense + [embedding]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="small")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--engine", default="auto")
    p.add_argument("--floats", type=int, default=0, help="all-reduce one tensor of this many floats instead")
    args = p.parse_args()
    from distrnn import parallel
    from distrnn.ptb.configs import PRESETS
    world = parallel.init(args.engine)
    import tensorflow as tf
    grads = [tf.random.normal([args.floats])] if args.floats else gradients(PRESETS.get(args.config))
    sparse = [g for g in grads if isinstance(g, tf.IndexedSlices)]

    @tf.function
    def step(grads):  # an argument, not a capture: inside the function they are graph tensors, as in training
        out = world.average_gradients(grads)
        return [tf.reduce_sum(g.values if isinstance(g, tf.IndexedSlices) else g) for g in out]

    times = []
    for i in range(3 + args.repeats):
        world.allreduce_sum([0.0])  # every rank starts the step together
        t0 = time.perf_counter()
        [float(s) for s in step(grads)]
        if i >= 3:
            times.append(time.perf_counter() - t0)
    ms = world.allgather(tf.constant([statistics.median(times) * 1000]).numpy())
    if world.is_chief:
        dense_bytes = sum(int(tf.size(g)) * 4 for g in grads if not isinstance(g, tf.IndexedSlices))
        print(json.dumps({"engine": world.report(), "config": args.config, "processes": world.size,
                          "ms_per_allreduce": round(float(max(ms)), 3), "dense_bytes": dense_bytes,
                          "embedding_rows": sum(int(g.values.shape[0]) for g in sparse)}))


if __name__ == "__main__":
    main()
