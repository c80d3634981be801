import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

# Four logical CPU devices for the whole session, so placement tests can pin
# layers to separate devices; TensorFlow allows this once, before first use.
VIRTUAL_DEVICES = 4


def pytest_configure(config):
    # A session started in the background by a script (launch/test.sh runs the second stack's with `&`)
    # inherits SIGINT ignored, as does every process it starts: a non-interactive shell ignores SIGINT in
    # its background commands, and Python keeps an inherited SIG_IGN. The tests that send SIGINT mean the
    # process to see it; a handler here (its children get SIGINT's default on exec) gives them that.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # The tests' own TensorFlow runs the kernels a distrnn job runs (distrnn turns oneDNN on where
    # TF_ENABLE_ONEDNN_OPTS is unset), so in-process results compare with the command line's.
    from distrnn import compat, cpu
    cpu.choose_onednn()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    tf = compat.import_tensorflow()
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * VIRTUAL_DEVICES)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")


def subprocess_env(**extra):
    """The environment the tests' subprocesses run with, read when called (tests change it): TensorFlow's
    start-up chatter hidden, output unbuffered, and `extra`."""
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", **extra)


# Memory capped for real, as a GPU's is: TensorFlow's CPU allocator made a BFC allocator (the GPUs' kind)
# limited to 200 MB, which works with either set of CPU kernels. The kernels are fixed to Eigen's, whatever
# the processor's default: oneDNN's kernels crash TensorFlow (SIGSEGV, at mkl_util.h:846) when an allocation
# fails inside them, measured in 1 of 3 runs under oneDNN's own cap (TF_MKL_ALLOC_MAX_BYTES, which moreover
# caps nothing where TensorFlow leaves oneDNN off) and 2 of 2 under this one at 100 MB; Eigen's raise
# ResourceExhaustedError.
# One inter-op thread: each allocation that fails has first waited 10 s for memory (BFC's retry), and
# fewer ops in flight fail fewer times (1 or 2 failed allocations a step with the sizes the tests use).
EIGEN = {"TF_ENABLE_ONEDNN_OPTS": "0"}
CAPPED = dict(EIGEN, TF_CPU_ALLOCATOR_USE_BFC="1", TF_CPU_BFC_MEM_LIMIT_IN_MB="200", TF_NUM_INTEROP_THREADS="1")


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


def shared_data(name: str, first_file: str, what: str) -> str:
    """../shared/data/NAME (read there, never copied), or the test skipped saying what is missing."""
    path = os.path.join(SHARED_DATA, name)
    if not os.path.isfile(os.path.join(path, first_file)):
        pytest.skip(f"{what} not found at {path} (../shared/data/{name} beside the checkout; see its README.md)")
    return path


@pytest.fixture
def full_ptb():
    """The standard full Penn Treebank files."""
    return shared_data("ptb", "ptb.train.txt", "the full Penn Treebank")


@pytest.fixture
def ptb_mini():
    return shared_data("ptb-mini", "ptb.train.txt", "real PTB data (ptb-mini)")


def hide_horovod(tmp_path, monkeypatch):
    """Subprocesses started after this see Horovod as not importable (a package of that name that raises
    ImportError, first on PYTHONPATH), as where it is not installed or cannot build."""
    shadow = tmp_path / "shadow" / "horovod"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('horovod hidden by the test')\n")
    monkeypatch.setenv("PYTHONPATH", f"{shadow.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def run_ptb(*args, timeout=600, check=None, env=None):
    """Runs `python -m distrnn.ptb ARGS` as a user would; see run_module."""
    return run_module("distrnn.ptb", *args, timeout=timeout, check=check, env=env)


HOROVODRUN = shutil.which("horovodrun", path=os.path.dirname(sys.executable)) or shutil.which("horovodrun")
ENGINES = ("horovod", "tensorflow")


def launcher_command(engine, nproc, command):
    """The command line that starts `command` (python, or another program, and its arguments) as `nproc`
    processes of one job on this machine: `horovodrun --gloo -H localhost:N` (horovod), or `python -m
    distrnn.launch --nproc N` (tensorflow: each worker with its TF_CONFIG). Skips where Horovod is missing."""
    if engine == "horovod":
        if HOROVODRUN is None:
            pytest.skip("horovodrun not found: Horovod is not installed on this stack (TensorFlow 2.19 and newer)")
        return [HOROVODRUN, "--gloo", "-np", str(nproc), "-H", f"localhost:{nproc}", *map(str, command)]
    own, program = ([], command[1:]) if command[0] == sys.executable else (["--no_python"], command)
    return [sys.executable, "-m", "distrnn.launch", "--nproc", str(nproc), *own, "--", *map(str, program)]


def launched(engine, nproc, *args, command=None, module="distrnn.ptb", timeout=300, check=0, env=None):
    """Runs `python -m MODULE ARGS` (or `command`) as `nproc` processes on `engine` (launcher_command), with
    `env` added to the environment, and returns the CompletedProcess; check: the exit code it must have
    (None: any)."""
    command = command or [sys.executable, "-m", module, *args]
    proc = subprocess.run(launcher_command(engine, nproc, command), cwd=ROOT, env=subprocess_env(**(env or {})),
                          capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def checkpoint_step(save_path) -> int:
    """The step of the latest checkpoint in save_path/checkpoints (its state file names it)."""
    with open(os.path.join(save_path, "checkpoints", "checkpoint"), encoding="utf-8") as f:
        return int(re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', f.read(), re.M).group(1))


def assert_one_line_error(proc, prog, *fragments):
    """`proc` exited 2 with exactly one line on stderr, `PROG: error: ...` holding every fragment, and no traceback."""
    assert_one_line(proc, prog, 2, *fragments)


def assert_one_line(proc, prog, code, *fragments, label="error"):
    """`proc` exited `code` with exactly one line on stderr, `PROG: LABEL: ...` holding every fragment, and no
    traceback."""
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: {label}: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def start_module(module, *args):
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def background_process():
    """start(*args) runs `python -m distrnn.ptb ARGS` (start(*args, module=M): another module) in the
    background, its output merged on proc.stdout; whatever is still running at the end is killed."""
    procs = []

    def start(*args, module="distrnn.ptb"):
        proc = start_module(module, *args)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file's bytes: magic (0, 0, 0x08 = uint8, number of dimensions), big-endian sizes, data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_images(directory, train=600, test=200, rows=12, cols=10, seed=0):
    """Small learnable IDX data in the MNIST layout: an image of class c is noise with row c+1 bright."""
    import gzip
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, count)
        images = rng.integers(0, 60, (count, rows, cols))
        images[np.arange(count), labels + 1] += 180
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            with open(os.path.join(directory, f"{prefix}-{kind}-ubyte.gz"), "wb") as f:
                f.write(gzip.compress(idx_bytes(array)))
    return str(directory)


@pytest.fixture
def images(tmp_path):
    return write_images(tmp_path / "images")


@pytest.fixture
def fashion_mnist():
    return shared_data("fashion-mnist", "train-images-idx3-ubyte.gz", "Fashion-MNIST")


def run_module(module, *args, timeout=600, check=None, env=None, python=sys.executable):
    """Runs `python -m MODULE ARGS` as a user would (with `env` added to the environment; `python` another
    stack's interpreter); returns the CompletedProcess."""
    proc = subprocess.run([python, "-m", module, *map(str, args)], cwd=ROOT,
                          env=subprocess_env(**(env or {})), capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def run_here(module, *args, check=None, env=None, cwd=None):
    """`python -m MODULE ARGS` run in this process (its `main`, which `python -m` calls, with `env` added to
    the environment and in `cwd`): the same code and exit code without the 5 s of a new process importing
    TensorFlow. For what does not need a process of its own (a kill, a signal, another stack). Returns a
    CompletedProcess."""
    import contextlib
    import importlib
    import io
    main = importlib.import_module(f"{module}.cli" if module in ("distrnn.ptb", "distrnn.mnist") else module).main
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    if cwd is not None:
        os.makedirs(cwd, exist_ok=True)
    saved = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})
    try:
        with contextlib.chdir(cwd or os.getcwd()), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's --help
                code = e.code or 0
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
    proc = subprocess.CompletedProcess([module, *argv], code, out.getvalue(), err.getvalue())
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def blocked_reading(proc, timeout=60):
    """Waits until a thread of `proc` sleeps in a pipe's read (its FIFO's, which nobody writes). A signal sent
    before that can be lost for good: one that arrives after Python last looked for signals and before read(2)
    begins is handled in C at once, and the read then blocks with nothing left to interrupt it (this hung
    CI once, 60 s, on a loaded 2-core machine). Sent to a sleeping read, it interrupts it, and Python raises.
    Where /proc shows no wchan for any thread, returns at once; where it shows "0" for every one (a running
    thread's, or a kernel that hides symbols), waits out `timeout` and the signal goes as it did before."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            threads = os.listdir(f"/proc/{proc.pid}/task")
        except OSError:
            return
        waits = [wchan(proc.pid, tid) for tid in threads]
        if any("pipe_read" in w for w in waits) or not any(waits):  # anon_pipe_read (older kernels: pipe_read)
            return
        time.sleep(0.01)


def wchan(pid, tid) -> str:
    """What a thread sleeps in ('' where it has gone or the kernel does not say)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/wchan") as f:
            return f.read()
    except OSError:
        return ""


def signalled_while_held(argv, sig, fifo, env, timeout=60):
    """Starts `python ARGV` (env: its whole environment), which holds itself by reading `fifo` (nobody
    writes); once it sleeps in that read (blocked_reading), sends `sig`. Returns the CompletedProcess: what a
    signal at that moment does, whatever the machine's speed."""
    proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    writer = None
    try:
        while writer is None:  # the write end opens without blocking once the process holds the read end
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.05)
        blocked_reading(proc)
        proc.send_signal(sig)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"no exit within {timeout} s of the signal:\n" + "\n".join(proc.communicate())) \
                from None
    finally:
        if writer is not None:
            os.close(writer)
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def too_high_then_settled(train):
    """train(name, initial loss scale) twice: from 2^40, where the first step's gradients overflow, and
    from the scale that run came down to. Asserts that every halving was an overflow run again; returns
    both runs' metrics. Scaling by a power of 2 is exact, so the two runs compute the same steps."""
    high = train("high", 2.0 ** 40)
    settled = high["loss_scale"]["scale"]
    low = train("low", settled)
    halvings = 40 - int(np.log2(settled))
    assert halvings > 0 and low["loss_scale"]["scale"] == settled
    assert high["loss_scale"]["overflows"] == low["loss_scale"]["overflows"] + halvings
    assert high["steps"] == low["steps"]
    return high, low


def signalled_at_first_progress(command, sig=signal.SIGTERM, timeout=90):
    """Starts `command` (a launcher of a training job), sends it `sig` once its first progress line is out,
    and returns (its exit code, everything it printed, stdout and stderr together)."""
    proc = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        printed = []
        for line in proc.stdout:
            printed.append(line)
            if "words/sec" in line:
                break
        proc.send_signal(sig)
        printed.append(proc.stdout.read())
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(printed)


def killed_after_first_checkpoint(command, save_path, victim, timeout=150):
    """Starts `command` (a launcher of a training job that saves to save_path), kill -9s the process
    `victim(launcher_pid)` names once the first checkpoint is written, and returns (the launcher's exit code,
    its stdout, its stderr, seconds from the kill to the launcher's end)."""
    proc = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not os.path.exists(os.path.join(save_path, "checkpoints", "checkpoint")) \
                and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        pid = victim(proc.pid)
        assert pid, "the process to kill was not found"
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        stdout, stderr = proc.communicate(timeout=timeout)
        return proc.returncode, stdout, stderr, time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()

