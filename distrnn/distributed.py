"""Everything about running as several processes lives here.

Model, cell and data code never import Horovod; training code asks the World
for its rank, whether it is the chief (the one process that logs, writes
checkpoints, TensorBoard and metrics), to reduce figures across ranks, to
wrap its gradient tape and to share state from rank 0. Without Horovod, or
outside a Horovod launch, the World is a single process and every collective
is the identity.
"""
import contextlib
import dataclasses
import os
import re
from typing import Any, Optional

import numpy as np

# How the learning rate may follow a global batch larger than the config's batch_size.
LR_SCALINGS = ("none", "linear", "sqrt")
# Set by horovodrun (Gloo), mpirun (Open MPI) or an MPI launcher (PMI).
LAUNCH_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def horovod_version() -> Optional[str]:
    try:
        import horovod
    except ImportError:
        return None
    return horovod.__version__


def launched_by_horovod() -> bool:
    return any(name in os.environ for name in LAUNCH_VARIABLES)


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    hvd: Any = dataclasses.field(default=None, repr=False, compare=False)  # horovod.tensorflow, when launched
    gpus_per_rank: int = 0  # as passed to init: GPUs each process owns (0: one per rank, or all when alone)

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def owned_gpus(self, num_gpus: int) -> Optional[list]:
        """Indices of the node's GPUs this process uses, in the order TensorFlow numbers them
        (what `init` pinned); None when it was left to see all of them."""
        if self.hvd is None and not self.gpus_per_rank:
            return None
        return rank_gpus(self.local_rank, self.local_size, num_gpus, self.gpus_per_rank)

    # --- collectives: identities in a single process ---------------------------
    def allreduce_sum(self, values) -> np.ndarray:
        """Sums `values` over ranks; identical on every rank."""
        values = np.asarray(values, dtype=np.float64)
        if self.hvd is None:
            return values
        return self.hvd.allreduce(values, op=self.hvd.Sum, name="allreduce_sum").numpy()  # Horovod:

    def allgather(self, array) -> np.ndarray:
        """Concatenates every rank's `array` along axis 0, in rank order."""
        if self.hvd is None:
            return np.asarray(array)
        return self.hvd.allgather(array).numpy()  # Horovod:

    def broadcast_object(self, obj):
        """rank 0's `obj` (any picklable value) on every rank."""
        if self.hvd is None:
            return obj
        return self.hvd.broadcast_object(obj, root_rank=0)  # Horovod:

    def broadcast_variables(self, variables) -> None:
        """Makes every rank's variables rank 0's."""
        if self.hvd is not None and variables:
            self.hvd.broadcast_variables(variables, root_rank=0)  # Horovod:

    def average(self, tensor):
        """Inside a tf.function: the mean of `tensor` over ranks."""
        if self.hvd is None:
            return tensor
        return self.hvd.allreduce(tensor, op=self.hvd.Average)  # Horovod:

    def wrap_tape(self, tape, sparse_as_dense: bool = False):
        """A tape whose gradients are averaged over ranks."""
        if self.hvd is None:
            return tape
        return self.hvd.DistributedGradientTape(tape, sparse_as_dense=sparse_as_dense)  # Horovod:

    def stripe(self, rows: np.ndarray) -> np.ndarray:
        """This rank's contiguous share of `rows` (axis 0 divisible by size)."""
        per_rank = rows.shape[0] // self.size
        return rows[self.rank * per_rank:(self.rank + 1) * per_rank]


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


@contextlib.contextmanager
def stop_if_a_rank_is_lost(world: World, checkpoint_hint: str):
    """Turns a collective broken by a lost rank into a RankLost error (one line, exit 75)
    instead of a traceback on every survivor. Nothing is saved then: saving needs every
    rank's share of the state, so the last checkpoint stays as it was."""
    try:
        yield
    except Exception as error:
        if world.size < 2 or not collective_failed(error):
            raise
        from distrnn.errors import RankLost
        raise RankLost(f"rank {world.rank} lost contact with the other ranks ({failure_reason(error)}): another "
                       f"rank died, hung or lost its network; {checkpoint_hint}") from None


def rank_gpus(local_rank: int, local_size: int, num_gpus: int, per_rank: int = 0) -> list:
    """Indices of the node's GPUs that a rank owns. per_rank 0: one, by local rank (ranks
    share GPUs round-robin when they outnumber them); per_rank K: rank r owns GPUs
    r*K ... r*K+K-1, across which it places its model (model parallel inside the rank)."""
    from distrnn.errors import UsageError
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


def init(gpus_per_rank: int = 0) -> World:
    """The World this process belongs to. Under a Horovod launcher: Horovod initialised,
    this process pinned to its GPU(s) (by local rank, memory growth on; see rank_gpus) and
    its share of the host's cores; otherwise a single process, which owns the first
    `gpus_per_rank` GPUs when that is given. Must run before TensorFlow starts its devices."""
    if not launched_by_horovod():
        world = World(gpus_per_rank=gpus_per_rank)
        if gpus_per_rank:
            _pin_gpus(world)
        return world
    try:
        import horovod.tensorflow as hvd
    except ImportError:
        from distrnn.errors import UsageError
        raise UsageError("launched by a Horovod/MPI launcher, but Horovod is not installed; run "
                         "bash launch/setup.sh, or start the job as one process") from None
    import tensorflow as tf
    hvd.init()  # Horovod:
    world = World(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), hvd, gpus_per_rank)
    _pin_gpus(world)
    # N processes on one host share its cores instead of each starting a pool as large as the host.
    threads = max(1, (os.cpu_count() or 1) // hvd.local_size())
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
    return world


def _pin_gpus(world: World) -> None:
    """Makes this process see only its GPUs (as /gpu:0, /gpu:1, ...), with memory growth on."""
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    owned = world.owned_gpus(len(gpus))  # raises when --gpus_per_rank asks for GPUs that are not there
    if gpus:
        tf.config.set_visible_devices([gpus[i] for i in owned], "GPU")
