"""The real command line: bad input, checkpoints that survive it, kill and resume."""
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, assert_one_line_error, checkpoint_step, hide_horovod, run_ptb, subprocess_env
from distrnn import cli

TINY = ["--config", "test", "--hidden_size", "8", "--batch_size", "4", "--num_steps", "5"]


def assert_usage_error(proc, *fragments):
    assert_one_line_error(proc, "distrnn.ptb", *fragments)


def checkpoint_files(save_path):
    directory = os.path.join(save_path, "checkpoints")
    return {name: os.path.getmtime(os.path.join(directory, name)) for name in sorted(os.listdir(directory))}


@pytest.mark.parametrize("args, fragments", [
    (["--hidden_size", "0"], ["hidden_size must be positive, got 0"]),
    (["--batch_size", "-2"], ["batch_size must be positive, got -2"]),
    (["--hidden_size", "big"], ["--hidden_size takes an integer, got 'big'"]),
    (["--hidden_sise", "10"], ["unrecognized arguments: --hidden_sise", "did you mean --hidden_size?"]),
    (["--config", "huge"], ["unknown --config 'huge'"]),
    (["--max_steps", "-1"], ["argument --max_steps: must be >= 0, got '-1'"]),
    (["--gpus_per_rank", "1"], ["--gpus_per_rank 1: this machine has no GPU; on CPUs, --virtual_devices N gives "
                                "each rank N logical devices instead"]),
])
def test_bad_flags(args, fragments, corpus, tmp_path):
    assert_usage_error(run_ptb(*TINY, "--data_path", corpus, "--save_path", tmp_path / "s", *args), *fragments)
    assert not (tmp_path / "s").exists()


def test_flags_from_files(tmp_path, corpus):
    """@FILE: shell words, comments, nested files; what it expands to is exactly what the command line
    would have held. A bad file is one line, exit 2, and nothing is created."""
    (tmp_path / "size.flags").write_text("--hidden_size 9   # a comment\n")
    (tmp_path / "run.flags").write_text(f"# the test run\n--config test --max_steps 2\n@{tmp_path / 'size.flags'}\n"
                                        f"--save_path '{tmp_path / 'with space'}'\n")
    assert cli.read_flag_files(["--seed", "3", f"@{tmp_path / 'run.flags'}", "@"]) == [
        "--seed", "3", "--config", "test", "--max_steps", "2", "--hidden_size", "9", "--save_path",
        str(tmp_path / "with space"), "@"]
    proc = run_ptb(f"@{tmp_path / 'run.flags'}", "--data_path", corpus, "--metrics_json", tmp_path / "m.json",
                   check=0)
    m = json.loads((tmp_path / "m.json").read_text())
    assert (m["config"]["hidden_size"], m["steps"], m["save_path"]) == (9, 2, str(tmp_path / "with space"))
    (tmp_path / "binary.flags").write_bytes(b"--seed \xff\xfe 1\n")
    (tmp_path / "quote.flags").write_text("--save_path 'unclosed\n")
    (tmp_path / "self.flags").write_text(f"@{tmp_path / 'self.flags'}\n")
    for name, fragments in (("binary.flags", ["is not UTF-8 text (byte 0xff at offset 7)"]),
                            ("quote.flags", ["line 1: No closing quotation"]),
                            ("self.flags", ["nested 8 files deep: does a flag file name itself?"]),
                            ("none.flags", ["cannot read flag file", "(No such file or directory)"]),
                            ("", ["cannot read flag file", "(Is a directory)"])):
        proc = run_ptb("--config", "test", f"@{tmp_path / name}", "--data_path", corpus, "--save_path", tmp_path / "s")
        assert_usage_error(proc, *fragments)
    assert not (tmp_path / "s").exists()


def test_missing_and_empty_data(tmp_path, corpus):
    assert_usage_error(run_ptb(*TINY, "--data_path", tmp_path / "nowhere", "--save_path", tmp_path / "s"),
                       "missing data file", "ptb.train.txt", "--data_path")
    with open(os.path.join(corpus, "ptb.test.txt"), "w"):
        pass
    assert_usage_error(run_ptb(*TINY, "--data_path", corpus, "--save_path", tmp_path / "s"),
                       "ptb.test.txt is empty", "--data_path")


def test_batch_larger_than_split(corpus, tmp_path):
    assert_usage_error(run_ptb("--config", "test", "--batch_size", "500", "--num_steps", "20",
                               "--data_path", corpus, "--save_path", tmp_path / "s"),
                       "too few for batch_size x num_steps = 500 x 20", "lower --batch_size or --num_steps")


def test_unwritable_save_path(corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert_usage_error(run_ptb(*TINY, "--data_path", corpus, "--save_path", blocker / "run"),
                       "cannot write to --save_path", "pass a directory you can write to")
    assert blocker.read_text() == "not a directory"


@pytest.mark.slow
def test_checkpoints_are_never_clobbered(corpus, tmp_path):
    save = tmp_path / "run"
    run_ptb(*TINY, "--data_path", corpus, "--save_path", save, "--max_steps", "3", check=0)
    before = checkpoint_files(save)
    assert "checkpoint" in before
    # A fresh run into the same save_path would overwrite it: refused.
    assert_usage_error(run_ptb(*TINY, "--data_path", corpus, "--save_path", save, "--max_steps", "3"),
                       "already holds checkpoints", "--resume")
    # Resuming with another shape: refused, with the fields named.
    assert_usage_error(run_ptb(*TINY[:-4], "--hidden_size", "12", "--batch_size", "4", "--data_path", corpus,
                               "--save_path", save, "--resume"),
                       "are from another config", "hidden_size=8 there, 12 here")
    # Even without config.json to compare, the shapes are checked on restore.
    os.remove(save / "config.json")
    assert_usage_error(run_ptb(*TINY[:-4], "--hidden_size", "12", "--batch_size", "4", "--data_path", corpus,
                               "--save_path", save, "--resume"),
                       "does not fit this model")
    assert checkpoint_files(save) == before


@pytest.mark.slow
def test_kill_and_resume_continues_as_uninterrupted(corpus, tmp_path, background_process):
    """Stopped as Slurm stops it ahead of a time limit (SIGUSR1) and resumed, a run ends where an uninterrupted
    one ends. The run has no end it could reach before the signal, however fast the machine: its end is set
    on resume. Once it has saved, a SIGTERM (what srun --kill-on-bad-exit sends the ranks still running
    when one has exited) does not change its exit code."""
    common = ["--config", "test", "--hidden_size", "8", "--batch_size", "2", "--num_steps", "3", "--max_max_epoch",
              "1000000", "--data_path", corpus, "--checkpoint_every", "100000"]
    proc = background_process(*common, "--save_path", tmp_path / "b", "--metrics_json", tmp_path / "never.json")
    for line in proc.stdout:  # wait until it is training, then stop it as a scheduler would
        if "words/sec" in line:
            break
    proc.send_signal(signal.SIGUSR1)
    output = ""
    for line in proc.stdout:
        output += line
        if "stopped by signal: checkpoint saved" in line:
            proc.send_signal(signal.SIGTERM)  # still exiting: TensorFlow's shutdown takes a while
            break
    output += proc.stdout.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGUSR1, output
    assert "stopped by signal: checkpoint saved" in output
    assert not (tmp_path / "never.json").exists()
    stopped_at = checkpoint_step(tmp_path / "b")
    assert stopped_at > 0
    end = ["--max_steps", stopped_at + 100]

    resumed = tmp_path / "resumed.json"
    proc = run_ptb(*common, *end, "--save_path", tmp_path / "b", "--resume", "--metrics_json", resumed, check=0)
    assert "resumed from" in proc.stdout and f"ckpt-{stopped_at}" in proc.stdout
    straight = tmp_path / "straight.json"
    run_ptb(*common, *end, "--save_path", tmp_path / "a", "--metrics_json", straight, check=0)
    a, b = json.loads(straight.read_text()), json.loads(resumed.read_text())
    assert b["steps"] == a["steps"] == stopped_at + 100
    for key in ("train_perplexity", "valid_perplexity", "test_perplexity"):
        assert b[key] == pytest.approx(a[key], rel=1e-6), key


def test_list_configs():
    proc = run_ptb("--list_configs", check=0)
    assert "small     published test ppl 115.91" in proc.stdout
    assert "large     published test ppl 78.29" in proc.stdout


@pytest.mark.slow
def test_small_preset_on_ptb_mini(ptb_mini, tmp_path):
    """The real preset on real data for a few steps, through the command line."""
    metrics = tmp_path / "m.json"
    proc = run_ptb("--config", "small", "--data_path", ptb_mini, "--save_path", tmp_path / "run", "--max_steps", "30",
                   "--metrics_json", metrics, check=0)
    m = json.loads(metrics.read_text())
    assert m["vocab_size"] == 6049 and m["steps"] == 30
    assert m["oov"] == {"valid": 0, "test": 0}  # ptb-mini's vocabulary is closed, as in standard PTB
    # 30 steps of SGD take the model well below the uniform guess (perplexity = vocabulary size).
    assert m["test_perplexity"] < 0.5 * 6049
    assert "test ppl" in proc.stdout


def test_runs_without_horovod(corpus, tmp_path, monkeypatch):
    """Horovod is optional: with it unimportable the job runs as one process."""
    hide_horovod(tmp_path, monkeypatch)
    metrics = tmp_path / "m.json"
    run_ptb(*TINY, "--data_path", corpus, "--save_path", tmp_path / "s", "--max_steps", "3",
            "--metrics_json", metrics, check=0)
    m = json.loads(metrics.read_text())
    assert m["versions"]["horovod"] is None and m["world_size"] == 1 and m["steps"] == 3


def test_default_data_offline_and_corrupt(tmp_path, monkeypatch):
    """Without --data_path the standard PTB is fetched into ~/.cache/distrnn/ptb and checked."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DISTRNN_PTB_URL", "http://127.0.0.1:9/simple-examples.tgz")  # nothing listens there
    assert_usage_error(run_ptb(*TINY, "--save_path", tmp_path / "s"), "could not download PTB", "--data_path")
    cache = tmp_path / ".cache" / "distrnn" / "ptb"
    for name in ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"):
        (cache / name).write_text("a b c\n")
    assert_usage_error(run_ptb(*TINY, "--save_path", tmp_path / "s"),
                       "ptb.train.txt does not match the standard PTB file", "--data_path")
    assert (cache / "ptb.train.txt").read_text() == "a b c\n"  # the user's files are left alone


def test_ranks_sharing_an_output_never_merge_their_lines():
    """Launchers run ranks unbuffered (PYTHONUNBUFFERED) into one terminal or log: every line a command
    prints leaves in one write, so two ranks printing at once never make one line of two (measured before:
    1,808 of 40,000 lines merged or empty)."""
    program = ("import sys; from distrnn import cli; "
               "cli.run_main('x', lambda: [print(f'rank {sys.argv[1]}: line {i} ' + 'x' * 200) for i in range(20000)])")
    env = subprocess_env()  # PYTHONUNBUFFERED=1
    read, write = os.pipe()
    ranks = [subprocess.Popen([sys.executable, "-c", program, str(rank)], cwd=ROOT, env=env, stdout=write)
             for rank in (0, 1)]
    os.close(write)
    with os.fdopen(read) as shared:
        lines = shared.read().splitlines()
    assert [rank.wait() for rank in ranks] == [0, 0]
    assert len(lines) == 40000 and all(line.count("rank ") == 1 for line in lines)
