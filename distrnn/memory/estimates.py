"""What each part of a stacked recurrent model needs in memory during a training step: the one
estimate behind the balanced placement strategy, `distrnn.devices --plan` and the memory modes'
advice, for every job (TensorFlow-free). bench/memory_estimate.py checks it against measured peaks.
"""
import dataclasses
from typing import List, NamedTuple, Optional

from distrnn.names import PRECISION_BYTES

WEIGHT_BYTES = 4  # variables, their gradients and optimizer slots are float32 in every precision

# Peak bytes per unit, step and batch row that an LSTM layer holds in the backward pass, in
# float32 words, when every activation is kept: the records of the forward pass (output, the
# four gates, cell, tanh(j): 7), the factors built from them for all steps at once (pd 4, q,
# f, c_prev: 7), the gate gradients (4) and the temporaries of building them (about 10).
# Measured: bench/bptt_memory.py (2 x 256 units, batch 32, 2000 steps, keep): (4160 - 654)
# MiB / (2000 * 32 * 256 * 2 * 4 B) = 28.0 words.
LSTM_KEEP_WORDS = 28
SWAP_SEGMENT = 16  # steps per swapped segment (distrnn.rnn.Memory's default)


# Held on every GPU besides the model: the CUDA context, cuBLAS/cuDNN workspaces and TensorFlow's
# runtime. A typical figure (0.3-0.6 GiB on recent GPUs and drivers), not one measured here.
GPU_RUNTIME_MIB = 512


def recompute_segment(num_steps: int) -> int:
    """The K of --recompute K that needs least: about sqrt(num_steps) (T/K states plus K steps)."""
    return max(1, round(num_steps ** 0.5))


class Memory(NamedTuple):
    """What `lstm_stack` keeps for its backward pass, and where.

    Default (keep): every step's activations, on the layer's device.
    recompute=K: only the state at the start of each K-step segment; the
        backward pass computes one segment's activations again from it, the
        segment it is about to need. Holds T/K states and about two segments
        of activations instead of T steps' worth; costs about one more forward
        pass.
    swap: every activation, copied to `host` as each `segment`-step segment
        finishes and copied back when the backward pass reaches it; the layer's
        device holds about two segments of activations at a time.

    Both run the sequence segment by segment in tf.while_loops, whatever the
    unrolling mode: in one Python-unrolled graph the optimiser may merge the
    recomputation with the forward pass (common subexpressions), and nothing
    would stop every segment's copy or recomputation from running at once.
    The backward loop runs at most two segments at once (parallel_iterations=2):
    the next one is fetched or recomputed while the current one runs.
    """
    recompute: int = 0                  # K > 0: keep every K-th state, recompute the rest
    swap: bool = False                  # keep the activations in host memory
    host: str = "/device:CPU:0"         # where swap keeps them
    segment: int = SWAP_SEGMENT         # time steps per swapped segment

    @property
    def segmented(self) -> bool:
        return self.swap or self.recompute > 0

    @property
    def steps(self) -> int:
        """Time steps per segment."""
        return self.recompute or self.segment

    def leaner(self, num_steps: int) -> Optional["Memory"]:
        """The next mode to try after running out of memory in this one: keep, then recompute
        with segments of about sqrt(num_steps) (the fewest states plus segment steps), then
        swap; None after swap."""
        if not self.segmented:
            return Memory(recompute=recompute_segment(num_steps), host=self.host)
        if self.recompute:
            return Memory(swap=True, host=self.host)
        return None

    def describe(self) -> str:
        if self.recompute:
            return f"recompute (one state in {self.recompute} kept)"
        if self.swap:
            return f"swap (activations on {self.host}, {self.segment} steps at a time on the device)"
        return "keep (all activations on the device)"


KEEP = Memory()


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


def compute_copy(weight_bytes: int, precision: str) -> int:
    """Bytes of the 16-bit copy of float32 weights that a step casts and computes with (none in float32)."""
    return 0 if precision == "float32" else weight_bytes // WEIGHT_BYTES * PRECISION_BYTES[precision]


def recurrent_layer(name: str, input_size: int, hidden_size: int, batch_size: int, num_steps: int,
                    cell_gates: int = 4, dropout: bool = False, recompute: int = 0, swap: bool = False,
                    optimizer_slots: int = 0, precision: str = "float32") -> PartMemory:
    """Bytes of one recurrent layer in one training step: its weights (with their compute copy in 16-bit
    precisions), their gradients (and optimizer slots), and the activations backprop through time needs,
    which are in the compute precision: half of float32's in bfloat16 and float16.

    LSTM layers (cell_gates 4) follow lstm_stack's memory modes: keep (LSTM_KEEP_WORDS per
    unit, step and row), recompute K (one state in K, plus two K-step segments being
    recomputed and used, and a running sum of the weight gradients), swap (two
    SWAP_SEGMENT-step segments on the device, the records on the host, the same sums).
    Other cells are differentiated by TensorFlow: their gates and state per step.
    """
    h, g = hidden_size, cell_gates
    act = PRECISION_BYTES[precision]
    weights = (input_size + h + 1) * g * h * WEIGHT_BYTES
    dropout_words = 2 * dropout  # its mask and the masked output
    host, sums = 0, 0  # sums: weight gradients summed over segments, beside each segment's own
    if g != 4:
        words = (g + 2 + dropout_words) * num_steps  # per unit and batch row
    elif recompute:
        segment = min(recompute, num_steps)
        words = (2 * -(-num_steps // recompute) + 2 * LSTM_KEEP_WORDS * segment
                 + (2 + dropout_words) * num_steps)  # the output, its gradient and dropout
        sums = 1
    elif swap:
        words = 2 * LSTM_KEEP_WORDS * min(SWAP_SEGMENT, num_steps) + (2 + dropout_words) * num_steps
        host = (7 + dropout) * batch_size * num_steps * h * act
        sums = 1
    else:
        words = (LSTM_KEEP_WORDS + dropout_words) * num_steps
    return PartMemory(name, weights + compute_copy(weights, precision), weights * (1 + optimizer_slots + sums),
                      batch_size * h * words * act, host)


def lm_memory(vocab_size: int, hidden_size: int, num_layers: int, batch_size: int, num_steps: int,
              cell_gates: int = 4, dropout: bool = False, recompute: int = 0, swap: bool = False,
              optimizer_slots: int = 0, precision: str = "float32") -> List[PartMemory]:
    """Bytes of each part of a stacked-RNN language model (embedding, layers, softmax) in one
    training step: weights, their gradients (and optimizer slots), and activations (see
    recurrent_layer), in `precision`."""
    h, v, w = hidden_size, vocab_size, WEIGHT_BYTES
    act = PRECISION_BYTES[precision]
    tokens = batch_size * num_steps
    grads = 1 + optimizer_slots
    parts = [PartMemory("embedding", v * h * w,
                        # the gradient is sparse: one row per token, plus the rows summed per word
                        2 * tokens * h * w + v * h * optimizer_slots * w,
                        tokens * h * (1 + dropout) * act)]
    parts += [recurrent_layer(f"layer {l}", h, h, batch_size, num_steps, cell_gates, dropout, recompute, swap,
                              optimizer_slots, precision) for l in range(num_layers)]
    softmax = (h * v + v) * w
    # The logits' softmax, kept for the backward pass, and the gradient built from it: T*B x V each, both
    # float32 in every precision (distrnn.numerics.ops), and in 16 bits the gradient's cast for the matmuls.
    logits = tokens * v * (2 * w + (act if precision != "float32" else 0))
    parts.append(PartMemory("softmax", softmax + compute_copy(softmax, precision), softmax * grads, logits))
    return parts


def lm_costs(vocab_size: int, hidden_size: int, num_layers: int, batch_size: int, num_steps: int,
             cell_gates: int = 4, optimizer_slots: int = 0, precision: str = "float32", keeps: Memory = Memory(),
             dropout: bool = False) -> List[float]:
    """Bytes of each part of a stacked-RNN language model (see lm_memory) in memory mode `keeps`, what the
    balanced strategy evens out and the host is checked against."""
    return [p.total for p in lm_memory(vocab_size, hidden_size, num_layers, batch_size, num_steps, cell_gates,
                                       dropout, keeps.recompute, keeps.swap, optimizer_slots, precision)]
