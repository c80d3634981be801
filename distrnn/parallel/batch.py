"""The global batch of a data-parallel job: each rank's share of it, and how the learning rate may
follow a global batch larger than the one a config was tuned for."""
import dataclasses
import math
from typing import List, Optional

from distrnn.cli import read_flag_files
from distrnn.errors import UsageError


def per_rank_config(config, global_batch_size: int, world):
    """With --global_batch_size, each rank's batch_size is its share of it."""
    if not global_batch_size:
        return config
    if global_batch_size < world.size or global_batch_size % world.size:
        raise UsageError(f"--global_batch_size {global_batch_size} cannot be split evenly over {world.size} ranks; "
                         f"use a multiple of {world.size}")
    return dataclasses.replace(config, batch_size=global_batch_size // world.size)


def global_batch_in(args: List[str]) -> Optional[int]:
    """A command line's --global_batch_size, as its parser reads it (given as one argument or two, the last
    one counting, inside @FILE too), if any: what a launcher needs to know before it starts the workers. A
    value the job would refuse (not a positive int32) counts as none: the job says why."""
    found = None
    args = read_flag_files(list(args))
    for arg, following in zip(args, [*args[1:], ""]):
        name, equals, value = arg.partition("=")
        if name == "--global_batch_size":
            value = value if equals else following
            found = int(value) if value.isdigit() and 0 < int(value) < 2 ** 31 else None
    return found


def most_workers(batch: Optional[int], available: int) -> int:
    """The most workers, at most `available`, over which the global batch `batch` splits evenly (all of
    them where no global batch is given): its largest divisor up to `available`."""
    if not batch:
        return available
    divisors = {d for i in range(1, math.isqrt(batch) + 1) if batch % i == 0 for d in (i, batch // i)}
    return max((d for d in divisors if d <= available), default=0)


def lr_factor(batch_ratio: float, scaling: str = "none", step: int = 0, warmup_steps: int = 0) -> float:
    """What multiplies a config's learning rate for a global batch `batch_ratio` times the one it was
    tuned for: 1 (none), batch_ratio (linear, Goyal et al. 2017) or its square root (sqrt), ramped up
    linearly from 1 over the first `warmup_steps` steps."""
    factor = {"none": 1.0, "linear": batch_ratio, "sqrt": math.sqrt(batch_ratio)}[scaling]
    if warmup_steps and step < warmup_steps:
        factor = 1.0 + (factor - 1.0) * step / warmup_steps
    return factor
