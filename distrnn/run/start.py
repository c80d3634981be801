"""A run of a job, from its start (`run`: the World, devices, save path and its lock, each rank's batch,
same-run checks, then the job and the loop). The options every job shares are distrnn.options; what a
job is, distrnn.run.job; the loop distrnn.run.loop; the save path distrnn.run.checkpoints; stops
distrnn.run.stops; what a run shows distrnn.run.outputs.
"""
import os
import time

import tensorflow as tf

from distrnn import cpu, parallel
from distrnn.errors import OutOfMemory
from distrnn.memory import monitor
from distrnn.options import JobOptions
from distrnn.parallel import local_devices
from distrnn.run import checkpoints, faults, files, loop
from distrnn.run.outputs import log
from distrnn.run.stops import SignalsInterrupt


def default_save_path(job: str, config_name: str) -> str:
    return os.path.join("runs", f"{job}-{config_name}-{time.strftime('%Y%m%d-%H%M%S')}")


def run(job_cls, config, options: JobOptions, world=None) -> dict:
    """A run of the job `job_cls` (a distrnn.run.job.Job) with `config` and `options` (its RunOptions):
    trains, validates every epoch, tests at the end and returns the metrics (metrics["interrupted"]: the exit
    code of a stop, after its checkpoint). Every entry point and library caller starts a job here.

    It joins the World (parallel.init), sets up the devices asked for (before anything runs on
    TensorFlow's devices, which a collective does), agrees on the save path (a default has the start time
    in it: every rank takes rank 0's), gives each rank its share of --global_batch_size, checks that every
    rank runs the same config and options, takes the save path's lock (one run at a time), checks that
    --metrics_json can be written, makes the job (job_cls(config for this rank, options, world, devices,
    the config's batch_size, which its learning rate was chosen for)) and returns loop.train's metrics. A
    collective broken by a lost rank is turned into RankLost and a signal outside the training loop's own
    handling (start-up, evaluation) into Interrupted."""
    options.validate()  # a library caller's options may have changed since they were made
    reference_batch = config.batch_size
    world = world or parallel.init(options.engine, options.gpus_per_rank, options.virtual_devices)
    if world.is_chief:
        log(f"machine: {cpu.describe_machine()}")
        log(f"engine: {world.describe()}")
    devices = local_devices.job_devices(options.devices, options.num_gpus, options.virtual_devices,
                                        options.gpus_per_rank)
    save_path = world.broadcast_object(options.save_path or default_save_path(job_cls.name, options.config_name))
    locks = []
    with parallel.stop_if_a_rank_is_lost(
            world, f"the checkpoints in {save_path} are intact: start the whole job again with --resume"), \
            SignalsInterrupt(save_path):
        try:
            config = parallel.per_rank_config(config, options.global_batch_size, world)
            config.validate()
            parallel.check_same_run(world, config, options)
            parallel.on_chief(world, lambda: files.check_save_path(save_path))
            # Before the lock: a refused flag leaves the save path as it was, its lock file included.
            parallel.on_chief(world, lambda: files.check_output(options.metrics_json, "--metrics_json",
                                                                own_run=save_path))
            parallel.on_chief(world, lambda: locks.append(checkpoints.SavePathLock(save_path)))
            faults.point("start")
            started = time.time()
            job = job_cls(config, options, world, devices, reference_batch)
            return loop.train(job, world, options, save_path, started)
        except tf.errors.ResourceExhaustedError as error:  # a training step's own is handled in the loop
            raise OutOfMemory(f"ran out of memory outside a training step ({monitor.oom_reason(error)}): where the "
                              "model's weights do not fit, lower --hidden_size or --num_layers, or spread the layers "
                              "over more devices (--num_gpus N); python -m distrnn.devices --plan estimates what "
                              "each device needs") from None
        finally:
            for lock in locks:
                lock.release()
