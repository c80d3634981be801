"""Everything about running as several processes lives here.

Model, cell and data code never import Horovod; training code asks the World
for its rank, whether it is the chief (the one process that logs, writes
checkpoints, TensorBoard and metrics), and to reduce figures across ranks.
Without Horovod, or with one process, the World is a single process and every
reduction is the identity.
"""
import dataclasses
from typing import Optional

import numpy as np


def horovod_version() -> Optional[str]:
    try:
        import horovod
    except ImportError:
        return None
    return horovod.__version__


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def allreduce_sum(self, values) -> np.ndarray:
        """Sums `values` over ranks; identical on every rank."""
        return np.asarray(values, dtype=np.float64)


def init() -> World:
    """The World this process belongs to (a single process until Horovod support lands)."""
    return World()
