"""Parallelism: data parallel across processes and model parallel across a process's devices.

- world: the World interface training code talks to (rank, chief, collectives, a lost rank), its
  one-process implementation, and what is written once over it (on_chief, chief_first, check_same_run,
  stop_if_a_rank_is_lost);
- horovod: Horovod as an engine, the only module that imports it; join: init, which picks the engine;
- batch: each rank's share of a global batch, the learning rate that follows it;
- srun and slurm_env: an srun step's tasks as one job (Slurm's variables read, the rendezvous found);
- local_devices: the GPUs a rank owns, the cores it shares, the devices its flags name;
- placement: a model's parts mapped to a process's devices (model parallelism).
"""
from distrnn.parallel.batch import lr_factor, per_rank_config
from distrnn.parallel.join import engine_versions, init
from distrnn.parallel.world import OneProcess, World, check_same_run, chief_first, on_chief, stop_if_a_rank_is_lost

__all__ = ["World", "OneProcess", "init", "engine_versions", "on_chief", "chief_first", "check_same_run",
           "stop_if_a_rank_is_lost", "per_rank_config", "lr_factor"]
