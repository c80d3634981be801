"""Horovod as distrnn's engine: the only module that imports Horovod.

A process joins a Horovod job when horovodrun, an MPI launcher or an srun step of several tasks
started it (join): under srun, this module turns the step's Slurm variables into what horovodrun's Gloo
launcher would set (gloo_environment) and rank 0 serves Horovod's own rendezvous (serve_rendezvous); under
distrnn.launch --engine horovod, the launcher serves it and sets each worker's variables (local_workers).
`HorovodWorld` runs the World's collectives through Horovod and tells a collective broken by a lost
rank from Gloo's and Horovod's errors (lost). Horovod is imported inside functions: the TensorFlow
stacks Horovod does not build on (2.19 and newer) never load it.
"""
import dataclasses
import os
import re
import socket
import threading
from typing import Any, ClassVar, Optional

import numpy as np

from distrnn import compat
from distrnn.config import env_number
from distrnn.errors import UsageError
from distrnn.parallel import local_devices, slurm_env, srun
from distrnn.parallel.slurm_env import SrunTask
from distrnn.parallel.world import World

# Set by horovodrun (Gloo), mpirun (Open MPI) or an MPI launcher (srun --mpi=pmi2 / pmix, Intel MPI's PMI).
LAUNCH_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
MPI_VARIABLES = LAUNCH_VARIABLES[1:]


def version() -> Optional[str]:
    try:
        import horovod
    except ImportError:
        return None
    return horovod.__version__


def loads() -> bool:
    """Whether Horovod's TensorFlow module can be loaded here (installed, and built against this TensorFlow)."""
    try:
        _load()
    except UsageError:
        return False
    return True


def launched() -> bool:
    return any(name in os.environ for name in LAUNCH_VARIABLES)


def mpi_joins_ranks() -> bool:
    """Whether an MPI launcher started this process and Horovod has MPI to meet the others through."""
    if not any(name in os.environ for name in MPI_VARIABLES):
        return False
    try:
        import horovod.tensorflow as hvd
    except ImportError:
        return False
    return hvd.mpi_built()


@dataclasses.dataclass(frozen=True)
class HorovodWorld(World):
    hvd: Any = dataclasses.field(default=None, repr=False, compare=False)  # horovod.tensorflow
    engine: ClassVar[str] = "horovod"
    pins_gpus: ClassVar[bool] = True

    def allreduce_sum(self, values) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        return self.hvd.allreduce(values, op=self.hvd.Sum, name="allreduce_sum").numpy()  # Horovod:

    def allgather(self, array) -> np.ndarray:
        return self.hvd.allgather(array).numpy()  # Horovod:

    def allgather_object(self, obj) -> list:
        return self.hvd.allgather_object(obj)  # Horovod:

    def broadcast_object(self, obj):
        return self.hvd.broadcast_object(obj, root_rank=0)  # Horovod:

    def broadcast_variables(self, variables) -> None:
        if variables:
            self.hvd.broadcast_variables(variables, root_rank=0)  # Horovod:

    def average(self, tensor):
        return self.hvd.allreduce(tensor, op=self.hvd.Average)  # Horovod:

    def average_gradients(self, grads, sparse_as_dense: bool = False, fp16: bool = False) -> list:
        """Dense gradients in one grouped allreduce, an embedding's IndexedSlices by allgathering its rows
        (or as a dense tensor with sparse_as_dense), as Horovod's DistributedGradientTape does; fp16: sent
        as float16 (Horovod's fp16 compression).
        Written here rather than through that tape because Horovod leaves IndexedSlices uncompressed
        (horovod/tensorflow/__init__.py, 0.28.1: its allgather branch never calls the compressor), and
        the embedding's rows are most of what the PTB step sends."""
        import tensorflow as tf
        hvd = self.hvd
        compression = hvd.Compression.fp16 if fp16 else hvd.Compression.none
        if sparse_as_dense:
            grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        grads = list(grads)
        dense = [i for i, g in enumerate(grads) if g is not None and not isinstance(g, tf.IndexedSlices)]
        if dense:
            for i, g in zip(dense, hvd.grouped_allreduce([grads[i] for i in dense], op=hvd.Average,  # Horovod:
                                                         compression=compression)):
                grads[i] = g
        for i, g in enumerate(grads):
            if isinstance(g, tf.IndexedSlices):
                sent, context = compression.compress(g.values)
                rows = compression.decompress(hvd.allgather(sent), context) / self.size  # Horovod:
                grads[i] = tf.IndexedSlices(rows, hvd.allgather(g.indices), g.dense_shape)  # Horovod:
        return grads

    def lost(self, error: BaseException) -> Optional[str]:
        return failure_reason(error) if collective_failed(error) else None


def collective_failed(error: BaseException) -> bool:
    """Whether `error` is a Horovod collective that failed because another rank is gone:
    it died (Gloo: "Connection reset by peer", at once) or hung past Gloo's timeout
    (HOROVOD_GLOO_TIMEOUT_SECONDS, 30 s by default: "Application timeout caused pair
    closure"), or Horovod shut down after such a failure."""
    try:
        from horovod.common.exceptions import HorovodInternalError
        if isinstance(error, HorovodInternalError):
            return True
    except ImportError:
        return False
    import tensorflow as tf
    text = getattr(error, "message", str(error))
    return isinstance(error, tf.errors.OpError) and ("Horovod" in text or "gloo" in text)


def failure_reason(error: BaseException) -> str:
    """The line of a collective's error that says what happened, without its source location."""
    lines = [line.strip() for line in getattr(error, "message", str(error)).splitlines()]
    lines = [line for line in lines if line and not line.startswith(("[[", "Detected at", "File "))]
    line = re.sub(r"\{\{[^}]*\}\}\s*", "", lines[-1]) if lines else type(error).__name__  # {{function_node ...}}
    line = re.sub(r"^\[[^\]]*\.(cc|h):\d+\]\s*", "", line)                             # [gloo/.../pair.cc:589]
    return line.split(". ")[0].rstrip(".")


def gloo_environment(task: SrunTask, env=os.environ) -> dict:
    """What horovodrun's Gloo launcher would set for this process, made from what srun set: its
    rank, local and cross rank, and where the rendezvous is (rank 0's node) and which network
    interface leads there. No ssh and no launcher process: the tasks srun started are the job."""
    address = srun.rendezvous_address(task, env)
    return {
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": address,
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(srun.rendezvous_port(env)),
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_GLOO_IFACE": srun.interface_towards(address),
        "HOROVOD_HOSTNAME": task.node,
        "HOROVOD_RANK": str(task.rank),
        "HOROVOD_SIZE": str(task.size),
        "HOROVOD_LOCAL_RANK": str(task.local_rank),
        "HOROVOD_LOCAL_SIZE": str(task.local_size),
        "HOROVOD_CROSS_RANK": str(task.cross_rank),
        "HOROVOD_CROSS_SIZE": str(task.cross_size),
    }


def serve_rendezvous(hosts: str, size: int, port: int, fix: str):
    """Horovod's own rendezvous server (what horovodrun runs) for `size` ranks laid out on `hosts`
    (horovodrun's -H), in a thread of this process, on `port` (0: a free one, then its
    server_address[1]); `fix` says what to do when the port is taken."""
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
    from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer
    try:
        server = RendezvousHTTPServer(("", port), RendezvousHandler, False)  # Horovod:
    except OSError as error:
        raise UsageError(f"cannot serve Horovod's rendezvous on port {port} of {socket.gethostname()} "
                         f"({error.strerror}): {fix}") from None
    server.init(get_host_assignments(parse_hosts(hosts), size))  # Horovod:
    threading.Thread(target=server.serve_forever, name="horovod-rendezvous", daemon=True).start()
    return server


def local_workers(size: int, port: int = 0):
    """What horovodrun -np SIZE -H localhost:SIZE does before it starts its processes, for
    python -m distrnn.launch --engine horovod: Horovod's rendezvous served in this (the launcher's) process,
    on `port` (0: a free one), and each worker's environment, made as gloo_environment makes it from
    srun's variables. Returns (the environments, what stops the rendezvous once the workers are gone)."""
    try:
        server = serve_rendezvous(f"localhost:{size}", size, port, "give --port a free port, or leave --port out")
    except ImportError as error:
        raise UsageError(f"--engine horovod: {compat.horovod_missing(error)}") from None
    where = {"DISTRNN_RENDEZVOUS_ADDR": "127.0.0.1", "DISTRNN_RENDEZVOUS_PORT": str(server.server_address[1])}
    slots = (("localhost", size),)
    tasks = [SrunTask(rank, size, rank, size, 0, 1, "localhost", slots) for rank in range(size)]

    def stop():
        server.shutdown()
        server.server_close()
    return [gloo_environment(task, where) for task in tasks], stop


def join(gpus_per_rank: int = 0, required: bool = False) -> Optional[HorovodWorld]:
    """This process's place in a Horovod job, when a launcher started it as one (horovodrun, an MPI
    launcher, or an srun step of several tasks, which meet through Gloo unless srun --mpi=pmix started
    them and Horovod has MPI): Horovod initialised, the process pinned to its GPU(s) (by local rank,
    memory growth on; see local_devices.rank_gpus) and given its share of the host's cores. None when no
    launcher started it (required, --engine horovod: after checking that Horovod loads). Must run before
    TensorFlow starts its devices."""
    by_horovodrun = "HOROVOD_RANK" in os.environ
    task = None if by_horovodrun or mpi_joins_ranks() else slurm_env.srun_task()
    if task is not None:
        os.environ.update(gloo_environment(task))
    if not launched():
        if required:
            _load()
        return None
    hvd = _load()
    if task is not None:
        _meet_under_srun(hvd, task)
    elif not by_horovodrun and not hvd.mpi_built():
        # Horovod would start as a job of one, and every process would train alone.
        raise UsageError("started by an MPI launcher, but this Horovod was built without MPI: start with "
                         "horovodrun --gloo, or srun without --mpi")
    if os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR"):
        srun.check_own_name_resolves()
    hvd.init()  # Horovod:
    world = HorovodWorld(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), gpus_per_rank, hvd)
    local_devices.pin_gpus(world)
    local_devices.share_cores(world.local_size, by_srun=task is not None)
    return world


def _load():
    import tensorflow as tf
    try:
        import horovod.tensorflow as hvd
    except (ImportError, tf.errors.NotFoundError) as e:  # NotFoundError: built against another TensorFlow
        raise UsageError(compat.horovod_missing(e)) from None
    return hvd


def _meet_under_srun(hvd, task: SrunTask) -> None:
    """Rank 0 serves Horovod's rendezvous; the others wait until it answers."""
    if not hvd.gloo_built():
        raise UsageError("started by srun, but this Horovod was built without Gloo: start with srun "
                         "--mpi=pmix (Horovod built with MPI), or rebuild it with bash launch/setup.sh")
    port = env_number(os.environ, "HOROVOD_GLOO_RENDEZVOUS_PORT", None, minimum=1, maximum=65535)
    if task.rank == 0:
        serve_rendezvous(task.hosts, task.size, port, "set DISTRNN_RENDEZVOUS_PORT to a free port")
    else:
        # As long as Horovod itself waits for the other ranks at the rendezvous.
        srun.wait_for_rendezvous(os.environ["HOROVOD_GLOO_RENDEZVOUS_ADDR"], port,
                                 env_number(os.environ, "HOROVOD_GLOO_TIMEOUT_SECONDS", 30.0, float, positive=True),
                                 task.rank)
