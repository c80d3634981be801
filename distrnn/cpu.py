"""The processor a job runs on, and TensorFlow's oneDNN switch, which depends on it.

TensorFlow's x86 Linux builds carry two sets of CPU kernels: Eigen's, and oneDNN's (with its own
allocator, MklCPUAllocator). Which one runs is decided once, when TensorFlow first asks: by
TF_ENABLE_ONEDNN_OPTS where it is set, else by the processor (tensorflow/core/util/util.cc,
IsMklEnabled: on where any of TENSORFLOW_ONEDNN_FLAGS is present, which AVX2-only processors
such as AMD EPYC Zen 3 lack). So the same command ran different kernels, at different speeds and
with a different allocator, on two machines. distrnn decides it itself instead (`choose_onednn`,
called by every entry point before TensorFlow loads): on, unless the user set the variable. Why on:
bench/onednn.py measured it (docs/measurements.md: CPU kernels).

Reads /proc/cpuinfo only; imports no TensorFlow.
"""
import dataclasses
import os
import platform
from importlib import metadata
from typing import FrozenSet, Mapping, MutableMapping, Optional, Tuple

from distrnn.errors import UsageError

ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"
# What TensorFlow 2.15's IsMklEnabled() tests for its default on Linux, as /proc/cpuinfo names them.
TENSORFLOW_ONEDNN_FLAGS = ("avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
# The vector extensions worth naming beside a speed figure, oldest first.
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
# The /proc/cpuinfo flags of native 16-bit matrix arithmetic that TensorFlow's CPU kernels use (oneDNN's
# cpu_isa avx512_core_bf16, avx512_core_amx); without one they convert. None for float16: oneDNN has
# avx512_core_fp16, but TensorFlow does not route float16 there. Measured on an AVX512_FP16 + AMX processor
# (docs/precision.md): a 400x650 @ 650x2600 half MatMul takes 1.4 s in 2.15.1 (summing in half), 7.3 ms in
# 2.21.0, against float32's 6.8 and 7.4 ms, while bfloat16's takes 2.0 and 3.0 ms.
NATIVE_16_BIT = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ()}
# tsl's ReadBoolFromEnvVar: case-insensitive, anything else is ignored with a warning.
_TRUE, _FALSE = ("1", "true"), ("0", "false")


@dataclasses.dataclass(frozen=True)
class Processor:
    model: str                      # /proc/cpuinfo's model name (a VM may show a generic one)
    flags: FrozenSet[str]
    family_model: str = ""          # "family 25 model 1": tells processors apart that share a name

    @property
    def vector_extensions(self) -> Tuple[str, ...]:
        return tuple(f for f in VECTOR_FLAGS if f in self.flags)

    def lacks_native(self, precision: str) -> bool:
        """Whether a 16-bit `precision` runs converted to float32 around every kernel here (slower than
        float32, though still half the activation memory)."""
        return precision in NATIVE_16_BIT and not any(f in self.flags for f in NATIVE_16_BIT[precision])

    @property
    def tensorflow_enables_onednn(self) -> bool:
        """Whether TensorFlow turns oneDNN on by itself here (when TF_ENABLE_ONEDNN_OPTS is unset)."""
        return any(f in self.flags for f in TENSORFLOW_ONEDNN_FLAGS)


def processor(cpuinfo: str = "/proc/cpuinfo") -> Processor:
    """The model name and feature flags of the first processor in `cpuinfo` (platform's names where
    it cannot be read: another OS, a container without /proc)."""
    first = {}
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first processor's block
                key, _, value = line.partition(":")
                first.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    family_model = f"family {first['cpu family']} model {first['model']}" if "cpu family" in first else ""
    return Processor(first.get("model name") or platform.processor() or platform.machine(),
                     frozenset(first.get("flags", "").split()), family_model)


@dataclasses.dataclass(frozen=True)
class OneDNN:
    enabled: bool
    why: str  # who decided, for the start-up log

    def describe(self) -> str:
        return f"oneDNN {'on' if self.enabled else 'off'} ({self.why})"


# What choose_onednn decided for this process: like TensorFlow's own decision, once per process.
_chosen: Optional[OneDNN] = None


def choose_onednn(environ: MutableMapping[str, str] = None, cpu: Processor = None) -> OneDNN:
    """distrnn's oneDNN setting, put into `environ` (this process's: os.environ) before TensorFlow
    loads: the user's TF_ENABLE_ONEDNN_OPTS as it is, else 1. A value TensorFlow cannot read is
    refused: it would warn and fall back to the processor's default, the dependence this removes."""
    global _chosen
    own = environ is None
    environ = os.environ if own else environ
    cpu = cpu or processor()
    if environ.get(ONEDNN_VARIABLE) is None:
        environ[ONEDNN_VARIABLE] = "1"
        choice = OneDNN(True, "TensorFlow's default on this processor, and distrnn's" if cpu.tensorflow_enables_onednn
                        else f"set by distrnn: TensorFlow alone leaves it off on this processor; "
                             f"{ONEDNN_VARIABLE}=0 turns it off")
    else:
        choice = onednn(environ, cpu)
    if own:
        _chosen = choice
    return choice


def onednn(environ: Mapping[str, str] = None, cpu: Processor = None) -> OneDNN:
    """Whether TensorFlow runs (or will run) oneDNN's kernels under `environ` (default: in this
    process, as choose_onednn decided where it ran), and why."""
    if environ is None:
        if _chosen is not None:
            return _chosen
        environ = os.environ
    value = environ.get(ONEDNN_VARIABLE)
    if value is None:
        return OneDNN((cpu or processor()).tensorflow_enables_onednn, "TensorFlow's default on this processor")
    return OneDNN(_read_bool(value), f"{ONEDNN_VARIABLE}={value} in the environment")


def machine(environ: Mapping[str, str] = None) -> dict:
    """What a speed figure depends on, for metrics files and bench/: the processor, its vector
    extensions, oneDNN, cores and the installed versions (package metadata: no TensorFlow import; the
    jobs' metrics also hold `versions`, what they imported)."""
    cpu = processor()
    state = onednn(environ, cpu)
    return {"processor": cpu.model, "family_model": cpu.family_model, "vector_extensions": list(cpu.vector_extensions),
            "onednn": state.enabled, "onednn_why": state.why, "cores": os.cpu_count(),
            "python": platform.python_version(), "tensorflow": _version("tensorflow-cpu", "tensorflow", "tf-nightly"),
            "horovod": _version("horovod")}


def describe_machine(environ: Mapping[str, str] = None) -> str:
    """machine() as one line: `PROCESSOR, family F model M (EXTENSIONS), N cores; oneDNN on (WHY);
    python P, tensorflow T, horovod H`."""
    m = machine(environ)
    where = f"{m['processor']}, {m['family_model']}" if m["family_model"] else m["processor"]
    return (f"{where} ({' '.join(m['vector_extensions']) or 'no AVX'}), {m['cores']} cores; "
            f"oneDNN {'on' if m['onednn'] else 'off'} ({m['onednn_why']}); python {m['python']}, "
            f"tensorflow {m['tensorflow'] or '-'}, horovod {m['horovod'] or '-'}")


def _version(*distributions: str) -> Optional[str]:
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _read_bool(value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise UsageError(f"{ONEDNN_VARIABLE}={value!r} is neither 0 nor 1: set it to 1 (oneDNN's CPU kernels, "
                     f"distrnn's default) or 0 (Eigen's), or unset it")
