"""How a training job starts (run_job: the World, devices, save path and its lock, each rank's batch,
same-run checks) and the run options every job shares (JobOptions). The loop is distrnn.loop; the
save path distrnn.checkpoints; stops distrnn.stops; what a run shows distrnn.outputs.
"""
import dataclasses
import os
import platform
import time
from typing import Dict, Optional

import tensorflow as tf

from distrnn import checkpoints, cpu, distributed, memory, placement
from distrnn.errors import OutOfMemory, UsageError
from distrnn.outputs import log
from distrnn.rnn import Memory
from distrnn.stops import SignalsInterrupt


@dataclasses.dataclass
class JobOptions:
    """How a training job runs, as opposed to what it trains (the config). Every entry point's
    RunOptions extends these; the flags of the same names are in distrnn.cli."""
    data_path: Optional[str] = None      # the data set's directory; None: download to the cache
    save_path: Optional[str] = None      # checkpoints, TensorBoard, plots; None: runs/<job>-<config>-<time>
    resume: bool = False                 # continue from the latest checkpoint in save_path
    max_epochs: int = 0                  # stop after this many epochs in all (0: the config's)
    max_steps: int = 0                   # stop after this many training steps in all (0: no limit)
    metrics_json: Optional[str] = None   # write the final figures here
    seed: int = 1                        # weights, dropout masks, shuffling
    checkpoint_every: int = 500          # steps between checkpoints (also saved after every epoch)
    devices: Optional[str] = None        # comma-separated devices for the layers, e.g. /gpu:0,/gpu:1
    num_gpus: int = 0                    # use /gpu:0 ... /gpu:N-1
    virtual_devices: int = 0             # split the CPU into N logical devices and use them
    strategy: str = "round_robin"        # placement strategy: round_robin or balanced
    placement: str = "sequential"        # sequential or pipeline (wavefront across the layers' devices)
    gpus_per_rank: int = 0               # rank r owns local GPUs r*K ... r*K+K-1 and places its layers on them
    global_batch_size: int = 0           # rows of one step over all ranks (0: batch_size x ranks)
    lr_scaling: str = "none"             # none, linear or sqrt in global batch / the config's batch_size
    lr_warmup_steps: int = 0             # ramp from the unscaled to the scaled learning rate over N steps
    mem_warn: float = 0.90               # warn once when device or host memory in use reaches this fraction
    mem_stop: float = 0.97               # checkpoint and exit (code 76) when it reaches this fraction
    mem_interval: float = 5.0            # seconds between memory samples
    recompute: int = 0                   # K > 0: backprop through time keeps every K-th LSTM state, recomputes the rest
    swap_memory: bool = False            # backprop through time keeps the LSTM activations in host memory
    config_name: str = "custom"

    @property
    def memory(self) -> Memory:
        return Memory(recompute=self.recompute, swap=self.swap_memory)


def default_save_path(job: str, config_name: str) -> str:
    return os.path.join("runs", f"{job}-{config_name}-{time.strftime('%Y%m%d-%H%M%S')}")


def run_job(job: str, config, options: JobOptions, body, world=None):
    """What starts every job: joins the World (distributed.init), sets up the devices asked for (before
    anything runs on TensorFlow's devices, which a collective does), agrees on the save path (a default
    has the start time in it: every rank takes rank 0's), gives each rank its share of
    --global_batch_size, checks that every rank runs the same config and options, takes the save path's
    lock (one run at a time), checks that --metrics_json can be written, and returns
    body(config for this rank, world, save_path, devices), a collective broken by a lost rank turned
    into RankLost and a signal outside the training loop's own handling (start-up, evaluation) into
    Interrupted."""
    world = world or distributed.init(options.gpus_per_rank)
    if world.is_chief:
        log(f"machine: {cpu.describe_machine()}")
    devices = placement.job_devices(options.devices, options.num_gpus, options.virtual_devices, options.gpus_per_rank)
    save_path = world.broadcast_object(options.save_path or default_save_path(job, options.config_name))
    locks = []
    with distributed.stop_if_a_rank_is_lost(
            world, f"the checkpoints in {save_path} are intact: start the whole job again with --resume"), \
            SignalsInterrupt(save_path):
        try:
            config = distributed.per_rank_config(config, options.global_batch_size, world)
            config.validate()
            distributed.check_same_run(world, config, options)
            distributed.on_chief(world, lambda: locks.append(checkpoints.SavePathLock(save_path)))
            distributed.on_chief(world, lambda: check_metrics_path(options.metrics_json))
            return body(config, world, save_path, devices)
        except tf.errors.ResourceExhaustedError as error:  # a training step's own is handled in the loop
            raise OutOfMemory(f"ran out of memory outside a training step ({memory.oom_reason(error)}): where the "
                              "model's weights do not fit, lower --hidden_size or --num_layers, or spread the layers "
                              "over more devices (--num_gpus N); python -m distrnn.devices --plan estimates what "
                              "each device needs") from None
        finally:
            for lock in locks:
                lock.release()


def versions() -> Dict[str, Optional[str]]:
    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "horovod": distributed.horovod_version()}


def check_metrics_path(path: Optional[str]) -> None:
    """Fails at start-up, not after hours of training, when --metrics_json cannot be written (run after
    the save path exists, so --metrics_json SAVE_PATH/m.json is fine)."""
    if not path:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"--metrics_json {path} is a directory; name a file in it, e.g. "
                         f"{os.path.join(path, 'metrics.json')}")
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise UsageError(f"cannot write --metrics_json {path}: {directory} is not a writable directory")
    if os.path.lexists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"cannot write --metrics_json {path}: the file is not writable; make it writable or "
                         "name another file")
