"""Model parallelism: which device holds each part of a stacked recurrent model.

A Plan maps the embedding, every recurrent layer and the softmax onto
devices. Model code takes the plan as an argument and places each part's
variables and computation inside `tf.device(...)`: TensorFlow 2's counterpart
of TensorFlow 1's DeviceCellWrapper (a `with tf.device()` block around a cell
*factory* is silently ignored, because variables are created later, when the
cell is first called; distrnn creates them inside the block). Gradients are
built colocated with their forward ops, so the backward pass runs where the
forward did.

Strategies:
  round_robin  layer i on device i mod N; the embedding with the first layer,
               the softmax with the last (the classic multi-GPU LSTM layout)
  balanced     the parts, in order, cut into N contiguous groups so that the
               largest group's bytes (parameters, optimizer slots, activations
               of one batch) are as small as possible
"""
import dataclasses
from typing import Dict, List, Optional, Sequence

from distrnn.errors import UsageError
from distrnn.names import STRATEGIES



@dataclasses.dataclass(frozen=True)
class Plan:
    embedding: str
    layers: tuple
    softmax: str
    strategy: str = "round_robin"
    costs: Optional[tuple] = None  # bytes of [embedding, layers..., softmax], when known

    @property
    def devices(self) -> List[str]:
        """The distinct devices used, in order of first use."""
        return list(dict.fromkeys((self.embedding, *self.layers, self.softmax)))

    @property
    def multi_device(self) -> bool:
        return len(self.devices) > 1

    def parts(self):
        return [("embedding", self.embedding)] + [(f"layer {i}", d) for i, d in enumerate(self.layers)] + \
               [("softmax", self.softmax)]

    def describe(self) -> List[str]:
        lines = [f"placement plan ({self.strategy}, {len(self.devices)} device(s)):"]
        for i, (name, device) in enumerate(self.parts()):
            cost = f"  {self.costs[i] / 2**20:9.1f} MiB" if self.costs else ""
            lines.append(f"  {name:10s} -> {device}{cost}")
        return lines

    def as_dict(self) -> Dict:
        d = {"strategy": self.strategy, "embedding": self.embedding, "layers": list(self.layers),
             "softmax": self.softmax, "devices": self.devices}
        if self.costs:
            d["bytes"] = list(self.costs)
        return d


def single_device(num_layers: int, device: str = "") -> Plan:
    """Everything on one device ('' lets TensorFlow choose)."""
    return Plan(device, (device,) * num_layers, device, "single")


def _balanced_groups(costs: Sequence[float], k: int) -> List[int]:
    """Group index of each item: contiguous groups, minimal largest group sum (exact DP)."""
    n = len(costs)
    k = min(k, n)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[j][i]: minimal max-sum splitting the first i items into j groups
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n + 1):
            for s in range(j - 1, i):
                value = max(best[j - 1][s], prefix[i] - prefix[s])
                if value < best[j][i]:
                    best[j][i], cut[j][i] = value, s
    groups, i = [0] * n, n
    for j in range(k, 0, -1):
        s = cut[j][i]
        for item in range(s, i):
            groups[item] = j - 1
        i = s
    return groups


def make_plan(num_layers: int, devices: Sequence[str], strategy: str = "round_robin",
              costs: Optional[Sequence[float]] = None) -> Plan:
    """costs: bytes of [embedding, layer 0..num_layers-1, softmax] (needed for balanced)."""
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown placement strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    devices = list(devices)
    if not devices:
        raise UsageError("a placement plan needs at least one device")
    costs = tuple(costs) if costs is not None else None
    if strategy == "round_robin":
        layers = tuple(devices[i % len(devices)] for i in range(num_layers))
        return Plan(layers[0], layers, layers[-1], strategy, costs)
    if costs is None or len(costs) != num_layers + 2:
        raise ValueError("balanced placement needs the cost of every part")
    groups = _balanced_groups(costs, len(devices))
    placed = [devices[g] for g in groups]
    return Plan(placed[0], tuple(placed[1:-1]), placed[-1], strategy, costs)


# Peak bytes per unit, step and batch row that an LSTM layer holds in the backward pass, in
# float32 words, when every activation is kept: the records of the forward pass (output, the
# four gates, cell, tanh(j): 7), the factors built from them for all steps at once (pd 4, q,
# f, c_prev: 7), the gate gradients (4) and the temporaries of building them (about 10).
# Measured: bench/bptt_memory.py (2 x 256 units, batch 32, 2000 steps, keep): (4160 - 654)
# MiB / (2000 * 32 * 256 * 2 * 4 B) = 28.0 words.
LSTM_KEEP_WORDS = 28
SWAP_SEGMENT = 16  # steps per swapped segment (distrnn.rnn.Memory's default)


def recompute_segment(num_steps: int) -> int:
    """The K of --recompute K that needs least: about sqrt(num_steps) (T/K states plus K steps)."""
    return max(1, round(num_steps ** 0.5))


@dataclasses.dataclass(frozen=True)
class PartMemory:
    """Estimated bytes of one part of a model on its device during a training step."""
    name: str
    parameters: int
    gradients: int     # with optimizer slots
    activations: int   # the peak of what the backward pass needs, and its working space
    host: int = 0      # what --swap_memory keeps in host memory instead

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.activations


def lm_memory(vocab_size: int, hidden_size: int, num_layers: int, batch_size: int, num_steps: int,
              cell_gates: int = 4, dropout: bool = False, recompute: int = 0, swap: bool = False,
              optimizer_slots: int = 0, dtype_bytes: int = 4) -> List[PartMemory]:
    """Bytes of each part of a stacked-RNN language model (embedding, layers, softmax) in one
    training step: weights, their gradients (and optimizer slots), and activations.

    LSTM layers (cell_gates 4) follow lstm_stack's memory modes: keep (LSTM_KEEP_WORDS per
    unit, step and row), recompute K (one state in K, plus two K-step segments being
    recomputed and used, and a running sum of the weight gradients), swap (two
    SWAP_SEGMENT-step segments on the device, the records on the host, the same sums).
    Other cells are differentiated by TensorFlow: their gates and state per step.
    """
    h, v, g = hidden_size, vocab_size, cell_gates
    tokens = batch_size * num_steps
    grads = 1 + optimizer_slots
    parts = [PartMemory("embedding", v * h * dtype_bytes,
                        # the gradient is sparse: one row per token, plus the rows summed per word
                        2 * tokens * h * dtype_bytes + v * h * optimizer_slots * dtype_bytes,
                        tokens * h * (1 + dropout) * dtype_bytes)]
    for l in range(num_layers):
        weights = (2 * h * g * h + g * h) * dtype_bytes
        dropout_words = 2 * dropout  # its mask and the masked output
        host, sums = 0, 0  # sums: weight gradients summed over segments, beside each segment's own
        if g != 4:
            words_per_step = (g + 2 + dropout_words) * num_steps
        elif recompute:
            segment = min(recompute, num_steps)
            words_per_step = (2 * -(-num_steps // recompute) + 2 * LSTM_KEEP_WORDS * segment
                              + (2 + dropout_words) * num_steps)  # the output, its gradient and dropout
            sums = 1
        elif swap:
            segment = min(SWAP_SEGMENT, num_steps)
            words_per_step = 2 * LSTM_KEEP_WORDS * segment + (2 + dropout_words) * num_steps
            host = (7 + dropout) * tokens * h * dtype_bytes
            sums = 1
        else:
            words_per_step = (LSTM_KEEP_WORDS + dropout_words) * num_steps
        parts.append(PartMemory(f"layer {l}", weights, weights * (grads + sums),
                                batch_size * h * words_per_step * dtype_bytes, host))
    softmax = (h * v + v) * dtype_bytes
    # The logits' softmax, kept for the backward pass, and the gradient built from it: T*B x V each.
    parts.append(PartMemory("softmax", softmax, softmax * grads, 2 * tokens * v * dtype_bytes))
    return parts


def lm_costs(vocab_size: int, hidden_size: int, num_layers: int, batch_size: int, num_steps: int,
             cell_gates: int = 4, optimizer_slots: int = 0, dtype_bytes: int = 4) -> List[float]:
    """Bytes of each part of a stacked-RNN language model (see lm_memory), what the balanced
    strategy evens out."""
    return [p.total for p in lm_memory(vocab_size, hidden_size, num_layers, batch_size, num_steps, cell_gates,
                                       optimizer_slots=optimizer_slots, dtype_bytes=dtype_bytes)]


# --- devices -----------------------------------------------------------------

def setup_virtual_devices(n: int) -> None:
    """Splits the CPU into n logical devices (/device:CPU:0 ... n-1), so placement runs on a
    machine without GPUs. Must run before TensorFlow initialises its devices."""
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError:
        existing = len(tf.config.list_logical_devices("CPU"))
        if existing != n:
            raise UsageError(f"--virtual_devices {n}: TensorFlow already started with {existing} CPU device(s); "
                             "set it once per process, before anything runs") from None


def canonical(device: str) -> str:
    """'/gpu:1' -> '/device:GPU:1' (job/task parts dropped)."""
    import tensorflow as tf
    spec = tf.DeviceSpec.from_string(device)
    if spec.device_type is None:
        raise UsageError(f"device {device!r} names no device type; write it like /gpu:0 or /cpu:0")
    return f"/device:{spec.device_type.upper()}:{spec.device_index or 0}"


def available() -> List[str]:
    import tensorflow as tf
    return [canonical(d.name) for d in tf.config.list_logical_devices()]


def resolve_devices(devices: Optional[str] = None, num_gpus: int = 0, virtual_devices: int = 0) -> List[str]:
    """The devices a job asked for, checked against those that exist.

    --devices /gpu:0,/gpu:1 | --num_gpus N | --virtual_devices N (CPU split in N);
    none of them: [] (one device, TensorFlow's choice).
    """
    if virtual_devices:
        setup_virtual_devices(virtual_devices)
    if devices:
        wanted = [canonical(d.strip()) for d in devices.split(",") if d.strip()]
    elif num_gpus:
        wanted = [f"/device:GPU:{i}" for i in range(num_gpus)]
    elif virtual_devices:
        wanted = [f"/device:CPU:{i}" for i in range(virtual_devices)]
    else:
        return []
    have = available()
    missing = [d for d in wanted if d not in have]
    if missing:
        hint = " (pass --virtual_devices N to split the CPU into N devices)" if "GPU" in " ".join(missing) else ""
        raise UsageError(f"device(s) {', '.join(missing)} do not exist; this machine has {', '.join(have)}{hint}")
    if len(set(wanted)) != len(wanted):
        raise UsageError(f"--devices lists a device twice: {devices}")
    return wanted


def job_devices(devices: Optional[str], num_gpus: int, virtual_devices: int, gpus_per_rank: int) -> List[str]:
    """resolve_devices for a job's flags: with --gpus_per_rank K and no other device flag, the
    layers go across the rank's K GPUs (which distributed.init made /gpu:0 ... /gpu:K-1)."""
    if not (num_gpus or devices or virtual_devices):
        num_gpus = gpus_per_rank
    return resolve_devices(devices, num_gpus, virtual_devices)


def on_device(device: str, fn):
    """fn(*tensors) -> list of tensors, run on `device` in the forward AND the backward pass.

    Ops that TensorFlow 2 builds for gradients carry no device, so by default the
    backward pass of a placed layer runs wherever the placer puts it; inside
    the gradient of a tf.while_loop not even colocate_gradients_with_ops
    reaches them. This wrapper records fn on a tape and builds its gradient
    inside tf.device(device), so any gradient machinery (GradientTape, while
    loops, Horovod's tape) keeps the layer's backward on the layer's device.
    """
    if not device:
        return fn
    import tensorflow as tf

    def call(*args):
        @tf.custom_gradient
        def run(*args):
            with tf.device(device), tf.GradientTape() as tape:
                tape.watch(args)
                outputs = fn(*args)

            def grad(*d_outputs, variables=None):
                variables = list(variables or [])
                with tf.device(device):
                    grads = tape.gradient(outputs, list(args) + variables, output_gradients=list(d_outputs),
                                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
                return grads[:len(args)], grads[len(args):]

            return outputs, grad

        return run(*args)

    return call
