"""Shared pieces of the command-line entry points.

Every entry point parses flags, then calls a library function inside
`run_main`, which turns a DistrnnError into one line on stderr and its exit code (2 for bad input).
"""
import argparse
import dataclasses
import difflib
import os
import shlex
import sys
from typing import Callable, Dict, List

from distrnn import cpu, names
from distrnn.config import field_types, override, read_number
from distrnn.errors import DistrnnError, UsageError


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


def number(kind=float, minimum=None, positive: bool = False, maximum=None):
    """An argparse type for a finite int or float in range: nan, inf, a negative count or a fraction
    above 1 stops at parsing, in one line, before anything runs (float('nan') compares false with
    everything, so a later `value <= 0` check would let it through)."""
    def parse(text: str):
        try:
            return read_number(text, kind, minimum, positive, maximum)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


COUNT = number(int, minimum=0)             # 0 meaning none, or not set
POSITIVE_INT = number(int, positive=True)
FRACTION = number(float, positive=True, maximum=1)  # of memory in use: (0, 1]
SAMPLE_SECONDS = number(float, minimum=0.1)  # a shorter interval would keep a core busy sampling


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


def add_job_flags(parser: argparse.ArgumentParser, job: str, presets, default_config: str, data_help: str):
    """The flags every training entry point shares (distrnn.training.JobOptions); returns the groups
    {"ranks", "memory"} so an entry point can add its own flags to them."""
    parser.add_argument("--config", default=default_config,
                        help=f"preset: {', '.join(presets.names())} (default {default_config})")
    parser.add_argument("--list_configs", action="store_true", help="print the presets and what they cost, and exit")
    parser.add_argument("--data_path", help=data_help)
    parser.add_argument("--save_path", help="where checkpoints, TensorBoard logs, plots and config.json go "
                        f"(default runs/{job}-CONFIG-TIME)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --save_path "
                        "(starts fresh when there is none)")
    parser.add_argument("--max_epochs", type=COUNT, default=0,
                        help="stop after N epochs in all (default: the preset's)")
    parser.add_argument("--max_steps", type=COUNT, default=0, help="stop after N training steps in all")
    parser.add_argument("--metrics_json", help="write the final figures to this JSON file")
    parser.add_argument("--seed", type=number(int, minimum=0, maximum=2**31 - 1), default=1,
                        help="seed for weights, dropout and shuffling (default 1)")
    parser.add_argument("--checkpoint_every", type=POSITIVE_INT, default=500,
                        help="steps between checkpoints; one is also saved after every epoch (default 500)")
    devices = parser.add_argument_group("devices (model parallelism)")
    devices.add_argument("--devices", help="comma-separated devices for the model's parts, e.g. /gpu:0,/gpu:1")
    devices.add_argument("--num_gpus", type=COUNT, default=0, help="use /gpu:0 ... /gpu:N-1")
    # More logical devices than model parts only cost start-up time (100,000 took 100 s to create).
    devices.add_argument("--virtual_devices", type=number(int, minimum=0, maximum=64), default=0,
                         help="split the CPU into N logical devices (at most 64) and place the model on them")
    devices.add_argument("--strategy", default="round_robin", choices=names.STRATEGIES,
                         help="how parts are mapped to devices (default round_robin)")
    devices.add_argument("--placement", default="sequential", choices=names.PLACEMENTS,
                         help="sequential: one layer after another; pipeline: a wavefront so all devices work at "
                              "once (default sequential)")
    ranks = parser.add_argument_group("several processes (under horovodrun or srun)")
    ranks.add_argument("--gpus_per_rank", type=COUNT, default=0,
                       help="GPUs each rank owns (rank r: local GPUs r*K ... r*K+K-1), its layers placed across them; "
                            "default one GPU per rank")
    ranks.add_argument("--global_batch_size", type=COUNT, default=0,
                       help="rows of one step over all ranks, split evenly (default: batch_size x ranks)")
    ranks.add_argument("--lr_scaling", default="none", choices=names.LR_SCALINGS,
                       help="scale the learning rate with global batch / batch_size (default none: see "
                            "docs/horovod.md)")
    ranks.add_argument("--lr_warmup_steps", type=COUNT, default=0,
                       help="reach the scaled learning rate linearly over N steps")
    mem = parser.add_argument_group("memory")
    mem.add_argument("--mem_warn", type=FRACTION, default=0.90,
                     help="warn once when a GPU's or the host's memory in use reaches this fraction (default 0.90)")
    mem.add_argument("--mem_stop", type=FRACTION, default=0.97,
                     help="save a checkpoint and exit with code 76 when it reaches this fraction (default 0.97)")
    mem.add_argument("--mem_interval", type=SAMPLE_SECONDS, default=5.0,
                     help="seconds between memory samples (default 5)")
    mem.add_argument("--recompute", type=COUNT, default=0, metavar="K",
                     help="backprop through time keeps every K-th LSTM state and recomputes the rest (K near "
                          "sqrt(num_steps): least memory; about one more forward pass of time)")
    mem.add_argument("--swap_memory", action="store_true",
                     help="backprop through time keeps the LSTM activations in host memory, fetched back segment by "
                          "segment (GPU memory of about two segments)")
    return {"ranks": ranks, "memory": mem}


def check_job_flags(args: argparse.Namespace) -> None:
    """Refuses combinations of the shared flags that cannot run, before TensorFlow is imported."""
    # Each flag alone is checked where it is parsed (cli.number); here, what they mean together.
    if args.mem_warn > args.mem_stop:
        raise UsageError(f"--mem_warn {args.mem_warn:g} is above --mem_stop {args.mem_stop:g}: the warning must "
                         "come first; lower --mem_warn")
    if args.recompute and args.swap_memory:
        raise UsageError("--recompute and --swap_memory are alternatives: recompute keeps less, swap keeps all "
                         "of it on the host; pass one of them")


def job_options(args: argparse.Namespace, options_cls):
    """The run options dataclass filled from the flags of the same names (config_name from --config)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(options_cls) if hasattr(args, f.name)}
    return options_cls(config_name=args.config, **values)


def list_configs(presets, describe: Callable[[str], str]) -> None:
    """Each preset's name, `describe(name)` (its result and cost) and its fields."""
    for name in presets.names():
        fields = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(presets.get(name)).items())
        print(f"{name:9s} {describe(name)}\n          {fields}")


def run_training(argv: List[str], build_parser, presets, describe: Callable[[str], str], train_module: str) -> int:
    """A training entry point: --list_configs, or the flags checked, the preset overridden and
    `train_module`'s train_and_evaluate run with its RunOptions; returns the exit code."""
    parser, names = build_parser()
    args = parser.parse_args(argv)
    if args.list_configs:
        list_configs(presets, describe)
        return 0
    check_job_flags(args)
    config = override(presets.get(args.config), config_overrides(args, names))
    cpu.choose_onednn()  # before TensorFlow loads: it decides once, at load
    import importlib
    train = importlib.import_module(train_module)  # TensorFlow is imported only once the flags are known to be good
    return train.train_and_evaluate(config, job_options(args, train.RunOptions))["interrupted"] or 0


def run_main(prog: str, fn: Callable[[], int]) -> int:
    """Runs fn, the one boundary of every entry point: a DistrnnError becomes `prog: error: message` and
    its exit code (2 for a UsageError), Ctrl-C before a job is running (TensorFlow loading, a download)
    one line and 130, and a closed output pipe (`| head`) a quiet exit. Anything else is a bug and keeps
    its traceback."""
    try:
        return fn() or 0
    except DistrnnError as e:
        print(f"{prog}: {e.label}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: stopped: interrupted (Ctrl-C) before a run began; nothing was saved", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else flushing stdout at exit fails again
        return 141  # 128 + SIGPIPE, as a shell reports a command whose reader went away
