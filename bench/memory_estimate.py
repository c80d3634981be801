"""`distrnn.devices --plan`'s memory estimate against the measured peak of real runs, in one run.

    python bench/memory_estimate.py [--data_path DIR] [--configs small medium large] [--max_steps 6]

Runs `python -m distrnn.ptb --config C --max_steps N` on one CPU device for the
`test` preset (two units: what TensorFlow itself and the input data hold) and
for each preset asked, in keep mode and with --recompute K (K near
sqrt(num_steps)), and reads each run's peak resident memory (ru_maxrss from
wait4). The prediction for a run is

    test's peak - test's estimate     (TensorFlow's runtime, the data)
    + the estimate for the run        (estimates.lm_memory: what a device holds)
    + the parameters once more        (on CPU the checkpoint is written from a host
                                       copy of every variable; on a GPU that copy is
                                       in host memory, not the device's)

and the error is (prediction - measured) / measured. On a GPU the device holds
the estimate alone (plus the CUDA context), which is what `--plan` prints.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MIB = 1024 * 1024

from distrnn.memory.estimates import recompute_segment  # noqa: E402  (after sys.path points at the checkout)


def peak_mib(config, data_path, max_steps, extra=()):
    """The run's peak RSS (MiB) and its metrics."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.json")
        proc = subprocess.Popen([sys.executable, "-m", "distrnn.ptb", "--config", config, "--data_path", data_path,
                                 "--max_steps", str(max_steps), "--save_path", os.path.join(tmp, "run"),
                                 "--metrics_json", metrics, *extra], cwd=ROOT, stdout=subprocess.DEVNULL,
                                env=machine.child_env())
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            raise SystemExit(f"memory_estimate: the {config} run failed (status {status})")
        with open(metrics) as f:
            return usage.ru_maxrss / 1024, json.load(f)


def estimate_mib(metrics, recompute=0):
    """The device estimate for the run (all parts on one device) and its parameter bytes, MiB."""
    from distrnn import names
    from distrnn.memory import estimates
    c = metrics["config"]
    gates = names.CELL_KINDS[c["cell"]].gates
    parts = estimates.lm_memory(metrics["vocab_size"], c["hidden_size"], c["num_layers"], c["batch_size"],
                                c["num_steps"], gates, c["keep_prob"] < 1.0, recompute)
    return sum(p.total for p in parts) / MIB, sum(p.parameters for p in parts) / MIB


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "ptb-mini"))
    p.add_argument("--configs", nargs="+", default=["small", "medium", "large"])
    p.add_argument("--max_steps", type=int, default=6)
    args = p.parse_args()
    host = machine.start()
    test_peak, test_metrics = peak_mib("test", args.data_path, args.max_steps)
    test_estimate, test_params = estimate_mib(test_metrics)
    runtime = test_peak - test_estimate - test_params
    print(f"test: peak {test_peak:.0f} MiB, estimate {test_estimate:.1f} MiB -> runtime and data {runtime:.0f} MiB",
          flush=True)
    rows = []
    for config in args.configs:
        for mode in ("keep", "recompute"):
            steps = {"small": 20, "medium": 35, "large": 35}.get(config, 20)
            k = recompute_segment(steps) if mode == "recompute" else 0
            measured, metrics = peak_mib(config, args.data_path, args.max_steps,
                                         ["--recompute", str(k)] if k else [])
            estimate, params = estimate_mib(metrics, k)
            predicted = runtime + estimate + params
            error = (predicted - measured) / measured
            rows.append({"config": config, "mode": f"recompute {k}" if k else "keep", "measured_mib": round(measured),
                         "estimate_mib": round(estimate, 1), "predicted_mib": round(predicted),
                         "error": round(error, 3)})
            print(f"{config:7s} {rows[-1]['mode']:12s} measured {measured:6.0f} MiB  predicted {predicted:6.0f} MiB "
                  f"(device estimate {estimate:6.1f} MiB)  error {100 * error:+.1f}%", flush=True)
    worst = max(abs(r["error"]) for r in rows)
    print(f"largest error: {100 * worst:.1f}%")
    print(json.dumps({"runtime_mib": round(runtime), "max_steps": args.max_steps, "rows": rows,
                      "largest_error": worst, "machine": host}))


if __name__ == "__main__":
    main()
