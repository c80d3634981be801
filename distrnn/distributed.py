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
import hashlib
import json
import math
import os
import re
from typing import Any, Optional

import numpy as np

from distrnn import compat, slurm_env, srun
from distrnn.config import env_number
from distrnn.errors import DistrnnError, RankLost, UsageError

# How the learning rate may follow a global batch larger than the config's batch_size.
# Set by horovodrun (Gloo), mpirun (Open MPI) or an MPI launcher (srun --mpi=pmi2 / pmix, Intel MPI's PMI).
LAUNCH_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
MPI_VARIABLES = LAUNCH_VARIABLES[1:]


def horovod_version() -> Optional[str]:
    try:
        import horovod
    except ImportError:
        return None
    return horovod.__version__


def launched_by_horovod() -> bool:
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

    def allgather_object(self, obj) -> list:
        """Every rank's `obj` (any picklable value), in rank order."""
        if self.hvd is None:
            return [obj]
        return self.hvd.allgather_object(obj)  # Horovod:

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

    def average_gradients(self, grads, sparse_as_dense: bool = False, fp16: bool = False) -> list:
        """Inside a tf.function: each gradient averaged over ranks, dense ones in one grouped allreduce,
        an embedding's IndexedSlices by allgathering its rows (or as a dense tensor with sparse_as_dense),
        as Horovod's DistributedGradientTape does; fp16: sent as float16 (Horovod's fp16 compression).
        Written here rather than through that tape because Horovod leaves IndexedSlices uncompressed
        (horovod/tensorflow/__init__.py, 0.28.1: its allgather branch never calls the compressor), and
        the embedding's rows are most of what the PTB step sends."""
        if self.hvd is None:
            return list(grads)
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


def on_chief(world: World, fn):
    """Runs fn on rank 0 only and returns its result on every rank; a DistrnnError there (bad input, a
    failed save) is raised on every rank with its message and exit code, so no rank is left waiting for
    the others."""
    result, error = None, None
    if world.is_chief:
        try:
            result = fn()
        except DistrnnError as e:
            error = (type(e), str(e), e.exit_code)
    if world.size > 1:
        result, error = world.broadcast_object((result, error))
    if error:
        kind, message, code = error
        raised = kind.__new__(kind)
        Exception.__init__(raised, message)
        raised.exit_code = code
        raise raised
    return result


def chief_first(world: World, fn):
    """fn() on rank 0, then, once it has succeeded there, on every other rank; each rank gets its own
    result and a UsageError on rank 0 is raised on every rank. For work such as filling a download cache,
    which the ranks of a node must not do at once and every node must have done."""
    result = on_chief(world, fn)
    return result if world.is_chief else fn()


def check_same_run(world: World, config, options) -> None:
    """Every rank must train the same thing: ranks started with other flags would deadlock or
    diverge silently, so a hash of the config and run options (dataclasses) is compared with rank 0's."""
    if world.size == 1:
        return
    text = json.dumps([dataclasses.asdict(config), dataclasses.asdict(options)], sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    differing = int(world.allreduce_sum([digest != world.broadcast_object(digest)])[0])
    if differing:
        raise UsageError(f"{differing} of {world.size} ranks started with a config or flags different from rank 0's; "
                         "start every rank with the same command line")


def per_rank_config(config, global_batch_size: int, world: World):
    """With --global_batch_size, each rank's batch_size is its share of it."""
    if not global_batch_size:
        return config
    if global_batch_size < world.size or global_batch_size % world.size:
        raise UsageError(f"--global_batch_size {global_batch_size} cannot be split evenly over {world.size} ranks; "
                         f"use a multiple of {world.size}")
    return dataclasses.replace(config, batch_size=global_batch_size // world.size)


def lr_factor(batch_ratio: float, scaling: str = "none", step: int = 0, warmup_steps: int = 0) -> float:
    """What multiplies a config's learning rate for a global batch `batch_ratio` times the one it was
    tuned for: 1 (none), batch_ratio (linear, Goyal et al. 2017) or its square root (sqrt), ramped up
    linearly from 1 over the first `warmup_steps` steps."""
    factor = {"none": 1.0, "linear": batch_ratio, "sqrt": math.sqrt(batch_ratio)}[scaling]
    if warmup_steps and step < warmup_steps:
        factor = 1.0 + (factor - 1.0) * step / warmup_steps
    return factor


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
        raise RankLost(f"rank {world.rank} lost contact with the other ranks ({failure_reason(error)}): another "
                       f"rank died, hung or lost its network; {checkpoint_hint}") from None


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


def init(gpus_per_rank: int = 0) -> World:
    """The World this process belongs to. Under a Horovod launcher: Horovod initialised,
    this process pinned to its GPU(s) (by local rank, memory growth on; see rank_gpus) and
    its share of the host's cores; otherwise a single process, which owns the first
    `gpus_per_rank` GPUs when that is given. Must run before TensorFlow starts its devices.

    A task of an srun step of several tasks joins the others through Gloo (srun_environment), unless
    an MPI launcher started it (srun --mpi=pmix) and Horovod has MPI, which then finds the others."""
    by_horovodrun = "HOROVOD_RANK" in os.environ
    task = None if by_horovodrun or mpi_joins_ranks() else slurm_env.srun_task()
    if task is not None:
        srun_env = srun.srun_environment(task)
        os.environ.update(srun_env)
    if not launched_by_horovod():
        world = World(gpus_per_rank=gpus_per_rank)
        if gpus_per_rank:
            _pin_gpus(world)
        return world
    import tensorflow as tf
    try:
        import horovod.tensorflow as hvd
    except (ImportError, tf.errors.NotFoundError) as e:  # NotFoundError: built against another TensorFlow
        raise UsageError(compat.horovod_missing(e)) from None
    if task is not None:
        if not hvd.gloo_built():
            raise UsageError("started by srun, but this Horovod was built without Gloo: start with srun "
                             "--mpi=pmix (Horovod built with MPI), or rebuild it with bash launch/setup.sh")
        port = env_number(srun_env, "HOROVOD_GLOO_RENDEZVOUS_PORT", None, minimum=1, maximum=65535)
        if task.rank == 0:
            srun.serve_rendezvous(task, port)
        else:
            # As long as Horovod itself waits for the other ranks at the rendezvous.
            srun.wait_for_rendezvous(srun_env["HOROVOD_GLOO_RENDEZVOUS_ADDR"], port,
                                env_number(os.environ, "HOROVOD_GLOO_TIMEOUT_SECONDS", 30.0, float, positive=True),
                                task.rank)
    elif not by_horovodrun and not hvd.mpi_built():
        # Horovod would start as a job of one, and every process would train alone.
        raise UsageError("started by an MPI launcher, but this Horovod was built without MPI: start with "
                         "horovodrun --gloo, or srun without --mpi")
    if os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR"):
        srun.check_own_name_resolves()
    hvd.init()  # Horovod:
    world = World(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), hvd, gpus_per_rank)
    _pin_gpus(world)
    # N processes on one host share its cores instead of each starting a pool as large as the host;
    # an srun task has the cores Slurm gave it (--cpus-per-task).
    threads = env_number(os.environ, "SLURM_CPUS_PER_TASK", 0, minimum=0) if task else 0
    threads = threads or max(1, (os.cpu_count() or 1) // hvd.local_size())
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
