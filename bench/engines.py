"""The two engines against each other on one machine, in one run: PTB with 2 processes under Horovod
(horovodrun --gloo) and under TensorFlow's collectives (python -m distrnn.launch), interleaved, median of
--repeats: words/sec of the whole job, and the time one step's gradient all-reduce takes (bench/
allreduce_step.py: World.average_gradients on the preset's gradient shapes), with the ratios
TensorFlow / Horovod. Needs a stack where both run (TensorFlow 2.15-2.18 with Horovod).

    python bench/engines.py [--configs small medium] [--np 2] [--steps 40] [--repeats 3] [--data_path DIR]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import machine

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def launcher(engine: str, np_: int) -> list:
    if engine == "horovod":
        horovodrun = shutil.which("horovodrun", path=os.path.dirname(sys.executable))
        if horovodrun is None:
            sys.exit("engines: horovodrun not found: this stack has no Horovod (bash launch/setup.sh)")
        return [horovodrun, "--gloo", "-np", str(np_), "-H", f"localhost:{np_}", sys.executable]
    return [sys.executable, "-m", "distrnn.launch", "--nproc", str(np_), "--"]


def job_speed(engine, np_, config, steps, data_path) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.json")
        subprocess.run([*launcher(engine, np_), "-m", "distrnn.ptb", "--config", config, "--data_path", data_path,
                        "--max_steps", str(steps), "--engine", engine, "--save_path", os.path.join(tmp, "run"),
                        "--metrics_json", metrics], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                       env=machine.child_env())
        with open(metrics) as f:
            return json.load(f)["words_per_sec"]


def allreduce_ms(engine, np_, config) -> float:
    out = subprocess.run([*launcher(engine, np_), os.path.join(HERE, "allreduce_step.py"), "--config", config,
                          "--engine", engine], cwd=ROOT, check=True, capture_output=True, text=True,
                         env=machine.child_env()).stdout
    line = [line for line in out.splitlines() if '{"engine"' in line][-1]  # horovodrun prefixes [0]<stdout>:
    return json.loads(line[line.index("{"):])["ms_per_allreduce"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["small", "medium"])
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "ptb-mini"))
    args = p.parse_args()
    out = {"machine": machine.start(), "processes": args.np, "steps": args.steps, "repeats": args.repeats}
    engines = ("horovod", "tensorflow")
    for config in args.configs:
        speed = {e: [] for e in engines}
        ms = {e: [] for e in engines}
        for r in range(args.repeats):
            for engine in engines:
                speed[engine].append(job_speed(engine, args.np, config, args.steps, args.data_path))
                ms[engine].append(allreduce_ms(engine, args.np, config))
            print(f"{config} run {r + 1}: " + ", ".join(f"{e} {speed[e][-1]:.0f} words/sec, all-reduce {ms[e][-1]:.1f} ms"
                                                        for e in engines), flush=True)
        med = {e: (statistics.median(speed[e]), statistics.median(ms[e])) for e in engines}
        (hw, hm), (tw, tm) = med["horovod"], med["tensorflow"]
        out[config] = {"horovod_words_per_sec": round(hw, 1), "tensorflow_words_per_sec": round(tw, 1),
                       "words_per_sec_ratio": round(tw / hw, 3), "horovod_allreduce_ms": hm,
                       "tensorflow_allreduce_ms": tm, "allreduce_ms_ratio": round(tm / hm, 3)}
        print(f"{config}, {args.np} processes (median of {args.repeats}): words/sec horovod {hw:.0f}, tensorflow "
              f"{tw:.0f} (ratio {tw / hw:.3f}); one step's gradient all-reduce horovod {hm:.1f} ms, tensorflow "
              f"{tm:.1f} ms (ratio {tm / hm:.3f})", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
