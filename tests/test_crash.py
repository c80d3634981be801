"""Crash consistency, as databases test it: a small PTB run killed (kill -9) at many moments drawn from a
seeded generator (start-up, a step, a checkpoint's save, the best's, an evaluation, the end), resumed
after each until it finishes, ends with the figures of the run that was never interrupted, and
`score --checkpoint best` gives its best_test_perplexity; then the disk filled at each of those moments:
one line, exit 74, and the resumed run's figures the same again. The moments are distrnn.run.faults' points,
reached by the run itself (DISTRNN_FAULT), so no test waits on a run's speed."""
import json
import os
import random
import subprocess

import pytest

from conftest import assert_one_line, run_module, run_ptb, write_corpus
from distrnn.run import faults

# At lr 0.2 training is not chaotic (docs/runs.md): a restart that changed anything would show.
ARGS = ["--config", "test", "--hidden_size", "8", "--batch_size", "4", "--num_steps", "5", "--learning_rate", "0.2",
        "--max_max_epoch", "3", "--max_epoch", "1", "--keep_prob", "0.9", "--checkpoint_every", "9"]
FIGURES = ("steps", "epochs", "train_perplexity", "valid_perplexity", "test_perplexity", "best_epoch",
           "best_valid_perplexity", "best_test_perplexity", "history", "stopped_early")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: (its directory, corpus, metrics)."""
    root = tmp_path_factory.mktemp("crash")
    corpus = write_corpus(root / "data", train_words=1200, other_words=300)
    run_ptb(*ARGS, "--data_path", corpus, "--save_path", root / "run", "--metrics_json", root / "m.json", check=0)
    metrics = json.loads((root / "m.json").read_text())
    assert metrics["steps"] == 180 and len(metrics["history"]) == 3 and metrics["best_epoch"] == 3
    return root, corpus, metrics


def figures(metrics):
    return {key: metrics[key] for key in FIGURES}


def resume(corpus, save, metrics_json, fault=None):
    return run_ptb(*ARGS, "--data_path", corpus, "--save_path", save, "--resume", "--metrics_json", metrics_json,
                   env={faults.VARIABLE: fault} if fault else None)


def assert_finished_as_the_reference(corpus, save, metrics_json, reference_metrics):
    assert figures(json.loads(metrics_json.read_text())) == figures(reference_metrics)
    proc = run_module("distrnn.ptb.score", "--save_path", save, "--checkpoint", "best",
                      os.path.join(corpus, "ptb.test.txt"), "--metrics_json", metrics_json.with_suffix(".best.json"),
                      check=0)
    scored = json.loads(metrics_json.with_suffix(".best.json").read_text())
    assert scored["perplexity"] == pytest.approx(reference_metrics["best_test_perplexity"], rel=1e-5), proc.stdout
    assert scored["checkpoint_step"] == reference_metrics["history"][reference_metrics["best_epoch"] - 1]["step"]


def kill_plan(seed: int):
    """Faults along the run's life, in an order drawn from `seed`: each names a point and which time this
    process reaches it (each resumed process counts from its start, so each kill comes a little further
    on: up to 20 steps, up to 2 checkpoints, the next validation or best save), and a kill now or from a
    timer a few milliseconds on (landing inside the step or the save that follows); the last kill comes at
    the end, as the metrics are written."""
    rng = random.Random(seed)
    kinds = ["start", "eval", "best"] + ["step"] * 2 + ["checkpoint"] * 2
    rng.shuffle(kinds)
    limits = {"start": 1, "step": 20, "checkpoint": 2, "best": 1, "eval": 1}
    plan = []
    for name in kinds:
        delay = f"@{rng.uniform(0.0, 0.05):.3f}" if name in ("step", "checkpoint", "best") and rng.random() < 0.5 \
            else ""
        plan.append(f"{name}:{rng.randint(1, limits[name])}:kill{delay}")
    return plan + ["metrics:1:kill"]


@pytest.mark.slow
def test_killed_at_many_moments_the_run_ends_as_if_never_interrupted(reference, tmp_path):
    _, corpus, expected = reference
    save, metrics_json = tmp_path / "run", tmp_path / "m.json"
    killed = []
    for fault in kill_plan(seed=27):
        proc = resume(corpus, save, metrics_json, fault)
        assert proc.returncode in (0, -9), f"{fault}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr
        killed += [fault] * (proc.returncode == -9)
    print("killed at:", ", ".join(killed))
    assert {fault.split(":")[0] for fault in killed} == set(faults.POINTS)  # killed at every kind of moment
    resume(corpus, save, metrics_json).check_returncode()
    assert_finished_as_the_reference(corpus, save, metrics_json, expected)
    assert not any("_temp" in name or name.endswith(".tmp") for _, _, names in os.walk(save) for name in names)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)])


# Along the run's life, each resumed process counting from its start: a fresh run's first write, a step (its
# next write is a checkpoint), a checkpoint's save, a validation (then the epoch's checkpoint), the best save,
# the final metrics.
FULL_AT = ("start:1", "step:12", "checkpoint:2", "eval:1", "best:1", "metrics:1")


@pytest.mark.slow
def test_a_full_disk_at_each_moment_is_one_line_and_loses_nothing(reference, small_disk):
    """The disk fills at each kind of moment in turn (for real: a file of zeros up to the tmpfs's size); each
    time the run stops at its next write with 74 and one line, and once the space is freed, --resume goes on;
    the run ends as the uninterrupted one did."""
    _, corpus, expected = reference
    save, metrics_json, filler = small_disk / "run", small_disk / "m.json", small_disk / "filler"
    for moment in FULL_AT:
        proc = resume(corpus, save, metrics_json, f"{moment}:fill@{filler}")
        assert_one_line(proc, "distrnn.ptb", 74, "No space left on device")
        assert not any(name.endswith(".tmp") or "_temp" in name for _, _, names in os.walk(save) for name in names)
        os.remove(filler)
    resume(corpus, save, metrics_json).check_returncode()
    assert_finished_as_the_reference(corpus, save, metrics_json, expected)
