"""The cost of one training step of a stacked-LSTM language model on N GPUs: compute from the model's shapes
against the GPU's roofline, the gradients' all-reduce over the links, the pipeline's fill and drain. Every
figure it assumes is a field of `Assumptions`, documented and overridable; docs/scaling.md holds the
calibration against measured steps and all-reduces.

An LSTM layer, as cuDNN and distrnn's own LSTM (distrnn/rnn/lstm_sequence.py) run it: what does not depend
on the previous step is done for the whole sequence at once (the input's projection [T x B, in] x [in, 4h],
and in the backward pass the input's gradient and both weights' gradients: four products over T x B rows,
near the GPU's peak); what does runs a time step at a time, forward and backward: the recurrent product of
the batch's rows [B, h] with [h, 4h] (backward: the gates' gradient [B, 4h] with its transpose) and a few
element-wise kernels. At the batches language models train with (PTB: 20 rows) that product reads far more
bytes (the recurrent weights, every time step) than it computes on them, so on a GPU it runs at the memory's
bandwidth, not its peak: the roofline, max(flops / (peak x matmul_efficiency), bytes / bandwidth), plus
each kernel's launch. distrnn's own LSTM differs in one place (`Assumptions.per_step_inputs`): a layer above
the first takes its input's product and that input's gradient a time step at a time, inside the wavefront.
The softmax is one product over all T x B rows, forward and backward; the optimizer's update reads every
dense weight and its gradient and writes the weight back, at the memory's bandwidth.
"""
import dataclasses
import math
from typing import Optional

from distrnn.scaling.hardware import GPU, Link

GATES = 4                # an LSTM's four gate blocks
# The pieces distrnn's TensorFlow engine sends its gradients in between CPUs (collective.PIECE_BYTES; the model
# does not import the engine, a seam tests/test_layout.py keeps; tests/test_scaling.py holds the two equal).
TENSORFLOW_PIECE_BYTES = 16 * 2**20
WEIGHT_BYTES = 4         # variables and their gradients are float32 in every precision
INDEX_BYTES = 8          # an embedding row's int64 index, sent beside it
BACKWARD_SHARE = 2 / 3   # of a layer's compute, its backward pass: twice the forward's products


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """What the model does not know from shapes, each documented and overridable by a flag."""
    matmul_efficiency: float = 0.5     # fraction of peak a time step's product reaches at the batch's rows
    sequence_efficiency: float = 0.8   # fraction of peak a product over the whole sequence's rows reaches
    #                                    (the weights' gradient, the softmax): large products run near peak
    backward_efficiency: float = 1.0   # the backward time step's product ([B, 4h] x [4h, h]: a long sum to
    #                                    few columns) at this fraction of the forward one's rate: cuBLAS runs both
    #                                    alike; oneDNN on a CPU reaches 0.3-0.7 (bench/scaling_compute.py)
    per_step_inputs: bool = False      # layers above the first take their input's product and its gradient a
    #                                    time step at a time (distrnn's own LSTM, its wavefront) rather than
    #                                    over the whole sequence (cuDNN)
    update_passes: int = 4             # passes over the dense weights' bytes the update makes: clipping's norm
    #                                    reads each gradient; SGD reads it and the weight and writes the weight
    kernels_per_step: float = 6.0      # kernels one layer's time step launches (product, gates, state), each way
    kernel_us: float = 5.0             # one kernel's launch and tail, microseconds
    overlap: bool = True               # gradients travel as soon as they are ready, during the rest of the
    #                                    backward pass (Horovod's background thread); distrnn's TensorFlow engine
    #                                    packs every gradient into one all-reduce after the backward pass
    engine_gbps: float = 0.0           # GB/s at which the engine itself moves an all-reduce's bytes (host copies,
    #                                    the reduction, serialization); where its ring streams chunks the slower
    #                                    of it and the link sets the pace; 0: never the limit (NCCL on GPUs);
    #                                    measured here for Gloo and gRPC on a CPU (bench/scaling_links.py)
    engine_streams: bool = True        # the engine moves a chunk while the link carries the one before (Gloo,
    #                                    NCCL); False: its time adds to the link's (TensorFlow's RING over gRPC:
    #                                    a chunk is asked for by its receiver and arrives whole before the
    #                                    engine reduces it)
    fusion_mb: float = 64.0            # gradients ready together travel as all-reduces of at most this many MB,
    #                                    each paying the ring's latencies (Horovod's HOROVOD_FUSION_THRESHOLD
    #                                    default; 0: no limit, as distrnn's TensorFlow engine packs them all
    #                                    between GPUs)


def engine_assumptions(engine: str, on_cpus: bool = False, **figures) -> Assumptions:
    """How an engine exchanges gradients: Horovod as they are ready, in fused all-reduces of 64 MB; distrnn's
    TensorFlow engine all at once, after the backward pass, as one all-reduce between GPUs (NCCL) and in
    pieces of TENSORFLOW_PIECE_BYTES between CPUs (its RING, which does not stream). Between CPUs whose
    cores the ranks' compute fills, nothing is hidden behind the backward pass: the same cores copy and
    reduce the gradients. `figures`: other Assumptions fields."""
    if engine == "horovod":
        return Assumptions(overlap=not on_cpus, **figures)
    return Assumptions(overlap=False, fusion_mb=TENSORFLOW_PIECE_BYTES / 1e6 if on_cpus else 0.0,
                       engine_streams=not on_cpus, **figures)


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


def element_bytes(precision: str) -> int:
    return 4 if precision == "float32" else 2


def time_step_product(model: Model, rows: int, precision: str) -> tuple:
    """Flops and bytes of a time step's product [B, h] x [h, 4h]: the weights read once, the rows in and out."""
    h, p = model.hidden_size, element_bytes(precision)
    return 2.0 * rows * h * GATES * h, h * GATES * h * p + rows * 2 * GATES * h * p


def lstm_layer_seconds(model: Model, rows: int, gpu: GPU, precision: str, a: Assumptions, first: bool) -> float:
    """One LSTM layer's forward and backward pass over `rows` batch rows: its time steps, then the products
    over the whole sequence. `first`: the stack's first layer, which always takes its input over the sequence."""
    h, t = model.hidden_size, model.num_steps
    step_flops, step_bytes = time_step_product(model, rows, precision)
    forward = roofline(step_flops, step_bytes, gpu, precision, a.matmul_efficiency)
    backward = roofline(step_flops, step_bytes, gpu, precision, a.matmul_efficiency * a.backward_efficiency)
    stepwise_input = a.per_step_inputs and not first
    products_a_step = 2 if stepwise_input else 1  # the recurrent product, and the input's where it is stepwise
    kernels = 2 * a.kernels_per_step * a.kernel_us * 1e-6
    # Over the whole sequence: both weights' gradients, and the input's projection and gradient unless stepwise.
    sequence = (2 if stepwise_input else 4) * roofline(step_flops * t, h * GATES * h * WEIGHT_BYTES, gpu, precision,
                                                       a.sequence_efficiency)
    return t * (products_a_step * (forward + backward) + kernels) + sequence


def compute_seconds(model: Model, rows: int, gpu: GPU, precision: str = "float32", a: Assumptions = Assumptions(),
                    layers: Optional[int] = None) -> dict:
    """One step's compute on one GPU holding `layers` of the LSTM layers (all by default; a pipeline's last GPU
    holds one layer) and the softmax, over `rows` batch rows: {'lstm', 'softmax', 'update', 'total'} in
    seconds, and 'bound' (compute or memory, whichever the LSTM's time steps hit)."""
    layers = model.num_layers if layers is None else layers
    h, t, p = model.hidden_size, model.num_steps, element_bytes(precision)
    lstm = sum(lstm_layer_seconds(model, rows, gpu, precision, a, first=l == 0) for l in range(layers))
    logits = 2.0 * rows * t * h * model.vocab_size
    softmax = 3 * roofline(logits, (h * model.vocab_size + 2 * rows * t * model.vocab_size) * p, gpu, precision,
                           a.sequence_efficiency)
    weights = layers * model.layer_weights + (h + 1) * model.vocab_size
    update = a.update_passes * weights * WEIGHT_BYTES / (gpu.memory_gbps * 1e9)
    step_flops, step_bytes = time_step_product(model, rows, precision)
    memory_bound = step_bytes / (gpu.memory_gbps * 1e9) > step_flops / (peak_flops(gpu, precision)
                                                                         * a.matmul_efficiency)
    return {"lstm": lstm, "softmax": softmax, "update": update, "total": lstm + softmax + update,
            "bound": "memory" if memory_bound else "compute"}


def ring_allreduce_bytes(nbytes: float, gpus: int) -> float:
    """What each GPU sends in a ring all-reduce of `nbytes`: its reduce-scatter, then its all-gather, each
    n-1 chunks of 1/n."""
    return 2 * (gpus - 1) / gpus * nbytes


def ring_allgather_bytes(nbytes_each: float, gpus: int) -> float:
    """What each GPU sends in a ring all-gather of `nbytes_each` a GPU: every other GPU's share passes by."""
    return (gpus - 1) * nbytes_each


def _ring(gpus: int, gpus_per_node: int, intra: Link, inter: Link) -> tuple:
    """A ring over `gpus` GPUs, hierarchical (within each node, then between nodes): the bytes a second of
    the slowest link it crosses (a node's network link carries the whole ring's traffic once the ring spans
    nodes), and the seconds of one pass around it (a latency a hop)."""
    nodes = math.ceil(gpus / gpus_per_node)
    within = min(gpus, gpus_per_node)
    bandwidth = (inter if nodes > 1 else intra).gbps * 1e9
    return bandwidth, ((within - 1) * intra.latency_us + (nodes - 1) * inter.latency_us) * 1e-6


def ring_allreduce_seconds(nbytes: float, gpus: int, gpus_per_node: int, intra: Link, inter: Link,
                           fusion_bytes: float = 0) -> float:
    """A ring all-reduce of `nbytes` over `gpus` GPUs, `gpus_per_node` to a node (`_ring`: hierarchical, as
    NCCL and Horovod do): 2(n-1)/n x bytes over the ring's slowest link, plus two passes' latencies (the
    reduce-scatter, the all-gather) for each all-reduce of at most `fusion_bytes` (0: one)."""
    if gpus <= 1:
        return 0.0
    bandwidth, latency = _ring(gpus, gpus_per_node, intra, inter)
    return ring_allreduce_bytes(nbytes, gpus) / bandwidth + allreduce_count(nbytes, fusion_bytes) * 2 * latency


def allreduce_count(nbytes: float, fusion_bytes: float) -> int:
    """The all-reduces `nbytes` go in, each of at most `fusion_bytes` (0: one)."""
    return max(1, math.ceil(nbytes / fusion_bytes)) if fusion_bytes else 1


def ring_allgather_seconds(nbytes_each: float, gpus: int, gpus_per_node: int, intra: Link, inter: Link) -> float:
    """Every GPU's `nbytes_each` to every other GPU, in a ring: each link carries (n-1) x bytes (it grows with
    the GPUs, where an all-reduce's traffic does not), plus one pass's latencies."""
    if gpus <= 1:
        return 0.0
    bandwidth, latency = _ring(gpus, gpus_per_node, intra, inter)
    return ring_allgather_bytes(nbytes_each, gpus) / bandwidth + latency


def exposed_after_backward(chunks, backward_seconds: float) -> float:
    """Seconds the gradient exchange runs past the end of the backward pass. `chunks`: (when a group of
    gradients is ready, as a fraction of the backward pass; its seconds on the link), in the order they are
    ready; the link takes them one after another, as Horovod's background thread does."""
    t = 0.0
    for ready, seconds in chunks:
        t = max(t, ready * backward_seconds) + seconds
    return max(0.0, t - backward_seconds)


def gradient_bytes(model: Model, rows: int, fp16_allreduce: bool = False) -> dict:
    """Bytes of one step's gradients: the dense ones' (the LSTM's, the softmax's), the embedding's rows (one a
    token, with its index: what a rank sends to every other when the engine gathers them), and the embedding's
    gradient as one dense tensor (what --sparse_as_dense all-reduces instead)."""
    width = 2 if fp16_allreduce else WEIGHT_BYTES
    lstm = model.num_layers * model.layer_weights * width
    softmax = (model.hidden_size + 1) * model.vocab_size * width
    rows_bytes = rows * model.num_steps * (model.hidden_size * width + INDEX_BYTES)
    return {"lstm": lstm, "softmax": softmax, "embedding_rows": rows_bytes,
            "embedding_dense": model.vocab_size * model.hidden_size * width}


@dataclasses.dataclass(frozen=True)
class Cluster:
    gpu: GPU
    intra: Link              # between the GPUs of a node
    inter: Link              # between nodes (each node's network link)
    gpus_per_node: int = 8


def _through_engine(link: Link, a: Assumptions) -> Link:
    """The link as the engine sees it: no faster than the engine moves bytes, or, where the engine does not
    stream, at the rate of the two one after the other."""
    if not a.engine_gbps:
        return link
    gbps = min(link.gbps, a.engine_gbps) if a.engine_streams else 1 / (1 / link.gbps + 1 / a.engine_gbps)
    return dataclasses.replace(link, gbps=gbps)


def communication(model: Model, ranks: int, per_rank: int, cluster: Cluster, rows: int, lstm_seconds: float,
                  fp16_allreduce: bool = False, a: Assumptions = Assumptions(),
                  sparse_as_dense: Optional[bool] = None) -> dict:
    """One step's gradient exchange between `ranks` ranks of `per_rank` GPUs: seconds in all ('total_s'), and
    past the end of the backward pass ('exposed_s': with `a.overlap` the softmax's gradients, ready first,
    travel during the LSTM's backward pass, about 2/3 of `lstm_seconds`; the LSTM's and the embedding's are
    ready at its end); the embedding's gradient as its gathered rows or dense ('embedding':
    `sparse_as_dense`, or with None whichever is faster)."""
    g = gradient_bytes(model, rows, fp16_allreduce)
    # Pipelined: each layer's ring joins that layer's GPU of every rank, all rings at once over the same links.
    nodes_share = max(1, cluster.gpus_per_node // per_rank)
    links = (nodes_share, _through_engine(cluster.intra, a),
             _through_engine(dataclasses.replace(cluster.inter, gbps=cluster.inter.gbps / per_rank), a))
    fusion = a.fusion_mb * 1e6

    def allreduce(nbytes):
        return ring_allreduce_seconds(nbytes, ranks, *links, fusion_bytes=fusion)

    lstm = g["lstm"] / per_rank
    ways = {"rows": allreduce(lstm) + ring_allgather_seconds(g["embedding_rows"], ranks, *links),
            "dense": allreduce(lstm + g["embedding_dense"])}
    embedding = min(ways, key=ways.get) if sparse_as_dense is None else ("dense" if sparse_as_dense else "rows")
    first, last = allreduce(g["softmax"]), ways[embedding]
    total = first + last
    exposed = (exposed_after_backward([(0.0, first), (1.0, last)], lstm_seconds * BACKWARD_SHARE) if a.overlap
               else total)
    return {"total_s": total, "exposed_s": exposed, "embedding": embedding}


def step(model: Model, gpus: int, cluster: Cluster, rows: int, pipelined: bool = False, precision: str = "float32",
         fp16_allreduce: bool = False, a: Assumptions = Assumptions(), sparse_as_dense: Optional[bool] = None) -> dict:
    """One training step on `gpus` GPUs, `rows` batch rows a rank: data parallel (a rank a GPU, each the whole
    model), or `pipelined` (a rank across num_layers GPUs, a layer each, the softmax with the last, the layers'
    time steps in a wavefront; ranks data parallel). The embedding's gradient travels as its rows, gathered,
    or with `sparse_as_dense` as one dense tensor in the all-reduce (None: whichever is faster; 'embedding'
    says which). Seconds of compute, of the pipeline's fill and drain, of the all-reduce not hidden behind
    the backward pass; the step; words/sec; what bounds it."""
    per_rank = model.num_layers if pipelined else 1
    ranks = gpus // per_rank
    c = compute_seconds(model, rows, cluster.gpu, precision, a, layers=1 if pipelined else None)
    bubble = c["lstm"] * (per_rank - 1) / model.num_steps
    compute = c["total"]
    talk = communication(model, ranks, per_rank, cluster, rows, c["lstm"], fp16_allreduce, a, sparse_as_dense)
    embedding, exposed = talk["embedding"], talk["exposed_s"]
    seconds = compute + bubble + exposed
    parts = {"compute": compute, "pipeline bubble": bubble, "all-reduce": exposed}
    return {"gpus": gpus, "ranks": ranks, "gpus_per_rank": per_rank, "rows_per_rank": rows,
            "global_batch": ranks * rows, "compute_s": compute, "bubble_s": bubble, "allreduce_s": exposed,
            "embedding": embedding, "step_s": seconds, "words_per_sec": ranks * rows * model.num_steps / seconds,
            "bound": max(parts, key=parts.get) if max(parts.values()) != compute else
            ("memory bandwidth" if c["bound"] == "memory" else "compute")}
