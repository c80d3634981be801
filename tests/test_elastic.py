"""Elastic by restart (issue 30): a run saved by N workers goes on on M (1 included), the global batch kept,
as if it had never stopped: the data order, the carried LSTM state's rows, the dropout masks, the learning
rate and the loss scale follow the global batch, not the number of workers. Real worker processes under
`python -m distrnn.launch` (TensorFlow's collectives, on whichever stack runs the test)."""
import json
import socket
import subprocess
import sys

import pytest

from conftest import (ENGINES, HOROVODRUN, ROOT, assert_one_line_error, checkpoint_step, hide_horovod, launched,
                      run_module, subprocess_env, write_corpus, write_images)
from distrnn.launch import local
from distrnn.parallel import join
from distrnn.parallel.batch import global_batch_in, most_workers
from distrnn.run import faults

# At --learning_rate 0.2 training is not chaotic (docs/runs.md): a restart that changed anything would show.
PTB = ["--config", "test", "--hidden_size", "8", "--num_layers", "2", "--num_steps", "5", "--max_max_epoch", "2",
       "--max_epoch", "1", "--keep_prob", "0.7", "--max_grad_norm", "5", "--learning_rate", "0.2", "--seed", "3",
       "--global_batch_size", "6"]


def train(module, workers, *args):
    """`module ARGS` on `workers` processes (one: no launcher)."""
    if workers == 1:
        return run_module(module, *args, check=0)
    return launched("tensorflow", workers, *args, module=module)


def in_three_parts(module, common, ends, tmp_path):
    """The run on 2 workers until ends[0], on 1 until ends[1], on 3 to its end; then uninterrupted on 1.
    Returns both metrics and the elastic run's output."""
    outputs = []
    for workers, end in zip((2, 1, 3), ends):
        limit = ["--max_steps", end] if end else []
        outputs.append(train(module, workers, *common, *limit, "--resume", "--save_path", tmp_path / "elastic",
                             "--metrics_json", tmp_path / "elastic.json").stdout)
    train(module, 1, *common, "--save_path", tmp_path / "whole", "--metrics_json", tmp_path / "whole.json")
    elastic, whole = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("elastic", "whole"))
    return elastic, whole, outputs


@pytest.mark.slow
def test_ptb_with_dropout_goes_on_at_every_size_as_if_uninterrupted(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", train_words=2000, other_words=600)
    elastic, whole, outputs = in_three_parts("distrnn.ptb", [*PTB, "--data_path", corpus], (30, 80, None), tmp_path)
    assert elastic["steps"] == whole["steps"] == 2 * elastic["steps_per_epoch"]
    assert len(elastic["history"]) == len(whole["history"]) == 2
    for a, b in zip(elastic["history"], whole["history"]):
        assert a["train_perplexity"] == pytest.approx(b["train_perplexity"], rel=1e-5)
        assert a["valid_perplexity"] == pytest.approx(b["valid_perplexity"], rel=1e-4)
    assert elastic["test_perplexity"] == pytest.approx(whole["test_perplexity"], rel=1e-4)
    assert [(s["step"], s["world_size"]) for s in elastic["sizes"]] == [(0, 2), (30, 1), (80, 3)]
    assert [s["engine"] for s in elastic["sizes"]] == ["tensorflow", "one process", "tensorflow"]
    assert (elastic["world_size"], elastic["global_batch_size"]) == (3, 6)
    assert ("the run goes on as one process from step 30; it ran on 2 process(es) (tensorflow) before, with the "
            "same global batch of 6") in outputs[1]
    assert "the run goes on as tensorflow (RING collectives), 3 process(es) from step 80; it ran on 1" in outputs[2]


@pytest.mark.slow
def test_mnist_goes_on_at_every_size_as_if_uninterrupted(tmp_path):
    images = write_images(tmp_path / "images")
    common = ["--config", "stacked", "--hidden_size", "8", "--validation_size", "100", "--num_epochs", "2",
              "--data_path", images, "--seed", "3", "--global_batch_size", "12"]
    elastic, whole, _ = in_three_parts("distrnn.mnist", common, (20, 45, None), tmp_path)
    assert elastic["steps"] == whole["steps"] > 45
    for a, b in zip(elastic["history"], whole["history"], strict=True):
        assert a["valid_accuracy"] == b["valid_accuracy"]
        assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=1e-4)
    assert elastic["test_loss"] == pytest.approx(whole["test_loss"], rel=1e-4)
    assert elastic["confusion_matrix"] == whole["confusion_matrix"]
    assert [s["world_size"] for s in elastic["sizes"]] == [2, 1, 3]


def test_another_global_batch_is_refused_in_one_line_naming_how_to_keep_it(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", train_words=2000, other_words=600)
    common = [*PTB[:-2], "--data_path", corpus, "--save_path", tmp_path / "run"]  # PTB less its global batch
    run_module("distrnn.ptb", *common, "--global_batch_size", 6, "--max_steps", 2, check=0)
    proc = run_module("distrnn.ptb", *common, "--batch_size", 4, "--resume")
    assert_one_line_error(proc, "distrnn.ptb", "are from another config (global_batch_size=6 there, 4 here; keep it "
                                               "on any number of ranks with --global_batch_size 6)")


def supervised(*launcher_flags, workers=3, fault_worker=1, common=(), timeout=400, engine="tensorflow"):
    """`python -m distrnn.launch --engine ENGINE --nproc WORKERS LAUNCHER_FLAGS -m distrnn.ptb COMMON`, the
    worker of index `fault_worker` killed (-9) at its 25th step, wherever the run stands then (the first
    start's worker 2 and, after a restart to fewer, none; or worker 1 of every start): no test waits for a
    moment."""
    if engine == "horovod" and not HOROVODRUN:
        pytest.skip("Horovod is not installed on this stack (TensorFlow 2.19 and newer)")
    return subprocess.run([sys.executable, "-m", "distrnn.launch", "--engine", engine, "--nproc", str(workers),
                           *map(str, launcher_flags),
                           "-m", "distrnn.ptb", *map(str, common)], cwd=ROOT, capture_output=True, text=True,
                          env=subprocess_env(**{faults.VARIABLE: "step:25:kill",
                                                faults.WORKER_VARIABLE: str(fault_worker)}), timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_a_killed_worker_costs_a_restart_and_the_run_ends_as_if_uninterrupted(tmp_path, engine):
    """kill -9 of one of three workers in the middle of an epoch: the two others end with 75 having lost it,
    the launcher starts them again with --resume, and the run ends on two with the uninterrupted run's
    figures (the steps after the last checkpoint run again), on either engine."""
    corpus = write_corpus(tmp_path / "corpus", train_words=2000, other_words=600)
    common = [*PTB, "--data_path", corpus, "--checkpoint_every", 10]
    proc = supervised("--min_nproc", 2, "--max_restarts", 2, fault_worker=2, engine=engine,
                      common=[*common, "--save_path", tmp_path / "elastic", "--metrics_json", tmp_path / "e.json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    restarts = [line for line in proc.stderr.splitlines() if line.startswith("distrnn.launch:")]
    assert restarts == ["distrnn.launch: lost worker 2 (ended by SIGKILL); 2 worker(s) go on from the last "
                        "checkpoint (restart 1 of 2)"], proc.stderr[-3000:]
    run_module("distrnn.ptb", *common, "--save_path", tmp_path / "whole", "--metrics_json", tmp_path / "w.json",
               check=0)
    elastic, whole = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("e", "w"))
    assert elastic["steps"] == whole["steps"] and [s["world_size"] for s in elastic["sizes"]] == [3, 2]
    assert {s["engine"] for s in elastic["sizes"]} == {engine}
    assert elastic["sizes"][1]["step"] == 20  # the last checkpoint before the kill at the 25th step
    for a, b in zip(elastic["history"], whole["history"], strict=True):
        assert a["train_perplexity"] == pytest.approx(b["train_perplexity"], rel=1e-5)
        assert a["valid_perplexity"] == pytest.approx(b["valid_perplexity"], rel=1e-4)
    assert elastic["test_perplexity"] == pytest.approx(whole["test_perplexity"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("flags, why", [
    (["--min_nproc", 3, "--max_restarts", 2], "fewer than --min_nproc 3 workers to go on with"),
    (["--min_nproc", 1, "--max_restarts", 1], "no restarts left (--max_restarts 1)")])
def test_losses_past_what_the_launcher_may_restart_end_with_75_and_one_line(tmp_path, flags, why):
    """Worker 1 is killed in every start: after --max_restarts restarts, or when fewer than --min_nproc
    workers are left, the launcher ends with 75 and one line of its own, the checkpoints intact."""
    corpus = write_corpus(tmp_path / "corpus", train_words=2000, other_words=600)
    proc = supervised(*flags, common=[*PTB, "--data_path", corpus, "--checkpoint_every", 10, "--save_path",
                                      tmp_path / "run"])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("distrnn.launch:")]
    assert proc.returncode == 75 and lines[-1] == (f"distrnn.launch: lost worker 1 (ended by SIGKILL); {why}: "
                                                   f"stopped, the checkpoints intact (start again with --resume)")
    assert len(lines) == (2 if "restarts left" in why else 1), lines
    assert checkpoint_step(tmp_path / "run") >= 20


def test_the_size_a_restart_goes_on_at():
    # Those that lost the others (75) go on, fewer where the global batch would not split over them.
    assert local.restart_size([75, 137, 75], 6, 1) == 2
    assert local.restart_size([75, 75, 137, 75], 6, 1) == 3
    assert local.restart_size([75, 75, 137, 75], 8, 1) == 2
    assert local.restart_size([75, 75, 137, 75], 8, 3) is None
    assert local.restart_size([75, 137, 75, 75], None, 1) == 3
    assert local.restart_size([75, 75, 75], None, 1) == 3


def test_a_command_lines_global_batch_is_read_as_its_parser_reads_it(tmp_path):
    flags = tmp_path / "run.flags"
    flags.write_text("--max_steps 5 --global_batch_size 12  # the last one counts\n")
    assert global_batch_in(["python", "-m", "distrnn.ptb", "--global_batch_size", "60"]) == 60
    assert global_batch_in(["python", "-m", "distrnn.ptb", "--global_batch_size=24", "--resume"]) == 24
    assert global_batch_in(["--global_batch_size", "24", "--global_batch_size=36"]) == 36
    assert global_batch_in(["--global_batch_size", "24", f"@{flags}"]) == 12
    assert global_batch_in(["python", "-m", "distrnn.ptb", "--batch_size", "20"]) is None
    assert [most_workers(20, n) for n in (1, 3, 4, 8, 12, 25)] == [1, 2, 4, 5, 10, 20]
    assert most_workers(None, 7) == 7 and most_workers(20, 0) == 0
    assert global_batch_in(["--global_batch_size", "9" * 30]) is None  # the job refuses it in its own line
    assert most_workers(2 ** 31 - 1, 10 ** 15) == 2 ** 31 - 1 and most_workers(2 ** 31 - 1, 10 ** 9) == 1  # a prime
    assert local.with_resume(["python", "x", "--resume"]) == ["python", "x", "--resume"]
    assert local.lost_text([75, 137, 1]) == "lost worker 1 (ended by SIGKILL), worker 2 (exit 1)"


def test_a_launcher_asked_for_more_than_it_starts_is_one_line():
    proc = run_module("distrnn.launch", "--nproc", 2, "--min_nproc", 3, "--max_restarts", 1, "-m", "distrnn.ptb")
    assert_one_line_error(proc, "distrnn.launch", "--min_nproc 3 is more than --nproc 2: give at most 2")


def test_the_horovod_engine_where_horovod_does_not_load_is_one_line(tmp_path, monkeypatch):
    hide_horovod(tmp_path, monkeypatch)
    proc = run_module("distrnn.launch", "--engine", "horovod", "--nproc", 2, "-m", "distrnn.ptb")
    assert_one_line_error(proc, "distrnn.launch", "--engine horovod: launched as several ranks, but ", "--engine tensorflow")


def test_each_horovod_worker_is_given_its_rank_and_the_rendezvous_the_launcher_serves():
    """What horovodrun -np 3 -H localhost:3 sets, made by the launcher, whose rendezvous answers until stopped."""
    pytest.importorskip("horovod.runner", reason="Horovod is not installed on this stack (TensorFlow 2.19 and newer)")
    environments, stop = join.local_workers("horovod", 3)
    try:
        ports = {int(e["HOROVOD_GLOO_RENDEZVOUS_PORT"]) for e in environments}
        assert [(e["HOROVOD_RANK"], e["HOROVOD_LOCAL_RANK"], e["HOROVOD_SIZE"], e["HOROVOD_CROSS_SIZE"])
                for e in environments] == [("0", "0", "3", "1"), ("1", "1", "3", "1"), ("2", "2", "3", "1")]
        assert {e["HOROVOD_GLOO_RENDEZVOUS_ADDR"] for e in environments} == {"127.0.0.1"} and len(ports) == 1
        socket.create_connection(("127.0.0.1", ports.pop()), timeout=5).close()
    finally:
        stop()
    with pytest.raises(ConnectionError):
        socket.create_connection(("127.0.0.1", int(environments[0]["HOROVOD_GLOO_RENDEZVOUS_PORT"])), timeout=5)


def test_each_tensorflow_worker_is_given_its_task_of_one_cluster():
    environments, stop = join.local_workers("tensorflow", 2)
    stop()
    configs = [json.loads(e["TF_CONFIG"]) for e in environments]
    assert [c["task"] for c in configs] == [{"type": "worker", "index": 0}, {"type": "worker", "index": 1}]
    assert configs[0]["cluster"] == configs[1]["cluster"] and len(set(configs[0]["cluster"]["worker"])) == 2
