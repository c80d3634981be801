"""The compatibility seam: TensorFlow's start-up log lines held to TF_CPP_MIN_LOG_LEVEL, the stack read
without loading it, and the one line a launch of several ranks gets where Horovod cannot run."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, assert_one_line_error, hide_horovod, run_ptb
from distrnn import compat

PREAMBLE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
INFO = (b"I0000 00:00:1796192094.546020    3411 cpu_feature_guard.cc:227] This TensorFlow binary is optimized.\n"
        b"To enable the following instructions: AVX2 FMA, rebuild TensorFlow.\n")
WARNING = b"W1201 06:11:09.123456  17 port.cc:12] a warning\n"
ERROR = b"E0000 00:00:1796192094.5 17 loader.cc:9] an error\n    with a second line\n"
OTHER = b"a line of another library's\n"
CHATTER = OTHER + PREAMBLE + INFO + WARNING + ERROR


@pytest.mark.parametrize("level, kept", [(0, OTHER + INFO + WARNING + ERROR), (1, OTHER + WARNING + ERROR),
                                         (2, OTHER + ERROR), (3, OTHER)])
def test_log_filter_keeps_messages_at_the_level_with_their_continuation_lines(level, kept):
    assert compat.LogFilter(level).filter(CHATTER) == kept


NOTICE = b"E0000 00:00:1796193506.839436   11411 util.cc:131] " + compat.NOTICES[0] + b" implementation.\n"


OLD_FORMAT = (b"2026-12-02 06:57:14.511076: E tensorflow/core/util/util.cc:131] " + compat.NOTICES[0] + b" impl.\n"
              b"2026-12-02 06:57:14.6: W tensorflow/core/framework/op_kernel.cc:1840] a warning\n")


def test_notices_logged_as_errors_are_dropped_at_every_level():
    """In absl's format (2.21) and TensorFlow's own (2.18 to 2.20), whose warnings the level still governs."""
    assert compat.LogFilter(0).filter(NOTICE + WARNING) == WARNING
    assert compat.LogFilter(1).filter(OLD_FORMAT) == OLD_FORMAT.splitlines(keepends=True)[1]
    assert compat.LogFilter(2).filter(OTHER + OLD_FORMAT) == OTHER


def fake_tensorflow(tmp_path, body):
    fake = tmp_path / "fake" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import os, sys\n" + body)
    return str(fake.parent)


def import_fake(fake, level, code="from distrnn import compat; compat.import_tensorflow()"):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL=level, PYTHONPATH=f"{fake}{os.pathsep}{ROOT}"))


@pytest.mark.parametrize("level", ["1", "3"])
def test_import_tensorflow_holds_back_what_the_cpp_side_writes(tmp_path, level):
    """A stand-in `tensorflow` writes a line through Python's sys.stderr, then to file descriptor 2 as
    TensorFlow's C++ side does (in two writes that split a line, the known notice among them), and the
    program writes to fd 2 again after the import: Python's lines pass whatever the level, of the C++ side's
    only what passes the filter, in order."""
    fake = fake_tensorflow(tmp_path, f"chatter = {CHATTER + NOTICE!r}\nsys.stderr.write('python\\n')\n"
                                     "sys.stderr.flush()\nos.write(2, chatter[:150])\nos.write(2, chatter[150:])\n"
                                     "__version__ = 'fake'\n")
    # The filter is no child of the program's (a launcher that signals a rank's children finds none).
    code = ("import os, sys, psutil\nfrom distrnn import compat\ntf = compat.import_tensorflow()\n"
            "print('after', tf.__version__, 'children', len(psutil.Process().children()), file=sys.stderr)\n"
            f"os.write(2, {INFO + WARNING!r})")
    proc = import_fake(fake, level, code)
    assert proc.returncode == 0, proc.stderr
    # Python's lines go straight to stderr, the C++ side's through the filter process: each in its order.
    python = [b"python\n", b"after fake children 0\n"]
    lines = proc.stderr.splitlines(keepends=True)
    assert [line for line in lines if line in python] == python
    assert b"".join(line for line in lines if line not in python) == \
        compat.LogFilter(int(level)).filter(CHATTER + INFO + WARNING)


def test_an_import_that_fails_still_shows_its_error(tmp_path):
    fake = fake_tensorflow(tmp_path, f"os.write(2, {INFO!r})\nraise ImportError('libcudart.so.12 missing')\n")
    proc = import_fake(fake, "1")
    stderr = proc.stderr.decode()
    assert proc.returncode == 1 and stderr.rstrip().endswith("ImportError: libcudart.so.12 missing")
    assert "cpu_feature_guard" not in stderr


def test_a_crash_in_tensorflow_still_shows_its_last_lines(tmp_path):
    """TensorFlow aborting on a failed CHECK: the filter, a process of its own, still forwards the fatal line."""
    fatal = b"F0000 00:00:1796193506.8 17 tensor.cc:733] Check failed: 1 == NumElements() (1 vs. 2)\n"
    fake = fake_tensorflow(tmp_path, f"os.write(2, {INFO + fatal!r})\nos.abort()\n")
    proc = import_fake(fake, "1")
    assert proc.returncode == -6 and proc.stderr == fatal


def test_stack_reads_versions_without_loading_them():
    code = "import sys; from distrnn import compat; s = compat.stack(); print(s); print('tensorflow' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    stack, loaded = proc.stdout.splitlines()
    import tensorflow as tf
    assert eval(stack)["tensorflow"] == tf.__version__ and loaded == "False"
    assert compat.format_stack({"python": "3.13.0", "tensorflow": "2.21.0", "keras": "3.15.1", "numpy": "2.5.5",
                                "tensorboard": None, "horovod": None}) == \
        "Python 3.13.0, TensorFlow 2.21.0 (Keras 3.15.1), numpy 2.5.5, TensorBoard none, Horovod none"


USE = ("use the Horovod stack (bash launch/setup.sh: TensorFlow 2.15.1 with Horovod 0.28.1) or NVIDIA's TensorFlow "
       "container, which carries its own Horovod (docs/stacks.md)")


def fake_stack(monkeypatch, tensorflow, horovod):
    monkeypatch.setattr(compat, "tensorflow_version", lambda: tensorflow)
    monkeypatch.setattr(compat, "version", lambda name: horovod if name == "horovod" else None)


def test_horovod_missing_names_the_stack_that_has_it(monkeypatch):
    fake_stack(monkeypatch, "2.21.0", None)
    assert compat.horovod_missing() == (
        "launched as several ranks, but there is no Horovod for TensorFlow 2.21.0: Horovod 0.28.1, its last release, "
        f"builds against TensorFlow <= 2.18; {USE}, or start it on TensorFlow's own collectives (--engine "
        "tensorflow, docs/engines.md)")
    fake_stack(monkeypatch, "2.16.2", None)
    assert compat.horovod_missing() == (
        "launched as several ranks, but Horovod is not installed; run bash launch/setup.sh (it builds Horovod against "
        f"TensorFlow 2.16.2), or {USE}, or start it on TensorFlow's own collectives (--engine tensorflow, "
        "docs/engines.md)")
    fake_stack(monkeypatch, "2.21.0", "0.28.1")
    error = ImportError("/x/mpi_lib.so: undefined symbol: _ZN10tensorflow8OpKernel\nsecond line")
    assert compat.horovod_missing(error) == (
        "launched as several ranks, but Horovod 0.28.1 cannot be loaded with TensorFlow 2.21.0 (/x/mpi_lib.so: "
        "undefined symbol: _ZN10tensorflow8OpKernel): it must be compiled against the TensorFlow it runs with: "
        f"bash launch/setup.sh rebuilds it, or {USE}, or start it on TensorFlow's own collectives (--engine "
        "tensorflow, docs/engines.md)")


LAUNCHES = {"horovodrun": {"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2", "HOROVOD_LOCAL_RANK": "1",
                            "HOROVOD_LOCAL_SIZE": "2"},
            "srun": {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "localhost",
                     "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_NODEID": "0", "SLURM_LOCALID": "1", "SLURM_PROCID": "1",
                     "SLURM_JOB_ID": "7"}}


@pytest.mark.parametrize("launcher", sorted(LAUNCHES))
def test_a_launch_of_several_ranks_without_a_loadable_horovod_is_one_line(launcher, corpus, tmp_path, monkeypatch):
    """A rank as horovodrun starts it, or a 2-task srun step with --engine horovod (without it, srun's tasks
    join through TensorFlow's collectives where Horovod does not load: test_collective), with Horovod
    unimportable (as on a TensorFlow it cannot build against): one line naming the stack that has Horovod,
    before anything is saved."""
    hide_horovod(tmp_path, monkeypatch)
    for name, value in LAUNCHES[launcher].items():
        monkeypatch.setenv(name, value)
    engine = ["--engine", "horovod"] if launcher == "srun" else []
    proc = run_ptb("--config", "test", "--data_path", corpus, "--save_path", tmp_path / "s", *engine, check=2)
    assert_one_line_error(proc, "distrnn.ptb", "launched as several ranks, but", USE)
    assert not (tmp_path / "s").exists()


def test_installed_with_no_deps_beside_the_stack_it_finds(tmp_path):
    """As the container images install it: `pip install --no-deps` into an environment that already holds
    TensorFlow (and Horovod, where it is): nothing else is installed, and the installed copy (not this
    checkout) reports the environment's versions."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), ROOT], check=True, capture_output=True, timeout=300)
    installed = sorted(p.name for p in target.iterdir() if not p.name.startswith("__"))
    assert [name for name in installed if not name.startswith("distrnn")] in ([], ["bin"]), installed
    env = dict(os.environ, PYTHONPATH=str(target), TF_CPP_MIN_LOG_LEVEL="2")
    code = "import distrnn, json; from distrnn import compat; print(distrnn.__file__); " \
           "print(json.dumps(compat.stack()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0].startswith(str(target)) and json.loads(out[1]) == compat.stack()
    shown = subprocess.run([sys.executable, "-m", "distrnn.devices", "--no-tensorflow"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert f"stack: {compat.format_stack(compat.stack())}" in shown


def test_without_tensorboard_a_run_says_so_once_and_writes_no_logs(tmp_path, monkeypatch, capsys):
    """tensorflow-cpu >= 2.20 without the tensorboard package: tf.summary would raise TBNotInstalledError at
    the first scalar; the run says so at its start and goes on without logs."""
    from distrnn.run import outputs
    missing = "the tensorboard package is not installed (pip install tensorboard)"
    monkeypatch.setattr(compat, "tensorboard_missing", lambda: missing)
    board = outputs.TensorBoard(str(tmp_path), enabled=True)
    board.scalars(1, loss=1.0)
    board.close()
    assert capsys.readouterr().out == f"no TensorBoard logs: {missing}\n"
    assert not (tmp_path / "tensorboard").exists()
