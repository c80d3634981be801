"""The World: what a process knows of the job's processes, and the collectives it runs among them.

`World` is the interface training code talks to (its rank, whether it is the chief, figures reduced
across ranks, gradients averaged, state shared from rank 0, whether an error means a rank was lost);
each engine implements it: `OneProcess` here (every collective the identity), Horovod in
distrnn.parallel.horovod. Which engine a process runs is decided once, when it joins (parallel.init);
nothing outside the engines asks. The functions below are written once over the interface.
"""
import abc
import contextlib
import dataclasses
import hashlib
import json
from typing import ClassVar, Optional

import numpy as np

from distrnn.errors import DistrnnError, RankLost, UsageError
from distrnn.parallel.local_devices import rank_gpus


@dataclasses.dataclass(frozen=True)
class World(abc.ABC):
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    gpus_per_rank: int = 0  # as passed to init: GPUs each process owns (0: one per rank, or all when alone)
    engine: ClassVar[str]
    # Whether joining pinned the process to its GPUs (a launched rank always is; a lone process only when
    # given --gpus_per_rank).
    pins_gpus: ClassVar[bool]

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        """The engine and the job's shape, for the start-up line."""
        return f"{self.engine}, {self.size} process(es)" if self.size > 1 else self.engine

    def report(self) -> dict:
        """The engine, for a run's metrics."""
        return {"engine": self.engine}

    def shape(self) -> dict:
        """How many processes on which engine, for the record of the sizes a run has had."""
        return {"world_size": self.size, **self.report()}

    def owned_gpus(self, num_gpus: int) -> Optional[list]:
        """Indices of the node's GPUs this process uses, in the order TensorFlow numbers them
        (what joining pinned); None when it was left to see all of them."""
        if not (self.pins_gpus or self.gpus_per_rank):
            return None
        return rank_gpus(self.local_rank, self.local_size, num_gpus, self.gpus_per_rank)

    def stripe(self, rows: np.ndarray) -> np.ndarray:
        """This rank's contiguous share of `rows` (axis 0 divisible by size)."""
        per_rank = rows.shape[0] // self.size
        return rows[self.rank * per_rank:(self.rank + 1) * per_rank]

    # --- collectives ---------------------------------------------------------------
    def barrier(self) -> None:
        """Waits until every rank is here, for as long as rank 0's one-off work takes (a checkpoint, a
        restore, a download): an engine whose collectives time out (a hung rank) waits longer here."""
        if self.size > 1:
            self.allreduce_sum([0.0])

    @abc.abstractmethod
    def allreduce_sum(self, values) -> np.ndarray:
        """Sums `values` (numbers) over ranks, as float64; identical on every rank."""

    @abc.abstractmethod
    def allgather(self, array) -> np.ndarray:
        """Concatenates every rank's `array` along axis 0, in rank order."""

    @abc.abstractmethod
    def allgather_object(self, obj) -> list:
        """Every rank's `obj` (any picklable value), in rank order."""

    @abc.abstractmethod
    def broadcast_object(self, obj):
        """rank 0's `obj` (any picklable value) on every rank."""

    @abc.abstractmethod
    def broadcast_variables(self, variables) -> None:
        """Makes every rank's variables rank 0's."""

    @abc.abstractmethod
    def average(self, tensor):
        """Inside a tf.function: the mean of `tensor` over ranks."""

    @abc.abstractmethod
    def average_gradients(self, grads, sparse_as_dense: bool = False, fp16: bool = False) -> list:
        """Inside a tf.function: each gradient averaged over ranks (an embedding's IndexedSlices by its
        rows, or as a dense tensor with sparse_as_dense); fp16: sent as float16."""

    def lost(self, error: BaseException) -> Optional[str]:
        """When `error` is a collective that failed because another rank is gone (died, hung, lost its
        network): the line that says what happened; otherwise None."""
        return None


@dataclasses.dataclass(frozen=True)
class OneProcess(World):
    """A job of one process: every collective is the identity."""
    engine: ClassVar[str] = "one process"
    pins_gpus: ClassVar[bool] = False

    def allreduce_sum(self, values) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)

    def allgather(self, array) -> np.ndarray:
        return np.asarray(array)

    def allgather_object(self, obj) -> list:
        return [obj]

    def broadcast_object(self, obj):
        return obj

    def broadcast_variables(self, variables) -> None:
        pass

    def average(self, tensor):
        return tensor

    def average_gradients(self, grads, sparse_as_dense: bool = False, fp16: bool = False) -> list:
        return list(grads)


def on_chief(world: World, fn):
    """Runs fn on rank 0 only and returns its result on every rank; a DistrnnError there (bad input, a
    failed save) is raised on every rank with its message and exit code, so no rank is left waiting for
    the others. They wait at a barrier (World.barrier), however long fn takes."""
    result, error = None, None
    if world.is_chief:
        try:
            result = fn()
        except DistrnnError as e:
            error = (type(e), str(e), e.exit_code)
    if world.size > 1:
        world.barrier()
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


@contextlib.contextmanager
def stop_if_a_rank_is_lost(world: World, checkpoint_hint: str):
    """Turns a collective broken by a lost rank (as the engine tells: World.lost) into a RankLost error
    (one line, exit 75) instead of a traceback on every survivor. Nothing is saved then: saving needs
    every rank's share of the state, so the last checkpoint stays as it was."""
    try:
        yield
    except Exception as error:
        reason = world.lost(error) if world.size > 1 else None
        if reason is None:
            raise
        raise RankLost(f"rank {world.rank} lost contact with the other ranks ({reason}): another "
                       f"rank died, hung or lost its network; {checkpoint_hint}") from None
