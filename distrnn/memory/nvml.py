"""GPUs read through NVML (nvidia-ml-py): memory, the processes holding it, the driver. NVML creates no
CUDA context, so reading it holds no GPU memory (used by the memory monitor and `distrnn.devices`)."""
from typing import Optional

import psutil

MIB = 1024 * 1024


def load():
    """The pynvml module where NVML answers, else None (not installed, or no driver: the host path runs)."""
    try:
        import pynvml
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return pynvml
    except Exception:
        return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_info(nvml=None) -> dict:
    """{"available": bool, "reason": why not, "driver": version, "gpus": [...]} through NVML.
    `nvml` is the pynvml module (nvidia-ml-py), or a stand-in with the same functions."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return {"available": False, "reason": "nvidia-ml-py is not installed (pip install nvidia-ml-py)",
                    "gpus": []}
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as e:  # no driver, no GPU: the normal case on a CPU machine
        return {"available": False, "reason": f"NVML: {_text(e)}", "gpus": []}
    try:
        gpus = [_one_gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount())]
        return {"available": True, "driver": _text(nvml.nvmlSystemGetDriverVersion()), "gpus": gpus}
    finally:
        nvml.nvmlShutdown()


def _one_gpu(nvml, index: int) -> dict:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    processes = {}
    for query in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
        for p in query(handle):
            processes[p.pid] = _process(p.pid, p.usedGpuMemory)
    return {"index": index, "name": _text(nvml.nvmlDeviceGetName(handle)), "compute_capability": f"{major}.{minor}",
            "memory_total_mib": memory.total // MIB, "memory_used_mib": memory.used // MIB,
            "memory_free_mib": memory.free // MIB, "processes": sorted(processes.values(), key=lambda p: p["pid"])}


def _process(pid: int, used_bytes: Optional[int]) -> dict:
    """A process holding GPU memory; user and command are '?' when it is not visible from
    here (another container or user namespace), as nvidia-smi shows them."""
    try:
        proc = psutil.Process(pid)
        user, command = proc.username(), " ".join(proc.cmdline()) or proc.name()
    except (psutil.Error, OSError):
        user, command = "?", "?"
    return {"pid": pid, "user": user, "command": command,
            "used_mib": None if used_bytes is None else used_bytes // MIB}
