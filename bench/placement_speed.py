"""Sequential against pipelined placement of a stacked LSTM over N virtual devices, in one run.

    python bench/placement_speed.py [--data_path DIR] [--devices 2 4] [--max_steps 60] [--rnn_mode dynamic]

For each N: the PTB small sizes with N layers (one per device), round-robin
placement over `--virtual_devices N`, `--placement sequential` and then
`pipeline`; prints words/sec of each and pipeline/sequential. Each run is a
child process (virtual devices are fixed once per process).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def words_per_sec(data_path, n, schedule, max_steps, rnn_mode):
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.json")
        subprocess.run([sys.executable, "-m", "distrnn.ptb", "--config", "small", "--num_layers", str(n),
                        "--virtual_devices", str(n), "--placement", schedule, "--rnn_mode", rnn_mode,
                        "--data_path", data_path, "--max_steps", str(max_steps), "--save_path",
                        os.path.join(tmp, "run"), "--metrics_json", metrics], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, env=machine.child_env())
        with open(metrics) as f:
            return json.load(f)["words_per_sec"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "ptb-mini"))
    p.add_argument("--devices", type=int, nargs="+", default=[2, 4])
    p.add_argument("--max_steps", type=int, default=60)
    p.add_argument("--rnn_mode", default="dynamic", help="static or dynamic (the pipeline runs a step loop)")
    args = p.parse_args()
    host = machine.start()
    results = []
    for n in args.devices:
        seq = words_per_sec(args.data_path, n, "sequential", args.max_steps, args.rnn_mode)
        pipe = words_per_sec(args.data_path, n, "pipeline", args.max_steps, args.rnn_mode)
        results.append({"devices": n, "layers": n, "sequential_words_per_sec": round(seq, 1),
                        "pipeline_words_per_sec": round(pipe, 1), "pipeline_over_sequential": round(pipe / seq, 3)})
        print(f"{n} virtual devices, {n} layers: sequential {seq:.0f} words/sec, pipeline {pipe:.0f} words/sec, "
              f"ratio {pipe / seq:.3f}", flush=True)
    print(json.dumps({"rnn_mode": args.rnn_mode, "max_steps": args.max_steps, "machine": host,
                      "results": results}))


if __name__ == "__main__":
    main()
