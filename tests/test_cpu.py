"""The processor and the oneDNN switch: distrnn decides it, not the processor."""
import json

import pytest

from conftest import assert_one_line_error, run_module, run_ptb
from distrnn import cpu
from distrnn.errors import UsageError

# /proc/cpuinfo as an AVX2-only AMD EPYC (Zen 3, the processor TensorFlow leaves oneDNN off on) shows it.
EPYC_ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2 sha_ni vaes

processor\t: 1
model name\t: something else
flags\t\t: fpu avx512f
"""
SAPPHIRE_RAPIDS_FLAGS = "sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8"


def test_the_first_processor_is_read_from_cpuinfo(tmp_path):
    (tmp_path / "cpuinfo").write_text(EPYC_ZEN3)
    epyc = cpu.processor(str(tmp_path / "cpuinfo"))
    assert (epyc.model, epyc.family_model) == ("AMD EPYC 7B13", "family 25 model 1")
    assert epyc.vector_extensions == ("sse4_2", "avx", "avx2", "fma")
    assert not epyc.tensorflow_enables_onednn
    assert cpu.Processor("x", frozenset(SAPPHIRE_RAPIDS_FLAGS.split())).tensorflow_enables_onednn
    assert cpu.Processor("x", frozenset({"avx2", "avx_vnni"})).tensorflow_enables_onednn  # AVX-VNNI is enough
    unreadable = cpu.processor(str(tmp_path / "none"))  # another OS, a container without /proc
    assert unreadable.model and unreadable.flags == frozenset() and unreadable.family_model == ""


@pytest.mark.parametrize("flags, why", [
    ("avx avx2 fma", "set by distrnn: TensorFlow alone leaves it off on this processor; TF_ENABLE_ONEDNN_OPTS=0 "
                     "turns it off"),
    (SAPPHIRE_RAPIDS_FLAGS, "TensorFlow's default on this processor, and distrnn's"),
])
def test_unset_distrnn_turns_onednn_on_whatever_the_processor(flags, why):
    env = {}
    choice = cpu.choose_onednn(env, cpu.Processor("x", frozenset(flags.split())))
    assert env == {"TF_ENABLE_ONEDNN_OPTS": "1"} and choice == cpu.OneDNN(True, why)
    assert choice.describe() == f"oneDNN on ({why})"


@pytest.mark.parametrize("value, enabled", [("0", False), ("1", True), ("TRUE", True), ("false", False)])
def test_the_users_setting_always_wins(value, enabled):
    for flags in ("avx2", SAPPHIRE_RAPIDS_FLAGS):
        env = {"TF_ENABLE_ONEDNN_OPTS": value}
        choice = cpu.choose_onednn(env, cpu.Processor("x", frozenset(flags.split())))
        assert env == {"TF_ENABLE_ONEDNN_OPTS": value}
        assert choice == cpu.OneDNN(enabled, f"TF_ENABLE_ONEDNN_OPTS={value} in the environment")


@pytest.mark.parametrize("value", ["yes", "", " 1", "2"])
def test_a_value_tensorflow_cannot_read_is_refused(value):
    with pytest.raises(UsageError, match=r"^TF_ENABLE_ONEDNN_OPTS=.* is neither 0 nor 1: set it to 1"):
        cpu.choose_onednn({"TF_ENABLE_ONEDNN_OPTS": value})


def test_a_job_says_which_kernels_it_runs_and_records_them(corpus, tmp_path):
    proc = run_ptb("--config", "test", "--max_steps", "2", "--data_path", corpus, "--save_path", tmp_path / "run",
                   "--metrics_json", tmp_path / "m.json", env={"TF_ENABLE_ONEDNN_OPTS": "0"}, check=0)
    first = proc.stdout.splitlines()[0]
    assert first.startswith("machine: ") and "oneDNN off (TF_ENABLE_ONEDNN_OPTS=0 in the environment)" in first
    machine = json.loads((tmp_path / "m.json").read_text())["machine"]
    assert machine["onednn"] is False and machine["processor"] == cpu.processor().model
    assert machine["vector_extensions"] == list(cpu.processor().vector_extensions)
    for module in ("distrnn.ptb", "distrnn.mnist"):
        proc = run_module(module, "--config", "test", "--data_path", corpus, "--save_path", tmp_path / "no",
                          env={"TF_ENABLE_ONEDNN_OPTS": "yes"})
        assert_one_line_error(proc, module, "TF_ENABLE_ONEDNN_OPTS='yes' is neither 0 nor 1")
    assert not (tmp_path / "no").exists()


def test_which_processors_run_16_bit_arithmetic_natively():
    zen4 = cpu.Processor("AMD EPYC", frozenset({"avx2", "avx512f", "avx512_bf16"}))
    sapphire = cpu.Processor("Intel Xeon", frozenset({"avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"}))
    avx2 = cpu.Processor("AMD EPYC", frozenset({"avx2", "fma"}))
    assert [zen4.lacks_native(p) for p in ("float32", "bfloat16", "float16")] == [False, False, True]
    # TensorFlow runs float16 converted even with AVX512_FP16 (measured: distrnn.cpu.NATIVE_16_BIT).
    assert [sapphire.lacks_native(p) for p in ("float32", "bfloat16", "float16")] == [False, False, True]
    assert [avx2.lacks_native(p) for p in ("float32", "bfloat16", "float16")] == [False, True, True]
