"""The devices of this process as a job's flags name them: --devices, --num_gpus, --virtual_devices
(the CPU split into logical devices, so placement runs on a machine without GPUs), checked against
those TensorFlow has, in canonical names."""
from typing import List, Optional

from distrnn.errors import UsageError


def setup_virtual_devices(n: int) -> None:
    """Splits the CPU into n logical devices (/device:CPU:0 ... n-1), so placement runs on a
    machine without GPUs. Must run before TensorFlow initialises its devices."""
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError:
        existing = len(tf.config.list_logical_devices("CPU"))
        if existing != n:
            raise UsageError(f"--virtual_devices {n}: TensorFlow already started with {existing} CPU device(s); "
                             "set it once per process, before anything runs") from None


def canonical(device: str) -> str:
    """'/gpu:1' -> '/device:GPU:1' (job/task parts dropped)."""
    import tensorflow as tf
    try:
        spec = tf.DeviceSpec.from_string(device)
    except (ValueError, TypeError):
        spec = None
    if spec is None or spec.device_type is None:
        raise UsageError(f"device {device!r} names no device type; write it like /gpu:0 or /cpu:0")
    return f"/device:{spec.device_type.upper()}:{spec.device_index or 0}"


def available() -> List[str]:
    import tensorflow as tf
    return [canonical(d.name) for d in tf.config.list_logical_devices()]


def resolve_devices(devices: Optional[str] = None, num_gpus: int = 0, virtual_devices: int = 0) -> List[str]:
    """The devices a job asked for, checked against those that exist.

    --devices /gpu:0,/gpu:1 | --num_gpus N | --virtual_devices N (CPU split in N);
    none of them: [] (one device, TensorFlow's choice).
    """
    if virtual_devices:
        setup_virtual_devices(virtual_devices)
    if devices:
        wanted = [canonical(d.strip()) for d in devices.split(",") if d.strip()]
    elif num_gpus:
        wanted = [f"/device:GPU:{i}" for i in range(num_gpus)]
    elif virtual_devices:
        wanted = [f"/device:CPU:{i}" for i in range(virtual_devices)]
    else:
        return []
    have = available()
    missing = [d for d in wanted if d not in have]
    if missing:
        hint = " (pass --virtual_devices N to split the CPU into N devices)" if "GPU" in " ".join(missing) else ""
        raise UsageError(f"device(s) {', '.join(missing)} do not exist; this machine has {', '.join(have)}{hint}")
    if len(set(wanted)) != len(wanted):
        raise UsageError(f"--devices lists a device twice: {devices}")
    return wanted


def job_devices(devices: Optional[str], num_gpus: int, virtual_devices: int, gpus_per_rank: int) -> List[str]:
    """resolve_devices for a job's flags: with --gpus_per_rank K and no other device flag, the
    layers go across the rank's K GPUs (which distributed.init made /gpu:0 ... /gpu:K-1)."""
    if not (num_gpus or devices or virtual_devices):
        num_gpus = gpus_per_rank
    return resolve_devices(devices, num_gpus, virtual_devices)


def runs_on_gpu(devices: List[str]) -> bool:
    """Whether a job's layers run on a GPU: on the devices it was given, or, given none, on the one
    TensorFlow chooses (a GPU wherever there is one)."""
    import tensorflow as tf
    if devices:
        return any("GPU" in device for device in devices)
    return bool(tf.config.list_logical_devices("GPU"))
