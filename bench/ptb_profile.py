"""Where the time of one PTB training step goes, by part, in one run.

    python bench/ptb_profile.py [--config small] [--rnn_mode auto] [--vocab_size 6049] [--repeats 7]

Each part runs alone as its own tf.function on prepared tensors, forward and
backward, and is timed as the median over `--repeats` rounds of 30 calls:

  recurrence  embedding lookup and the stacked LSTM (upstream gradient given)
  softmax     the softmax layer and its loss
  update      gradient clipping and the SGD step
  step        the whole training step on prepared tensors
  loop        the step as training runs it: windows sliced from the corpus as
              NumPy arrays, the loss read back every step

loop - step is the input pipeline and per-step overhead; step - (recurrence +
softmax + update) is what the parts do not show alone (the rest of the step,
and the overlap the executor finds between parts, which makes it negative).
vocab_size 6049 is ptb-mini's; the full PTB has 10000.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import machine  # noqa: E402

MACHINE = machine.start()  # before TensorFlow loads, which fixes the oneDNN setting then
import tensorflow as tf  # noqa: E402

from distrnn.config import override  # noqa: E402
from distrnn.ptb import configs, reader  # noqa: E402
from distrnn.ptb.trainer import Trainer, sum_duplicate_rows  # noqa: E402


def median_ms(fn, repeats: int, calls: int = 30) -> float:
    for _ in range(5):
        out = fn()
    tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out)
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn()
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out)
        rounds.append((time.perf_counter() - t0) / calls * 1000)
    return statistics.median(rounds)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", choices=list(configs.PRESETS.names()))
    p.add_argument("--rnn_mode", default="auto")
    p.add_argument("--vocab_size", type=int, default=6049)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    config = override(configs.PRESETS.get(args.config), {"rnn_mode": args.rnn_mode})
    B, T, V = config.batch_size, config.num_steps, args.vocab_size
    trainer = Trainer(config, V, seed=1)
    model = trainer.model
    rng = np.random.default_rng(0)
    corpus = rng.integers(0, V, B * (40 * T + 1)).astype(np.int32)
    rows = reader.train_rows(corpus, B)
    x = tf.constant(rows[:, :T])
    y = tf.constant(rows[:, 1:T + 1])
    state = model.zero_state(B)
    features, _ = model(x, state, training=True)
    upstream = tf.random.stateless_normal(features.shape, seed=[1, 2])
    recurrent_vars = [model.embedding] + [v for cell in model.cells for v in cell.trainable_variables]
    softmax_vars = [model.softmax_w, model.softmax_b]

    @tf.function
    def recurrence():
        with tf.GradientTape() as tape:
            out, new_state = model(x, state, training=True)
            loss = tf.reduce_sum(out * upstream)
        return [loss] + [tf.convert_to_tensor(g) for g in tape.gradient(loss, recurrent_vars)]

    @tf.function
    def softmax():
        with tf.GradientTape() as tape:
            tape.watch(features)
            loss = tf.reduce_sum(model.token_losses(features, y))
        return tape.gradient(loss, [features] + softmax_vars)

    with tf.GradientTape() as tape:  # one step's real gradients (the embedding's as IndexedSlices)
        out, _ = model(x, state, training=True)
        loss = tf.reduce_sum(model.token_losses(out, y))
    real = tape.gradient(loss, model.trainable_variables)

    @tf.function
    def update():
        grads = [sum_duplicate_rows(g) for g in real]  # as train_step: merge repeated rows, then clip + SGD
        trainer.optimizer.apply(grads, model.trainable_variables, clip_norm=config.max_grad_norm)
        return trainer.optimizer.iterations

    def step():
        return trainer.train_step(x, y, state)

    def loop():
        s = state
        for _, xs, ys in reader.train_windows(rows, T, start=0):
            loss, _, _, s = trainer.train_step(xs, ys, s)
            float(loss)
        return loss

    windows = sum(1 for _ in reader.train_windows(rows, T, start=0))
    parts = {"recurrence": median_ms(recurrence, args.repeats), "softmax": median_ms(softmax, args.repeats),
             "update": median_ms(update, args.repeats), "step": median_ms(step, args.repeats)}
    parts["loop"] = median_ms(loop, args.repeats, calls=1) / windows
    rest = parts["step"] - parts["recurrence"] - parts["softmax"] - parts["update"]
    print(f"PTB {args.config} step (batch {B} x {T} steps, vocab {V}, rnn_mode {trainer.unrolling.mode}), ms per step:")
    for name in ("recurrence", "softmax", "update"):
        print(f"  {name:12s} {parts[name]:6.2f}  ({parts[name] / parts['step']:5.1%} of the step)")
    print(f"  {'not in parts':12s} {rest:6.2f}")
    print(f"  {'step':12s} {parts['step']:6.2f}")
    print(f"  {'loop':12s} {parts['loop']:6.2f}  (input pipeline and per-step overhead: "
          f"{parts['loop'] - parts['step']:.2f})")
    print(json.dumps(dict({k: round(v, 3) for k, v in parts.items()}, machine=MACHINE)))


if __name__ == "__main__":
    main()
