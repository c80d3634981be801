"""What a hostile user and a hostile machine do, through the real command line: each case ends in its
documented exit code and one line, and every file saved before is byte-identical afterwards."""
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import (CAPPED, ROOT, assert_one_line, assert_one_line_error, idx_bytes, run_module, run_ptb,
                      signalled_while_held, write_corpus, write_images)

TINY = ["--config", "test", "--hidden_size", "8", "--batch_size", "4", "--num_steps", "5"]


def snapshot(directory):
    """{relative path: sha256} of every file under `directory` but the lock (its holder's name changes)."""
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            if name != ".lock":
                with open(path, "rb") as f:
                    found[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 6 steps with checkpoints at steps 2, 4 and 6, and its data; each test takes a copy."""
    base = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(base / "data")
    run_ptb(*TINY, "--data_path", corpus, "--save_path", base / "run", "--max_steps", "6", "--checkpoint_every", "2",
            check=0)
    return base


@pytest.fixture
def run(trained, tmp_path):
    """(a copy of the trained run, the corpus)."""
    shutil.copytree(trained / "run", tmp_path / "run")
    return tmp_path / "run", str(trained / "data")


def ckpt(save, name):
    return save / "checkpoints" / name


# --- flags: finite and in range, before anything runs -------------------------------------------------
@pytest.mark.parametrize("args, fragments", [
    (["--learning_rate", "inf"], ["--learning_rate must be a finite number", "got 'inf'"]),
    (["--max_grad_norm", "nan"], ["--max_grad_norm must be a finite number", "got 'nan'"]),
    (["--init_scale", "1e39"], ["--init_scale must be a finite number within float32's range", "1e+39"]),
    (["--mem_interval", "inf"], ["argument --mem_interval: must be a finite number, got 'inf'"]),
    (["--mem_interval", "nan"], ["argument --mem_interval: must be a finite number, got 'nan'"]),
    (["--mem_stop", "nan"], ["argument --mem_stop: must be a finite number"]),
    (["--mem_warn", "0.99", "--mem_stop", "0.9"], ["--mem_warn 0.99 is above --mem_stop 0.9"]),
    (["--max_steps", "1.5"], ["argument --max_steps: takes an integer, got '1.5'"]),
    (["--checkpoint_every", "0"], ["argument --checkpoint_every: must be positive, got '0'"]),
    (["--seed", "-1"], ["argument --seed: must be >= 0"]),
    (["--seed", str(2 ** 40)], ["argument --seed: must be <= 2147483647"]),
    (["--virtual_devices", "100000"], ["argument --virtual_devices: must be <= 64"]),
])
def test_flags_refused_before_anything_runs(args, fragments, tmp_path):
    proc = run_ptb(*TINY, "--data_path", tmp_path / "data", "--save_path", tmp_path / "s", *args)
    assert_one_line_error(proc, "distrnn.ptb", *fragments)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--watch", "nan"], "argument --watch: must be a finite number, got 'nan'"),
    (["--watch", "inf"], "argument --watch: must be a finite number, got 'inf'"),
    (["--watch", "-1"], "argument --watch: must be >= 0"),
    (["--count", "-2"], "argument --count: must be >= 0"),
    (["--plan", "--gpu_memory_gib", "-4"], "argument --gpu_memory_gib: must be positive, got '-4'"),
    (["--plan", "--gpu_memory_gib", "nan"], "argument --gpu_memory_gib: must be a finite number"),
    (["--plan", "--vocab_size", "0"], "argument --vocab_size: must be positive"),
])
def test_devices_flags_refused(args, fragment):
    assert_one_line_error(run_module("distrnn.devices", "--no-tensorflow", *args), "distrnn.devices", fragment)


def test_slurm_junk_is_one_line():
    assert_one_line_error(run_module("distrnn.slurm", "bogus"), "python -m distrnn.slurm", "invalid choice: 'bogus'")
    env = {"SLURM_JOB_NODELIST": "x[1-999999999999]", "SLURM_TASKS_PER_NODE": "1", "SLURM_NTASKS": "1"}
    proc = run_module("distrnn.slurm", "hosts", env=env, timeout=60)
    assert_one_line_error(proc, "python -m distrnn.slurm", "it names 999,999,999,999 nodes, more than the 100,000")
    env = {"SLURM_JOB_NODELIST": "x1", "SLURM_TASKS_PER_NODE": "1(x999999999999)", "SLURM_NTASKS": "1"}
    assert_one_line_error(run_module("distrnn.slurm", "hosts", env=env, timeout=60), "python -m distrnn.slurm",
                          "task counts")


# --- inputs that are not what they should be -----------------------------------------------------------
@pytest.mark.parametrize("content, fragment", [
    (b"the cat \xff\xfe sat\n", "is not UTF-8 text (byte 0xff at offset 8)"),
    ("the cat sat\n".encode("utf-16"), "is not UTF-8 text (byte 0xff at offset 0)"),
    ("caf\xe9 au lait\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 3)"),
])
def test_data_that_is_not_text(content, fragment, tmp_path):
    corpus = write_corpus(tmp_path / "data")
    with open(os.path.join(corpus, "ptb.valid.txt"), "wb") as f:
        f.write(content)
    assert_one_line_error(run_ptb(*TINY, "--data_path", corpus, "--save_path", tmp_path / "s"), "distrnn.ptb",
                          "ptb.valid.txt", fragment)
    assert not (tmp_path / "s").exists()  # a save path this run created and wrote nothing to is removed


def test_data_file_that_is_a_directory(tmp_path):
    corpus = write_corpus(tmp_path / "data")
    os.remove(os.path.join(corpus, "ptb.test.txt"))
    os.mkdir(os.path.join(corpus, "ptb.test.txt"))
    assert_one_line_error(run_ptb(*TINY, "--data_path", corpus, "--save_path", tmp_path / "s"), "distrnn.ptb",
                          "ptb.test.txt is a directory, not a file")


def test_mirror_urls_that_are_not_archives_or_urls(tmp_path):
    home = {"HOME": str(tmp_path / "home")}  # an empty download cache
    proc = run_ptb(*TINY, "--save_path", tmp_path / "s", env=dict(home, DISTRNN_PTB_URL="not-a-url"))
    assert_one_line_error(proc, "distrnn.ptb", "DISTRNN_PTB_URL='not-a-url' is not a URL", "file://")
    (tmp_path / "junk.tgz").write_bytes(b"this is not an archive\n")
    proc = run_ptb(*TINY, "--save_path", tmp_path / "s", env=dict(home, DISTRNN_PTB_URL=f"file://{tmp_path}/junk.tgz"))
    assert_one_line_error(proc, "distrnn.ptb", "junk.tgz is not a tar archive", "DISTRNN_PTB_URL")
    proc = run_module("distrnn.mnist", "--config", "test", "--save_path", tmp_path / "m",
                      env=dict(home, DISTRNN_MNIST_URL="ftp//x"))
    assert_one_line_error(proc, "distrnn.mnist", "DISTRNN_MNIST_URL='ftp//x' is not a URL")


def test_idx_header_whose_sizes_overflow(tmp_path):
    """2**32-1 x 2**32-1 x 2**32-1 images: np.prod wraps around at 2**63; the size check must not."""
    data = write_images(tmp_path / "images")
    header = bytes([0, 0, 8, 3]) + (2 ** 32 - 1).to_bytes(4, "big") * 3
    with gzip.open(os.path.join(data, "t10k-images-idx3-ubyte.gz"), "wb") as f:
        f.write(header + idx_bytes(np.zeros((1, 2, 2)))[16:])
    proc = run_module("distrnn.mnist", "--config", "test", "--data_path", data, "--save_path", tmp_path / "m")
    assert_one_line_error(proc, "distrnn.mnist", "t10k-images-idx3-ubyte.gz is not an IDX file of images",
                          "truncated")


# --- saved runs: found from what is on disk, never lost ------------------------------------------------
def test_missing_state_file_is_a_run_that_exists(run):
    """The issue's reproduction: state file deleted, then a fresh run with another size into the same
    save path. Refused, every file as it was; --resume restores the newest checkpoint and rewrites the
    state file."""
    save, corpus = run
    os.remove(ckpt(save, "checkpoint"))
    before = snapshot(save)
    for extra, fragments in (([], ["already holds checkpoints", "ckpt-6, ckpt-4, ckpt-2; its state file", "is missing",
                                   "pass --resume"]),
                             (["--resume"], ["are from another config (hidden_size=8 there, 9 here)"])):
        proc = run_ptb(*TINY, "--hidden_size", "9", "--data_path", corpus, "--save_path", save, *extra)
        assert_one_line_error(proc, "distrnn.ptb", *fragments)
        assert snapshot(save) == before
    proc = run_ptb(*TINY, "--data_path", corpus, "--save_path", save, "--resume", "--max_steps", "8", check=0)
    assert "is missing: rewrote it from the files on disk (latest ckpt-6" in proc.stdout
    assert "resumed from" in proc.stdout and "ckpt-6 at epoch 1, step 6" in proc.stdout
    after = snapshot(save)
    assert all(after[k] == v for k, v in before.items() if k.startswith("checkpoints/ckpt-"))  # none rotated away
    assert 'model_checkpoint_path: "ckpt-8"' in ckpt(save, "checkpoint").read_text()


@pytest.mark.parametrize("damage", ["missing quote", "binary"])
def test_unreadable_state_file_refused_for_a_fresh_run(run, damage):
    save, corpus = run
    state = ckpt(save, "checkpoint")
    if damage == "binary":
        state.write_bytes(b"\xff\xfe\x00\x01 garbage")
    else:
        state.write_text(state.read_text().replace('"ckpt-6"', '"ckpt-6', 1))
    before = snapshot(save)
    assert_one_line_error(run_ptb(*TINY, "--data_path", corpus, "--save_path", save), "distrnn.ptb",
                          "already holds checkpoints", "is unreadable", "--resume")
    assert snapshot(save) == before


@pytest.mark.parametrize("damage, skipped", [
    ("truncated data", "ckpt-6 (IndexError"),
    ("missing index", "ckpt-6 (no .index file)"),
    ("state names a checkpoint that is not there", None),
])
def test_resume_past_a_corrupt_checkpoint(run, damage, skipped):
    save, corpus = run
    data = ckpt(save, "ckpt-6.data-00000-of-00001")
    if damage == "truncated data":
        data.write_bytes(data.read_bytes()[:3000])
    elif damage == "missing index":
        os.remove(ckpt(save, "ckpt-6.index"))
    else:
        state = ckpt(save, "checkpoint")
        state.write_text(state.read_text().replace('"ckpt-6"', '"ckpt-9"', 1))
    proc = run_ptb(*TINY, "--data_path", corpus, "--save_path", save, "--resume", "--max_steps", "8", check=0)
    if skipped:
        assert f"skipped {skipped}" in proc.stdout and "read the next older one, ckpt-4" in proc.stdout
        assert "ckpt-4 at epoch 1, step 4" in proc.stdout
    else:
        assert "names ckpt-9, which is not there" in proc.stdout and "ckpt-6 at epoch 1, step 6" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_resume_when_no_checkpoint_restores(run):
    save, corpus = run
    for name in os.listdir(save / "checkpoints"):
        if ".data-" in name:
            path = ckpt(save, name)
            path.write_bytes(path.read_bytes()[:100])
    before = snapshot(save)
    proc = run_ptb(*TINY, "--data_path", corpus, "--save_path", save, "--resume")
    assert_one_line_error(proc, "distrnn.ptb", "no checkpoint in", "reads whole: ckpt-6 (IndexError",
                          "ckpt-2 (IndexError", "every file was left as it was")
    assert snapshot(save) == before


@pytest.mark.parametrize("content, fragment", [
    ('{"hidden_size": 8', "config.json is not JSON"),
    (b"\xff\xfe{}", "config.json is not JSON"),
    ("[1, 2]", "config.json holds a list, not a JSON object"),
    (None, "hidden_size='8' there, 8 here"),
])
def test_saved_config_that_cannot_be_read(run, content, fragment):
    save, corpus = run
    path = save / "config.json"
    if content is None:
        path.write_text(path.read_text().replace('"hidden_size": 8', '"hidden_size": "8"'))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    before = snapshot(save)
    assert_one_line_error(run_ptb(*TINY, "--data_path", corpus, "--save_path", save, "--resume"), "distrnn.ptb",
                          fragment)
    assert snapshot(save) == before


def test_metrics_json_paths(run, tmp_path):
    save, corpus = run
    before = snapshot(save)
    proc = run_ptb(*TINY, "--data_path", corpus, "--save_path", save, "--resume", "--metrics_json", save)
    assert_one_line_error(proc, "distrnn.ptb", "is the run's own save path; name another file")
    assert snapshot(save) == before
    assert "step " not in proc.stdout  # refused at start-up, not after training
    fresh = tmp_path / "fresh"  # inside the save path the run is about to create
    run_ptb(*TINY, "--data_path", corpus, "--save_path", fresh, "--max_steps", "2", "--metrics_json",
            fresh / "m.json", check=0)
    assert json.loads((fresh / "m.json").read_text())["steps"] == 2


# --- one run at a time ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_save_path_belongs_to_one_run(run, background_process):
    """Two real processes on one save path: the second stops at once naming the first; after a kill -9
    of the first (no clean-up), the lock is gone with it and a run proceeds."""
    save, corpus = run
    first = background_process(*TINY, "--data_path", corpus, "--save_path", save, "--resume", "--max_max_epoch",
                               "1000000")
    for line in first.stdout:  # the lock is taken before the log says where the run stands
        if line.startswith("resumed from"):
            break
    for extra in ([], ["--resume"]):
        proc = run_ptb(*TINY, "--data_path", corpus, "--save_path", save, *extra)
        assert_one_line_error(proc, "distrnn.ptb", f"--save_path {save} is in use by another run (process "
                              f"{first.pid} on", "wait for it to end, or choose another --save_path")
    first.send_signal(signal.SIGKILL)
    first.wait()
    proc = run_ptb(*TINY, "--data_path", corpus, "--save_path", save, "--resume", "--max_steps", "1", check=0)
    assert "resumed from" in proc.stdout


# --- the training itself goes wrong ------------------------------------------------------------------
def test_diverged_run_stops_without_saving_broken_weights(tmp_path):
    corpus = write_corpus(tmp_path / "data")
    save = tmp_path / "run"
    proc = run_ptb(*TINY, "--data_path", corpus, "--save_path", save, "--learning_rate", "1e30",
                   "--checkpoint_every", "1")
    # Which figures are inf or nan first depends on the processor's kernels; the perplexity always is.
    assert_one_line(proc, "distrnn.ptb", 65, "step 2: the ", "perplexity is inf", "so training diverged",
                    f"the last good checkpoint is {save}/checkpoints/ckpt-1", "lower --learning_rate (now 1e+30)",
                    "continue with --resume")
    assert sorted(n for n in os.listdir(save / "checkpoints") if n.endswith(".index")) == ["ckpt-1.index"]
    proc = run_ptb(*TINY, "--data_path", corpus, "--save_path", tmp_path / "r2", "--init_scale", "1e30")
    assert_one_line(proc, "distrnn.ptb", 65, "step 1:", "nothing was saved before it", "start again")


def test_full_disk_while_saving(tmp_path):
    """A 1 MiB tmpfs: a run saves one checkpoint, the disk is filled, the resumed run's next save fails:
    one line, exit 74, no partial files, every earlier file as it was."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        corpus = write_corpus(tmp_path / "data")
        save, args = mount / "run", [*TINY[:-6], "--hidden_size", "40", "--data_path", corpus]
        run_ptb(*args, "--save_path", save, "--max_steps", "3", check=0)
        free = shutil.disk_usage(mount).free
        with open(mount / "filler", "wb") as f:
            f.write(b"\0" * (free - 20 * 1024))  # 20 KiB left, the checkpoint takes 75
        before = snapshot(save)
        proc = run_ptb(*args, "--save_path", save, "--resume", "--max_steps", "6")
        assert_one_line(proc, "distrnn.ptb", 74, "could not save checkpoint ckpt-6", "(No space left on device)",
                        "partial files were removed", "latest: ", "ckpt-3")
        after = snapshot(save)
        assert {k: v for k, v in after.items() if not k.startswith("tensorboard/")} == \
               {k: v for k, v in before.items() if not k.startswith("tensorboard/")}
        assert not any("_temp" in n or n.endswith(".tmp") for n in os.listdir(save / "checkpoints"))
    finally:
        subprocess.run(["umount", str(mount)])


# --- signals outside the training loop ----------------------------------------------------------------
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_start_up(sig, code, tmp_path):
    """Held in start-up by a download from a FIFO nobody writes to; the signal then ends it in one line."""
    fifo = tmp_path / "archive.tgz"
    os.mkfifo(fifo)
    env = dict(os.environ, HOME=str(tmp_path / "home"), DISTRNN_PTB_URL=f"file://{fifo}", TF_CPP_MIN_LOG_LEVEL="2")
    proc = signalled_while_held(["-m", "distrnn.ptb", *TINY, "--save_path", tmp_path / "s"], sig, fifo, env)
    assert_one_line(proc, "distrnn.ptb", code, f"interrupted by {signal.Signals(sig).name} before the first "
                    "checkpoint: nothing was saved", label="stopped")


def test_signals_outside_the_training_loop_become_one_line(tmp_path):
    """SignalsInterrupt (what start.run wraps a job in): Ctrl-C in the final evaluation, or SIGTERM / SIGUSR1
    delivered for real, become Interrupted with 128 + the signal and what the save path holds."""
    from distrnn import errors
    from distrnn.run import stops
    save = tmp_path / "run"
    (save / "checkpoints").mkdir(parents=True)
    for name in ("ckpt-4.index", "ckpt-4.data-00000-of-00001", "ckpt-7_temp"):
        (save / "checkpoints" / name).touch()
    with pytest.raises(errors.Interrupted) as caught:
        with stops.SignalsInterrupt(str(save)):
            raise KeyboardInterrupt
    assert caught.value.exit_code == 130 and str(caught.value) == (
        f"interrupted by SIGINT outside a training step; the checkpoints in {save}/checkpoints are intact (newest "
        f"ckpt-4): continue with --resume --save_path {save}")
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        with pytest.raises(errors.Interrupted) as caught:
            with stops.SignalsInterrupt(str(tmp_path / "empty")):
                os.kill(os.getpid(), sig)
                time.sleep(5)  # the handler raises at the next bytecode
        assert caught.value.exit_code == 128 + sig
        assert str(caught.value) == f"interrupted by {sig.name} before the first checkpoint: nothing was saved"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back


def test_signals_ignored_at_start_stay_ignored():
    """A background command of a script starts with SIGINT ignored (nohup: SIGHUP): neither the training loop's
    StopSignal nor SignalsInterrupt catches a signal ignored on entry; the others they catch and put back."""
    from distrnn.run import stops
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        with stops.SignalsInterrupt("unused"), stops.StopSignal():
            assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, previous)


IGNORED_AFTER_THE_STOP = """
import os, signal, sys, time
from distrnn.run import stops
with stops.SignalsInterrupt("unused"):
    stops.ignore_launcher_signals(int(sys.argv[1]))
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGUSR1)
time.sleep(1)
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("code, returned", [(138, 138), (143, 143), (75, 75), (130, -signal.SIGTERM)])
def test_a_stopped_run_keeps_its_exit_code_when_signalled_again(code, returned):
    """After an agreed stop (SIGUSR1, SIGTERM, memory), the launcher's SIGTERM to a rank still exiting is
    ignored, beyond SignalsInterrupt's end; after a Ctrl-C stop SIGTERM still ends the process."""
    proc = subprocess.run([sys.executable, "-c", IGNORED_AFTER_THE_STOP, str(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == returned, proc.stderr


def test_run_main_is_the_one_boundary(capsys):
    from distrnn import cli, errors

    def raise_(error):
        def fn():
            raise error
        return fn
    assert cli.run_main("prog", raise_(errors.SaveFailed("disk full"))) == 74
    assert cli.run_main("prog", raise_(KeyboardInterrupt())) == 130
    assert cli.run_main("prog", raise_(errors.Interrupted("by SIGTERM", 143))) == 143
    assert capsys.readouterr().err.splitlines() == [
        "prog: error: disk full", "prog: stopped: interrupted by SIGINT (Ctrl-C) before a run began; nothing was "
        "saved, nothing partial was written",
        "prog: stopped: by SIGTERM"]
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        cli.run_main("prog", lambda: 1 / 0)


def test_junk_in_launcher_environment_variables(tmp_path):
    from distrnn import errors
    from distrnn.parallel import srun
    proc = run_ptb(*TINY, "--data_path", tmp_path, "--save_path", tmp_path / "s",
                   env={"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "two"})
    assert_one_line_error(proc, "distrnn.ptb", "environment variable SLURM_STEP_NUM_TASKS='two': takes an integer")
    for env, fragment in (({"DISTRNN_RENDEZVOUS_PORT": "99999"}, "DISTRNN_RENDEZVOUS_PORT='99999': must be <= 65535"),
                          ({"SLURM_STEP_RESV_PORTS": "x-y"}, "SLURM_STEP_RESV_PORTS='x': takes an integer"),
                          ({"SLURM_JOB_ID": "12.5"}, "SLURM_JOB_ID='12.5': takes an integer")):
        with pytest.raises(errors.UsageError, match=fragment.replace(".", r"\.")):
            srun.rendezvous_port(env)


def test_weights_that_do_not_fit_in_memory(tmp_path):
    """32 TB of LSTM kernel: refused by the estimate before anything is allocated (on a CPU the allocation
    would succeed and the kernel's OOM killer end the process without a word). Within the host's memory but
    beyond the allocator's cap (a GPU's kind: CAPPED, 200 MB), TensorFlow's allocation fails while the model
    is built, outside any step."""
    corpus = write_corpus(tmp_path / "data")
    proc = run_ptb(*TINY, "--hidden_size", "1000000", "--data_path", corpus, "--save_path", tmp_path / "s")
    assert_one_line(proc, "distrnn.ptb", 76, "the model needs about 59,6", "GiB of host memory by distrnn's estimate",
                    "nothing was allocated", "lower --batch_size, --hidden_size")
    proc = run_ptb(*TINY, "--hidden_size", "4000", "--data_path", corpus, "--save_path", tmp_path / "s", env=CAPPED)
    assert_one_line(proc, "distrnn.ptb", 76, "ran out of memory outside a training step (OOM when allocating tensor "
                    "with shape[8000,16000]", "lower --hidden_size")


def test_check_finite_names_the_figure_and_the_last_checkpoint(tmp_path):
    from distrnn import errors
    from distrnn.run import stops

    class Saved:  # what check_finite reads of a Checkpoints
        def __init__(self, latest, manager=True):
            self.latest, self.manager, self.directory = latest, manager, str(tmp_path / "checkpoints")
    stops.check_finite(3, {"loss": 2.5, "gradient norm": 1e30}, Saved(None), "lower it")
    with pytest.raises(errors.Diverged) as caught:
        stops.check_finite(7, {"loss": float("nan"), "gradient norm": float("inf")}, Saved("x/ckpt-5"), "lower it")
    assert caught.value.exit_code == 65 and str(caught.value) == (
        "step 7: the loss is nan and the gradient norm is inf, so training diverged; its weights were not saved; the "
        "last good checkpoint is x/ckpt-5: lower it, then continue with --resume")
    with pytest.raises(errors.Diverged, match="the newest checkpoint in .*checkpoints is the last good one"):
        stops.check_finite(7, {"loss": float("inf")}, Saved(None, manager=None), "lower it")  # not the chief


def test_write_json_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    from distrnn import errors
    from distrnn.run import files
    path = tmp_path / "config.json"
    files.write_json(str(path), {"a": 1})

    def full_disk(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(errors.SaveFailed, match=r"could not write .*config.json \(No space left on device\)"):
        files.write_json(str(path), {"a": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["config.json"]
