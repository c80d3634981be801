"""The scaling model's compute, calibrated on this machine's CPU as its "GPU": the model's step time for PTB
small, medium and large against measured training steps, one run, median of --repeats.

    python bench/scaling_compute.py [--configs small medium large] [--repeats 3] [--seconds 5] [--data_path DIR]

The CPU's figures, measured here with TensorFlow in a child process: its matrix-product rate (a 2048^3
float32 product, the "peak"), its memory bandwidth (summing a 512 MiB array), one small op's dispatch (the
model's kernel time); at each preset's shapes, what a time step's product reaches of that rate (the model's
matmul_efficiency), the backward step's product of the forward's (backward_efficiency), the products over
the whole sequence (sequence_efficiency), and the ops distrnn's own LSTM runs a layer's time step each way,
counted in its graph (kernels_per_step). distrnn's own LSTM takes the inputs of the layers above the first a
step at a time (per_step_inputs). With them the model (distrnn.scaling.model.compute_seconds) predicts a
training step; distrnn.ptb measures it (`words_per_sec` of --metrics_json, the first 5 steps left out; each
run at least --seconds of timed steps, by the predicted step). The presets take turns in each repeat.
Printed: predicted, measured, ratio.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile

import machine

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from distrnn.ptb import reader  # noqa: E402
from distrnn.ptb.configs import PRESETS  # noqa: E402
from distrnn.scaling import hardware, model  # noqa: E402

RATES = r"""
import json, sys, time
import tensorflow as tf

def best(fn, *args, rounds=5):
    fn(*args)
    times = []
    for _ in range(rounds):
        began = time.perf_counter(); fn(*args).numpy(); times.append(time.perf_counter() - began)
    return min(times)

n, calls = 2048, 10
a = tf.random.normal([n, n]); b = tf.random.normal([n, n])
@tf.function
def products(a, b):
    out = a
    for _ in range(calls):
        out = tf.matmul(out, b) * 1e-3
    return out
flops = 2.0 * n ** 3 * calls / best(products, a, b)
big = tf.random.normal([128 * 1024 * 1024])
@tf.function
def total(x):
    return tf.reduce_sum(x)
gbps = big.shape[0] * 4 / best(total, big) / 1e9
small = tf.random.normal([20, 200])
@tf.function
def chain(x):
    for _ in range(200):
        x = tf.tanh(x)
    return x
kernel_us = best(chain, small) / 200 * 1e6
# What a time step's products reach at each preset's shape, 35 a call, each needing the one before as a
# recurrence's do: forward [B, h] x [h, 4h]; backward [B, 4h] x [h, 4h]^T.
fraction, backward = {}, {}
for name, (rows, h, _, _) in json.loads(sys.argv[1]).items():
    x = tf.random.normal([rows, h]); w = tf.random.normal([h, 4 * h])
    @tf.function
    def steps(x, w):
        for _ in range(35):
            x = tf.matmul(x, w)[:, :h] * 1e-3
        return x
    @tf.function
    def back(x, w):
        for _ in range(35):
            x = tf.tile(tf.matmul(x, w, transpose_b=True), [1, 4]) * 1e-3
        return x
    forward_s = best(steps, x, w)
    fraction[name] = 2.0 * rows * h * 4 * h * 35 / forward_s / flops
    backward[name] = forward_s / best(back, tf.random.normal([rows, 4 * h]), w)
# What the products over a whole sequence's rows (35 steps) reach at each preset's shape: the LSTM's input
# projection, its input's and weights' gradients, and the softmax's three, all their flops over all their time.
sequence = {}
vocab = int(sys.argv[2])
for name, (rows, h, _, _) in json.loads(sys.argv[1]).items():
    n = rows * 35
    x, w, dz = tf.random.normal([n, h]), tf.random.normal([h, 4 * h]), tf.random.normal([n, 4 * h])
    ws, dl = tf.random.normal([h, vocab]), tf.random.normal([n, vocab])
    plain = tf.function(lambda a, b: tf.matmul(a, b))
    into = tf.function(lambda a, b: tf.matmul(a, b, transpose_b=True))
    weights = tf.function(lambda a, b: tf.matmul(a, b, transpose_a=True))
    seconds = sum(best(f, a, b) for f, a, b in [(plain, x, w), (into, dz, w), (weights, x, dz), (plain, x, ws),
                                                (into, dl, ws), (weights, x, dl)])
    sequence[name] = 3 * 2.0 * n * h * (4 * h + vocab) / seconds / flops
# The kernels one layer's time step runs each way in distrnn's own LSTM (static, as on this CPU): the ops its
# graph gains, forward and backward, from two more time steps.
sys.path.insert(0, sys.argv[3])
from distrnn.rnn.lstm_sequence import Layer, lstm_stack
def graph_ops(steps, rows, h, layers, dropout):
    @tf.function
    def run(x, kernels, biases):
        with tf.GradientTape() as tape:
            tape.watch([x] + kernels + biases)
            states = [(tf.zeros([rows, h]), tf.zeros([rows, h])) for _ in kernels]
            drops = [tf.ones([steps, rows, h]) for _ in kernels] if dropout else None
            out, _ = lstm_stack(x, states, [Layer(k, b, 0.0) for k, b in zip(kernels, biases)], drops, static=True)
            loss = tf.reduce_sum(out)
        return tape.gradient(loss, [x] + kernels + biases)
    specs = (tf.TensorSpec([steps, rows, h]), [tf.TensorSpec([2 * h, 4 * h])] * layers,
             [tf.TensorSpec([4 * h])] * layers)
    return len(run.get_concrete_function(*specs).graph.get_operations())
kernels = {name: (graph_ops(6, *shape) - graph_ops(4, *shape)) / (2 * 2 * shape[2])
           for name, shape in json.loads(sys.argv[1]).items()}
print(json.dumps({"tflops": flops / 1e12, "gbps": gbps, "kernel_us": kernel_us, "fraction": fraction,
                  "backward": backward, "sequence": sequence, "kernels": kernels}))
"""


def cpu_rates(configs, vocab: int) -> dict:
    shapes = {c: (PRESETS.get(c).batch_size, PRESETS.get(c).hidden_size, PRESETS.get(c).num_layers,
                  PRESETS.get(c).keep_prob < 1) for c in configs}
    out = subprocess.run([sys.executable, "-c", RATES, json.dumps(shapes), str(vocab), ROOT], capture_output=True,
                         text=True, check=True, env=machine.child_env()).stdout
    return json.loads(out.strip().splitlines()[-1])


def measured_step(config: str, steps: int, data_path: str, vocab: int) -> float:
    """Seconds of one training step, as distrnn.ptb measures its words/sec."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.json")
        subprocess.run([sys.executable, "-m", "distrnn.ptb", "--config", config, "--data_path", data_path,
                        "--max_steps", str(steps), "--save_path", os.path.join(tmp, "run"), "--metrics_json",
                        metrics], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env=machine.child_env())
        with open(metrics) as f:
            m = json.load(f)
    c = PRESETS.get(config)
    assert m["vocab_size"] == vocab, (m["vocab_size"], vocab)
    return c.batch_size * c.num_steps / m["words_per_sec"]


def predicted_parts(config: str, vocab: int, rates: dict) -> dict:
    """The model's compute of one step on this CPU, by part (distrnn.scaling.model.compute_seconds)."""
    c = PRESETS.get(config)
    cpu = hardware.GPU("this CPU", rates["tflops"], rates["tflops"], 0, rates["gbps"], "measured here")
    a = model.Assumptions(matmul_efficiency=rates["fraction"][config], sequence_efficiency=rates["sequence"][config],
                          backward_efficiency=rates["backward"][config], per_step_inputs=True,
                          kernels_per_step=rates["kernels"][config], kernel_us=rates["kernel_us"])
    shapes = model.Model(c.hidden_size, c.num_layers, c.num_steps, vocab)
    return model.compute_seconds(shapes, c.batch_size, cpu, "float32", a)


def predicted_step(config: str, vocab: int, rates: dict) -> float:
    return predicted_parts(config, vocab, rates)["total"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["small", "medium", "large"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=25, help="training steps a run at least (the first 5 are not timed)")
    p.add_argument("--seconds", type=float, default=5.0, help="timed steps a run at least (by the predicted step)")
    p.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "ptb-mini"))
    args = p.parse_args()
    out = {"machine": machine.start(), "repeats": args.repeats, "configs": {}}
    runs = {c: [] for c in args.configs}
    vocab = len(reader.build_vocab(reader.read_words(os.path.join(args.data_path, reader.file_name("train")))))
    for r in range(args.repeats):
        rates = cpu_rates(args.configs, vocab)
        for config in args.configs:
            predicted = predicted_step(config, vocab, rates)
            # At least --seconds of timed steps: small's 20 steps were 0.4 s and its reading moved 0.018-0.021 s.
            timed = max(args.steps - 5, math.ceil(args.seconds / predicted))
            seconds = measured_step(config, 5 + timed, args.data_path, vocab)
            runs[config].append((predicted, seconds, rates))
            print(f"run {r + 1}, {config}: predicted {runs[config][-1][0]:.3f} s a step, measured {seconds:.3f} s "
                  f"(CPU: {rates['tflops'] * 1000:.0f} GFLOPS, {rates['gbps']:.1f} GB/s, an op "
                  f"{rates['kernel_us']:.1f} us; the step's product reaches {rates['fraction'][config]:.2f} of "
                  f"that rate, backward {rates['backward'][config]:.2f} of forward's; the sequence's products "
                  f"{rates['sequence'][config]:.2f}; {rates['kernels'][config]:.1f} ops a layer's step each way)",
                  flush=True)
    for config, results in runs.items():
        predicted = statistics.median(x[0] for x in results)
        measured = statistics.median(x[1] for x in results)
        out["configs"][config] = {"predicted_s": round(predicted, 4), "measured_s": round(measured, 4),
                                  "ratio": round(predicted / measured, 3)}
        print(f"{config}: predicted {predicted:.3f} s a step, measured {measured:.3f} s, ratio "
              f"{predicted / measured:.3f}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
