"""Speed of the row-by-row classifier's presets, and of the stacked preset on 1 and 3 devices, in one run.

    python bench/mnist_speed.py [--data_path DIR] [--max_steps 150] [--repeats 3]

Runs `python -m distrnn.mnist --max_steps N` as child processes (virtual devices are fixed once per
process), each setting `--repeats` times, interleaved so that drift of the machine hits all alike, and
prints the median images/sec of each (the first 5 steps of a process, tracing, are left out), the
seconds a 55,000-image epoch takes at that rate, and the stacked preset's speed on 3 virtual devices
(sequential and pipelined) over its speed on one.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {
    "basic_rnn": ["--config", "basic_rnn"],
    "lstm": ["--config", "lstm"],
    "stacked, 1 device": ["--config", "stacked"],
    "stacked, 3 devices sequential": ["--config", "stacked", "--virtual_devices", "3"],
    "stacked, 3 devices pipeline": ["--config", "stacked", "--virtual_devices", "3", "--placement", "pipeline"],
}


def images_per_sec(data_path, args, max_steps):
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.json")
        subprocess.run([sys.executable, "-m", "distrnn.mnist", *args, "--data_path", data_path,
                        "--max_steps", str(max_steps), "--save_path", os.path.join(tmp, "run"),
                        "--metrics_json", metrics], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                       env=machine.child_env())
        with open(metrics) as f:
            return json.load(f)["examples_per_sec"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "fashion-mnist"))
    p.add_argument("--max_steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    host = machine.start()
    rates = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):
        for name, flags in SETTINGS.items():
            rates[name].append(images_per_sec(args.data_path, flags, args.max_steps))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, rate in medians.items():
        print(f"{name:30s} {rate:7.0f} images/sec (runs: {', '.join(f'{r:.0f}' for r in rates[name])}), "
              f"{55000 / rate:5.1f} s an epoch", flush=True)
    one = medians["stacked, 1 device"]
    for schedule in ("sequential", "pipeline"):
        print(f"stacked on 3 devices, {schedule}, over 1 device: {medians[f'stacked, 3 devices {schedule}'] / one:.3f}")
    print(json.dumps({"max_steps": args.max_steps, "repeats": args.repeats, "machine": host,
                      "images_per_sec": medians, "runs": rates}))


if __name__ == "__main__":
    main()
