"""Property tests (hypothesis): every command, every flag, any value a user can type (integers of any size,
floats with nan, inf and subnormals, empty and unicode strings, bytes that are not UTF-8, paths to files,
directories, symlinks, loops and missing places, paths into a run's own files) ends in a documented exit
code, and where it is not 0 in one line on stderr, never in a traceback. The commands run in this process
(their `main`, what `python -m` calls), each example on a tiny run, so that hundreds fit in CI's time;
the examples are drawn in a fixed order (derandomize), so a failure is the same on every machine."""
import argparse
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_here, write_corpus, write_images
from distrnn import config, devices
from distrnn.errors import UsageError
from distrnn.mnist import cli as mnist_cli
from distrnn.parallel import slurm_env, srun
from distrnn.ptb import cli as ptb_cli, export, generate, score

DOCUMENTED = {0, 2, 65, 74, 75, 76, 130, 138, 143}  # docs/runs.md
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TINY = ["--config", "test", "--hidden_size", "4", "--batch_size", "2", "--num_steps", "3", "--max_steps", "2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A corpus, a trained run, and the kinds of path a hostile user gives: {name: path}."""
    root = tmp_path_factory.mktemp("world")
    corpus = write_corpus(root / "data", train_words=400, other_words=120, vocab=20)
    write_images(root / "images", train=60, test=20, rows=12, cols=3)
    run = root / "run"
    run_here("distrnn.ptb", *TINY[:-2], "--max_max_epoch", "1", "--data_path", corpus, "--save_path", run, check=0)
    (root / "dir").mkdir()
    (root / "text.txt").write_text("w1 w2 w3\nw4 w5\n")
    (root / "empty.txt").write_text("")
    (root / "binary.bin").write_bytes(b"\xff\xfe\x00\x01" * 64)
    os.symlink(root / "dir", root / "link_to_dir")
    os.symlink(root / "loop_a", root / "loop_b")
    os.symlink(root / "loop_b", root / "loop_a")
    os.symlink(run / "config.json", root / "link_into_run")
    paths = {name: str(root / name) for name in ("dir", "text.txt", "empty.txt", "binary.bin", "link_to_dir",
                                                  "loop_a", "link_into_run")}
    paths.update({"missing": str(root / "missing" / "x"), "fresh": str(root / "fresh.out"), "run": str(run),
                  "run config": str(run / "config.json"), "run vocab": str(run / "vocab.txt"),
                  "run checkpoint": str(run / "checkpoints" / "checkpoint"), "run lock": str(run / ".lock"),
                  "run metrics": str(run / "m.json"), "corpus": corpus, "under a file": str(root / "text.txt" / "x"),
                  "dev null": "/dev/null", "root": "/"})
    return root, corpus, str(run), paths


def numbers():
    return st.one_of(
        st.integers(-3, 40), st.just(2 ** 31 - 1), st.just(2 ** 31), st.integers(min_value=2 ** 31),
        st.integers(max_value=-2 ** 31), st.just(int("9" * 400)),
        st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
        st.sampled_from([5e-324, 1e-310, -0.0, 1e308, 3.5e38]),
    ).map(repr)


def texts():
    """What a user can type: any text the terminal passes (no NUL: argv cannot hold it), and bytes that
    are not UTF-8 as Python hands them over (surrogate escapes)."""
    return st.one_of(st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=30),
                     st.binary(max_size=12).filter(lambda b: b"\x00" not in b).map(os.fsdecode),
                     st.sampled_from(["", " ", "-", "--", "@", "nan", "1_000", "0x10", "\u0661\u0662", "1e999"]))


def values(paths):
    return st.one_of(numbers(), texts(), st.sampled_from(sorted(paths.values())))


def flags_of(parser: argparse.ArgumentParser, leave_out=()):
    """The long options of `parser` (subparsers' not included), with whether each takes a value."""
    found = []
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--") and option not in ("--help",) + tuple(leave_out):
                found.append((option, action.nargs != 0))
    return sorted(found)


def assert_documented(proc, prog, argv):
    code, stderr = proc.returncode, proc.stderr
    assert code in DOCUMENTED, f"{argv}: exit {code}\n{stderr}"
    assert "Traceback" not in stderr, f"{argv}:\n{stderr}"
    if code:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{prog}: "), f"{argv}:\n{stderr}"


def example(data, world, parser, base, leave_out=()):
    """One flag of `parser` and a value (or none, for a switch), after `base`."""
    _, _, _, paths = world
    flag, takes_value = data.draw(st.sampled_from(flags_of(parser, leave_out)), label="flag")
    return base + ([flag, data.draw(values(paths), label="value")] if takes_value else [flag])


def runs_as_documented(data, world, module, parser, base, leave_out=(), prog=None):
    """`module` with `base` and one drawn flag ends as documented; returns the argv."""
    argv = example(data, world, parser, base, leave_out)
    assert_documented(run_here(module, *argv, cwd=world[0] / "cwd"), prog or module, argv)
    return argv


def fresh(root, name="save"):
    """A save path no example has used: each training example starts a new run."""
    path = root / name
    shutil.rmtree(path, ignore_errors=True)
    return str(path)


# Flags whose valid values run for as long as they ask (a refresh loop, a child TensorFlow).
WAITS = ("--watch", "--device-lib")


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_training_takes_any_value_of_any_flag(data, world):
    root, corpus, _, _ = world
    # --max_steps 2 and the test preset's single epoch bound the work a valid value starts.
    runs_as_documented(data, world, "distrnn.ptb", ptb_cli.build_parser()[0],
                       [*TINY, "--data_path", corpus, "--save_path", fresh(root)], leave_out=("--list_configs",))


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_mnist_takes_any_value_of_any_flag(data, world):
    root = world[0]
    runs_as_documented(data, world, "distrnn.mnist", mnist_cli.build_parser()[0],
                       ["--config", "test", "--hidden_size", "4", "--max_steps", "2", "--data_path",
                        str(root / "images"), "--save_path", fresh(root, "mnist")], leave_out=("--list_configs",))


@settings(max_examples=50, **SETTINGS)
@given(data=st.data())
def test_score_takes_any_value_of_any_flag(data, world):
    root, corpus, run, paths = world
    argv = example(data, world, score.build_parser(), ["--save_path", run, os.path.join(corpus, "ptb.test.txt")])
    if data.draw(st.booleans(), label="another file"):
        argv.append(data.draw(values(paths), label="file"))
    assert_documented(run_here("distrnn.ptb.score", *argv, cwd=root / "cwd"), "distrnn.ptb.score", argv)
    assert sorted(os.listdir(run)) == sorted(world_run_files(run))  # nothing written into the run


def world_run_files(run):
    return [".lock", "best", "checkpoints", "config.json", "perplexity.png", "tensorboard", "vocab.txt"]


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_generate_takes_any_value_of_any_flag(data, world):
    runs_as_documented(data, world, "distrnn.ptb.generate", generate.build_parser(),
                       ["--save_path", world[2], "--words", "3", "--seed", "1"])


@settings(max_examples=25, **SETTINGS)
@given(data=st.data())
def test_export_takes_any_value_of_any_flag(data, world):
    root, _, run, _ = world
    runs_as_documented(data, world, "distrnn.ptb.export", export.build_parser(),
                       ["--save_path", run, "--export_dir", fresh(root, "export")])
    assert sorted(os.listdir(run)) == sorted(world_run_files(run))


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_devices_takes_any_value_of_any_flag(data, world):
    runs_as_documented(data, world, "distrnn.devices", devices.build_parser(), ["--no-tensorflow", "--plan"],
                       leave_out=WAITS)


SLURM_VARIABLES = ("SLURM_JOB_NODELIST", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_STEP_NODELIST",
                   "SLURM_STEP_TASKS_PER_NODE", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_ID", "SLURM_NODEID",
                   "SLURM_LOCALID", "SLURM_PROCID", "SLURM_JOB_ID", "SLURM_STEP_RESV_PORTS",
                   "DISTRNN_RENDEZVOUS_PORT", "SLURM_CPUS_PER_TASK")
# A two-task step on two nodes: each example changes some of it.
STEP = {"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_ID": "0", "SLURM_NODEID": "1", "SLURM_LOCALID": "0", "SLURM_PROCID": "1", "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "1(x2)"}


def slurm_values():
    return st.one_of(numbers(), texts(), st.sampled_from(["n[1-3]", "n[3-1]", "4(x2),2", "1(x999999)", "x[1-",
                                                          "12000-12001", "-1", "2"]))


@settings(max_examples=300, **SETTINGS)
@given(changes=st.dictionaries(st.sampled_from(SLURM_VARIABLES), slurm_values(), max_size=4))
def test_any_slurm_environment_is_a_task_or_one_line(changes):
    """Slurm's variables as srun sets them, some replaced by junk: a task laid out, or a UsageError."""
    env = dict(STEP, **changes)
    for read in (slurm_env.srun_task, srun.rendezvous_port, slurm_env.horovod_hosts):
        try:
            read(env)
        except UsageError as e:
            assert "\n" not in str(e)


@settings(max_examples=40, **SETTINGS)
@given(what=st.sampled_from(["hosts", "np"]),
       changes=st.dictionaries(st.sampled_from(SLURM_VARIABLES), slurm_values(), max_size=3))
def test_the_slurm_command_takes_any_environment(what, changes, monkeypatch, tmp_path):
    for name, value in dict(STEP, **changes).items():
        monkeypatch.setenv(name, value)
    assert_documented(run_here("distrnn.slurm", what, cwd=tmp_path), "python -m distrnn.slurm", [what, changes])


@settings(max_examples=300, **SETTINGS)
@given(text=st.one_of(numbers(), texts()), kind=st.sampled_from([int, float]),
       bounds=st.tuples(st.none() | st.integers(-5, 5), st.none() | st.integers(-5, 10 ** 6)))
def test_the_number_parser_returns_a_value_in_range_or_one_reason(text, kind, bounds):
    minimum, maximum = bounds
    try:
        value = config.read_number(text, kind, minimum=minimum, maximum=maximum)
    except ValueError as e:
        assert "\n" not in str(e) and len(str(e)) < 200
        return
    assert type(value) is kind
    assert (minimum is None or value >= minimum) and value <= (maximum if maximum is not None else config.INT_MAX
                                                                if kind is int else float("inf"))
