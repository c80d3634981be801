"""A stand-in for nvidia-ml-py's pynvml: two GPUs, for tests on machines without one.

GPU 0 (an A100) is used by this test's own process (FAKE_NVML_PID) and by a pid that does
not exist here; GPU 1 is idle. FAKE_NVML_FAIL=1 makes nvmlInit fail as on a machine without
a driver. Calls are appended to FAKE_NVML_LOG when it is set. FAKE_NVML_LEAK_MIB=N adds N MiB
to GPU 1's used memory at every nvmlInit after the first, as if something kept memory in between.
"""
import os
from types import SimpleNamespace

GIB = 1024 ** 3


class NVMLError(Exception):
    pass


def _log(name):
    if os.environ.get("FAKE_NVML_LOG"):
        with open(os.environ["FAKE_NVML_LOG"], "a") as f:
            f.write(name + "\n")


_inits = 0


def nvmlInit():
    global _inits
    _inits += 1
    _log("init")
    if os.environ.get("FAKE_NVML_FAIL"):
        raise NVMLError("Driver Not Loaded")


def nvmlShutdown():
    _log("shutdown")


def nvmlSystemGetDriverVersion():
    return "535.104.05"


def nvmlDeviceGetCount():
    return 2


def nvmlDeviceGetHandleByIndex(i):
    return i


def nvmlDeviceGetName(h):
    return [b"NVIDIA A100-SXM4-40GB", "NVIDIA H100 80GB HBM3"][h]


def nvmlDeviceGetCudaComputeCapability(h):
    return [(8, 0), (9, 0)][h]


def nvmlDeviceGetMemoryInfo(h):
    leaked = (_inits - 1) * int(os.environ.get("FAKE_NVML_LEAK_MIB", "0")) * 1024 ** 2
    total, used = [(40 * GIB, 30 * GIB + 512 * 1024 ** 2), (80 * GIB, leaked)][h]
    return SimpleNamespace(total=total, used=used, free=total - used)


def nvmlDeviceGetComputeRunningProcesses(h):
    if h:
        return []
    return [SimpleNamespace(pid=int(os.environ.get("FAKE_NVML_PID", "1")), usedGpuMemory=29 * GIB),
            SimpleNamespace(pid=4194303, usedGpuMemory=None)]


def nvmlDeviceGetGraphicsRunningProcesses(h):
    return []
