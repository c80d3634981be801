"""The memory monitor: NVML through a stand-in, the host for real, and the run it stops."""
import importlib.util
import json
import os

import pytest

from conftest import run_ptb
from distrnn import memory

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
    monitor = memory.MemoryMonitor(warn=0.7, stop=0.9, nvml=fake_nvml)
    reading = monitor.sample()
    gpu0, gpu1 = reading["gpus"]
    assert gpu0 == {"index": 0, "used_mib": 31232, "total_mib": 40960, "used_fraction": 0.7625, "process_mib": 29696}
    assert gpu1["used_fraction"] == 0.0 and gpu1["process_mib"] is None
    assert monitor.take_warning().startswith("GPU 0 memory at 76.2% (--mem_warn 0.7); the run stops with a "
                                             "checkpoint at --mem_stop 0.9. To need less: lower --batch_size")
    assert monitor.take_warning() is None and monitor.stop_reason is None  # warned once
    assert monitor.peaks["gpu0_used_mib"] == 31232 and monitor.peaks["gpu0_process_mib"] == 29696
    assert monitor.summary().startswith("mem host ") and monitor.summary().endswith("% gpu0 76% gpu1 0%")
    assert monitor.scalars()["memory/gpu0_used_fraction"] == 0.7625

    monitor = memory.MemoryMonitor(warn=0.5, stop=0.75, nvml=fake_nvml)
    monitor.sample()
    assert monitor.stop_reason == "GPU 0 memory at 76.2% (--mem_stop 0.75)"
    # A rank watches only the GPUs it owns: here GPU 1, which is empty.
    monitor = memory.MemoryMonitor(warn=0.5, stop=0.75, nvml=fake_nvml, owned_gpus=lambda n: [1])
    assert [g["index"] for g in monitor.sample()["gpus"]] == [1] and monitor.stop_reason is None


def test_host_threshold_stops_the_run_with_a_checkpoint_and_resume_continues(corpus, tmp_path):
    save = tmp_path / "run"
    # Any machine running TensorFlow uses more than 0.1% of its memory: the first sample trips both thresholds.
    proc = run_ptb(*TINY, "--data_path", corpus, "--save_path", save, "--mem_warn", "0.0005", "--mem_stop", "0.001",
                   "--metrics_json", tmp_path / "m.json")
    assert proc.returncode == memory.EXIT_MEMORY == 76, proc.stderr
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


@pytest.mark.parametrize("args, message", [
    (["--mem_warn", "0.99", "--mem_stop", "0.9"],
     "memory thresholds must satisfy 0 < --mem_warn <= --mem_stop <= 1, got --mem_warn 0.99 --mem_stop 0.9"),
    (["--mem_interval", "0"], "--mem_interval must be positive, got 0"),
])
def test_bad_thresholds(corpus, tmp_path, args, message):
    proc = run_ptb(*TINY, "--data_path", corpus, "--save_path", tmp_path / "s", *args)
    assert proc.returncode == 2 and proc.stderr == f"distrnn.ptb: error: {message}\n"
