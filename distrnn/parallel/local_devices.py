"""The devices of this process: the GPUs a rank owns and is pinned to, the host's cores it shares, and
the devices a job's flags name (--devices, --num_gpus, --virtual_devices: the CPU split into logical
devices, so placement runs on a machine without GPUs), checked against those TensorFlow has, in
canonical names."""
import os
from typing import List, Optional

from distrnn.config import env_number
from distrnn.errors import UsageError


def rank_gpus(local_rank: int, local_size: int, num_gpus: int, per_rank: int = 0) -> list:
    """Indices of the node's GPUs that a rank owns. per_rank 0: one, by local rank (ranks
    share GPUs round-robin when they outnumber them); per_rank K: rank r owns GPUs
    r*K ... r*K+K-1, across which it places its model (model parallel inside the rank)."""
    if per_rank == 0:
        return [local_rank % num_gpus] if num_gpus else []
    if num_gpus == 0:
        raise UsageError(f"--gpus_per_rank {per_rank}: this machine has no GPU; on CPUs, --virtual_devices N "
                         f"gives each rank N logical devices instead")
    if local_size * per_rank > num_gpus:
        raise UsageError(f"--gpus_per_rank {per_rank} with {local_size} rank(s) on this node needs "
                         f"{local_size * per_rank} GPUs, but it has {num_gpus}; lower --gpus_per_rank or start at "
                         f"most {num_gpus // per_rank} rank(s) per node")
    return list(range(local_rank * per_rank, (local_rank + 1) * per_rank))


def pin_gpus(world) -> None:
    """Makes this process see only the GPUs its World owns (as /gpu:0, /gpu:1, ...), with memory growth
    on. Must run before TensorFlow starts its devices."""
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    owned = world.owned_gpus(len(gpus))  # raises when --gpus_per_rank asks for GPUs that are not there
    if gpus and owned is not None:
        tf.config.set_visible_devices([gpus[i] for i in owned], "GPU")


def owns_gpus() -> bool:
    """Whether this process sees a GPU, asked without starting TensorFlow's devices (which would fix them)."""
    import tensorflow as tf
    return bool(tf.config.get_visible_devices("GPU"))


def share_cores(local_size: int, by_srun: bool) -> None:
    """N processes on one host share its cores instead of each starting a pool as large as the host;
    an srun task has the cores Slurm gave it (--cpus-per-task)."""
    import tensorflow as tf
    threads = env_number(os.environ, "SLURM_CPUS_PER_TASK", 0, minimum=0) if by_srun else 0
    threads = threads or max(1, (os.cpu_count() or 1) // local_size)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))


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
    layers go across the rank's K GPUs (which parallel.init made /gpu:0 ... /gpu:K-1)."""
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


def spread_layers(devices: List[str], num_layers: int):
    """A preset's spread_layers: with no device flag, the layers go one per GPU over this process's GPUs
    (when it has two or more). Returns (the layers' devices, a start-up line saying what was done)."""
    if devices or num_layers < 2:
        return devices, None
    import tensorflow as tf
    gpus = [canonical(d.name) for d in tf.config.list_logical_devices("GPU")]
    if len(gpus) > 1:
        used = min(len(gpus), num_layers)
        return gpus[:num_layers], f"spread_layers: the layers spread over {used} GPUs, one layer per GPU"
    return devices, ("spread_layers: this process has fewer than 2 GPUs, so every layer is on one device; --num_gpus "
                     "N, --devices or --virtual_devices N place the layers on N devices")
