"""Peak memory and time of backprop through time over long sequences, per memory mode, in one run.

    python bench/bptt_memory.py [--num_steps 2000] [--hidden 256] [--batch 32] [--layers 2]
                                [--recompute K] [--repeats 3] [--precisions float32 bfloat16 float16]

Each mode runs in a child process of its own: a stacked LSTM (distrnn's
lstm_stack, dynamic loop) over `num_steps` steps, forward and backward, then
the child's peak resident memory (ru_maxrss) is read. Modes: keep (every
activation on the device), recompute K (default: the nearest integer to
sqrt(num_steps)), swap (activations kept on the host device). A `baseline`
child does the same but the training step: what TensorFlow, the weights and
the inputs hold, so the activation memory is the peak minus it. Every mode
runs in float32; keep also in each other of --precisions (distrnn.numerics.precision:
inputs and states in that dtype, the float32 weights cast), against a baseline
of its own, so that the activation memory of each precision is compared.

On a machine without a GPU the host is the device, so swap cannot lower the
process's peak here: what this measures for swap is its time cost; its
placement (activations on the host device) is tested in tests/test_rnn.py.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from distrnn.memory.estimates import recompute_segment  # noqa: E402  (imports no TensorFlow)


def child(args):
    import tensorflow as tf

    from distrnn.rnn.lstm_sequence import KEEP, Layer, Memory, lstm_stack

    from distrnn.numerics.precision import compute_dtype

    memory = {"keep": KEEP, "baseline": KEEP, "recompute": Memory(recompute=args.recompute),
              "swap": Memory(swap=True)}[args.child]
    h, rng, dtype = args.hidden, tf.random.Generator.from_seed(0), compute_dtype(args.precision)
    layers = [Layer(tf.Variable(rng.uniform([2 * h, 4 * h], -0.05, 0.05)), tf.Variable(tf.zeros([4 * h])), 1.0)
              for _ in range(args.layers)]
    inputs = tf.cast(rng.normal([args.num_steps, args.batch, h]), dtype)
    targets = tf.cast(rng.normal([args.num_steps, args.batch, h]), dtype)
    zeros = [(tf.zeros([args.batch, h], dtype), tf.zeros([args.batch, h], dtype)) for _ in range(args.layers)]
    variables = [w for layer in layers for w in (layer.kernel, layer.bias)]

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            outputs, _ = lstm_stack(inputs, zeros, layers,
                                    memory=memory)
            loss = tf.reduce_mean(tf.square(tf.cast(outputs - targets, tf.float32)))
        return loss, tf.linalg.global_norm(tape.gradient(loss, variables))

    seconds = []
    if args.child != "baseline":
        for _ in range(args.repeats + 1):  # the first call traces
            start = time.perf_counter()
            loss, norm = step()
            norm.numpy()
            seconds.append(time.perf_counter() - start)
    result = {"mode": args.child, "precision": args.precision,
              "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "step_sec": sorted(seconds[1:])[len(seconds[1:]) // 2] if seconds else None,
              "grad_norm": float(norm) if seconds else None}
    print(json.dumps(result))


def run_mode(mode, args, precision="float32"):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--precision", precision] + [
        f"--{k}={v}" for k, v in vars(args).items() if k not in ("child", "precision", "precisions")]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True,
                         env=machine.child_env(PYTHONPATH=ROOT))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_steps", type=int, default=2000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--recompute", type=int, default=0, help="segment length K (0: round(sqrt(num_steps)))")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per mode (median reported)")
    p.add_argument("--precisions", nargs="+", default=["float32", "bfloat16", "float16"],
                   choices=["float32", "bfloat16", "float16"], help="keep's activation memory in each")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.recompute = args.recompute or recompute_segment(args.num_steps)
    if args.child:
        return child(args)  # with the oneDNN setting the parent chose (inherited)
    host = machine.start()
    print(f"LSTM {args.layers} x {args.hidden}, batch {args.batch}, {args.num_steps} steps, "
          f"recompute K = {args.recompute}", flush=True)
    results = {}
    for mode in ("baseline", "keep", "recompute", "swap"):
        results[mode] = r = run_mode(mode, args)
        step = f", {r['step_sec']:.2f} s a step" if r["step_sec"] else ""
        print(f"{mode:9s} peak {r['peak_mib']:7.0f} MiB{step}", flush=True)
    base, keep = results["baseline"]["peak_mib"], results["keep"]
    summary = {}
    for mode in ("recompute", "swap"):
        r = results[mode]
        summary[mode] = {
            "peak_ratio": round(keep["peak_mib"] / r["peak_mib"], 3),        # keep's peak / this mode's
            "activation_ratio": round((keep["peak_mib"] - base) / max(r["peak_mib"] - base, 1.0), 3),
            "time_ratio": round(r["step_sec"] / keep["step_sec"], 3),          # this mode's time / keep's
            "same_gradient_norm": abs(r["grad_norm"] - keep["grad_norm"]) <= 1e-4 * abs(keep["grad_norm"]),
        }
        s = summary[mode]
        print(f"{mode}: peak memory {s['peak_ratio']:.2f}x lower than keep ({s['activation_ratio']:.2f}x above the "
              f"baseline), time {s['time_ratio']:.2f}x keep's, same gradient norm: {s['same_gradient_norm']}")
    summary["precision"] = by_precision(args, results)
    print(json.dumps({"settings": {k: v for k, v in vars(args).items() if k not in ("child", "precision")},
                      "results": results, "summary": summary, "machine": host}))


def by_precision(args, results) -> dict:
    """keep's activation memory (its peak above its own baseline's) in each precision, against float32's."""
    activations = {"float32": results["keep"]["peak_mib"] - results["baseline"]["peak_mib"]}
    for precision in args.precisions:
        if precision == "float32":
            continue
        base, keep = (run_mode(mode, args, precision) for mode in ("baseline", "keep"))
        results[f"keep_{precision}"] = keep
        activations[precision] = keep["peak_mib"] - base["peak_mib"]
        print(f"keep in {precision}: peak {keep['peak_mib']:7.0f} MiB, activations {activations[precision]:7.0f} MiB "
              f"({activations[precision] / activations['float32']:.2f}x float32's {activations['float32']:.0f} MiB), "
              f"{keep['step_sec']:.2f} s a step", flush=True)
    return {p: {"activation_mib": round(mib, 1), "of_float32": round(mib / activations["float32"], 3)}
            for p, mib in activations.items()}


if __name__ == "__main__":
    main()
