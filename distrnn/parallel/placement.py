"""Model parallelism: which device holds each part of a stacked recurrent model.

A Plan maps the embedding, every recurrent layer and the softmax onto
devices. Model code takes the plan as an argument and places each part's
variables and computation inside `tf.device(...)`: TensorFlow 2's counterpart
of TensorFlow 1's DeviceCellWrapper (a `with tf.device()` block around a cell
*factory* is silently ignored, because variables are created later, when the
cell is first called; distrnn creates them inside the block). Gradients are
built colocated with their forward ops, so the backward pass runs where the
forward did.

Strategies (the bytes each part needs come from distrnn.memory.estimates):
  round_robin  layer i on device i mod N; the embedding with the first layer,
               the softmax with the last (the classic multi-GPU LSTM layout)
  balanced     the parts, in order, cut into N contiguous groups so that the
               largest group's bytes (parameters, optimizer slots, activations
               of one batch) are as small as possible
"""
import dataclasses
from typing import Callable, Dict, List, Optional, Sequence

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

    def bytes_on(self, costs: Sequence[float]) -> Dict[str, float]:
        """The estimated bytes each device holds, from `costs` (bytes of [embedding, layers..., softmax])."""
        held: Dict[str, float] = {}
        for (_, device), cost in zip(self.parts(), costs):
            held[device] = held.get(device, 0.0) + cost
        return held

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


def job_plan(num_layers: int, devices: Sequence[str], strategy: str, costs: Callable[[], Sequence[float]]) -> Plan:
    """make_plan over the devices a job was given; given none, one device of TensorFlow's choice. Refused
    (monitor.check_host_fits) before anything is allocated where the host cannot hold what the plan puts on it."""
    from distrnn.memory import monitor
    estimate = tuple(costs())
    plan = make_plan(num_layers, devices, strategy, estimate) if devices else single_device(num_layers)
    monitor.check_host_fits(plan, estimate)
    return plan


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
