"""Errors a user can act on.

Each carries one line that names the problem and the fix; entry points print
it without a traceback and exit with the error's code (see distrnn.cli):

    2   UsageError: bad input (a flag, the data, a path, a save path another run
        holds, checkpoints that do not restore); nothing saved is touched
    65  Diverged: the loss or the gradient became inf or nan; the broken weights
        were not saved, the last checkpoint is the last good one (65 is
        EX_DATAERR: the numbers went bad; lower the learning rate and resume)
    74  SaveFailed: a checkpoint or another output could not be written (a full
        disk); the partial files were removed, earlier checkpoints are intact
        (74 is EX_IOERR)
    75  RankLost: another rank of a multi-process job died, hung or lost its
        network, so this one cannot go on; the checkpoints saved so far are
        intact and the job can be restarted with --resume (75 is EX_TEMPFAIL:
        a retry can succeed, which schedulers and wrappers can key on)
    76  OutOfMemory: memory ran short (a training step failed to allocate, or
        the memory monitor reached --mem_stop); a checkpoint was saved where
        one process runs, and the message says what to change
    130 Interrupted: a signal outside the training loop, which saves and stops
        cleanly on its own: start-up, evaluation (128 + the signal, the shell's
        convention: 130 SIGINT, 143 SIGTERM, 138 SIGUSR1)
"""


class DistrnnError(Exception):
    """An error with a one-line message and its own exit code."""

    exit_code = 1
    label = "error"  # what the line says after the program's name


class UsageError(DistrnnError):
    """Bad input from the user: wrong flag, missing data, unusable path."""

    exit_code = 2


class RankLost(DistrnnError):
    """A collective operation failed because another rank is gone."""

    exit_code = 75


class OutOfMemory(DistrnnError):
    """Memory ran short and no leaner memory mode is left to try (or --on_oom stop)."""

    exit_code = 76


class Diverged(DistrnnError):
    """The loss or the gradient norm of a step is inf or nan."""

    exit_code = 65


class SaveFailed(DistrnnError):
    """A checkpoint, config.json or a metrics file could not be written."""

    exit_code = 74


class Interrupted(DistrnnError):
    """A signal where the training loop could not save and stop first (start-up, evaluation); the
    exit code is the shell's 128 + the signal (130 for SIGINT)."""

    exit_code = 130
    label = "stopped"

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class Signalled(BaseException):
    """SIGTERM or SIGUSR1 raised where the program is (as SIGINT's KeyboardInterrupt is), by the handlers
    distrnn.cli.run_main installs first thing and distrnn.run.stops.SignalsInterrupt around a job's start-up,
    so that it ends in one line and 128 + the signal, never in a silent death. A BaseException: no
    `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
