"""The scaling model's compute, calibrated on this machine's CPU as its "GPU": the model's step time for PTB
small, medium and large against measured training steps, one run, median of --repeats.

    python bench/scaling_compute.py [--configs small medium large] [--repeats 3] [--data_path DIR]

The CPU's figures, measured here with TensorFlow in a child process: its matrix-product rate (a 2048^3
float32 product, the "peak"), its memory bandwidth (summing a 512 MiB array), and one small op's dispatch
(the model's kernel time), and what a time step's product at each preset's shape reaches of that rate (the
model's matmul_efficiency, measured; its sequence_efficiency is 1: the measured rate is a large product's). With them the model (distrnn.scaling.model.compute_seconds) predicts a
training step; distrnn.ptb measures it
(`words_per_sec` of --metrics_json, the first 5 steps left out). Printed: predicted, measured, ratio.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import machine

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

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
# What a time step's recurrent product reaches at each preset's shape: [B, h] x [h, 4h], 35 a call.
fraction = {}
for name, (rows, h) in json.loads(sys.argv[1]).items():
    x = tf.random.normal([rows, h]); w = tf.random.normal([h, 4 * h])
    @tf.function
    def steps(x, w):
        for _ in range(35):  # each product needs the one before, as a recurrence's do
            x = tf.matmul(x, w)[:, :h] * 1e-3
        return x
    fraction[name] = 2.0 * rows * h * 4 * h * 35 / best(steps, x, w) / flops
print(json.dumps({"tflops": flops / 1e12, "gbps": gbps, "kernel_us": kernel_us, "fraction": fraction}))
"""


def cpu_rates(configs) -> dict:
    shapes = {c: (PRESETS.get(c).batch_size, PRESETS.get(c).hidden_size) for c in configs}
    out = subprocess.run([sys.executable, "-c", RATES, json.dumps(shapes)], capture_output=True, text=True,
                         check=True, env=machine.child_env()).stdout
    return json.loads(out.strip().splitlines()[-1])


def measured_step(config: str, steps: int, data_path: str) -> float:
    """Seconds of one training step, as distrnn.ptb measures its words/sec."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.json")
        subprocess.run([sys.executable, "-m", "distrnn.ptb", "--config", config, "--data_path", data_path,
                        "--max_steps", str(steps), "--save_path", os.path.join(tmp, "run"), "--metrics_json",
                        metrics], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env=machine.child_env())
        with open(metrics) as f:
            m = json.load(f)
    c = PRESETS.get(config)
    return c.batch_size * c.num_steps / m["words_per_sec"], m["vocab_size"]


def predicted_step(config: str, vocab: int, rates: dict) -> float:
    c = PRESETS.get(config)
    cpu = hardware.GPU("this CPU", rates["tflops"], rates["tflops"], 0, rates["gbps"], "measured here")
    a = model.Assumptions(matmul_efficiency=rates["fraction"][config], sequence_efficiency=1.0,
                          kernel_us=rates["kernel_us"])
    shapes = model.Model(c.hidden_size, c.num_layers, c.num_steps, vocab)
    return model.compute_seconds(shapes, c.batch_size, cpu, "float32", a)["total"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["small", "medium", "large"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=25, help="training steps a run (the first 5 are not timed)")
    p.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "ptb-mini"))
    args = p.parse_args()
    out = {"machine": machine.start(), "repeats": args.repeats, "configs": {}}
    runs = {c: [] for c in args.configs}
    for r in range(args.repeats):
        rates = cpu_rates(args.configs)
        for config in args.configs:
            seconds, vocab = measured_step(config, args.steps, args.data_path)
            runs[config].append((predicted_step(config, vocab, rates), seconds, rates))
            print(f"run {r + 1}, {config}: predicted {runs[config][-1][0]:.3f} s a step, measured {seconds:.3f} s "
                  f"(CPU: {rates['tflops'] * 1000:.0f} GFLOPS, {rates['gbps']:.1f} GB/s, an op "
                  f"{rates['kernel_us']:.1f} us; the step's product reaches {rates['fraction'][config]:.2f} of "
                  f"that rate)", flush=True)
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
