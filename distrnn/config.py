"""Frozen, named presets and the one function that applies overrides to them.

Every training script keeps its presets as frozen dataclasses in a registry;
command-line overrides go through `override`, which rejects unknown fields,
wrong types and values a field's own check refuses.
"""
import dataclasses
import math
import re
import typing
from typing import Any, Callable, Dict, Mapping

from distrnn.errors import UsageError
from distrnn.names import CELL_KINDS, CELLS, RNN_MODES


FLOAT32_MAX = 3.4028234663852886e38  # the weights are float32: a larger init_scale is inf in them


INT_MAX = 2 ** 31 - 1  # the largest integer any flag, field or variable takes unless it says otherwise (-INT_MAX - 1
                      # the smallest)
_INTEGER = re.compile(r"[+-]?[0-9]+")  # ASCII digits: int() also takes "1_000" and other scripts' digits
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NOT_FINITE = re.compile(r"[+-]?(?:inf|infinity|nan)", re.IGNORECASE)


def parse_value(name: str, kind: type, text: str) -> Any:
    """Turns the text of a command-line override into a field's type (read_number's checks for numbers)."""
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"--{name} takes bool (true or false), got {shown(text)}")
    if kind in (int, float):
        try:
            return read_number(text, kind)
        except ValueError as e:
            raise UsageError(f"--{name} {e}") from None
    return kind(text)


def shown(text: str) -> str:
    """`text` quoted for a one-line message, however long or strange it is."""
    text = str(text)
    return repr(text) if len(text) <= 40 else f"{text[:24]!r}... ({len(text)} characters)"


def read_number(text: str, kind=float, minimum=None, positive: bool = False, maximum=None):
    """The one parser of every number from a flag or an environment variable: `text` as a finite int or
    float in range (an int within int32's unless `minimum` or `maximum` says otherwise); ValueError with the reason
    otherwise. Any text at all ends in a value or that one line: nan (which compares false with
    everything, so a later `value <= 0` check would let it through), inf, a 400-digit integer (int()
    takes it, math.isfinite does not; 5000 digits int() refuses), "1_000" or another script's digits."""
    if not isinstance(text, str):
        text = str(text)
    bare = text.strip()
    if kind is int:
        if not _INTEGER.fullmatch(bare):
            raise ValueError(f"takes an integer, got {shown(text)}")
        maximum = INT_MAX if maximum is None else maximum
        minimum = -INT_MAX - 1 if minimum is None else minimum
        digits = bare.lstrip("+-").lstrip("0")
        value = int(bare, 10) if len(digits) <= 40 else (-1 if bare.startswith("-") else 1) * 10 ** 41
    else:
        if _NOT_FINITE.fullmatch(bare):
            raise ValueError(f"must be a finite number, got {shown(text)}")
        if not _DECIMAL.fullmatch(bare):
            raise ValueError(f"takes a number, got {shown(text)}")
        value = float(bare)
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {shown(text)}")
    if positive and value <= 0:
        raise ValueError(f"must be positive, got {shown(text)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"must be >= {minimum}, got {shown(text)}")
    if maximum is not None and value > maximum:
        raise ValueError(f"must be <= {maximum}, got {shown(text)}")
    return value


def env_number(env: Mapping[str, str], name: str, default, kind=int, **limits):
    """The number in environment variable `name` (read_number's checks), or `default` where it is unset or
    empty; UsageError naming the variable for junk, instead of a ValueError deep in start-up."""
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        return read_number(text, kind, **limits)
    except ValueError as e:
        raise UsageError(f"environment variable {name}={shown(text)}: {str(e).split(', got')[0]}; fix or unset it"
                         ) from None


def field_types(cls) -> Dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def override(config, overrides: Mapping[str, Any]):
    """Returns `config` with `overrides` applied; values may be strings.

    Raises UsageError naming the field for an unknown name, a value of the
    wrong type, or a value the config's `validate` refuses.
    """
    types = field_types(type(config))
    changes = {}
    for name, value in overrides.items():
        if name not in types:
            known = ", ".join(sorted(types))
            raise UsageError(f"unknown config field {name!r}; fields are: {known}")
        kind = types[name]
        if isinstance(value, str) and kind is not str:
            value = parse_value(name, kind, value)
        elif kind in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = parse_value(name, kind, repr(value))  # a library caller's number: the same checks
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UsageError(f"config field {name!r} takes {kind.__name__}, got {shown(repr(value))}")
        if kind is float and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise UsageError(f"--{name} must be a finite number within float32's range (|x| <= 3.4e38), got "
                             f"{value!r}")
        changes[name] = value
    new = dataclasses.replace(config, **changes)
    validate = getattr(new, "validate", None)
    if validate is not None:
        validate()
    return new


def check(condition: bool, message: str) -> None:
    """Raises UsageError(message) unless condition holds; for config validation."""
    if not condition:
        raise UsageError(message)




MAX_LAYERS = 100  # deeper than any published recurrent stack (GNMT: 8); a typo's million layers would build for hours


def check_recurrence(cell: str, rnn_mode: str, use_peepholes: bool, num_layers: int) -> None:
    """The cell, depth and unrolling-mode fields every recurrent config has: known, in range, and able to
    run together."""
    check(num_layers <= MAX_LAYERS, f"num_layers must be at most {MAX_LAYERS}, got {num_layers}")
    check(rnn_mode in RNN_MODES, f"rnn_mode must be one of {', '.join(RNN_MODES)}, got {rnn_mode!r}")
    check(cell in CELLS, f"cell must be one of {', '.join(CELLS)}, got {cell!r}")
    problem = CELL_KINDS[cell].mode_problem(rnn_mode, use_peepholes)
    check(problem is None, problem)


class Registry:
    """Named presets of one config class."""

    def __init__(self):
        self._presets: Dict[str, Callable[[], Any]] = {}

    def register(self, name: str, config) -> None:
        self._presets[name] = config

    def names(self):
        return sorted(self._presets)

    def get(self, name: str):
        if name not in self._presets:
            raise UsageError(f"unknown --config {name!r}; choose one of: {', '.join(self.names())}")
        return self._presets[name]
