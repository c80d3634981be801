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
    one counting, inside @FILE too), if any: what a launcher needs to know before it starts the workers."""
    found = None
    args = read_flag_files(list(args))
    for arg, following in zip(args, [*args[1:], ""]):
        name, equals, value = arg.partition("=")
        if name == "--global_batch_size":
            value = value if equals else following
            found = int(value) if value.isdigit() else found
    return found


def most_workers(batch: Optional[int], available: int) -> int:
    """The most workers, at most `available`, over which the global batch `batch` splits evenly (all of
    them where no global batch is given)."""
    size = available
    while batch and size and batch % size:
        size -= 1
    return size


def lr_factor(batch_ratio: float, scaling: str = "none", step: int = 0, warmup_steps: int = 0) -> float:
    """What multiplies a config's learning rate for a global batch `batch_ratio` times the one it was
    tuned for: 1 (none), batch_ratio (linear, Goyal et al. 2017) or its square root (sqrt), ramped up
    linearly from 1 over the first `warmup_steps` steps."""
    factor = {"none": 1.0, "linear": batch_ratio, "sqrt": math.sqrt(batch_ratio)}[scaling]
    if warmup_steps and step < warmup_steps:
        factor = 1.0 + (factor - 1.0) * step / warmup_steps
    return factor
