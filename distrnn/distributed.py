"""Everything about running as several processes lives here.

Model, cell and data code never import Horovod; training code asks the World
for its rank, whether it is the chief (the one process that logs, writes
checkpoints, TensorBoard and metrics), to reduce figures across ranks, to
wrap its gradient tape and to share state from rank 0. Without Horovod, or
outside a Horovod launch, the World is a single process and every collective
is the identity.
"""
import dataclasses
import os
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

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

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


def init() -> World:
    """The World this process belongs to. Under a Horovod launcher: Horovod initialised,
    this process pinned to its GPU (by local rank, memory growth on) and its share of the
    host's cores; otherwise a single process. Must run before TensorFlow starts its devices."""
    if not launched_by_horovod():
        return World()
    try:
        import horovod.tensorflow as hvd
    except ImportError:
        from distrnn.errors import UsageError
        raise UsageError("launched by a Horovod/MPI launcher, but Horovod is not installed; run "
                         "bash launch/setup.sh, or start the job as one process") from None
    import tensorflow as tf
    hvd.init()  # Horovod:
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:  # Horovod: one GPU per process, chosen by local rank
        tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
    # N processes on one host share its cores instead of each starting a pool as large as the host.
    threads = max(1, (os.cpu_count() or 1) // hvd.local_size())
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
    return World(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), hvd)
