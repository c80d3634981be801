"""Data parallelism on one host, in one run: 1 process x N threads against N processes x 1 thread,
and the embedding gradient allgathered (Horovod's default for IndexedSlices) against densified.

    python bench/horovod_speed.py [--data_path DIR] [--np 2] [--small_steps 60] [--large_steps 12]

Every run is PTB with the same global batch (the preset's batch_size); words/sec leaves out each
process's first 5 steps. Scaling efficiency = words/sec of N processes / words/sec of 1 process on
the same cores.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(data_path, config, steps, processes, extra=()):
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.json")
        cmd = [sys.executable, "-m", "distrnn.ptb", "--config", config, "--global_batch_size", "20",
               "--data_path", data_path, "--max_steps", str(steps), "--save_path", os.path.join(tmp, "run"),
               "--metrics_json", metrics, *extra]
        if processes > 1:
            horovodrun = shutil.which("horovodrun", path=os.path.dirname(sys.executable))
            cmd = [horovodrun, "--gloo", "-np", str(processes), "-H", f"localhost:{processes}"] + cmd
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env=machine.child_env())
        with open(metrics) as f:
            return json.load(f)["words_per_sec"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "ptb-mini"))
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--small_steps", type=int, default=60)
    p.add_argument("--large_steps", type=int, default=12)
    args = p.parse_args()
    out = {"machine": machine.start(), "processes": args.np}
    one = run(args.data_path, "small", args.small_steps, 1)
    many = run(args.data_path, "small", args.small_steps, args.np)
    out["small_1_process"], out[f"small_{args.np}_processes"] = round(one, 1), round(many, 1)
    out["scaling_efficiency"] = round(many / one, 3)
    print(f"small: 1 process x {os.cpu_count()} threads {one:.0f} words/sec; {args.np} processes "
          f"{many:.0f} words/sec; efficiency {many / one:.3f}", flush=True)
    for config, steps in (("small", args.small_steps), ("large", args.large_steps)):
        gathered = run(args.data_path, config, steps, args.np)
        dense = run(args.data_path, config, steps, args.np, ["--sparse_as_dense"])
        out[f"{config}_allgather"], out[f"{config}_dense"] = round(gathered, 1), round(dense, 1)
        print(f"{config}, {args.np} processes: embedding gradient allgathered {gathered:.0f} words/sec, "
              f"densified {dense:.0f} words/sec (dense/allgather {dense / gathered:.3f})", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
