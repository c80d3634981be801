"""Crash points, for the crash-consistency tests (tests/test_crash.py), as a database's test build has them:
a run is killed, or its disk filled, at a chosen moment of its life, and then resumed.

    DISTRNN_FAULT=POINT:N:ACTION    the Nth time this process reaches POINT, do ACTION:
        kill            SIGKILL now
        kill@SECONDS    SIGKILL from a timer SECONDS later, landing inside what follows (a step, a save)
        fill@PATH       fill the file system of PATH (a file of zeros until it is full): every write after
                        fails as on a full disk
        sleep@SECONDS   pause SECONDS here (a slow disk, a slow download)
        hang            stop here for good, alive (a worker stuck in a read or a deadlock: its runtime's
                        threads still answer, so only the other workers' collective timeout notices)

    DISTRNN_FAULT_WORKER=K          only in the worker of index K of TF_CONFIG, or of Horovod rank K (one
                                    of distrnn.launch's workers, whose environment is shared)

Points: start (the save path locked, nothing restored yet), step (a training step begins), checkpoint and
best (a save begins), eval (a validation or test begins), metrics (the end-of-run figures are written).
Unset, which it is outside those tests, reaching a point costs one dictionary lookup.
"""
import json
import os
import signal
import threading
import time
from typing import Dict, Optional, Tuple

VARIABLE = "DISTRNN_FAULT"
WORKER_VARIABLE = "DISTRNN_FAULT_WORKER"
POINTS = ("start", "step", "checkpoint", "best", "eval", "metrics")
_seen: Dict[str, int] = {}
_plan: Optional[Tuple[str, int, str]] = None


def point(name: str) -> None:
    """Marks a crash point; does what DISTRNN_FAULT asks there, if anything."""
    plan = _planned()
    if plan is None or plan[0] != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == plan[1]:
        _act(plan[2])


def _planned() -> Optional[Tuple[str, int, str]]:
    global _plan
    if _plan is None:
        text = os.environ.get(VARIABLE, "")
        name, _, rest = text.partition(":")
        count, _, action = rest.partition(":")
        _plan = (name, int(count), action) if name in POINTS and count.isdigit() and action else ("", 0, "")
        if os.environ.get(WORKER_VARIABLE, "") not in ("", _worker_index()):
            _plan = ("", 0, "")
    return _plan if _plan[0] else None


def _worker_index() -> str:
    """This worker's index among distrnn.launch's: its TF_CONFIG task's, or its Horovod rank."""
    try:
        return str(json.loads(os.environ.get("TF_CONFIG", ""))["task"]["index"])
    except (ValueError, KeyError, TypeError):
        return os.environ.get("HOROVOD_RANK", "")


def _act(action: str) -> None:
    kind, _, argument = action.partition("@")
    if kind == "kill" and not argument:
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "kill":
        timer = threading.Timer(float(argument), os.kill, (os.getpid(), signal.SIGKILL))
        timer.daemon = True
        timer.start()
    elif kind == "fill":
        fill(argument)
    elif kind == "sleep":
        time.sleep(float(argument))
    elif kind == "hang":
        threading.Event().wait()


def fill(path: str) -> None:
    """Writes zeros to `path` until its file system has no space left."""
    with open(path, "wb", buffering=0) as f:
        block = b"\0" * (1 << 16)
        try:
            while True:
                f.write(block)
        except OSError:
            pass
        try:
            while True:  # the last blocks' worth
                f.write(b"\0" * 512)
        except OSError:
            pass
