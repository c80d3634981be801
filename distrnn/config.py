"""Frozen, named presets and the one function that applies overrides to them.

Every training script keeps its presets as frozen dataclasses in a registry;
command-line overrides go through `override`, which rejects unknown fields,
wrong types and values a field's own check refuses.
"""
import dataclasses
import math
import typing
from typing import Any, Callable, Dict, Mapping

from distrnn.errors import UsageError
from distrnn.names import CELLS, RNN_MODES


FLOAT32_MAX = 3.4028234663852886e38  # the weights are float32: a larger init_scale is inf in them


def parse_value(name: str, kind: type, text: str) -> Any:
    """Turns the text of a command-line override into a field's type."""
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text, 10)
        return kind(text)
    except ValueError:
        raise UsageError(f"--{name} takes {kind.__name__}, got {text!r}") from None


def read_number(text: str, kind=float, minimum=None, positive: bool = False, maximum=None):
    """`text` as a finite int or float in range; ValueError with the reason otherwise (nan compares
    false with everything, so a later `value <= 0` check would let it through)."""
    try:
        value = int(text, 10) if kind is int else float(text)
    except ValueError:
        raise ValueError(f"takes {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {text!r}")
    if positive and value <= 0:
        raise ValueError(f"must be positive, got {text!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"must be >= {minimum}, got {text!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"must be <= {maximum}, got {text!r}")
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
        raise UsageError(f"environment variable {name}={text!r}: {str(e).split(', got')[0]}; fix or unset it") from None


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
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UsageError(f"config field {name!r} takes {kind.__name__}, got {value!r}")
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




def check_recurrence(cell: str, rnn_mode: str, use_peepholes: bool) -> None:
    """The cell and unrolling-mode fields every recurrent config has: known, and able to run together."""
    check(rnn_mode in RNN_MODES, f"rnn_mode must be one of {', '.join(RNN_MODES)}, got {rnn_mode!r}")
    check(cell in CELLS, f"cell must be one of {', '.join(CELLS)}, got {cell!r}")
    check(not use_peepholes or cell == "lstm",
          f"use_peepholes needs cell lstm, got cell {cell!r}; drop --use_peepholes")
    check(rnn_mode not in ("block", "cudnn") or cell == "lstm",
          f"rnn_mode {rnn_mode} runs LSTM cells only; use --rnn_mode auto, static or dynamic for {cell}")
    check(not (rnn_mode == "cudnn" and use_peepholes),
          "cuDNN has no peephole LSTM; use --rnn_mode block, static or dynamic with --use_peepholes")


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
