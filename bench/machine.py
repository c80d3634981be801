"""The machine a benchmark's figures come from, printed beside them.

    python bench/machine.py [--json]

Every script in bench/ calls `start()` first: it makes the oneDNN choice a distrnn job makes
(distrnn.cpu.choose_onednn: the children it runs, the Keras baseline included, inherit it), prints
`machine: PROCESSOR, family F model M (vector extensions), N cores; oneDNN on|off (why); python,
tensorflow and horovod versions`, and returns the same as a dict for the script's JSON line, so that
figures from two machines, or from two oneDNN settings, are never mixed up.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distrnn import cpu  # noqa: E402  (imports no TensorFlow)


def start() -> dict:
    cpu.choose_onednn()
    print(f"machine: {cpu.describe_machine()}", flush=True)
    return cpu.machine()


def child_env(**extra) -> dict:
    """The environment of a benchmark's child process, read when called (after start()): quiet TensorFlow."""
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)


if __name__ == "__main__":
    cpu.choose_onednn()
    print(json.dumps(cpu.machine()) if sys.argv[1:] == ["--json"] else cpu.describe_machine())
