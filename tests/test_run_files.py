"""A run's files belong to the run (issue 27's defects, each through the command line: in this process,
conftest.run_here, where no process boundary is at stake; in a process of its own for a kill, a signal or
what is read before the command's first line): what a run reports of its best epoch and what best/ holds
never disagree; no command writes inside a save path it does not hold; every checkpoint is read one way;
every file is written one way; signals and numbers are one line from the first moment; contradicting flags
are refused from every entry point."""
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile

import pytest

from conftest import (assert_one_line, assert_one_line_error, run_here, run_module, run_ptb, signalled_while_held,
                      write_corpus)
from distrnn.run import faults
from test_hostile import snapshot

TINY = ["--config", "test", "--hidden_size", "8", "--batch_size", "4", "--num_steps", "5"]
# Two epochs, the second better than the first (the learning rate halves after epoch 1).
TWO_EPOCHS = [*TINY, "--max_max_epoch", "2", "--max_epoch", "1", "--learning_rate", "0.5"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-epoch run: (save path, corpus, metrics); each test takes a copy."""
    root = tmp_path_factory.mktemp("finished")
    corpus = write_corpus(root / "data", train_words=1500, other_words=400)
    run_here("distrnn.ptb", *TWO_EPOCHS, "--data_path", corpus, "--save_path", root / "run", "--metrics_json",
             root / "m.json", check=0)
    metrics = json.loads((root / "m.json").read_text())
    assert metrics["best_epoch"] == 2 and len(metrics["history"]) == 2
    return root / "run", corpus, metrics


@pytest.fixture
def run(finished, tmp_path):
    save, corpus, metrics = finished
    shutil.copytree(save, tmp_path / "run")
    return tmp_path / "run", corpus, metrics


def score(save, corpus, *args, check=0, process=False):
    """`score` of the run's test file; process: in a process of its own (where what TensorFlow's logging
    writes to stderr counts: in this process it does not reach the captured stream)."""
    run = run_module if process else run_here
    return run("distrnn.ptb.score", "--save_path", save, os.path.join(corpus, "ptb.test.txt"), *args, check=check)


def scored(save, corpus, out, *args):
    score(save, corpus, "--metrics_json", out, *args)
    return json.loads(out.read_text())


def best_numbers(save):
    return sorted(int(n[5:-6]) for n in os.listdir(save / "best") if n.endswith(".index"))


# --- the best checkpoint is part of the epoch's commit ---------------------------------------------------
@pytest.mark.parametrize("fault", ["best:2:kill", "best:2:kill@0.002"])
def test_a_kill_between_the_epochs_checkpoint_and_its_best_save_is_repaired(finished, tmp_path, fault):
    """Killed after epoch 2's checkpoint, before (or while) its best is saved: best/ still holds epoch 1.
    The resumed run finds that out, copies epoch 2's checkpoint into best/, and then its metrics and
    `score --checkpoint best` agree, as in the run that was never killed."""
    _, corpus, expected = finished
    save = tmp_path / "run"
    args = [*TWO_EPOCHS, "--data_path", corpus, "--save_path", save, "--metrics_json", tmp_path / "m.json"]
    killed = run_ptb(*args, env={faults.VARIABLE: fault})
    assert killed.returncode == -signal.SIGKILL
    steps = expected["steps_per_epoch"]
    assert best_numbers(save) in ([steps], [steps, 2 * steps], [2 * steps])
    resumed = run_here("distrnn.ptb", *args, "--resume", check=0)
    if best_numbers(save) != [2 * steps] or "copied it from checkpoints/" in resumed.stdout:
        assert "best/ did not hold the best epoch's checkpoint (step " in resumed.stdout
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert (metrics["best_epoch"], metrics["best_test_perplexity"]) == (2, expected["best_test_perplexity"])
    assert best_numbers(save) == [2 * steps]
    figures = scored(save, corpus, tmp_path / "s.json", "--checkpoint", "best")
    assert figures["perplexity"] == pytest.approx(metrics["best_test_perplexity"], rel=1e-5)
    assert (figures["checkpoint_step"], figures["checkpoint_epochs"]) == (2 * steps, 2)


def test_a_damaged_best_checkpoint_is_copied_again(run, tmp_path):
    save, corpus, expected = run
    steps = expected["steps_per_epoch"]
    data = save / "best" / f"ckpt-{2 * steps}.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:500])
    proc = run_here("distrnn.ptb", *TWO_EPOCHS, "--data_path", corpus, "--save_path", save, "--resume",
                    "--metrics_json", tmp_path / "m.json", check=0)
    assert "copied it from checkpoints/" in proc.stdout
    assert json.loads((tmp_path / "m.json").read_text())["best_test_perplexity"] == expected["best_test_perplexity"]


def test_best_weights_that_are_gone_are_said_and_not_reported(tmp_path):
    """A best epoch before the last whose checkpoint has left checkpoints/ (rotated), and best/ damaged: the
    resumed run says so and reports no best figures, rather than figures of weights it does not have."""
    corpus = write_corpus(tmp_path / "data")
    # Overfits the corpus within 6 epochs (tests/test_best.py): the best epoch is not the last.
    args = ["--config", "test", "--hidden_size", "64", "--num_steps", "5", "--batch_size", "10", "--max_max_epoch",
            "6", "--max_epoch", "6", "--max_grad_norm", "5", "--data_path", corpus, "--save_path", tmp_path / "run",
            "--metrics_json", tmp_path / "m.json"]
    run_here("distrnn.ptb", *args, check=0)
    full = json.loads((tmp_path / "m.json").read_text())
    step = full["history"][full["best_epoch"] - 1]["step"]
    assert full["best_epoch"] < 6 and not (tmp_path / "run" / "checkpoints" / f"ckpt-{step}.index").exists()
    data = tmp_path / "run" / "best" / f"ckpt-{step}.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:500])
    proc = run_here("distrnn.ptb", *args, "--resume", check=0)
    assert f"the best epoch's weights (step {step}) are in neither best/ nor checkpoints/" in proc.stdout
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["best_epoch"] is None and metrics["best_test_perplexity"] is None
    assert metrics["history"] == full["history"]
    assert_one_line_error(run_here("distrnn.ptb.score", "--save_path", tmp_path / "run", "--checkpoint", "best",
                                   os.path.join(corpus, "ptb.test.txt")),
                          "distrnn.ptb.score", "no checkpoint in", "best", "--checkpoint last")


# --- a save path is the run's own ----------------------------------------------------------------------
def test_no_command_writes_into_a_run(run, tmp_path):
    save, corpus, _ = run
    other = tmp_path / "other"
    shutil.copytree(save, other)
    os.symlink(save / "vocab.txt", tmp_path / "link")
    before = snapshot(save)
    lock = os.stat(save / ".lock").st_mtime_ns, (save / ".lock").read_bytes()
    refusals = [
        (score(save, corpus, "--per_line", save / "vocab.txt", check=None), "distrnn.ptb.score", "--per_line"),
        (score(save, corpus, "--metrics_json", save / "config.json", check=None), "distrnn.ptb.score", "config.json"),
        (score(save, corpus, "--metrics_json", save / "new.json", check=None), "distrnn.ptb.score", "new.json"),
        (score(save, corpus, "--per_line", tmp_path / "link", check=None), "distrnn.ptb.score", "link"),
        (score(save, corpus, "--per_line", save / "checkpoints" / "x", check=None), "distrnn.ptb.score", "x"),
        (run_here("distrnn.ptb.export", "--save_path", save, "--export_dir", save / "export"), "distrnn.ptb.export",
         "--export_dir"),
        (run_here("distrnn.ptb", *TWO_EPOCHS, "--data_path", corpus, "--save_path", save, "--resume", "--metrics_json",
                  save / "config.json"), "distrnn.ptb", "is the run's own config.json"),
        (run_here("distrnn.ptb", *TWO_EPOCHS, "--data_path", corpus, "--save_path", save, "--resume", "--metrics_json",
                  other / "m.json"), "distrnn.ptb", f"inside the save path {other}"),
        (run_here("distrnn.ptb", *TWO_EPOCHS, "--data_path", corpus, "--save_path", save / "checkpoints" / "nested"),
         "distrnn.ptb", "is inside the save path"),
    ]
    for proc, prog, fragment in refusals:
        assert_one_line_error(proc, prog, fragment)
    assert snapshot(save) == before
    assert (os.stat(save / ".lock").st_mtime_ns, (save / ".lock").read_bytes()) == lock  # refused before the lock
    assert not (save / "checkpoints" / "nested").exists()


# --- one way to read a checkpoint ----------------------------------------------------------------------
def test_score_reads_past_a_truncated_checkpoint_and_names_the_files_when_none_reads(run, tmp_path):
    save, corpus, expected = run
    numbers = sorted(int(n[5:-6]) for n in os.listdir(save / "checkpoints") if n.endswith(".index"))
    newest = save / "checkpoints" / f"ckpt-{numbers[-1]}.data-00000-of-00001"
    newest.write_bytes(newest.read_bytes()[:700])
    proc = score(save, corpus, process=True)
    assert proc.stderr.strip() == (f"distrnn.ptb.score: note: skipped ckpt-{numbers[-1]} (IndexError: Read less bytes "
                                   f"than requested): read the next older one, ckpt-{numbers[-2]}")
    for number in numbers:
        path = save / "checkpoints" / f"ckpt-{number}.data-00000-of-00001"
        path.write_bytes(path.read_bytes()[:700])
    proc = score(save, corpus, check=None, process=True)
    assert_one_line_error(proc, "distrnn.ptb.score", "reads whole", *(f"ckpt-{n} (IndexError" for n in numbers))
    assert "config.json" not in proc.stderr  # the real cause, not an edited config


def test_an_edited_config_is_one_line_and_a_leftover_temp_file_no_refusal(run, tmp_path):
    save, corpus, expected = run
    steps = expected["steps_per_epoch"]
    (save / "best" / f"ckpt-{3 * steps}_temp").mkdir()  # a best save killed long ago
    figures = scored(save, corpus, tmp_path / "s.json", "--checkpoint", "best")
    assert figures["perplexity"] == pytest.approx(expected["best_test_perplexity"], rel=1e-5)
    config = json.loads((save / "config.json").read_text())
    (save / "config.json").write_text(json.dumps(dict(config, hidden_size=9)))
    proc = score(save, corpus, check=None, process=True)
    assert_one_line_error(proc, "distrnn.ptb.score", "does not fit this model",
                          "its config.json may have been edited")  # one line: no TensorFlow warnings after it


# --- one way to write a file ---------------------------------------------------------------------------
def test_export_at_a_symlink_or_under_a_file(run, tmp_path):
    save, _, _ = run
    (tmp_path / "empty").mkdir()
    os.symlink(tmp_path / "empty", tmp_path / "link")
    run_here("distrnn.ptb.export", "--save_path", save, "--export_dir", tmp_path / "link", check=0)
    assert (tmp_path / "empty" / "saved_model.pb").is_file() and os.path.islink(tmp_path / "link")
    (tmp_path / "file").write_text("x")
    proc = run_here("distrnn.ptb.export", "--save_path", save, "--export_dir", tmp_path / "file" / "model")
    assert_one_line_error(proc, "distrnn.ptb.export", "is not a writable directory")


@pytest.fixture
def mount(tmp_path):
    """mount(options) -> a fresh tmpfs (root only; skipped elsewhere), unmounted at the end."""
    mounted = []

    def make(options):
        path = tmp_path / f"mount{len(mounted)}"
        path.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(path)
        return path
    yield make
    for path in mounted:
        subprocess.run(["umount", str(path)])


def test_export_onto_a_full_disk_is_74_and_leaves_nothing(run, mount):
    save, _, _ = run
    disk = mount("size=64k")
    proc = run_here("distrnn.ptb.export", "--save_path", save, "--export_dir", disk / "model")
    assert_one_line(proc, "distrnn.ptb.export", 74, "No space left on device", "nothing partial was left")
    assert os.listdir(disk) == []


def test_a_read_only_download_cache_is_74(tmp_path, mount):
    home = mount("ro,size=64k")
    proc = run_here("distrnn.ptb", *TINY, "--save_path", tmp_path / "s", env={"HOME": str(home)})
    assert_one_line(proc, "distrnn.ptb", 74, f"could not write the data cache {home}/.cache/distrnn/ptb "
                    "(Read-only file system)", "--data_path")


def test_a_mirror_archive_with_a_directory_for_a_file(tmp_path):
    archive = tmp_path / "simple-examples.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("ptb.valid.txt", "ptb.test.txt"):
            info = tarfile.TarInfo(f"./simple-examples/data/{name}")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"a b"))
        info = tarfile.TarInfo("./simple-examples/data/ptb.train.txt")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    proc = run_here("distrnn.ptb", *TINY, "--save_path", tmp_path / "s",
                    env={"HOME": str(tmp_path / "home"), "DISTRNN_PTB_URL": f"file://{archive}"})
    assert_one_line_error(proc, "distrnn.ptb", "is not the simple-examples archive",
                          "simple-examples/data/ptb.train.txt is not a file")
    assert not os.path.exists(tmp_path / "home" / ".cache" / "distrnn" / "ptb" / "ptb.train.txt")


def test_a_temperature_below_the_smallest_double_picks_the_likeliest_word(run):
    save, _, _ = run
    words = [run_here("distrnn.ptb.generate", "--save_path", save, "--words", "12", "--seed", str(seed),
                      "--temperature", temperature, check=0).stdout for seed, temperature in
             ((1, "1e-310"), (2, "1e-310"))]
    alone = run_module("distrnn.ptb.generate", "--save_path", save, "--words", "12", "--seed", "3", "--temperature",
                       "5e-324", check=0)  # a process of its own: a numpy warning would reach its stderr
    assert words[0] == words[1] == alone.stdout and len(words[0].split()) >= 5  # greedy: the seed draws nothing
    assert alone.stderr == ""


# --- signals from the first line ----------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_signal_while_tensorflow_loads(sig, run, tmp_path):
    """TensorFlow's import held (a stand-in package that waits on a FIFO, first on PYTHONPATH) while a
    --resume starts: the signal ends it in one line with 128 + the signal, and the run is untouched."""
    save, corpus, _ = run
    fifo = tmp_path / "held"
    os.mkfifo(fifo)
    shadow = tmp_path / "shadow" / "tensorflow"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(f"open({str(fifo)!r}).read()\n")
    before = snapshot(save)
    env = dict(os.environ, PYTHONPATH=str(shadow.parent), TF_CPP_MIN_LOG_LEVEL="0")
    proc = signalled_while_held(["-m", "distrnn.ptb", *TWO_EPOCHS, "--data_path", corpus, "--save_path", save,
                                 "--resume"], sig, fifo, env)
    assert_one_line(proc, "distrnn.ptb", 128 + sig, f"interrupted by {signal.Signals(sig).name}",
                    "nothing was saved", label="stopped")
    assert snapshot(save) == before


# --- one way to read a number --------------------------------------------------------------------------
@pytest.mark.parametrize("module, args, fragment", [
    ("distrnn.ptb", ["--max_steps", "9" * 400], "argument --max_steps: must be <= 2147483647"),
    ("distrnn.ptb", ["--hidden_size", "9" * 400], "--hidden_size must be <= 2147483647"),
    ("distrnn.ptb", ["--learning_rate", "9" * 400], "--learning_rate must be a finite number"),
    ("distrnn.ptb", ["--num_layers", "101"], "num_layers must be at most 100"),
    ("distrnn.mnist", ["--batch_size", "-" + "9" * 400], "--batch_size must be >= -2147483648, got '-99999"),
    ("distrnn.ptb.generate", ["--save_path", "x", "--words", "9" * 400], "argument --words: must be <= 1000000"),
    ("distrnn.devices", ["--plan", "--vocab_size", "9" * 5000], "argument --vocab_size: must be <= 2147483647"),
    ("distrnn.ptb", ["--seed", "\u0661\u0662"], "argument --seed: takes an integer"),
])
def test_numbers_of_any_size_are_one_line(module, args, fragment, tmp_path):
    proc = run_module(module, *(TINY if module == "distrnn.ptb" else []), *args, "--save_path", tmp_path / "s") \
        if module in ("distrnn.ptb", "distrnn.mnist") else run_module(module, *args)
    prog = "distrnn.devices" if module == "distrnn.devices" else module
    assert_one_line_error(proc, prog, fragment)
    assert len(proc.stderr) < 400


@pytest.mark.parametrize("variables, fragment", [
    ({"SLURM_NODEID": "abc"}, "SLURM_NODEID='abc': takes an integer"),
    ({"SLURM_LOCALID": "5"}, "SLURM_LOCALID='5': must be <= 0 (the step has 1 task(s) on node n2)"),
    ({"SLURM_PROCID": "9" * 400}, "SLURM_PROCID='99999999999999999999"),
])
def test_srun_task_variables_that_are_junk_or_out_of_range(variables, fragment, tmp_path):
    step = {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "n[1-2]",
            "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_NODEID": "1", "SLURM_LOCALID": "0", "SLURM_PROCID": "1"}
    proc = run_here("distrnn.ptb", *TINY, "--save_path", tmp_path / "s", env=dict(step, **variables))
    assert_one_line_error(proc, "distrnn.ptb", fragment)


# --- contradicting flags, refused in one place ---------------------------------------------------------
def test_contradicting_flags_from_every_entry_point(tmp_path):
    from distrnn.errors import UsageError
    from distrnn.ptb.configs import RunOptions
    for module, extra in (("distrnn.ptb", TINY), ("distrnn.mnist", ["--config", "test"]),
                          ("distrnn.devices", ["--plan", "--no-tensorflow"])):
        save = ["--save_path", tmp_path / "s"] if module != "distrnn.devices" else []
        proc = run_here(module, *extra, *save, "--use_fp16", "--precision", "float32")
        assert_one_line_error(proc, module, "--use_fp16 means --precision float16, and --precision float32 was given")
    assert RunOptions(use_fp16=True, precision="float16").compute_precision == "float16"
    assert RunOptions().compute_precision == "float32" and RunOptions(use_fp16=True).compute_precision == "float16"
    for wrong, fragment in (({"use_fp16": True, "precision": "bfloat16"}, "--use_fp16 means --precision float16"),
                            ({"max_steps": -1}, "--max_steps must be >= 0"), ({"seed": 2 ** 40}, "--seed must be <="),
                            ({"mem_warn": float("nan")}, "--mem_warn must be a finite number"),
                            ({"strategy": "spread"}, "--strategy must be one of"),
                            ({"recompute": 4, "swap_memory": True}, "alternatives")):
        with pytest.raises(UsageError, match=fragment):
            RunOptions(**wrong)
    options = RunOptions()
    options.precision, options.use_fp16 = "float32", True  # changed after it was made: start.run checks again
    from distrnn.config import override
    from distrnn.ptb.configs import PRESETS
    from distrnn.ptb import job as ptb_job
    with pytest.raises(UsageError, match="--use_fp16 means --precision float16"):
        ptb_job.run(override(PRESETS.get("test"), {}), options)
