"""The memory monitor: NVML through a stand-in, the host for real, and the run it stops."""
import importlib.util
import json
import os

import pytest

from conftest import CAPPED, EIGEN, checkpoint_step, run_ptb, write_corpus
from distrnn.errors import OutOfMemory
from distrnn.memory.monitor import MemoryMonitor

TINY = ["--config", "test", "--num_steps", "5", "--batch_size", "4"]


@pytest.fixture
def fake_nvml(monkeypatch):
    monkeypatch.setenv("FAKE_NVML_PID", str(os.getpid()))
    spec = importlib.util.spec_from_file_location("fake_pynvml", os.path.join(os.path.dirname(__file__), "fakes",
                                                                              "pynvml.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_readings_thresholds_and_peaks(fake_nvml):
    monitor = MemoryMonitor(warn=0.7, stop=0.9, nvml=fake_nvml)
    reading = monitor.sample()
    gpu0, gpu1 = reading["gpus"]
    assert gpu0 == {"index": 0, "used_mib": 31232, "total_mib": 40960, "used_fraction": 0.7625, "process_mib": 29696}
    assert gpu1["used_fraction"] == 0.0 and gpu1["process_mib"] is None
    assert monitor.take_warning().startswith("GPU 0 memory at 76.2% (--mem_warn 0.7); the run stops with a "
                                             "checkpoint at --mem_stop 0.9. To need less: --recompute K")
    assert monitor.take_warning() is None and monitor.stop_reason is None  # warned once
    assert monitor.peaks["gpu0_used_mib"] == 31232 and monitor.peaks["gpu0_process_mib"] == 29696
    assert monitor.summary().startswith("mem host ") and monitor.summary().endswith("% gpu0 76% gpu1 0%")
    assert monitor.scalars()["memory/gpu0_used_fraction"] == 0.7625

    monitor = MemoryMonitor(warn=0.5, stop=0.75, nvml=fake_nvml)
    monitor.sample()
    assert monitor.stop_reason == "GPU 0 memory at 76.2% (--mem_stop 0.75)"
    # A rank watches only the GPUs it owns: here GPU 1, which is empty.
    monitor = MemoryMonitor(warn=0.5, stop=0.75, nvml=fake_nvml, owned_gpus=lambda n: [1])
    assert [g["index"] for g in monitor.sample()["gpus"]] == [1] and monitor.stop_reason is None


@pytest.mark.slow
def test_host_threshold_stops_the_run_with_a_checkpoint_and_resume_continues(corpus, tmp_path):
    save = tmp_path / "run"
    # Any machine running TensorFlow uses more than 0.1% of its memory: the first sample trips both thresholds.
    proc = run_ptb(*TINY, "--data_path", corpus, "--save_path", save, "--mem_warn", "0.0005", "--mem_stop", "0.001",
                   "--metrics_json", tmp_path / "m.json")
    assert proc.returncode == OutOfMemory.exit_code == 76, proc.stderr
    stopped = [line for line in proc.stdout.splitlines() if line.startswith("stopped: memory ran short")]
    assert len(stopped) == 1 and "host memory at" in stopped[0] and "(--mem_stop 0.001)" in stopped[0]
    assert f"checkpoint saved in {save / 'checkpoints'}" in stopped[0] and "--resume" in stopped[0]
    assert (save / "checkpoints" / "checkpoint").exists()
    assert not (tmp_path / "m.json").exists()  # as for a signal: metrics are written by the run that finishes
    done = run_ptb(*TINY, "--data_path", corpus, "--save_path", save, "--resume", "--mem_warn", "0.0005",
                   "--metrics_json", tmp_path / "m.json", check=0)
    assert "resumed from" in done.stdout
    assert done.stdout.count("warning: host memory at") == 1  # once, not every step
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["memory"]["peaks"]["host_process_rss_mib"] > 100 and m["memory"]["stopped"] is None
    assert m["memory"]["mem_warn"] == 0.0005 and m["memory"]["mem_stop"] == 0.97
    assert " | mem host " in done.stdout


# A step of 4 x 128 units over 1,000 steps keeps about 290 MB of activations when every one is kept, about
# 130 MB with recompute: under conftest.CAPPED (200 MB) the first runs out of memory for real (inside the
# forward loop), the second does not.
LONG = ["--config", "test", "--num_layers", "4", "--hidden_size", "128", "--num_steps", "1000", "--keep_prob", "0.5",
        "--max_steps", "3"]


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("long") / "data", train_words=65000)


@pytest.fixture(scope="module")
def recompute_from_the_start(long_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    run_ptb(*LONG, "--data_path", long_corpus, "--save_path", out / "run", "--recompute", "32",
            "--metrics_json", out / "m.json", env=EIGEN, check=0)  # the kernels of the capped runs
    return json.loads((out / "m.json").read_text())


def same_perplexities(a, b):
    for key in ("train_perplexity", "valid_perplexity", "test_perplexity"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key


@pytest.mark.slow
def test_out_of_memory_stops_with_a_checkpoint_and_advice_and_a_retry_goes_on(long_corpus, recompute_from_the_start,
                                                                            tmp_path):
    """Each step that runs out of memory costs the capped allocator's 10-s waits, so one test shows both
    answers to it: --on_oom stop (checkpoint, advice, exit 76), then on resume --on_oom retry (the same step
    again, leaner, and on)."""
    save = tmp_path / "run"
    proc = run_ptb(*LONG, "--data_path", long_corpus, "--save_path", save, env=CAPPED)
    assert proc.returncode == 76, proc.stderr
    stopped = [line for line in proc.stdout.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1 and stopped[0].startswith("stopped: step 1 ran out of memory (OOM when allocating")
    for advice in ("--recompute K", "--swap_memory", "--batch_size", "--num_gpus N", "--global_batch_size",
                   f"checkpoint saved in {save / 'checkpoints'}", f"--resume --save_path {save}"):
        assert advice in stopped[0], advice
    assert checkpoint_step(save) == 0

    proc = run_ptb(*LONG, "--data_path", long_corpus, "--save_path", save, "--resume", "--on_oom", "retry",
                   "--metrics_json", tmp_path / "m.json", env=CAPPED, check=0)
    assert "resumed from" in proc.stdout and "epoch 1, step 0" in proc.stdout
    retried = [line for line in proc.stdout.splitlines() if "ran out of memory" in line]
    assert len(retried) == 1, proc.stdout
    assert retried[0].startswith("step 1 ran out of memory (OOM when allocating tensor with shape[")
    assert retried[0].endswith(
        "in memory mode keep (all activations on the device); running it again in memory mode recompute "
        "(one state in 32 kept)"), retried
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["memory"]["changes"] == [{"step": 1, "from": "keep (all activations on the device)",
                                       "to": "recompute (one state in 32 kept)"}]
    assert m["memory"]["mode"] == "recompute (one state in 32 kept)" and m["steps"] == 3
    # The failed steps changed nothing (weights, dropout generator): the run is the one that recomputed throughout.
    same_perplexities(m, recompute_from_the_start)


@pytest.mark.parametrize("args, message", [
    (["--recompute", "4", "--swap_memory"], "--recompute and --swap_memory are alternatives"),
    (["--recompute", "-1"], "argument --recompute: must be >= 0, got '-1'"),
    (["--recompute", "4", "--cell", "gru"], "memory mode recompute (one state in 4 kept) needs LSTM cells and "
                                            "rnn_mode auto, static or dynamic (got the gru cell, rnn_mode auto)"),
    (["--swap_memory", "--rnn_mode", "block"], "needs LSTM cells and rnn_mode auto, static or dynamic (got the "
                                               "lstm cell, rnn_mode block)"),
])
def test_bad_memory_modes(corpus, tmp_path, args, message):
    proc = run_ptb(*TINY, "--data_path", corpus, "--save_path", tmp_path / "s", *args)
    assert proc.returncode == 2 and proc.stderr.startswith("distrnn.ptb: error: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


@pytest.mark.parametrize("args, message", [
    (["--mem_warn", "0.99", "--mem_stop", "0.9"],
     "--mem_warn 0.99 is above --mem_stop 0.9: the warning must come first; lower --mem_warn"),
    (["--mem_interval", "0"], "argument --mem_interval: must be >= 0.1, got '0'"),
    (["--mem_stop", "1.5"], "argument --mem_stop: must be <= 1, got '1.5'"),
])
def test_bad_thresholds(corpus, tmp_path, args, message):
    proc = run_ptb(*TINY, "--data_path", corpus, "--save_path", tmp_path / "s", *args)
    assert proc.returncode == 2 and proc.stderr == f"distrnn.ptb: error: {message}\n"
