"""Errors a user can act on.

A UsageError carries one line that names the problem and the fix; entry points
print it without a traceback and exit with code 2 (see distrnn.cli).
"""


class UsageError(Exception):
    """Bad input from the user: wrong flag, missing data, unusable path."""

    exit_code = 2
