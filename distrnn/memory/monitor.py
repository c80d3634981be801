"""Memory watch during training: samples GPU and host memory in the background, keeps the peaks,
and says when a threshold is crossed, so a run can warn early and stop cleanly with a checkpoint
instead of dying of an out-of-memory error.

Every `interval` seconds a thread reads:
  - each GPU this process uses, through NVML (no CUDA context): used / total, and this process's share;
  - TensorFlow's allocator on each logical GPU (tf.config.experimental.get_memory_info: current, peak);
  - the host through psutil: used fraction of memory, available MiB, this process's RSS.
The used fraction of a device (or the host) counts every process on it, since any of them can make
the next allocation fail.
"""
import re
import sys
import threading
from typing import Callable, Dict, List, Optional

import psutil

from distrnn.memory import nvml as nvml_reader
from distrnn.memory.nvml import MIB



def check_host_fits(plan, costs) -> None:
    """Refuses a job whose estimated memory on the host's devices (the CPU's, and TensorFlow's choice where
    the process has no GPU) is beyond the host's memory, before anything is allocated: on a CPU,
    TensorFlow's allocation of a too large tensor succeeds (Linux promises memory it does not have) and
    the process, or another one, is killed by the kernel once the pages are touched, without a word. A GPU's
    allocator fails cleanly (ResourceExhaustedError, exit 76), so GPUs are left to it."""
    import tensorflow as tf
    host = [d for d in plan.devices if "GPU" not in d and (d or not tf.config.list_logical_devices("GPU"))]
    need = sum(b for device, b in plan.bytes_on(costs).items() if device in host)
    total = psutil.virtual_memory().total
    if need > total:
        from distrnn.errors import OutOfMemory
        raise OutOfMemory(f"the model needs about {need / 2**30:,.1f} GiB of host memory by distrnn's estimate "
                          f"(python -m distrnn.devices --plan), more than this machine's {total / 2**30:.1f} GiB; "
                          "nothing was allocated: lower --batch_size, --hidden_size or --num_layers, or keep less "
                          "with --recompute K or --swap_memory")


class MemoryMonitor:
    """warn, stop: fractions (0-1] of device or host memory in use that trigger a warning and a stop.
    owned_gpus(num_gpus) -> the NVML indices of the GPUs this process uses, in the order TensorFlow
    numbers them (None, or no function: all of them)."""

    def __init__(self, warn: float = 0.90, stop: float = 0.97, interval: float = 5.0, nvml=None,
                 owned_gpus: Optional[Callable[[int], Optional[List[int]]]] = None):
        self.warn_at, self.stop_at, self.interval = warn, stop, interval
        self.owned_gpus = owned_gpus or (lambda num_gpus: None)
        self.nvml = nvml if nvml is not None else nvml_reader.load()
        self.process = psutil.Process()
        self.peaks: Dict[str, float] = {}
        self.latest: Optional[dict] = None
        self.warning: Optional[str] = None       # the first warning, until taken by `take_warning`
        self.stop_reason: Optional[str] = None   # set once usage reaches `stop`
        self._warned = False
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = None

    # --- sampling -------------------------------------------------------------------------
    def sample(self) -> dict:
        """One reading: {"host": {...}, "gpus": [...]}; also updates peaks and thresholds."""
        memory = self.process.memory_info()
        host = psutil.virtual_memory()
        reading = {"host": {"used_fraction": round(1.0 - host.available / host.total, 4),
                            "available_mib": host.available // MIB, "process_rss_mib": memory.rss // MIB},
                   "gpus": self._gpus()}
        with self._lock:
            self.latest = reading
            self._peak("host_used_fraction", reading["host"]["used_fraction"])
            self._peak("host_process_rss_mib", reading["host"]["process_rss_mib"])
            for g in reading["gpus"]:
                self._peak(f"gpu{g['index']}_used_fraction", g["used_fraction"])
                self._peak(f"gpu{g['index']}_used_mib", g["used_mib"])
                if g.get("process_mib") is not None:
                    self._peak(f"gpu{g['index']}_process_mib", g["process_mib"])
                if g.get("tensorflow_peak_mib") is not None:
                    self._peak(f"gpu{g['index']}_tensorflow_peak_mib", g["tensorflow_peak_mib"])
            self._check(reading)
        return reading

    def _peak(self, key: str, value: float) -> None:
        self.peaks[key] = max(self.peaks.get(key, value), value)

    def _gpus(self) -> list:
        if self.nvml is None:
            return []
        try:
            info = nvml_reader.gpu_info(self.nvml)
        except Exception:  # a monitor must never take the run down
            return []
        owned = self.owned_gpus(len(info["gpus"]))
        owned = list(range(len(info["gpus"]))) if owned is None else owned
        # TensorFlow's GPU i is the i-th GPU this process owns.
        tf_info = {owned[i]: v for i, v in _tensorflow_gpu_memory().items() if i < len(owned)}
        gpus = []
        for g in info["gpus"]:
            if g["index"] not in owned:
                continue
            mine = [p["used_mib"] for p in g["processes"] if p["pid"] == self.process.pid]
            entry = {"index": g["index"], "used_mib": g["memory_used_mib"], "total_mib": g["memory_total_mib"],
                     "used_fraction": round(g["memory_used_mib"] / max(1, g["memory_total_mib"]), 4),
                     "process_mib": mine[0] if mine else None}
            entry.update(tf_info.get(g["index"], {}))
            gpus.append(entry)
        return gpus

    def _check(self, reading: dict) -> None:
        worst_name, worst = "host memory", reading["host"]["used_fraction"]
        for g in reading["gpus"]:
            if g["used_fraction"] > worst:
                worst_name, worst = f"GPU {g['index']} memory", g["used_fraction"]
        if worst >= self.stop_at and self.stop_reason is None:
            self.stop_reason = f"{worst_name} at {worst:.1%} (--mem_stop {self.stop_at:g})"
        elif worst >= self.warn_at and not self._warned:
            self._warned = True
            self.warning = (f"{worst_name} at {worst:.1%} (--mem_warn {self.warn_at:g}); the run stops with a "
                            f"checkpoint at --mem_stop {self.stop_at:g}. {ADVICE}")

    # --- background thread ------------------------------------------------------------------
    def start(self) -> "MemoryMonitor":
        self.sample()
        self._thread = threading.Thread(target=self._run, name="distrnn-memory", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            self.sample()

    def close(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "MemoryMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def metrics(self) -> dict:
        """For --metrics_json: the peaks seen and the thresholds."""
        with self._lock:
            return {"peaks": dict(self.peaks), "mem_warn": self.warn_at, "mem_stop": self.stop_at,
                    "stopped": self.stop_reason}

    def take_warning(self) -> Optional[str]:
        with self._lock:
            warning, self.warning = self.warning, None
        return warning

    def summary(self) -> str:
        """For the progress line: host and each GPU's used fraction."""
        r = self.latest
        if r is None:
            return ""
        parts = [f"host {r['host']['used_fraction']:.0%}"] + [f"gpu{g['index']} {g['used_fraction']:.0%}"
                                                              for g in r["gpus"]]
        return "mem " + " ".join(parts)

    def scalars(self) -> Dict[str, float]:
        """The latest reading, flat, for TensorBoard."""
        r = self.latest or {"host": {}, "gpus": []}
        out = {f"memory/host_{k}": v for k, v in r["host"].items()}
        for g in r["gpus"]:
            out.update({f"memory/gpu{g['index']}_{k}": v for k, v in g.items() if k != "index" and v is not None})
        return out


ADVICE = ("To need less: --recompute K keeps one LSTM state in K and recomputes the rest in the backward pass "
          "(K near sqrt(num_steps); measured: 4.35x lower peak at 1.25x the time over 2,000 steps), --swap_memory "
          "keeps the activations in host memory (the GPU holds two segments of them), a lower --batch_size or "
          "--num_steps shrinks activation memory in proportion, more devices (--num_gpus N, --devices) split the "
          "layers between them, and more ranks with --global_batch_size split the batch.")


def oom_reason(error) -> str:
    """From TensorFlow's out-of-memory message, the line that says which tensor could not be
    allocated, on which device (without the job/replica/task prefix)."""
    found = re.search(r"OOM when allocating[^\n]*", error.message or "")
    if not found:
        return "ResourceExhaustedError"
    return re.sub(r"/job:[^/]*/replica:\d+/task:\d+/|\s*name:\s*$", "", found.group(0)).strip()


def _tensorflow_gpu_memory() -> dict:
    """{gpu index: {"tensorflow_current_mib", "tensorflow_peak_mib"}} from TensorFlow's allocator, for the
    GPUs TensorFlow has started (none on a CPU machine)."""
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return {}
    out = {}
    try:
        for i, device in enumerate(tf.config.list_logical_devices("GPU")):
            info = tf.config.experimental.get_memory_info(device.name)
            out[i] = {"tensorflow_current_mib": info["current"] // MIB, "tensorflow_peak_mib": info["peak"] // MIB}
    except Exception:
        return {}
    return out
