"""Errors a user can act on.

Each carries one line that names the problem and the fix; entry points print
it without a traceback and exit with the error's code (see distrnn.cli):

    2   UsageError: bad input (a flag, the data, a path); nothing saved is touched
    75  RankLost: another rank of a multi-process job died, hung or lost its
        network, so this one cannot go on; the checkpoints saved so far are
        intact and the job can be restarted with --resume (75 is EX_TEMPFAIL:
        a retry can succeed, which schedulers and wrappers can key on)
    76  OutOfMemory: memory ran short (a training step failed to allocate, or
        the memory monitor reached --mem_stop); a checkpoint was saved where
        one process runs, and the message says what to change
"""


class DistrnnError(Exception):
    """An error with a one-line message and its own exit code."""

    exit_code = 1


class UsageError(DistrnnError):
    """Bad input from the user: wrong flag, missing data, unusable path."""

    exit_code = 2


class RankLost(DistrnnError):
    """A collective operation failed because another rank is gone."""

    exit_code = 75


class OutOfMemory(DistrnnError):
    """Memory ran short and no leaner memory mode is left to try (or --on_oom stop)."""

    exit_code = 76
