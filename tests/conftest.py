import os
import signal
import subprocess
import sys

import numpy as np
import pytest

# Four logical CPU devices for the whole session, so placement tests can pin
# layers to separate devices; TensorFlow allows this once, before first use.
VIRTUAL_DEVICES = 4


def pytest_configure(config):
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * VIRTUAL_DEVICES)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")


def write_corpus(directory, train_words=6000, other_words=1500, vocab=60, seed=0):
    """A small synthetic PTB directory: Zipf-distributed words, lines of 4-14 words."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(vocab)]
    probs = 1.0 / np.arange(1, vocab + 1)
    probs /= probs.sum()
    os.makedirs(directory, exist_ok=True)
    for split, n in (("train", train_words), ("valid", other_words), ("test", other_words)):
        lines, total = [], 0
        while total < n:
            k = int(rng.integers(4, 15))
            lines.append(" ".join(rng.choice(words, size=k, p=probs)))
            total += k + 1
        with open(os.path.join(directory, f"ptb.{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return str(directory)


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "data")


@pytest.fixture
def ptb_mini():
    path = os.path.join(SHARED_DATA, "ptb-mini")
    if not os.path.isfile(os.path.join(path, "ptb.train.txt")):
        pytest.skip(f"real PTB data not found at {path} (../shared/data/ptb-mini beside the checkout)")
    return path


def run_ptb(*args, timeout=600, check=None, env=None):
    """Runs `python -m distrnn.ptb ARGS` as a user would (with `env` added to the environment);
    returns the CompletedProcess."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "distrnn.ptb", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def start_ptb(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "distrnn.ptb", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def ptb_process():
    procs = []

    def start(*args):
        proc = start_ptb(*args)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
