"""The one place where distrnn meets what differs between the TensorFlows it runs on (2.15.1 to 2.21.0,
Keras 2 or 3, numpy 1 or 2, Python 3.9 to 3.13). The rest of the code is written once, against what all
of them share: distrnn's cells, optimizers and models are tf.Modules over tf.Variables, so no Keras
object (whose variables, optimizers and checkpoint layout Keras 3 changed) is ever made.

What moved, and how it is met here:
- TensorFlow 2.21 logs through absl, and before absl is initialised its INFO lines ("oneDNN custom
  operations are on", the CPU feature notice) reach stderr whatever TF_CPP_MIN_LOG_LEVEL says (measured:
  two such messages at every start, at every level); and 2.16 to 2.21 log at ERROR level, in every PTB
  run, that oneDNN falls back to Eigen for int32 (a notice: nothing failed; measured with 2.16.2, 2.17.1,
  2.18.1, 2.20.0 and 2.21.0, in TensorFlow's own log format before 2.21). `import_tensorflow`
  holds those back (`LogFilter`), so an error is still one line. 2.15 obeys the level itself and the
  filter finds nothing.
- tensorflow-cpu >= 2.20 no longer installs TensorBoard, and then `tf.summary.scalar` raises
  TBNotInstalledError: `tensorboard_missing` says so before a run starts, and the run writes no logs
  instead of failing (tensorboard is one of distrnn's dependencies, so only a --no-deps install meets it).
- Horovod 0.28.1 (its last release) builds against TensorFlow up to 2.18 (measured, docs/stacks.md), not
  against 2.19 or newer: where it cannot be loaded, `horovod_missing` says which stack to use.
"""
import importlib.util
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from typing import Dict, Optional

# The start of a log message, in either format: absl's (TensorFlow 2.21 before absl is initialised:
# severity, date 0000, HH:MM:EPOCH_SECONDS.micros, thread, file:line) and TensorFlow's own (2.15 to 2.20:
# date, time, severity, path:line).
_LOG_LINE = re.compile(rb"^(?:(?P<absl>[IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ ]+:\d+\] "
                       rb"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: (?P<tf>[IWEF]) [^ ]+:\d+\] )")
_ABSL_PREAMBLE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_SEVERITY = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}
# Messages TensorFlow logs as errors though nothing failed, dropped at every level.
NOTICES = (b"oneDNN supports DT_INT32 only on platforms with AVX-512. Falling back to the default Eigen-based",)


def min_log_level(environ=None) -> int:
    """TF_CPP_MIN_LOG_LEVEL as TensorFlow reads it (0 where unset or not a number)."""
    value = (os.environ if environ is None else environ).get("TF_CPP_MIN_LOG_LEVEL", "0")
    value = value.strip()
    # ASCII digits only: str.isdigit() also passes "²", which int() refuses; TensorFlow reads junk as 0.
    return int(value) if re.fullmatch(r"[0-9]{1,3}", value) else 0


class LogFilter:
    """Passes through what TensorFlow's C++ side writes to stderr but the log messages below `level` and the
    NOTICES (each with its continuation lines: the lines up to the next message), and absl's preamble.
    Fed whole lines."""

    def __init__(self, level: int):
        self.level = level
        self.dropping = False

    def keep(self, line: bytes) -> bool:
        if line.rstrip(b"\r\n") == _ABSL_PREAMBLE:
            return False
        start = _LOG_LINE.match(line)
        if start:
            severity = _SEVERITY[start.group("absl") or start.group("tf")]
            self.dropping = severity < self.level or any(n in line for n in NOTICES)
        return not self.dropping

    def filter(self, text: bytes) -> bytes:
        return b"".join(line for line in text.splitlines(keepends=True) if self.keep(line))


def import_tensorflow():
    """`import tensorflow`, with what TensorFlow's C++ side writes to stderr from then on held to
    TF_CPP_MIN_LOG_LEVEL (LogFilter). Every entry point calls it (after cpu.choose_onednn) before any
    module imports TensorFlow; the filter starts once, where the level is above 0.

    File descriptor 2, where the C++ side writes, becomes a pipe into a small filter process, which
    forwards what passes to the real stderr. A process, not a thread: when TensorFlow aborts (a failed
    CHECK) the filter still forwards the last lines and exits at the end of the pipe; and not a child of
    distrnn's (_DETACH). Python's own sys.stderr keeps the real stderr, so a line of Python's (a warning,
    a traceback, distrnn's one-line error) is never taken for the continuation of a log message held back."""
    global _filter
    if _filter is None and "tensorflow" not in sys.modules and min_log_level() > 0 and sys.stderr is not None:
        try:
            _filter = _start_filter(min_log_level())
        except OSError:  # no stderr to filter (2>&-), or no process to spare: TensorFlow writes as it would
            pass
    import tensorflow
    return tensorflow


_filter = None  # the real stderr's file descriptor, once the filter runs


# The filter is started through sh, which leaves it running and exits: so it is no one's child. A launcher
# that stops a rank by signalling the rank's children (horovodrun terminates them, then waits 5 s, then
# freezes the rank) finds none, as before the filter; it ends by itself when the rank's stderr closes.
_DETACH = 'exec 3<&0; "$0" -c "$1" "$2" 0<&3 3<&- &'
_FILTER = "from distrnn.compat import _filter_main; _filter_main()"


def _start_filter(level: int) -> int:
    """Starts the filter process; returns the file descriptor of the real stderr."""
    sys.stderr.flush()
    real = os.dup(2)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    # Its own session: Ctrl-C and a job's signals reach distrnn, which exits; the filter ends with the pipe.
    launcher = subprocess.Popen(["/bin/sh", "-c", _DETACH, sys.executable, _FILTER, str(level)],
                                stdin=subprocess.PIPE, stdout=real, stderr=real, env=env, start_new_session=True)
    os.dup2(launcher.stdin.fileno(), 2)
    launcher.stdin.close()
    launcher.wait()
    sys.stderr = os.fdopen(real, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    return real


def _filter_main() -> None:
    """The filter process: stdin (distrnn's file descriptor 2) to stdout (the real stderr), line by line."""
    log_filter = LogFilter(int(sys.argv[1]))
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        if log_filter.keep(line):
            out.write(line)
            out.flush()


def version(distribution: str) -> Optional[str]:
    """The installed version of a distribution, or None."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def tensorboard_missing() -> Optional[str]:
    """Why TensorBoard logs cannot be written here (None where they can): tf.summary needs the tensorboard
    package, which tensorflow-cpu >= 2.20 no longer installs."""
    if importlib.util.find_spec("tensorboard") is None:
        return "the tensorboard package is not installed (pip install tensorboard)"
    return None


HOROVOD_TF_MAX = (2, 18)  # the newest TensorFlow minor that Horovod 0.28.1 builds against (measured)
# Where TensorFlow comes from: PyPI's CPU and GPU builds, NVIDIA's containers ("tensorflow"), nightlies.
TENSORFLOW_DISTRIBUTIONS = ("tensorflow-cpu", "tensorflow", "tensorflow-gpu", "tensorflow-intel", "tf-nightly",
                            "tf-nightly-cpu")


def tensorflow_version() -> Optional[str]:
    """The installed TensorFlow's version, read from the package metadata (TensorFlow is not loaded)."""
    for distribution in TENSORFLOW_DISTRIBUTIONS:
        found = version(distribution)
        if found:
            return found
    return None


def stack() -> Dict[str, Optional[str]]:
    """The versions of what distrnn runs on, without loading any of it (None: not installed)."""
    return {"python": platform.python_version(), "tensorflow": tensorflow_version(), "keras": version("keras"),
            "numpy": version("numpy"), "tensorboard": version("tensorboard"), "horovod": version("horovod")}


def format_stack(s: Dict[str, Optional[str]]) -> str:
    tf = s["tensorflow"] or "none"
    keras = f" (Keras {s['keras']})" if s["keras"] else ""
    return (f"Python {s['python']}, TensorFlow {tf}{keras}, numpy {s['numpy'] or 'none'}, "
            f"TensorBoard {s['tensorboard'] or 'none'}, Horovod {s['horovod'] or 'none'}")


def _minor(release: str):
    numbers = re.match(r"(\d+)\.(\d+)", release or "")
    return (int(numbers.group(1)), int(numbers.group(2))) if numbers else None


def horovod_missing(error: BaseException = None) -> str:
    """Why a job launched as several ranks cannot use Horovod here, and which stack can: one line."""
    tf = tensorflow_version()
    use = ("use the Horovod stack (bash launch/setup.sh: TensorFlow 2.15.1 with Horovod 0.28.1) or NVIDIA's "
           "TensorFlow container, which carries its own Horovod (docs/stacks.md)")
    other = "start it on TensorFlow's own collectives (--engine tensorflow, docs/engines.md)"
    if version("horovod") is None:
        minor = _minor(tf)
        if minor and minor > HOROVOD_TF_MAX:
            return (f"launched as several ranks, but there is no Horovod for TensorFlow {tf}: Horovod 0.28.1, its "
                    f"last release, builds against TensorFlow <= {'.'.join(map(str, HOROVOD_TF_MAX))}; {use}, or "
                    f"{other}")
        return ("launched as several ranks, but Horovod is not installed; run bash launch/setup.sh (it builds "
                f"Horovod against TensorFlow {tf}), or {use}, or {other}")
    reason = str(error).strip().splitlines()[0][:160] if error else "it does not load"
    return (f"launched as several ranks, but Horovod {version('horovod')} cannot be loaded with TensorFlow {tf} "
            f"({reason}): it must be compiled against the TensorFlow it runs with: bash launch/setup.sh rebuilds "
            f"it, or {use}, or {other}")
