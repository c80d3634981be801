"""`python -m distrnn.devices`: the host, GPUs through NVML (a stand-in here), TensorFlow's devices."""
import json
import os
import subprocess
import sys

import numpy as np
import psutil
import pytest

from conftest import ROOT
from distrnn import compat, cpu, devices
from distrnn.memory.estimates import GPU_RUNTIME_MIB

FAKES = os.path.join(os.path.dirname(__file__), "fakes")


def run_devices(*args, **env):
    """The real command, with tests/fakes/pynvml.py standing in for nvidia-ml-py."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([FAKES, ROOT]), FAKE_NVML_PID=str(os.getpid()), **env)
    env = {k: v for k, v in env.items() if v is not None}  # None: unset
    return subprocess.run([sys.executable, "-m", "distrnn.devices", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


def test_gpus_and_the_processes_holding_their_memory(tmp_path):
    log = tmp_path / "nvml.log"
    proc = run_devices("--json", "--no-tensorflow", FAKE_NVML_LOG=str(log))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["tensorflow"] is None
    nvml = r["nvml"]
    assert nvml["available"] and nvml["driver"] == "535.104.05"
    a100, h100 = nvml["gpus"]
    assert (a100["index"], a100["name"], a100["compute_capability"]) == (0, "NVIDIA A100-SXM4-40GB", "8.0")
    assert (a100["memory_total_mib"], a100["memory_used_mib"], a100["memory_free_mib"]) == (40960, 31232, 9728)
    me = psutil.Process()
    assert a100["processes"] == [
        {"pid": os.getpid(), "user": me.username(), "command": " ".join(me.cmdline()), "used_mib": 29696},
        {"pid": 4194303, "user": "?", "command": "?", "used_mib": None}]  # not visible from here
    assert (h100["compute_capability"], h100["memory_free_mib"], h100["processes"]) == ("9.0", 81920, [])
    assert log.read_text().split() == ["init", "shutdown"]  # NVML released after reading
    host = r["host"]
    assert (host["logical_cores"], host["physical_cores"]) == (psutil.cpu_count(), psutil.cpu_count(logical=False))


def test_text_report_lines():
    proc = run_devices("--no-tensorflow", TF_ENABLE_ONEDNN_OPTS="1")
    lines = proc.stdout.splitlines()
    processor = cpu.processor()
    assert lines[1] == (f"  CPU {processor.family_model or '?'}: {' '.join(processor.vector_extensions) or 'no AVX'}; "
                        f"TensorFlow's CPU kernels: oneDNN on (TF_ENABLE_ONEDNN_OPTS=1 in the environment)")
    assert lines[2] == f"stack: {compat.format_stack(compat.stack())}"
    assert lines[3] == "GPUs: 2 (driver 535.104.05)"
    assert lines[4] == "  [0] NVIDIA A100-SXM4-40GB (compute 8.0): 31,232 / 40,960 MiB used, 9,728 MiB free"
    assert lines[5].split()[:4] == ["pid", str(os.getpid()), psutil.Process().username(), "29,696"]
    assert lines[6].split() == ["pid", "4194303", "?", "?", "MiB", "?"]
    assert lines[7] == "  [1] NVIDIA H100 80GB HBM3 (compute 9.0): 0 / 81,920 MiB used, 81,920 MiB free"
    off = run_devices("--no-tensorflow", TF_ENABLE_ONEDNN_OPTS="0").stdout.splitlines()[1]
    assert off.endswith("oneDNN off (TF_ENABLE_ONEDNN_OPTS=0 in the environment)")
    unset = run_devices("--no-tensorflow", TF_ENABLE_ONEDNN_OPTS=None).stdout.splitlines()[1]
    assert unset.endswith(f"oneDNN on ({cpu.choose_onednn({}, processor).why})")


def test_stack_prints_the_versions_installed_here():
    assert run_devices("--stack").stdout == compat.format_stack(compat.stack()) + "\n"
    import tensorflow as tf
    stack = json.loads(run_devices("--stack", "--json").stdout)
    assert stack == compat.stack() and stack["tensorflow"] == tf.__version__ and stack["numpy"] == np.__version__


def test_without_a_driver_and_with_tensorflow():
    proc = run_devices("--json", FAKE_NVML_FAIL="1", TF_ENABLE_ONEDNN_OPTS=None)
    r = json.loads(proc.stdout)
    assert r["nvml"] == {"available": False, "reason": "NVML: Driver Not Loaded", "gpus": []}
    tf = r["tensorflow"]
    assert tf["available"] and "/physical_device:CPU:0" in [name for name, _ in tf["physical"]]
    # Unset, distrnn turns oneDNN on whatever the processor, and TensorFlow's own answer agrees.
    assert tf["onednn"] is True and r["host"]["onednn"] is True
    assert "/device:CPU:0" in [name for name, _ in tf["logical"]]


def test_watch_refreshes_and_bad_flags():
    proc = run_devices("--json", "--no-tensorflow", "--watch", "0.1", "--count", "3")
    assert proc.returncode == 0 and [json.loads(line)["nvml"]["available"] for line in proc.stdout.splitlines()] == \
        [True] * 3
    for args, message in ((["--count", "2"], "--count needs --watch SECONDS"),
                          (["--watch", "-1"], "argument --watch: must be >= 0, got '-1'")):
        proc = run_devices(*args)
        assert proc.returncode == 2 and proc.stderr == f"distrnn.devices: error: {message}\n"


def test_device_lib_runs_in_a_child_and_shows_memory_before_and_after(tmp_path):
    log = tmp_path / "nvml.log"
    proc = run_devices("--device-lib", FAKE_NVML_LOG=str(log))
    assert proc.returncode == 0, proc.stderr
    assert 'name: "/device:CPU:0"' in proc.stdout  # device_lib's own listing
    assert proc.stdout.splitlines()[-2:] == [
        "GPU 0 memory used: 31,232 MiB before, 31,232 MiB after the listing (nothing held)",
        "GPU 1 memory used: 0 MiB before, 0 MiB after the listing (nothing held)"]
    assert log.read_text().split() == ["init", "shutdown"] * 2
    # Memory that stays held shows up as the difference.
    r = json.loads(run_devices("--device-lib", "--json", FAKE_NVML_LEAK_MIB="700").stdout)
    assert (r["gpu_memory_used_mib_before"], r["gpu_memory_used_mib_after"]) == ({"0": 31232, "1": 0},
                                                                                  {"0": 31232, "1": 700})
    proc = run_devices("--device-lib", FAKE_NVML_LEAK_MIB="700")
    assert proc.stdout.splitlines()[-1] == "GPU 1 memory used: 0 MiB before, 700 MiB after the listing (+700 MiB)"


def test_missing_nvidia_ml_py_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if not installed
    assert devices.gpu_info() == {"available": False, "gpus": [],
                                  "reason": "nvidia-ml-py is not installed (pip install nvidia-ml-py)"}


def test_plan_places_the_parts_and_estimates_each_device():
    # PTB small, full vocabulary, over the stand-in's two GPUs (40,960 and 81,920 MiB).
    proc = run_devices("--plan", "--config", "small", "--num_gpus", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    parts = {p["name"]: p for p in r["parts"]}
    assert [p["device"] for p in r["parts"]] == ["/device:GPU:0", "/device:GPU:0", "/device:GPU:1", "/device:GPU:1"]
    # Exact bytes: weights (2*200*800 + 800) * 4; their gradient; 28 words per unit, step and row kept.
    assert parts["layer 0"]["parameters"] == parts["layer 0"]["gradients"] == 1_283_200
    assert parts["layer 0"]["activations"] == 20 * 20 * 200 * 28 * 4
    assert parts["softmax"]["activations"] == 2 * 400 * 10000 * 4       # probabilities and their gradient
    assert parts["embedding"]["gradients"] == 2 * 400 * 200 * 4         # sparse: rows per token, summed per word
    gpu0, gpu1 = r["devices"]
    expected0 = (parts["embedding"]["total"] + parts["layer 0"]["total"]) / 2**20 + GPU_RUNTIME_MIB
    assert gpu0["need_mib"] == round(expected0, 1) and gpu0["capacity_mib"] == 40960 and gpu0["fits"]
    assert gpu1["capacity_mib"] == 81920 and gpu1["fits"]
    # recompute keeps less, and swap keeps the layers' records on the host
    assert r["alternatives_mib"]["--recompute 4"] < gpu1["need_mib"]
    swap = json.loads(run_devices("--plan", "--config", "small", "--num_gpus", "2", "--swap_memory",
                                  "--json").stdout)
    assert swap["host_mib"] == round(2 * 7 * 400 * 200 * 4 / 2**20, 1)
    recompute = json.loads(run_devices("--plan", "--config", "small", "--num_gpus", "2", "--recompute", "4",
                                       "--json").stdout)
    layer = recompute["parts"][1]
    assert layer["gradients"] == 2 * 1_283_200  # each segment's weight gradient and their running sum
    # 5 kept states (c, h), two 4-step segments of 28 words, the output and its gradient for all 20 steps
    assert layer["activations"] == (2 * 5 + 2 * 28 * 4 + 2 * 20) * 20 * 200 * 4


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_plan_in_16_bits_halves_the_activations_and_adds_the_compute_copy(precision):
    """Against float32's plan of the same job: every layer's saved activations take half, the float32 weights,
    gradients and slots stay, the 16-bit copy the step computes with adds half the weights; the softmax keeps
    its float32 probabilities and gradient and adds their 16-bit cast."""
    wide, half = (json.loads(run_devices("--plan", "--config", "small", "--num_gpus", "1", "--gpu_memory_gib", "16",
                                         "--precision", p, "--json", FAKE_NVML_FAIL="1").stdout)
                  for p in ("float32", precision))
    assert half["precision"] == precision
    for a, b in zip(wide["parts"], half["parts"]):
        assert b["gradients"] == a["gradients"]
        if a["name"].startswith("layer"):
            assert (b["activations"], b["parameters"]) == (a["activations"] // 2, a["parameters"] * 3 // 2)
    softmax_wide, softmax_half = wide["parts"][-1], half["parts"][-1]
    tokens, vocab = 20 * 20, 10000
    assert softmax_half["activations"] == softmax_wide["activations"] + tokens * vocab * 2
    assert wide["parts"][0]["activations"] == 2 * half["parts"][0]["activations"]


def test_plan_warns_where_it_will_not_fit():
    proc = run_devices("--plan", "--config", "large", "--num_gpus", "4", "--gpus_per_rank", "2", "--batch_size",
                       "64", "--gpu_memory_gib", "1", FAKE_NVML_FAIL="1")  # no NVML: capacity from the flag
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == ("plan: PTB large (2 x 1500 lstm units, batch 64 x 35 steps, vocabulary 10,000), float32, "
                        "memory mode keep, 2 device(s), each of 2 ranks, round_robin")
    assert any(line.startswith("  /device:GPU:1") and line.endswith("of 1,024 MiB: WILL NOT FIT") for line in lines)
    warning = next(line for line in lines if line.startswith("warning:"))
    assert "--recompute 6: " in warning and "--swap_memory: " in warning
    bad = run_devices("--plan", "--config", "large", "--num_gpus", "3", "--gpus_per_rank", "2")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "distrnn.devices: error: --gpus_per_rank 2 needs --num_gpus N, a multiple of it")
