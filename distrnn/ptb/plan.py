"""`distrnn.devices --plan`: where each part of a PTB model goes and what each device needs in a
training step, against what each device has (TensorFlow-free: it runs where the job will)."""
import dataclasses
from typing import Optional

import psutil

from distrnn import names
from distrnn.errors import UsageError
from distrnn.memory import estimates
from distrnn.memory.estimates import GPU_RUNTIME_MIB
from distrnn.memory.nvml import MIB, gpu_info
from distrnn.parallel import placement
from distrnn.ptb.configs import PRESETS


def memory_plan(config_name: str = "small", num_gpus: int = 0, gpus_per_rank: int = 0, recompute: int = 0,
                swap: bool = False, vocab_size: int = 10000, strategy: str = "round_robin",
                gpu_memory_mib: Optional[float] = None, nvml=None, precision: str = "float32", **overrides) -> dict:
    """Where each part of the PTB model goes and the memory each device needs in a training step
    (estimates.lm_memory), against what each device has: NVML's total, or gpu_memory_mib, or the
    host's available memory when no GPU is asked for. With gpus_per_rank K, one rank's plan
    (over K GPUs; every rank's is alike); precision: the job's --precision. `overrides`: config fields such
    as batch_size."""
    config = dataclasses.replace(PRESETS.get(config_name), **overrides)
    config.validate()
    if recompute and swap:
        raise UsageError("--recompute and --swap_memory are alternatives; pass one of them")
    if gpus_per_rank and (not num_gpus or num_gpus % gpus_per_rank):
        raise UsageError(f"--gpus_per_rank {gpus_per_rank} needs --num_gpus N, a multiple of it")
    per_rank = gpus_per_rank or num_gpus
    devices = [f"/device:GPU:{i}" for i in range(per_rank)] or ["/device:CPU:0"]
    gates = names.CELL_KINDS[config.cell].gates

    def parts_for(recompute, swap):
        return estimates.lm_memory(vocab_size, config.hidden_size, config.num_layers, config.batch_size,
                                   config.num_steps, gates, config.keep_prob < 1.0, recompute, swap,
                                   precision=precision)

    parts = parts_for(recompute, swap)
    plan = placement.make_plan(config.num_layers, devices, strategy, [p.total for p in parts])
    where = [plan.embedding, *plan.layers, plan.softmax]
    gpus = gpu_info(nvml)["gpus"] if per_rank else []
    capacity = {}
    for i, device in enumerate(devices):
        if not per_rank:
            capacity[device] = psutil.virtual_memory().available / MIB
        elif i < len(gpus):
            capacity[device] = gpus[i]["memory_total_mib"]
        elif gpu_memory_mib:
            capacity[device] = gpu_memory_mib

    def needs(parts):
        per_device = {d: 0.0 for d in devices}
        for part, device in zip(parts, where):
            per_device[device] += part.total / MIB
        return {d: (mib + GPU_RUNTIME_MIB if per_rank and mib else mib) for d, mib in per_device.items()}

    need = needs(parts)
    options = {}
    if names.CELL_KINDS[config.cell].own_backward:  # what the memory modes would need instead, for the advice
        k = estimates.recompute_segment(config.num_steps)
        options = {f"--recompute {k}": max(needs(parts_for(k, False)).values()),
                   "--swap_memory": max(needs(parts_for(0, True)).values())}
    return {"config": config_name, "settings": dataclasses.asdict(config), "vocab_size": vocab_size,
            "precision": precision,
            "memory_mode": f"recompute {recompute}" if recompute else "swap" if swap else "keep",
            "ranks": num_gpus // gpus_per_rank if gpus_per_rank else 1, "strategy": strategy,
            "parts": [dict(dataclasses.asdict(p), device=d, total=p.total) for p, d in zip(parts, where)],
            "devices": [{"device": d, "need_mib": round(need[d], 1), "capacity_mib": capacity.get(d),
                         "fits": None if d not in capacity else need[d] <= capacity[d]} for d in devices],
            "host_mib": round(sum(p.host for p in parts) / MIB, 1),
            "gpu_runtime_mib": GPU_RUNTIME_MIB if per_rank else 0,
            "alternatives_mib": {flag: round(mib, 1) for flag, mib in options.items()}}


def format_plan(r: dict) -> str:
    c = r["settings"]
    rank = f", each of {r['ranks']} ranks" if r["ranks"] > 1 else ""
    lines = [f"plan: PTB {r['config']} ({c['num_layers']} x {c['hidden_size']} {c['cell']} units, batch "
             f"{c['batch_size']} x {c['num_steps']} steps, vocabulary {r['vocab_size']:,}), {r['precision']}, "
             f"memory mode {r['memory_mode']}, {len(r['devices'])} device(s){rank}, {r['strategy']}",
             f"  {'part':<10} {'device':<15} {'weights':>10} {'gradients':>10} {'activations':>12} {'total':>10}"]
    for p in r["parts"]:
        lines.append(f"  {p['name']:<10} {p['device']:<15} " + " ".join(
            f"{p[k] / MIB:>{w},.1f}" for k, w in (("parameters", 10), ("gradients", 10), ("activations", 12),
                                                  ("total", 10))) + "  MiB")
    extra = f" (+{r['gpu_runtime_mib']} MiB each for the CUDA context and workspaces)" if r["gpu_runtime_mib"] else ""
    lines.append(f"per device, estimated{extra}:")
    short = False
    for d in r["devices"]:
        if not d["need_mib"]:
            verdict = f"unused ({r['settings']['num_layers']} layers and two end parts to place)"
        elif d["capacity_mib"] is None:
            verdict = "capacity unknown: pass --gpu_memory_gib G (or run where NVML sees the GPUs)"
        else:
            verdict = f"of {d['capacity_mib']:,.0f} MiB: " + ("fits" if d["fits"] else "WILL NOT FIT")
            short = short or not d["fits"]
        lines.append(f"  {d['device']:<15} {d['need_mib']:>10,.1f} MiB {verdict}")
    if r["host_mib"]:
        lines.append(f"  host memory for the swapped activations: {r['host_mib']:,.1f} MiB")
    if short:
        lines.append("warning: the largest device would need less with " + "; ".join(
            f"{flag}: {mib:,.1f} MiB" for flag, mib in r["alternatives_mib"].items()) +
            "; or more devices (--num_gpus), a smaller --batch_size or --num_steps")
    lines.append("(estimates: bench/memory_estimate.py checks them against measured peaks; docs/measurements.md "
                 "gives the error)")
    return "\n".join(lines)
