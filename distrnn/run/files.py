"""Every file distrnn writes goes through here: the one way to write (whole at its final path or absent,
the operating system's refusal one line and exit 74), and the rule that a save path's files belong to
the run that holds it.

    check_output(args.per_line, "--per_line")          # before any work: not inside a run, writable
    write_text(args.per_line, text)                     # atomic; SaveFailed (74) on a full disk
    with new_directory(export_dir) as tmp: ...          # complete at export_dir, or absent

TensorFlow-free: commands check their outputs before TensorFlow loads.
"""
import contextlib
import errno
import json
import os
import secrets
import shutil
from typing import Iterator, Optional

from distrnn.errors import SaveFailed, UsageError

LOCK = ".lock"
# What a training run writes in its save path (distrnn.run.checkpoints, distrnn.run.outputs, the jobs' plots):
# no other command, and no other output of the run itself, may write these.
RUN_FILES = (LOCK, "config.json", "vocab.txt", "checkpoints", "best", "tensorboard",
             "perplexity.png", "accuracy.png", "confusion_matrix.png", "misclassified.png")


def os_reason(error: OSError) -> str:
    """What the operating system said, without Python's decoration: "No space left on device"."""
    return error.strerror or str(error) or type(error).__name__


# --- whose directory a path is in ------------------------------------------------------------------

def is_save_path(directory: str) -> bool:
    """A training run's save path: its config.json beside checkpoints/ or best/, or its lock beside another
    of its files (a lock alone is not enough: other tools keep a .lock, pytest's temporary directories too)."""
    def has(name: str) -> bool:
        return os.path.lexists(os.path.join(directory, name))
    if not os.path.isdir(directory):
        return False
    return (has("config.json") and (has("checkpoints") or has("best"))) or \
        (has(LOCK) and any(has(name) for name in RUN_FILES if name != LOCK))


def save_path_of(path: str) -> Optional[str]:
    """The save path `path` lies in (itself or its nearest such parent, symlinks resolved, so that a link
    into a run is caught), or None."""
    here = os.path.realpath(path)
    while True:
        if is_save_path(here):
            return here
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent


def check_output(path: Optional[str], flag: str, example: str = "metrics.json", own_run: Optional[str] = None) -> None:
    """The one rule for a file a command will write, checked before any work is done: not inside a save
    path (a run's files are its own), except a name of the run's own choosing for the run `own_run`
    (training's --metrics_json SAVE_PATH/metrics.json, which is not one of RUN_FILES); not a directory;
    in a writable directory. UsageError (exit 2) otherwise, nothing written."""
    if not path:
        return
    run = save_path_of(path)
    own = own_run and os.path.realpath(own_run)
    if own and (os.path.realpath(path) + os.sep).startswith(own + os.sep):
        run = own  # a fresh run's save path holds only its lock yet
    if run is not None:
        inside = os.path.relpath(os.path.realpath(path), run)
        first = inside.split(os.sep)[0]
        if run != own:
            raise UsageError(f"{flag} {path} is inside the save path {run} of a training run, whose files are its "
                             f"own; write it outside that directory, e.g. {example}")
        if inside == "." or first in RUN_FILES:
            raise UsageError(f"{flag} {path} is the run's own {first if inside != '.' else 'save path'}; name "
                             f"another file, e.g. {os.path.join(own_run, example)}")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a directory; name a file in it, e.g. {os.path.join(path, example)}")
    directory = os.path.dirname(os.path.abspath(path))
    if own and os.path.realpath(directory) == own and not os.path.lexists(directory):
        return  # checked before the run makes its save path, which says so when it cannot
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise UsageError(f"cannot write {flag} {path}: {directory} is not a writable directory")
    if os.path.lexists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"cannot write {flag} {path}: the file is not writable; make it writable or name another "
                         "file")


def check_tensorflow_path(path: str, flag: str) -> None:
    """A path TensorFlow's file functions will open (checkpoints, summaries, a SavedModel): they take UTF-8
    only, and a name of other bytes (as Linux allows, and Python hands over as surrogate escapes) fails
    deep inside them."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = os.fsencode(path[e.start])[0]
        raise UsageError(f"{flag} {path.encode('utf-8', 'backslashreplace').decode()} is not UTF-8 (byte "
                         f"{byte:#04x}): TensorFlow opens UTF-8 paths only; name a directory whose name is") from None


def check_save_path(save_path: str) -> None:
    """A training run's --save_path: a run's own directory (new, or one to resume), not a place inside
    another run's (SAVE_PATH/checkpoints would mix two runs' files)."""
    check_tensorflow_path(save_path, "--save_path")
    run = save_path_of(save_path)
    if run is not None and run != os.path.realpath(save_path):
        raise UsageError(f"--save_path {save_path} is inside the save path {run} of another run, whose files are its "
                         "own; choose a directory outside it")


def check_new_directory(path: str, flag: str) -> str:
    """A directory a command will create whole (an export): not inside a save path, absent or an empty
    directory (through a symlink too), its parent a writable directory; returns its real path."""
    check_tensorflow_path(path, flag)
    target = os.path.realpath(path)
    run = save_path_of(os.path.dirname(target))
    if run is not None:
        raise UsageError(f"{flag} {path} is inside the save path {run} of a training run, whose files are its own; "
                         "name a directory outside it")
    if os.path.lexists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise UsageError(f"{flag} {path} already exists and is not an empty directory: name a new one (what is "
                         "there is kept)")
    parent = os.path.dirname(target)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"cannot create {flag} {path}: {parent} is not a writable directory")
    return target


# --- writing --------------------------------------------------------------------------------------

def _temporary_name(path: str) -> str:
    """A name beside `path` that no other writer uses (two commands writing one file at once each
    rename a whole file of their own)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")


def _remove(path: str) -> None:
    try:
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    except OSError:
        pass


def save_failed(path: str, error: OSError, what: str = "") -> SaveFailed:
    return SaveFailed(f"could not write {what or path} ({os_reason(error)}); free space there or make it writable "
                      "(nothing partial was left, and earlier files are as they were)")


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
    """Yields a temporary path beside `path` to write; once the block ends it is synced and renamed onto
    `path` (a reader sees the old file or the new, never half of one). An OSError in the block or the
    rename (a full disk, a read-only or missing directory, a symlink loop) becomes SaveFailed with the
    old file untouched; any other exception leaves no temporary file either."""
    tmp = _temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # on disk before it has the name: a power cut leaves old or new, not empty
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise save_failed(path, e) from None
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    """`text` written whole at `path` or not at all (replacing)."""
    with replacing(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def copy_stream(source, path: str) -> None:
    """`source` (a readable binary stream) copied to a new file `path`: its read errors are its own (a
    damaged archive), the writes' are SaveFailed (a full disk)."""
    try:
        out = open(path, "wb", buffering=0)  # unbuffered: every write is tried here, none left to the close
    except OSError as e:
        raise save_failed(path, e) from None
    with out:
        while True:
            chunk = source.read(1 << 20)
            if not chunk:
                return
            try:
                while chunk:  # a raw write may take part of it
                    chunk = chunk[out.write(chunk):]
            except OSError as e:
                raise save_failed(path, e) from None


@contextlib.contextmanager
def new_directory(target: str, failures=(), reason=str) -> Iterator[str]:
    """Yields a temporary directory beside `target` (checked by check_new_directory) to fill; it becomes
    `target` by a rename, so the result is complete at `target` or absent. An OSError, or one of
    `failures` (a library's own write errors, described by `reason`), becomes SaveFailed."""
    parent = os.path.dirname(target)
    tmp = os.path.join(parent, f".{os.path.basename(target)}.{secrets.token_hex(4)}.tmp")
    try:
        os.mkdir(tmp)
        yield tmp
        if os.path.isdir(target):
            os.rmdir(target)  # empty (checked); os.replace cannot put a directory over one
        os.replace(tmp, target)
    except OSError as e:
        _remove(tmp)
        raise save_failed(target, e) from None
    except failures as e:
        _remove(tmp)
        raise SaveFailed(f"could not write {target} ({reason(e)}); free space there or make it writable (nothing "
                         "partial was left)") from None
    except BaseException:
        _remove(tmp)
        raise


def is_full_disk(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


def save_figure(fig, path: str) -> None:
    """Saves a matplotlib figure as PNG, whole or not at all (replacing: SaveFailed on a full disk),
    and closes it."""
    import matplotlib.pyplot as plt
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def save_lines(path: str, lines: dict, title: str, xlabel: str, ylabel: str, log_x: int = 0, log_y: bool = False,
               ylim: Optional[tuple] = None, rule: Optional[float] = None) -> None:
    """A line a label of `lines` (label: [(x, y), ...]; labels without points left out) as a PNG: the
    training curves and the scaling plan draw through here. log_x: the x axis's log base (0: linear); rule: a
    dotted horizontal line at that y."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, points in lines.items():
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    if log_x:
        ax.set_xscale("log", base=log_x)
    if log_y:
        ax.set_yscale("log")
    if ylim:
        ax.set_ylim(*ylim)
    if rule is not None:
        ax.axhline(rule, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
