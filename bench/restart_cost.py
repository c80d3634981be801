"""What a lost worker costs under the supervisor: seconds from a worker's death to the first step at the new
size, for PTB small on both engines, and where the time goes. One run, the engines interleaved, median of
--repeats.

    python bench/restart_cost.py [--engines tensorflow horovod] [--repeats 3] [--data_path DIR] [--json F]

Each try: python -m distrnn.launch --engine E --nproc 3 --min_nproc 2 --max_restarts 1, PTB small with a
global batch of 24 (8 rows a worker, then 12), a checkpoint every 10 steps; worker 2 is killed (-9) as its
25th step begins (DISTRNN_FAULT, so the moment is the same in every try), the two others go on from the
checkpoint of step 20. The phases, from the time each line reaches this script (the death: when the killed
process is gone, watched every 5 ms):

    notice    the death until the first survivor's "lost contact" line (the engine's failure detection)
    wind-down until the launcher's restart line (every survivor has exited)
    start     until the new start's "engine:" line (Python and TensorFlow imported, the collective runtime
              or Horovod joined: the job prints its first lines once joined); beside it, what importing
              TensorFlow alone takes in a fresh Python (`import_tensorflow`, measured in the same try)
    restore   until "resumed from" (data read, model built, checkpoint read, rank 0's weights shared)
    step      until the first step at the new size has ended: the first progress line after the restart,
              less the steps after the first one at the steady pace of the next progress interval (an
              estimate: the loop prints progress every tenth of an epoch, not every step)
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil

import machine

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PHASES = ("notice", "wind-down", "start", "restore", "step")
KILLED_AT, CHECKPOINT_EVERY = 25, 10
PROGRESS = re.compile(r"step (\d+)/\d+ \(")


def watch_death(launcher: psutil.Process, found: dict) -> None:
    """Notes in found["death"] the moment worker 2 of the first start is gone."""
    while "death" not in found:
        for child in launcher.children():
            try:
                environment = child.environ()
            except psutil.Error:
                continue
            index = environment.get("HOROVOD_RANK") or json.loads(environment.get("TF_CONFIG", "{}")).get(
                "task", {}).get("index")
            if str(index) == "2":
                while _alive(child):
                    time.sleep(0.005)
                found["death"] = time.monotonic()
                return
        time.sleep(0.01)


def _alive(process: psutil.Process) -> bool:
    """Running and not a zombie (the launcher reaps its workers only every 0.2 s)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def one_restart(engine: str, data_path: str) -> dict:
    """The phases of one restart, in seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "distrnn.launch", "--engine", engine, "--nproc", "3", "--min_nproc", "2",
                   "--max_restarts", "1", "-m", "distrnn.ptb", "--config", "small", "--data_path", data_path,
                   "--global_batch_size", "24", "--checkpoint_every", str(CHECKPOINT_EVERY), "--max_steps", "70",
                   "--save_path", os.path.join(tmp, "run")]
        env = machine.child_env(DISTRNN_FAULT=f"step:{KILLED_AT}:kill", DISTRNN_FAULT_WORKER="2")
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        found = {}
        threading.Thread(target=watch_death, args=(psutil.Process(proc.pid), found), daemon=True).start()
        lines = [(time.monotonic(), line) for line in proc.stdout]
        if proc.wait() != 0:
            sys.exit(f"restart_cost: {engine}: the run failed (exit {proc.returncode}):\n"
                     + "".join(line for _, line in lines[-20:]))
    return phases(found["death"], lines)


def phases(death: float, lines: list) -> dict:
    def first(text: str, after: float) -> tuple:
        return next((t, line) for t, line in lines if t >= after and text in line)
    # A survivor may notice within the 5 ms the watch sleeps (a closed connection is seen at once).
    noticed, _ = first("lost contact", death - 0.01)
    noticed = max(noticed, death)
    restarted, _ = first("go on from the last checkpoint", noticed)
    started, _ = first("engine:", restarted)
    restored, _ = first("resumed from", started)
    progress = [(t, int(PROGRESS.search(line).group(1))) for t, line in lines if t > restored and PROGRESS.search(line)]
    (t1, s1), (t2, s2) = progress[:2]
    first_step = t1 - (s1 - (KILLED_AT // CHECKPOINT_EVERY) * CHECKPOINT_EVERY - 1) * (t2 - t1) / (s2 - s1)
    marks = [death, noticed, restarted, started, restored, first_step]
    return {name: b - a for name, a, b in zip(PHASES, marks, marks[1:])}


def import_seconds() -> float:
    """A fresh Python's `import tensorflow`, wall clock."""
    began = time.monotonic()
    subprocess.run([sys.executable, "-c", "import tensorflow"], check=True, env=machine.child_env())
    return time.monotonic() - began


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", nargs="+", default=["tensorflow", "horovod"], choices=["tensorflow", "horovod"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "ptb-mini"))
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()
    out = {"machine": machine.start(), "repeats": args.repeats, "config": "small", "workers": "3 -> 2"}
    tries = {e: [] for e in args.engines}
    for r in range(args.repeats):
        for engine in args.engines:
            tries[engine].append(dict(one_restart(engine, args.data_path), import_tensorflow=import_seconds()))
            total = sum(tries[engine][-1][k] for k in PHASES)
            print(f"try {r + 1}, {engine}: {total:.1f} s from the death to the first step on 2 workers ("
                  + ", ".join(f"{k} {v:.1f}" for k, v in tries[engine][-1].items()) + ")", flush=True)
    for engine, runs in tries.items():
        median = {k: round(statistics.median(run[k] for run in runs), 2) for k in (*PHASES, "import_tensorflow")}
        total = round(statistics.median(sum(run[k] for k in PHASES) for run in runs), 2)
        out[engine] = {"seconds_to_first_step": total, "phases": median}
        print(f"{engine} (median of {args.repeats}): {total:.1f} s from a worker's death to the first step at the "
              f"new size: " + ", ".join(f"{k} {v:.1f} s" for k, v in median.items()), flush=True)
    if len(tries) == 2:
        out["ratio_tensorflow_over_horovod"] = round(out["tensorflow"]["seconds_to_first_step"]
                                                     / out["horovod"]["seconds_to_first_step"], 3)
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
