"""What the LSTM cell state needs in 16 bits: how far the state drifts from float32's when c is kept in
the 16-bit dtype (what distrnn does) against keeping c alone in float32, gates and matmuls 16-bit both ways.

    python bench/precision_cell_state.py [--steps 200] [--forget_bias 0 3]

A 200-unit LSTM, batch 20, inputs uniform in [-1, 1], weights uniform +-0.1 (PTB small's init) and
+-0.3 (a larger recurrence), run forward on the same weights and inputs in float32 and in each variant;
prints the relative error of c and h after 20 steps and after --steps.
"""
import argparse
import json

import numpy as np

import machine


def run(tf, dtype, c_dtype, kernel, inputs, units, forget_bias):
    c, h = tf.zeros([inputs.shape[1], units], c_dtype), tf.zeros([inputs.shape[1], units], dtype)
    w = tf.cast(kernel, dtype)
    hs, cs = [], []
    for x in inputs:
        i, j, f, o = tf.split(tf.matmul(tf.concat([tf.cast(x, dtype), h], 1), w), 4, 1)
        c = tf.sigmoid(tf.cast(f, c_dtype) + forget_bias) * c + tf.cast(tf.sigmoid(i) * tf.tanh(j), c_dtype)
        h = tf.sigmoid(o) * tf.cast(tf.tanh(c), dtype)
        hs.append(tf.cast(h, tf.float64).numpy())
        cs.append(tf.cast(c, tf.float64).numpy())
    return np.array(hs), np.array(cs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--forget_bias", type=float, nargs="+", default=[0.0, 3.0])
    args = p.parse_args()
    host = machine.start()
    import tensorflow as tf
    units, batch, rows = 200, 20, []
    rng = np.random.default_rng(1)
    for forget_bias in args.forget_bias:
        for scale in (0.1, 0.3):
            kernel = tf.constant(rng.uniform(-scale, scale, [2 * units, 4 * units]), tf.float32)
            inputs = tf.constant(rng.uniform(-1, 1, [args.steps, batch, units]), tf.float32)
            h32, c32 = run(tf, tf.float32, tf.float32, kernel, inputs, units, forget_bias)
            for name in ("bfloat16", "float16"):
                dtype = tf.as_dtype(name)
                for c_name, c_dtype in ((name, dtype), ("float32", tf.float32)):
                    h, c = run(tf, dtype, c_dtype, kernel, inputs, units, forget_bias)

                    def error(a, b, t):
                        return float(np.linalg.norm(a[t] - b[t]) / np.linalg.norm(b[t]))
                    row = {"forget_bias": forget_bias, "init": scale, "dtype": name, "cell_state": c_name,
                           "c_error_20": error(c, c32, 19), "c_error_last": error(c, c32, -1),
                           "h_error_20": error(h, h32, 19), "h_error_last": error(h, h32, -1)}
                    rows.append(row)
                    print(f"forget bias {forget_bias:g}, init +-{scale}: {name} gates, c in {c_name:8s}: c's error "
                          f"{row['c_error_20']:.2e} after 20 steps, {row['c_error_last']:.2e} after {args.steps}; "
                          f"h's {row['h_error_20']:.2e}, {row['h_error_last']:.2e}", flush=True)
    print(json.dumps({"machine": host, "steps": args.steps, "rows": rows}))


if __name__ == "__main__":
    main()
