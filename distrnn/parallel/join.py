"""Joining a job: the one place that picks the engine a process runs (and knows which engines there are)."""
import os

from distrnn.errors import UsageError
from distrnn.parallel import collective, horovod, local_devices, slurm_env
from distrnn.parallel.world import OneProcess, World


def init(engine: str = "auto", gpus_per_rank: int = 0, virtual_devices: int = 0) -> World:
    """The World this process belongs to (engine: auto, horovod or tensorflow, as --engine says): a Horovod
    job where horovodrun or an MPI launcher started the process, or an srun step runs it and Horovod loads;
    a job of TensorFlow's collectives where TF_CONFIG is set, or an srun step runs it without Horovod;
    otherwise a process on its own, which owns the first `gpus_per_rank` GPUs when that is given. The CPU
    is split into `virtual_devices` (--virtual_devices) first. Must run before TensorFlow starts its
    devices."""
    if engine == "horovod" or (engine == "auto" and _horovod_runs()):
        world = horovod.join(gpus_per_rank, required=engine == "horovod")
    else:
        world = collective.join(gpus_per_rank, virtual_devices)
        if world is None and engine == "tensorflow":
            raise UsageError("--engine tensorflow: no TF_CONFIG and no srun step of several tasks, so no job to "
                             "join: start the processes with bash launch/one_node.sh N, with srun, or set TF_CONFIG")
    if world is None:
        world = OneProcess(gpus_per_rank=gpus_per_rank)
        if gpus_per_rank:
            local_devices.pin_gpus(world)
    return world


def local_workers(engine: str, size: int, port: int = 0):
    """For python -m distrnn.launch: each of `size` workers' environment on this machine under `engine`
    (tensorflow: its TF_CONFIG; horovod: Horovod's variables, the launcher serving the rendezvous as
    horovodrun does), and a function that ends what the start set up, to call once its workers are gone."""
    if engine == "horovod":
        return horovod.local_workers(size, port)
    return collective.local_workers(size, port)


def _horovod_runs() -> bool:
    """Whether Horovod's launcher started this process, or an srun step (with no TF_CONFIG set) runs it and
    Horovod loads."""
    if horovod.launched():
        return True
    return "TF_CONFIG" not in os.environ and slurm_env.srun_task() is not None and horovod.loads()


def engine_versions() -> dict:
    """The version of each engine's library as this process can load it (None: it cannot), for a run's
    metrics."""
    return {"horovod": horovod.version()}
