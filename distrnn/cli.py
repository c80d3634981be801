"""Shared pieces of the command-line entry points.

Every entry point parses flags, then calls a library function inside
`run_main`, which turns a DistrnnError into one line on stderr and its exit code (2 for bad input).
"""
import argparse
import contextlib
import dataclasses
import difflib
import importlib
import os
import shlex
import signal
import sys
import threading
from typing import Callable, Dict, List

from distrnn import compat, cpu
from distrnn.config import field_types, override
from distrnn.errors import DistrnnError, Signalled, UsageError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad flags as a UsageError (one line, exit 2) and suggests close names,
    and reads flags from files (`@FILE`, see read_flag_files). Abbreviations are refused: a typo such
    as --num_layer would silently mean --num_layers, and an abbreviation that is unique today becomes
    ambiguous when a flag is added."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(read_flag_files(sys.argv[1:] if args is None else list(args)), namespace)

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


def read_flag_files(args: List[str], depth: int = 0) -> List[str]:
    """`@FILE` replaced by the flags in FILE: shell words, any number a line, `#` to the end of a
    line a comment, `@OTHER` inside read in turn (argparse's fromfile_prefix_chars reads one whole
    line as one argument and lets a file that is not text end in a traceback). Read at every start,
    so editing the file changes what a requeued Slurm job runs next."""
    expanded = []
    for arg in args:
        if not arg.startswith("@") or arg == "@":
            expanded.append(arg)
            continue
        path = arg[1:]
        if depth >= 8:
            raise UsageError(f"flag file {path} is nested 8 files deep: does a flag file name itself?")
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise UsageError(f"cannot read flag file {path} ({e.strerror}): give @FILE, a readable text file of "
                             "flags") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"flag file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                             f"{e.start}): write the flags as plain text") from None
        for number, line in enumerate(lines, 1):
            try:
                words = shlex.split(line, comments=True)
            except ValueError as e:
                raise UsageError(f"flag file {path}, line {number}: {e} (quote values with '...')") from None
            expanded.extend(read_flag_files(words, depth + 1))
    return expanded


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


def add_job_flags(parser: argparse.ArgumentParser, job: str, presets, default_config: str, data_help: str,
                  options_cls) -> None:
    """--config, --list_configs, and a flag for every field of the job's options dataclass (a
    distrnn.options.JobOptions), its type, group, default and help taken from the field."""
    parser.add_argument("--config", default=default_config,
                        help=f"preset: {', '.join(presets.names())} (default {default_config})")
    parser.add_argument("--list_configs", action="store_true", help="print the presets and what they cost, and exit")
    groups = {None: parser}
    for field in dataclasses.fields(options_cls):
        if not field.metadata:
            continue  # not a flag (config_name comes from --config)
        meta = field.metadata
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        shown = meta["default_text"] if meta["default_text"] is not None else field.default
        template = meta["help"] + (f" (default {shown})" if shown not in ("", False) else "")
        text = template.format(data_help=data_help, job=job)
        if field.type in (bool, "bool"):
            groups[meta["group"]].add_argument(f"--{field.name}", action="store_true", help=text)
        else:
            groups[meta["group"]].add_argument(f"--{field.name}", type=meta["type"], default=field.default,
                                               choices=meta["choices"], metavar=meta["metavar"], help=text)


def add_saved_run_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that name a trained PTB run, for the commands that use one (generate, score, export)."""
    parser.add_argument("--save_path", required=True, help="the --save_path of a python -m distrnn.ptb run")
    parser.add_argument("--checkpoint", default="last", choices=("last", "best"),
                        help="the last checkpoint, or the best epoch's by validation perplexity (default last)")
    parser.add_argument("--data_path", help="the data the run trained on: rebuilds the run's vocab.txt where it "
                        "lacks one (a run from before distrnn kept it)")


def job_options(args: argparse.Namespace, options_cls):
    """The run options dataclass filled from the flags of the same names (config_name from --config)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(options_cls) if hasattr(args, f.name)}
    return options_cls(config_name=args.config, **values)


def list_configs(presets, describe: Callable[[str], str]) -> None:
    """Each preset's name, `describe(name)` (its result and cost) and its fields."""
    for name in presets.names():
        fields = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(presets.get(name)).items())
        print(f"{name:9s} {describe(name)}\n          {fields}")


def job_parser(package: str, description: str, default_config: str, data_help: str, config_cls):
    """A training command's parser (`python -m package`): --config and --list_configs over `package`.configs'
    PRESETS, a flag for every field of its RunOptions and of config_cls; returns (parser, the config's flag
    names)."""
    configs = importlib.import_module(f"{package}.configs")
    parser = ArgumentParser(prog=f"python -m {package}", description=description)
    add_job_flags(parser, package.rsplit(".", 1)[-1], configs.PRESETS, default_config, data_help, configs.RunOptions)
    return parser, add_config_flags(parser, config_cls, field_comments(config_cls))


def train_main(package: str, build_parser, describe: Callable[[str], str], argv=None) -> int:
    """A training command's main: train_command inside run_main, TensorFlow's C++ start-up chatter hidden."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    return run_main(package, lambda: train_command(sys.argv[1:] if argv is None else argv, build_parser, describe,
                                                   package))


def train_command(argv: List[str], build_parser, describe: Callable[[str], str], package: str) -> int:
    """A training entry point: --list_configs, or the flags checked (the job's RunOptions, from
    `package`.configs, checks them as they mean together), the preset overridden and `package`.job's run
    called; returns the exit code. TensorFlow is imported only once the flags are known to be good."""
    configs = importlib.import_module(f"{package}.configs")
    parser, names = build_parser()
    args = parser.parse_args(argv)
    if args.list_configs:
        list_configs(configs.PRESETS, describe)
        return 0
    options = job_options(args, configs.RunOptions)
    config = override(configs.PRESETS.get(args.config), config_overrides(args, names))
    load_tensorflow()
    return importlib.import_module(f"{package}.job").run(config, options)["interrupted"] or 0


def load_tensorflow() -> None:
    """Every entry point's start of TensorFlow, once its flags are known to be good: oneDNN chosen first
    (TensorFlow decides once, at load), then TensorFlow imported with its start-up log lines held to
    TF_CPP_MIN_LOG_LEVEL (compat.import_tensorflow), so that an error stays one line on every version."""
    cpu.choose_onednn()
    compat.import_tensorflow()


def run_main(prog: str, fn: Callable[[], int]) -> int:
    """Runs fn, the one boundary of every entry point: a DistrnnError becomes `prog: error: message` and
    its exit code (2 for a UsageError); Ctrl-C, SIGTERM or SIGUSR1 before a job's own handling (TensorFlow
    loading, a download, a model-use command) one line and 128 + the signal; a closed output pipe (`| head`)
    a quiet exit. Anything else is a bug and keeps its traceback."""
    # What is printed names the user's paths, which Linux lets be any bytes: shown escaped, never refused
    # by an encoder (stderr does this already). Each line leaves in one write, flushed at its end: unbuffered
    # (python -u, PYTHONUNBUFFERED, as the launchers run it) print writes a line and its newline apart, and
    # ranks sharing a terminal or a log merged their lines ("rank 1: ...rank 0: ...", then two newlines).
    for stream, errors in ((sys.stdout, "backslashreplace"), (sys.stderr, None)):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=errors, line_buffering=True, write_through=False)
    with raising_signals():
        try:
            return fn() or 0
        except DistrnnError as e:
            print(f"{prog}: {e.label}: {one_line(str(e))}", file=sys.stderr)
            return e.exit_code
        except (KeyboardInterrupt, Signalled) as e:
            signum = getattr(e, "signum", signal.SIGINT)
            how = " (Ctrl-C)" if signum == signal.SIGINT else ""
            print(f"{prog}: stopped: interrupted by {signal.Signals(signum).name}{how} before a run began; nothing "
                  "was saved, nothing partial was written", file=sys.stderr)
            return 128 + signum
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else flushing stdout at exit fails again
            return 141  # 128 + SIGPIPE, as a shell reports a command whose reader went away


def one_line(text: str) -> str:
    """`text` with whatever would break it into lines (a newline in a path a user gave) shown escaped."""
    return "".join(repr(c)[1:-1] if c in _LINE_BREAKS else c for c in text)


_LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")  # what str.splitlines splits on


@contextlib.contextmanager
def raising_signals():
    """SIGTERM and SIGUSR1 raise Signalled from here on (SIGINT raises KeyboardInterrupt already), unless
    ignored when the process started (a background command of a script, nohup): their default would kill
    the process with no word. Put back on the way out where nothing has replaced them since (a stopped
    run ignores them until it exits: distrnn.run.stops.ignore_launcher_signals)."""
    def handler(signum, frame):
        raise Signalled(signum)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, before in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, before)
