"""Shared pieces of the command-line entry points.

Every entry point parses flags, then calls a library function inside
`run_main`, which turns a DistrnnError into one line on stderr and its exit code (2 for bad input).
"""
import argparse
import dataclasses
import difflib
import sys
from typing import Callable, Dict, List

from distrnn.config import field_types
from distrnn.errors import DistrnnError, UsageError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad flags as a UsageError (one line, exit 2) and suggests close names."""

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            flags = [a for a in message.split(":", 1)[1].split() if a.startswith("--")]
            known = [o for action in self._actions for o in action.option_strings]
            for flag in flags:
                close = difflib.get_close_matches(flag.split("=")[0], known, n=1)
                if close:
                    message += f" (did you mean {close[0]}?)"
                    break
            message += "; see --help for the flags"
        raise UsageError(message)


def add_config_flags(parser: argparse.ArgumentParser, config_cls, help_by_field: Dict[str, str] = None) -> List[str]:
    """Adds --FIELD for every field of `config_cls`; values stay strings for config.override."""
    group = parser.add_argument_group("config overrides (any field of the preset)")
    names = []
    for name, kind in field_types(config_cls).items():
        group.add_argument(f"--{name}", metavar=kind.__name__.upper(), default=None,
                           help=(help_by_field or {}).get(name))
        names.append(name)
    return names


def config_overrides(args: argparse.Namespace, names: List[str]) -> Dict[str, str]:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def field_comments(config_cls) -> Dict[str, str]:
    """Help text for each field: the comment after it in the dataclass source."""
    import inspect
    import re
    comments = {}
    for line in inspect.getsource(config_cls).splitlines():
        m = re.match(r"\s+(\w+): \w+ = [^#]+#\s*(.+)", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return {f.name: comments.get(f.name) for f in dataclasses.fields(config_cls)}


def run_main(prog: str, fn: Callable[[], int]) -> int:
    """Runs fn; a DistrnnError becomes `prog: error: message` and its exit code (2 for a UsageError)."""
    try:
        return fn() or 0
    except DistrnnError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
