"""`python -m distrnn.devices` (also `distrnn-devices`): what a job would see, without holding GPU memory.

    python -m distrnn.devices [--json] [--watch SECONDS [--count N]] [--no-tensorflow]
    python -m distrnn.devices --device-lib [--json]
    python -m distrnn.devices --plan --config large --num_gpus 4 [--gpus_per_rank K]
                              [--swap_memory | --recompute K] [--gpu_memory_gib G] [--json]

Lists the host (CPU model, cores, memory), every GPU (index, name, compute
capability, memory total/used/free) with the processes that hold its memory
(pid, user, command, MiB, as nvidia-smi shows them), and TensorFlow's physical
and logical devices.

Why it is built this way: the classic `device_lib.list_local_devices()`
creates a CUDA context and reserves most of every GPU's memory in the calling
process, so a job started next to it fails with CUDA_ERROR_OUT_OF_MEMORY.
Here GPUs are read through NVML (nvidia-ml-py), which creates no CUDA context,
and TensorFlow is asked in a short-lived child process with memory growth on,
so nothing stays held once the listing is printed (`--watch` asks TensorFlow
once, at the start).
"""
import argparse
import json
import platform
import subprocess
import sys
import time
from typing import Optional

import psutil

from distrnn import cli, compat, cpu, names, options
from distrnn.memory.nvml import MIB, gpu_info
from distrnn.ptb import plan
from distrnn.run import files
from distrnn.ptb import scale as scale_plan
from distrnn.scaling import hardware
from distrnn.scaling import model as cost

def host_info() -> dict:
    memory = psutil.virtual_memory()
    processor, onednn = cpu.processor(), cpu.onednn()
    return {"hostname": platform.node(), "cpu": processor.model, "cpu_family_model": processor.family_model,
            "vector_extensions": list(processor.vector_extensions), "onednn": onednn.enabled,
            "onednn_why": onednn.why, "logical_cores": psutil.cpu_count(),
            "physical_cores": psutil.cpu_count(logical=False), "memory_total_mib": memory.total // MIB,
            "memory_available_mib": memory.available // MIB}


# Run in a child process: the context it creates (and any memory) goes away with it.
_TF_PROBE = """
import json, os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf
physical = tf.config.list_physical_devices()
for gpu in tf.config.list_physical_devices("GPU"):
    tf.config.experimental.set_memory_growth(gpu, True)
logical = tf.config.list_logical_devices()
try:  # the answer TensorFlow itself gives (private: absent from some builds)
    from tensorflow.python.util import _pywrap_util_port
    onednn = bool(_pywrap_util_port.IsMklEnabled())
except (ImportError, AttributeError):
    onednn = None
print(json.dumps({"version": tf.__version__, "built_with_cuda": tf.test.is_built_with_cuda(), "onednn": onednn,
                  "physical": [[d.name, d.device_type] for d in physical],
                  "logical": [[d.name, d.device_type] for d in logical]}))
"""


def _in_child(code: str, timeout: float):
    """Runs Python `code` in a child process: (its stdout, None), or (None, why it failed)."""
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"TensorFlow did not answer within {timeout:.0f} s"
    if out.returncode != 0:
        return None, (out.stderr.strip().splitlines() or ["no output"])[-1]
    return out.stdout, None


def tensorflow_devices(timeout: float = 120) -> dict:
    """TensorFlow's physical and logical devices, asked in a child process with memory growth on."""
    stdout, error = _in_child(_TF_PROBE, timeout)
    if error:
        return {"available": False, "reason": f"TensorFlow could not be asked: {error}"}
    return dict(json.loads(stdout.strip().splitlines()[-1]), available=True)


# device_lib.list_local_devices() as the classic material calls it, but with memory growth on, in a child.
_DEVICE_LIB_PROBE = """
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf
for gpu in tf.config.list_physical_devices("GPU"):
    tf.config.experimental.set_memory_growth(gpu, True)
from tensorflow.python.client import device_lib
for d in device_lib.list_local_devices():
    print(d)
"""


def device_lib_listing(nvml=None, timeout: float = 120) -> dict:
    """device_lib.list_local_devices() run in a child process, with each GPU's used memory
    (NVML) before it starts and after it exits: equal when nothing stays held."""
    before = gpu_info(nvml)
    listing, error = _in_child(_DEVICE_LIB_PROBE, timeout)
    after = gpu_info(nvml)
    used = lambda info: {g["index"]: g["memory_used_mib"] for g in info["gpus"]}  # noqa: E731
    return {"listing": listing, "error": error,
            "gpu_memory_used_mib_before": used(before), "gpu_memory_used_mib_after": used(after),
            "nvml": before["available"]}


def format_device_lib(r: dict) -> str:
    lines = [r["listing"].rstrip() if r["listing"] is not None else f"device_lib failed: {r['error']}"]
    if not r["nvml"]:
        lines.append("GPU memory before/after: not measured (no GPU visible through NVML)")
    for index, before in r["gpu_memory_used_mib_before"].items():
        after = r["gpu_memory_used_mib_after"].get(index)
        lines.append(f"GPU {index} memory used: {before:,} MiB before, {after:,} MiB after the listing "
                     f"({'nothing held' if after == before else f'{after - before:+,} MiB'})")
    return "\n".join(lines)


def report(tensorflow: Optional[dict], nvml=None) -> dict:
    return {"host": host_info(), "stack": compat.stack(), "nvml": gpu_info(nvml), "tensorflow": tensorflow}


def format_report(r: dict) -> str:
    h = r["host"]
    lines = [f"host {h['hostname']}: {h['cpu']}, {h['physical_cores']} cores ({h['logical_cores']} logical), "
             f"memory {h['memory_available_mib']:,} MiB available of {h['memory_total_mib']:,} MiB",
             f"  CPU {h['cpu_family_model'] or '?'}: {' '.join(h['vector_extensions']) or 'no AVX'}; TensorFlow's "
             f"CPU kernels: oneDNN {'on' if h['onednn'] else 'off'} ({h['onednn_why']})",
             f"stack: {compat.format_stack(r['stack'])}"]
    n = r["nvml"]
    if not n["available"]:
        lines.append(f"GPUs: none visible ({n['reason']})")
    else:
        lines.append(f"GPUs: {len(n['gpus'])} (driver {n['driver']})")
        for g in n["gpus"]:
            lines.append(f"  [{g['index']}] {g['name']} (compute {g['compute_capability']}): "
                         f"{g['memory_used_mib']:,} / {g['memory_total_mib']:,} MiB used, "
                         f"{g['memory_free_mib']:,} MiB free")
            for p in g["processes"]:
                used = "?" if p["used_mib"] is None else f"{p['used_mib']:,}"
                lines.append(f"      pid {p['pid']:>7}  {p['user']:<10} {used:>8} MiB  {p['command'][:80]}")
    t = r["tensorflow"]
    if t is None:
        pass
    elif not t["available"]:
        lines.append(f"TensorFlow: {t['reason']}")
    else:
        onednn = {True: ", oneDNN on", False: ", oneDNN off"}.get(t.get("onednn"), "")
        lines.append(f"TensorFlow {t['version']} ({'CUDA' if t['built_with_cuda'] else 'no CUDA'} build{onednn}), "
                     f"asked with memory growth on in a child process that has exited:")
        lines.append("  physical: " + ", ".join(name for name, _ in t["physical"]))
        lines.append("  logical:  " + ", ".join(name for name, _ in t["logical"]))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="distrnn.devices", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object (one per refresh with --watch)")
    parser.add_argument("--watch", type=options.number(float, minimum=0, maximum=86400), default=0, metavar="SECONDS",
                        help="refresh every SECONDS, in place like `watch nvidia-smi` (Ctrl-C stops)")
    parser.add_argument("--count", type=options.COUNT, default=0, help="with --watch: stop after N refreshes")
    parser.add_argument("--device-lib", action="store_true",
                        help="print device_lib.list_local_devices() (run in a child process with memory growth on) "
                             "and each GPU's used memory before and after it")
    parser.add_argument("--stack", action="store_true",
                        help="print only the versions of Python, TensorFlow, Keras, numpy, TensorBoard and Horovod "
                             "installed here (read from the packages, nothing loaded)")
    parser.add_argument("--no-tensorflow", dest="tensorflow", action="store_false",
                        help="do not ask TensorFlow (it takes a few seconds to start)")
    plan = parser.add_argument_group("--plan: the memory a PTB training job will need on each device")
    plan.add_argument("--plan", action="store_true", help="print the placement plan and the estimated memory per "
                                                          "device (no TensorFlow involved)")
    plan.add_argument("--config", default="small", help="PTB preset (default small)")
    plan.add_argument("--num_gpus", type=options.DEVICE_COUNT, default=0,
                      help="GPUs of the job (default 0: the host's memory)")
    plan.add_argument("--gpus_per_rank", type=options.DEVICE_COUNT, default=0,
                      help="GPUs each rank places its layers across")
    plan.add_argument("--strategy", default="round_robin", help="placement strategy (round_robin or balanced)")
    plan.add_argument("--recompute", type=options.COUNT, default=0, metavar="K", help="the --recompute K of the job")
    plan.add_argument("--swap_memory", action="store_true", help="the job runs with --swap_memory")
    plan.add_argument("--precision", default=None, choices=names.PRECISIONS,
                      help="the --precision of the job: activations of bfloat16 and float16 take half (default "
                           "float32)")
    plan.add_argument("--use_fp16", action="store_true", help="the job runs with --use_fp16 (--precision float16)")
    plan.add_argument("--vocab_size", type=options.POSITIVE_INT, default=10000,
                      help="vocabulary (default 10000, the full PTB's)")
    plan.add_argument("--batch_size", type=options.COUNT, default=0, help="override the preset's batch_size")
    plan.add_argument("--num_steps", type=options.COUNT, default=0, help="override the preset's num_steps")
    plan.add_argument("--gpu_memory_gib", type=options.number(float, positive=True), default=0,
                      help="memory of each GPU, where NVML cannot tell (e.g. planning on another machine); with "
                           "--gpus, the GPU's memory in place of the table's")
    scale = parser.add_argument_group("--plan --gpus: how far a PTB job scales (words/sec, efficiency, time, "
                                      "memory, what bounds it), from the cost model")
    scale.add_argument("--gpus", type=scale_plan.gpu_counts, default=None, metavar="N,N,...",
                       help="GPU counts to plan for, e.g. 1,8,64,512")
    scale.add_argument("--gpu", default="h100", help=f"the GPU: {', '.join(hardware.GPUS)} (default h100)")
    scale.add_argument("--link", default="ndr", help=f"the network between nodes: {', '.join(hardware.LINKS)} "
                                                     "(default ndr)")
    scale.add_argument("--node_link", default=None, help="the link between a node's GPUs (default nvlink; pcie3 "
                                                         "for the k20)")
    scale.add_argument("--gpus_per_node", type=options.number(int, minimum=1, maximum=1024), default=8,
                       help="GPUs a node (default 8)")
    scale.add_argument("--global_batch_size", type=options.COUNT, default=0,
                       help="keep this global batch (each rank its share) instead of the preset's batch a rank")
    scale.add_argument("--fp16_allreduce", action="store_true", help="gradients sent in float16")
    scale.add_argument("--engine", choices=("horovod", "tensorflow"), default="horovod",
                       help="horovod overlaps the softmax's all-reduce with the LSTM's backward pass; distrnn's "
                            "TensorFlow engine sends every gradient after it (default horovod)")
    scale.add_argument("--plot", metavar="FILE", help="efficiency against GPUs, as PNG")
    positive = options.number(float, positive=True)
    for flag, what in (("gpu_float32_tflops", "peak float32 TFLOPS"), ("gpu_float16_tflops", "peak 16-bit TFLOPS"),
                       ("gpu_memory_gbps", "memory bandwidth, GB/s"), ("link_gbps", "the network's GB/s each way"),
                       ("link_latency_us", "the network's latency, microseconds"),
                       ("matmul_efficiency", "fraction of peak a time step's product reaches (default "
                                             f"{cost.Assumptions.matmul_efficiency}; at most 1)")):
        scale.add_argument(f"--{flag}", type=positive, default=0, help=f"your own figure: {what}")
    return parser


def run(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.count and not args.watch:
        raise cli.UsageError("--count needs --watch SECONDS")
    if args.stack:
        print(json.dumps(compat.stack()) if args.json else compat.format_stack(compat.stack()))
        return 0
    if args.plan and args.gpus:
        return plan_scaling(args)
    if args.plan:
        overrides = {k: getattr(args, k) for k in ("batch_size", "num_steps") if getattr(args, k)}
        precision = options.precision_of(args.precision, args.use_fp16)
        r = plan.memory_plan(args.config, args.num_gpus, args.gpus_per_rank, args.recompute, args.swap_memory,
                             args.vocab_size, args.strategy, args.gpu_memory_gib * 1024 or None,
                             precision=precision, **overrides)
        print(json.dumps(r) if args.json else plan.format_plan(r))
        return 0
    if args.device_lib:
        r = device_lib_listing()
        print(json.dumps(r) if args.json else format_device_lib(r))
        return 0 if r["listing"] is not None else 1
    tensorflow = tensorflow_devices() if args.tensorflow else None
    shown = 0
    try:
        while True:
            r = report(tensorflow)
            text = json.dumps(r) if args.json else format_report(r)
            if args.watch and not args.json and sys.stdout.isatty():
                text = "\033[H\033[J" + time.strftime("%H:%M:%S  ") + f"every {args.watch:g} s\n" + text
            print(text, flush=True)
            shown += 1
            if not args.watch or (args.count and shown >= args.count):
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def plan_scaling(args) -> int:
    files.check_output(args.plot, "--plot", "efficiency.png")
    precision = options.precision_of(args.precision, args.use_fp16)
    figures = {k: getattr(args, k) for k in ("gpu_float32_tflops", "gpu_float16_tflops", "gpu_memory_gbps",
                                             "link_gbps", "link_latency_us")}
    figures["gpu_memory_gib"] = args.gpu_memory_gib
    cluster = scale_plan.cluster_from(args.gpu, args.link, args.node_link, args.gpus_per_node, figures)
    figures = {"matmul_efficiency": min(args.matmul_efficiency, 1.0)} if args.matmul_efficiency else {}
    assumptions = cost.engine_assumptions(args.engine, **figures)
    r = scale_plan.scaling_plan(args.config, args.gpus, cluster, precision, args.global_batch_size,
                                args.fp16_allreduce, args.vocab_size, assumptions)
    if args.plot:
        scale_plan.plot_efficiency(r, args.plot)
    print(json.dumps(r) if args.json else scale_plan.format_scaling(r))
    return 0


def main(argv=None) -> int:
    def devices():
        cpu.choose_onednn()  # what a job started here would run, and what the TensorFlow child inherits
        return run(sys.argv[1:] if argv is None else argv)
    return cli.run_main("distrnn.devices", devices)


if __name__ == "__main__":
    sys.exit(main())
