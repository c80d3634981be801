"""Joining a job: the one place that picks the engine a process runs (and knows which engines there are)."""
from distrnn.parallel import horovod, local_devices
from distrnn.parallel.world import OneProcess, World


def init(gpus_per_rank: int = 0) -> World:
    """The World this process belongs to: a Horovod job when a launcher started it as one
    (horovod.join), otherwise a process on its own, which owns the first `gpus_per_rank` GPUs when that
    is given. Must run before TensorFlow starts its devices."""
    world = horovod.join(gpus_per_rank)
    if world is None:
        world = OneProcess(gpus_per_rank=gpus_per_rank)
        if gpus_per_rank:
            local_devices.pin_gpus(world)
    return world


def engine_versions() -> dict:
    """The version of each engine's library as this process can load it (None: it cannot), for a run's
    metrics."""
    return {"horovod": horovod.version()}
