"""The stops of a training run: signals (StopSignal in the loop, SignalsInterrupt outside it), memory
running short (through Watch, agreed by every rank) and a step that diverged (check_finite). Each saves
or keeps what is needed and ends in one line with its own exit code."""
import math
import os
import signal
import threading
from typing import Dict, Optional

import numpy as np

from distrnn.errors import Diverged, Interrupted, OutOfMemory, Signalled
from distrnn.memory import monitor
from distrnn.run import checkpoints
from distrnn.run.checkpoints import Checkpoints
from distrnn.run.outputs import log, say


class Watch:
    """What a training loop watches besides its steps: signals (StopSignal) and memory (a
    MemoryMonitor from the job's --mem_* flags), with every decision to stop agreed by all ranks.

        with Watch(world, options) as watch:
            ... a step ...
            watch.warn()                   # a memory warning, once, on the rank it concerns
            code = watch.stop_code()       # a collective: None to go on
        if code:
            ... save ...
            watch.report_stop(code, ...)
    """

    def __init__(self, world, options):  # a distrnn.options.JobOptions
        self.world = world
        self.signals = StopSignal()
        self.monitor = monitor.MemoryMonitor(options.mem_warn, options.mem_stop, options.mem_interval,
                                            owned_gpus=world.owned_gpus)

    def __enter__(self) -> "Watch":
        self.signals.__enter__()
        self.monitor.start()
        return self

    def __exit__(self, *exc):
        self.monitor.close()
        return self.signals.__exit__(*exc)

    def say(self, message: str) -> None:
        """Logs on any rank: memory matters wherever it runs short."""
        say(self.world, message)

    def warn(self) -> None:
        warning = self.monitor.take_warning()
        if warning:
            self.say(f"warning: {warning}")

    def stop_code(self) -> Optional[int]:
        return agreed_stop(self.world, self.signals.signum, self.monitor.stop_reason is not None)

    def report_stop(self, code: int, checkpoints: Checkpoints, save_path: str, out_of_memory: str = None) -> None:
        """After every rank agreed to stop with `code` and the chief saved a checkpoint: keeps every rank
        until then (a launcher that sees one rank exit non-zero stops the others: srun --kill-on-bad-exit,
        horovodrun) and says why it stopped and how to continue. out_of_memory: what a failed step said."""
        ignore_launcher_signals(code)
        self.world.barrier()
        where = f"checkpoint saved in {checkpoints.directory}"
        if code == OutOfMemory.exit_code:
            reason = out_of_memory or f"memory ran short ({self.monitor.stop_reason or 'on another rank'})"
            self.say(f"stopped: {reason}; {where}. {monitor.ADVICE} Then continue with --resume --save_path {save_path}")
        elif self.world.is_chief:
            log(f"stopped by signal: {where}; continue with --resume --save_path {save_path}")


def ignore_launcher_signals(code: int) -> None:
    """After a stop every rank agreed on, its checkpoint saved: SIGTERM and SIGUSR1 are ignored for the rest of
    the process, which is on its way out with `code`. A launcher signals the ranks still running when one has
    exited: srun --kill-on-bad-exit sent SIGTERM to rank 0 while TensorFlow was shutting down after rank 1
    had exited 138 (SIGUSR1 ahead of the time limit); rank 0 died by it, the step's code became 143, and
    slurm/job.sh did not requeue the job. SIG_IGN, unlike a Python handler, survives the interpreter's
    finalization. A Ctrl-C stop leaves them alone (an interactive process may be sent SIGTERM to end it)."""
    if code != StopSignal.exit_code(signal.SIGINT) and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)


def agreed_stop(world, signum: Optional[int], memory_short: bool) -> Optional[int]:
    """The exit code every rank stops with after this step, or None to go on. A collective: every
    rank must stop at the same step, or the others wait forever in the next one. Memory running
    short on any rank (OutOfMemory's code) comes first, else the largest signal any rank got."""
    signum, short = signum or 0, int(memory_short)
    if world.size > 1:
        signum, short = (int(v) for v in world.allgather(np.array([[signum, short]])).max(axis=0))
    return OutOfMemory.exit_code if short else (StopSignal.exit_code(signum) if signum else None)


def catchable(signals):
    """The signals a process may catch: those not ignored when it started. A non-interactive shell starts
    its background commands (`distrnn.ptb ... &` in a script) with SIGINT ignored, so that a Ctrl-C meant for
    the script does not reach them; nohup ignores SIGHUP the same way. Catching them would undo that."""
    return [sig for sig in signals if signal.getsignal(sig) is not signal.SIG_IGN]


class StopSignal:
    """Turns the first SIGINT, SIGTERM or SIGUSR1 into a flag the training loop checks between
    steps, so it can save a checkpoint and exit cleanly; a second signal interrupts at once.
    SIGUSR1 is what Slurm sends ahead of a job's time limit (sbatch --signal=USR1@SECONDS);
    SIGTERM what it sends on scancel, requeue and preemption."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in catchable(self.SIGNALS):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    @staticmethod
    def exit_code(signum: int) -> int:
        # The shell convention: 130 for SIGINT, 143 for SIGTERM, 138 for SIGUSR1.
        return 128 + signum


class SignalsInterrupt:
    """Turns SIGINT, SIGTERM and SIGUSR1 that arrive outside the training loop (which saves and stops on
    its own: StopSignal) into Interrupted: one line saying what the save path holds, exit 128 + signal."""

    def __init__(self, save_path: str):
        self.save_path = save_path
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in catchable((signal.SIGTERM, signal.SIGUSR1)):
                self._previous[sig] = signal.signal(sig, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise Signalled(signum)

    def __exit__(self, kind, error, tb):
        for sig, handler in self._previous.items():
            if signal.getsignal(sig) is self._raise:  # not where a stop has since ignored it
                signal.signal(sig, handler)
        if kind is KeyboardInterrupt or kind is Signalled:
            signum = signal.SIGINT if kind is KeyboardInterrupt else error.signum
            raise Interrupted(interrupted_message(self.save_path, signum), StopSignal.exit_code(signum)) from None
        return False


def interrupted_message(save_path: str, signum: int) -> str:
    directory = os.path.join(save_path, "checkpoints")
    found = sorted(n for n, names in checkpoints.checkpoint_files(directory).items()
                   if checkpoints.incomplete_reason(names) is None)
    name = signal.Signals(signum).name
    if not found:
        return f"interrupted by {name} before the first checkpoint: nothing was saved"
    return (f"interrupted by {name} outside a training step; the checkpoints in {directory} are intact (newest "
            f"ckpt-{found[-1]}): continue with --resume --save_path {save_path}")


def check_finite(step: int, figures: Dict[str, float], checkpoints_: Checkpoints, advice: str) -> None:
    """Stops a run whose step `step` gave a figure (loss, perplexity, gradient norm) that is inf or nan
    (Diverged), before anything saves its weights, which that step's update has broken. Every rank sees
    the same figures (each is averaged over the ranks), so every rank stops at the same step."""
    bad = [f"{name} is {value}" for name, value in figures.items() if not math.isfinite(value)]
    if not bad:
        return
    what = " and the ".join(bad)
    if checkpoints_.manager is None:  # not the chief: only it knows which checkpoint is the last
        rest = f"its weights were not saved; the newest checkpoint in {checkpoints_.directory} is the last good one"
    elif checkpoints_.latest:
        rest = f"its weights were not saved; the last good checkpoint is {checkpoints_.latest}"
    else:
        rest = "nothing was saved before it"
    then = "continue with --resume" if checkpoints_.latest or checkpoints_.manager is None else "start again"
    raise Diverged(f"step {step}: the {what}, so training diverged; {rest}: {advice}, then {then}")
