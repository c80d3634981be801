"""The cost of one training step of a stacked-LSTM language model on N GPUs: compute from the model's shapes
against the GPU's roofline, the gradients' all-reduce over the links, the pipeline's fill and drain. Every
figure it assumes is a field of `Assumptions`, documented and overridable; docs/scaling.md holds the
calibration against measured steps and all-reduces.

An LSTM layer, as cuDNN and distrnn's own LSTM (distrnn/rnn/lstm_sequence.py) run it: what does not depend
on the previous step is done for the whole sequence at once (the input's projection [T x B, in] x [in, 4h],
and in the backward pass the input's gradient and both weights' gradients: four products over T x B rows,
near the GPU's peak); what does runs a time step at a time, forward and backward: the recurrent product of
the batch's rows [B, h] with [h, 4h] and a few element-wise kernels. At the batches language models train
with (PTB: 20 rows) that product reads far more bytes (the recurrent weights, every time step) than it
computes on them, so it runs at the GPU's memory bandwidth, not its peak: the roofline, max(flops / (peak x
matmul_efficiency), bytes / bandwidth), plus each kernel's launch.
The softmax is one product over all T x B rows, forward and backward.
"""
import dataclasses
import math
from typing import Optional

from distrnn.scaling.hardware import GPU, Link

GATES = 4                # an LSTM's four gate blocks
WEIGHT_BYTES = 4         # variables and their gradients are float32 in every precision
INDEX_BYTES = 8          # an embedding row's int64 index, sent beside it


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """What the model does not know from shapes, each documented and overridable by a flag."""
    matmul_efficiency: float = 0.5     # fraction of peak a time step's product reaches at the batch's rows
    sequence_efficiency: float = 0.8   # fraction of peak a product over the whole sequence's rows reaches
    #                                    (the weights' gradient, the softmax): large products run near peak
    kernels_per_step: int = 6          # kernels one layer's time step launches (product, gates, state), each way
    kernel_us: float = 5.0             # one kernel's launch and tail, microseconds
    overlap: bool = True               # the all-reduce of gradients ready early (the softmax's) runs during the
    #                                    LSTM's backward pass: Horovod's background thread; distrnn's TensorFlow
    #                                    engine packs every gradient into one all-reduce after the backward pass


@dataclasses.dataclass(frozen=True)
class Model:
    """A stacked-LSTM language model's shapes (distrnn.ptb's presets)."""
    hidden_size: int
    num_layers: int
    num_steps: int
    vocab_size: int = 10000

    @property
    def layer_weights(self) -> int:
        """Weights of one LSTM layer (its input is the layer below, of hidden_size)."""
        return (2 * self.hidden_size + 1) * GATES * self.hidden_size

    @property
    def dense_weights(self) -> int:
        """Weights whose gradients are dense: the LSTM layers and the softmax."""
        return self.num_layers * self.layer_weights + (self.hidden_size + 1) * self.vocab_size

    def forward_flops(self, rows: int) -> float:
        """Multiply-adds x 2 of one step's forward pass over `rows` batch rows: every layer's products at
        every time step, and the softmax's."""
        tokens = rows * self.num_steps
        return 2.0 * tokens * (self.num_layers * 2 * self.hidden_size * GATES * self.hidden_size
                               + self.hidden_size * self.vocab_size)


def peak_flops(gpu: GPU, precision: str) -> float:
    return (gpu.float32_tflops if precision == "float32" else gpu.float16_tflops) * 1e12


def roofline(flops: float, bytes_: float, gpu: GPU, precision: str, efficiency: float) -> float:
    """Seconds of one kernel-sized piece of work: bounded by compute (at `efficiency` of the peak) or by
    memory bandwidth."""
    return max(flops / (peak_flops(gpu, precision) * efficiency), bytes_ / (gpu.memory_gbps * 1e9))


def compute_seconds(model: Model, rows: int, gpu: GPU, precision: str = "float32", a: Assumptions = Assumptions(),
                    layers: Optional[int] = None) -> dict:
    """One step's compute on one GPU holding `layers` of the LSTM layers (all by default) and the softmax
    (a pipeline's last GPU holds one layer and the softmax), over `rows` batch rows: {'lstm', 'softmax',
    'total'} in seconds, and 'bound' (compute or memory, whichever the LSTM's time steps hit)."""
    layers = model.num_layers if layers is None else layers
    h, t, p = model.hidden_size, model.num_steps, 2 if precision != "float32" else 4
    step_flops = 2.0 * rows * h * GATES * h  # the recurrent product: [B, h] x [h, 4h]
    step_bytes = h * GATES * h * p + rows * 2 * GATES * h * p
    per_step = (roofline(step_flops, step_bytes, gpu, precision, a.matmul_efficiency)
                + a.kernels_per_step * a.kernel_us * 1e-6)
    # Over the whole sequence at once: the input's projection, its gradient, and both weights' gradients.
    sequence = 4 * roofline(step_flops * t, h * GATES * h * WEIGHT_BYTES, gpu, precision, a.sequence_efficiency)
    lstm = layers * (2 * t * per_step + sequence)  # forward and backward steps, then the sequence's products
    logits = 2.0 * rows * t * h * model.vocab_size
    softmax = 3 * roofline(logits, (h * model.vocab_size + 2 * rows * t * model.vocab_size) * p, gpu, precision,
                           a.sequence_efficiency)
    memory_bound = step_bytes / (gpu.memory_gbps * 1e9) > step_flops / (peak_flops(gpu, precision)
                                                                         * a.matmul_efficiency)
    return {"lstm": lstm, "softmax": softmax, "total": lstm + softmax, "bound": "memory" if memory_bound else "compute"}


def ring_allreduce_seconds(nbytes: float, gpus: int, gpus_per_node: int, intra: Link, inter: Link) -> float:
    """A ring all-reduce of `nbytes` over `gpus` GPUs, `gpus_per_node` to a node: 2(n-1)/n x bytes over the
    slowest link the ring crosses (a node's network link carries the whole ring's traffic once the ring
    spans nodes), plus one latency per ring step, hierarchically (within each node, then between nodes) as
    NCCL and Horovod do."""
    if gpus <= 1:
        return 0.0
    nodes = math.ceil(gpus / gpus_per_node)
    within = min(gpus, gpus_per_node)
    bandwidth = (inter if nodes > 1 else intra).gbps * 1e9
    latency = 2 * (within - 1) * intra.latency_us + 2 * (nodes - 1) * inter.latency_us
    return 2 * (gpus - 1) / gpus * nbytes / bandwidth + latency * 1e-6


def gradient_bytes(model: Model, rows: int, fp16_allreduce: bool = False) -> dict:
    """Bytes each GPU sends into one step's collectives: the dense gradients' all-reduce (the LSTM's, then
    the softmax's), and the embedding's rows (one a token, with its index) that every other rank gathers."""
    width = 2 if fp16_allreduce else WEIGHT_BYTES
    lstm = model.num_layers * model.layer_weights * width
    softmax = (model.hidden_size + 1) * model.vocab_size * width
    rows_bytes = rows * model.num_steps * (model.hidden_size * width + INDEX_BYTES)
    return {"lstm": lstm, "softmax": softmax, "embedding_rows": rows_bytes}


@dataclasses.dataclass(frozen=True)
class Cluster:
    gpu: GPU
    intra: Link              # between the GPUs of a node
    inter: Link              # between nodes (each node's network link)
    gpus_per_node: int = 8


def step(model: Model, gpus: int, cluster: Cluster, rows: int, pipelined: bool = False, precision: str = "float32",
         fp16_allreduce: bool = False, a: Assumptions = Assumptions()) -> dict:
    """One training step on `gpus` GPUs, `rows` batch rows a rank: data parallel (a rank a GPU, each the whole
    model), or `pipelined` (a rank across num_layers GPUs, a layer each, the softmax with the last, the layers'
    time steps in a wavefront; ranks data parallel). Seconds of compute, of the pipeline's fill and drain, of
    the all-reduce not hidden behind the backward pass; the step; words/sec; what bounds it."""
    per_rank = model.num_layers if pipelined else 1
    ranks = gpus // per_rank
    c = compute_seconds(model, rows, cluster.gpu, precision, a, layers=1 if pipelined else None)
    bubble = c["lstm"] * (per_rank - 1) / model.num_steps
    compute = c["total"]
    g = gradient_bytes(model, rows, fp16_allreduce)
    # Pipelined: each layer's ring joins that layer's GPU of every rank, all rings at once over the same links.
    dense = g["lstm"] / per_rank + g["softmax"]
    nodes_share = max(1, cluster.gpus_per_node // per_rank)
    inter = dataclasses.replace(cluster.inter, gbps=cluster.inter.gbps / per_rank)
    allreduce = ring_allreduce_seconds(dense, ranks, nodes_share, cluster.intra, inter)
    gather = ring_allreduce_seconds(g["embedding_rows"], ranks, nodes_share, cluster.intra, inter) / 2
    communication = allreduce + gather
    hidden = min(communication * g["softmax"] / dense, c["lstm"] * 2 / 3) if a.overlap else 0.0
    exposed = communication - hidden
    seconds = compute + bubble + exposed
    parts = {"compute": compute, "pipeline bubble": bubble, "all-reduce": exposed}
    return {"gpus": gpus, "ranks": ranks, "gpus_per_rank": per_rank, "rows_per_rank": rows,
            "global_batch": ranks * rows, "compute_s": compute, "bubble_s": bubble, "allreduce_s": exposed,
            "step_s": seconds, "words_per_sec": ranks * rows * model.num_steps / seconds,
            "bound": max(parts, key=parts.get) if max(parts.values()) != compute else
            ("memory bandwidth" if c["bound"] == "memory" else "compute")}
