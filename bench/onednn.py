"""Speed and peak memory with TensorFlow's oneDNN kernels on and off, in one run: what distrnn's
default (distrnn.cpu.choose_onednn) rests on.

    python bench/onednn.py [--ptb_data DIR] [--mnist_data DIR] [--repeats 3] [--steps 300]
                           [--only NAME ...]

Each workload (PTB small; PTB small over 100-step windows in each memory mode; MNIST lstm) runs as
a child `python -m distrnn.ptb|mnist --max_steps N` under each setting: TF_ENABLE_ONEDNN_OPTS=0
(Eigen's kernels), =1 (oneDNN's), and, on a processor with AVX-512, =1 with ONEDNN_MAX_CPU_ISA=AVX2
(oneDNN limited to the instructions of an AVX2-only processor such as AMD EPYC Zen 3; the Eigen
kernels of the tensorflow-cpu wheel are built for AVX and run the same code on both). Workloads and
settings are interleaved, `--repeats` times, so that drift of the machine hits all alike; printed:
the median words (images) per second of each (the first 5 steps of a process left out), its ratio
to oneDNN off, and the child's peak resident memory (ru_maxrss).
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
DATA = os.path.join(ROOT, "..", "shared", "data")
LONG = ["--config", "small", "--num_steps", "100"]
WORKLOADS = {  # name: (module, flags, steps relative to --steps)
    "ptb small": ("distrnn.ptb", ["--config", "small"], 1.0),
    "ptb small T=100 keep": ("distrnn.ptb", LONG, 0.25),
    "ptb small T=100 recompute 10": ("distrnn.ptb", [*LONG, "--recompute", "10"], 0.25),
    "ptb small T=100 swap": ("distrnn.ptb", [*LONG, "--swap_memory"], 0.25),
    "mnist lstm": ("distrnn.mnist", ["--config", "lstm"], 1.0),
}
SETTINGS = {"off": {"TF_ENABLE_ONEDNN_OPTS": "0"}, "on": {"TF_ENABLE_ONEDNN_OPTS": "1"},
            "on, AVX2 kernels": {"TF_ENABLE_ONEDNN_OPTS": "1", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def run(module, flags, data_path, steps, env):
    """(units/sec, peak RSS MiB) of one child run."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.json")
        proc = subprocess.Popen([sys.executable, "-m", module, *flags, "--data_path", data_path, "--max_steps",
                                 str(steps), "--save_path", os.path.join(tmp, "run"), "--metrics_json", metrics],
                                cwd=ROOT, stdout=subprocess.DEVNULL, env=machine.child_env(**env))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            sys.exit(f"onednn: {module} {' '.join(flags)} failed with exit code {proc.returncode}")
        with open(metrics) as f:
            m = json.load(f)
    return m.get("words_per_sec") or m["examples_per_sec"], usage.ru_maxrss / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ptb_data", default=os.path.join(DATA, "ptb-mini"))
    p.add_argument("--mnist_data", default=os.path.join(DATA, "fashion-mnist"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=300, help="training steps of the PTB small and MNIST runs")
    p.add_argument("--only", nargs="+", choices=list(WORKLOADS), help="measure only these workloads")
    args = p.parse_args()
    host = machine.start()
    settings = {k: v for k, v in SETTINGS.items() if "AVX2" not in k or "avx512f" in host["vector_extensions"]}
    workloads = {k: v for k, v in WORKLOADS.items() if not args.only or k in args.only}
    runs = {(w, s): [] for w in workloads for s in settings}
    for r in range(args.repeats):
        for name, (module, flags, share) in workloads.items():
            data = args.ptb_data if module == "distrnn.ptb" else args.mnist_data
            for setting, env in settings.items():
                runs[name, setting].append(run(module, flags, data, max(10, round(args.steps * share)), env))
            print(f"run {r + 1} {name}: " + ", ".join(f"{s} {runs[name, s][-1][0]:.0f}/sec" for s in settings),
                  flush=True)
    result = {"machine": host, "repeats": args.repeats, "steps": args.steps, "workloads": {}}
    for name in workloads:
        off = statistics.median(rate for rate, _ in runs[name, "off"])
        figures = {}
        for setting in settings:
            rate = statistics.median(r for r, _ in runs[name, setting])
            rss = statistics.median(m for _, m in runs[name, setting])
            figures[setting] = {"per_sec": round(rate, 1), "ratio_to_off": round(rate / off, 3),
                                "peak_rss_mib": round(rss), "runs": [round(r) for r, _ in runs[name, setting]]}
            print(f"{name:30s} oneDNN {setting:17s} {rate:7.0f}/sec  ratio to off {rate / off:.3f}  "
                  f"peak RSS {rss:5.0f} MiB")
        result["workloads"][name] = figures
    print(json.dumps(result))


if __name__ == "__main__":
    main()
