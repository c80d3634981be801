"""Running a cell over time, in one of several modes that compute the same thing.

| mode    | how                                                       | cells            |
| ------- | --------------------------------------------------------- | ---------------- |
| static  | Python loop: every step visible to the graph optimiser    | all              |
| dynamic | tf.while_loop: graph size independent of sequence length  | all              |
| block   | TensorFlow's fused BlockLSTM kernel for the whole sequence | LSTM             |
| cudnn   | cuDNN on a GPU                                            | LSTM, no peepholes |
| auto    | the fastest of these for the device and options           | all              |

Every mode computes in float32, bfloat16 or float16 (the precision, distrnn.numerics.precision) except
block and cudnn in bfloat16: the BlockLSTM and cuDNN RNN ops are defined for half and float only.

LSTM cells in static and dynamic mode run through `lstm_stack`, whose
backward pass is written by hand; other cells are differentiated by
TensorFlow (`unroll_autodiff`, also the reference the tests hold the LSTM
path to).
"""
import dataclasses
import logging

import tensorflow as tf

from distrnn.errors import UsageError
from distrnn.names import CELL_KINDS, FUSED_MODES, RNN_MODES
from distrnn.numerics import precision
from distrnn.numerics.ops import matmul_for
from distrnn.rnn import fused
from distrnn.rnn.lstm_sequence import KEEP, Layer, Memory, lstm_stack

UNROLL_MODES = RNN_MODES  # the names, defined TensorFlow-free in distrnn.names
logger = logging.getLogger("distrnn")


FUSED_PRECISIONS = ("float32", "float16")  # the T attribute of BlockLSTM and CudnnRNNV3 (no bfloat16)


def supported(kind: str, use_peepholes: bool, mode: str, precision: str = "float32") -> bool:
    """Whether `mode` can run a cell of `kind` (a key of CELL_KINDS) in `precision`."""
    if CELL_KINDS[kind].mode_problem(mode, use_peepholes):
        return False
    return mode not in FUSED_MODES or precision in FUSED_PRECISIONS


STATIC_MAX_STEPS = 64  # beyond this a Python-unrolled graph grows slow to build and run
STEP_MODES = ("static", "dynamic")  # the modes that run a step at a time (lstm_stack's, and the pipeline's)


def resolve_mode(kind: str, use_peepholes: bool, mode: str, on_gpu: bool, num_steps: int = None,
                 memory: Memory = KEEP, placement: str = "sequential", precision: str = "float32") -> tuple:
    """(concrete mode, reason why) for a stack of `kind` cells (a key of CELLS): `auto` becomes the
    fastest mode for the device and cell; other modes are checked and returned as they are. A memory
    mode (swap or recompute) runs LSTM cells through `lstm_stack`'s segment loops, and the pipeline
    interleaves the layers' time steps, which a whole-sequence kernel cannot: both need a step loop.
    on_gpu: whether the stack runs on a GPU, which the job knows from the devices it was given.
    Raises ValueError for a combination that cannot run."""
    if mode not in UNROLL_MODES:
        raise ValueError(f"unknown rnn_mode {mode!r}; use one of {', '.join(UNROLL_MODES)}")
    if memory.segmented:
        if not CELL_KINDS[kind].own_backward or mode not in ("static", "dynamic", "auto"):
            raise ValueError(f"memory mode {memory.describe()} needs LSTM cells and rnn_mode auto, static or dynamic "
                             f"(got the {kind} cell, rnn_mode {mode}): fused kernels and TensorFlow's autodiff keep "
                             f"every step's activations themselves; drop --recompute/--swap_memory or change "
                             f"--cell/--rnn_mode")
        if num_steps is not None and memory.recompute > num_steps:
            raise ValueError(f"--recompute {memory.recompute} is longer than the sequence ({num_steps} steps): a segment "
                             f"is at most the whole sequence; about sqrt(steps), --recompute "
                             f"{max(1, round(num_steps ** 0.5))}, needs least memory")
        return "dynamic", "a memory mode runs segment by segment in while loops"
    mode, reason = _device_mode(kind, use_peepholes, mode, on_gpu, num_steps, precision)
    if placement == "pipeline" and mode not in STEP_MODES:
        return "dynamic", f"{mode} runs whole sequences; the pipeline needs a step loop"
    return mode, reason


def _device_mode(kind: str, use_peepholes: bool, mode: str, on_gpu: bool, num_steps: int,
                 precision: str = "float32") -> tuple:
    if mode != "auto":
        problem = CELL_KINDS[kind].mode_problem(mode, use_peepholes)
        if problem:
            raise ValueError(problem)
        if not supported(kind, use_peepholes, mode, precision):
            raise ValueError(f"rnn_mode {mode} has no {precision} kernel (TensorFlow's {mode} op takes float32 and "
                             f"float16); use --rnn_mode dynamic (or auto, which picks one that runs) with "
                             f"--precision {precision}, or --precision float16 with rnn_mode {mode}")
        if mode == "cudnn" and not (on_gpu and fused.built_with_cudnn()):
            # TensorFlow would fail inside the first step, with a traceback about a missing gradient.
            raise ValueError("rnn_mode cudnn needs a GPU with cuDNN and this process has none; use --rnn_mode auto, "
                             "which runs cuDNN wherever it can")
        return mode, "asked for"
    if on_gpu and supported(kind, use_peepholes, "cudnn", precision) and fused.built_with_cudnn():
        return "cudnn", "GPU with cuDNN and an LSTM without peepholes"
    # Measured on CPU (2 x 200-unit LSTM layers, 20 steps, batch 20, forward+backward):
    # static 12-14 ms, dynamic 14-16 ms, block 19 ms.
    if on_gpu:
        return "dynamic", "GPU without cuDNN for this cell"
    if num_steps is None or num_steps > STATIC_MAX_STEPS:
        return "dynamic", f"CPU, sequences longer than {STATIC_MAX_STEPS} steps (or of unknown length)"
    return "static", "CPU, short sequences: the Python-unrolled loop is fastest here"


@dataclasses.dataclass(frozen=True)
class Unrolling:
    """How a job's recurrent stack runs: resolved once, by the job, from the devices it was given.
    Models and cells take it and never look at devices themselves."""
    mode: str                      # static, dynamic, block or cudnn: never auto
    reason: str                    # why that mode (the job logs it)
    placement: str = "sequential"  # sequential or pipeline (distrnn.rnn.stack)
    memory: Memory = KEEP          # what an LSTM stack's backward pass keeps
    precision: str = "float32"     # what the model computes in (distrnn.numerics.precision): float32, bfloat16, float16
    on_gpu: bool = False           # where the stack runs, which decides how float16 products are summed

    @property
    def dtype(self) -> tf.DType:
        return precision.compute_dtype(self.precision)

    @property
    def matmul(self):
        """The matmul of the stack's cells, kernels and output layer (distrnn.numerics.ops.matmul_for)."""
        return matmul_for(self.on_gpu)

    @classmethod
    def resolve(cls, kind: str, use_peepholes: bool, mode: str, on_gpu: bool, num_steps: int,
                placement: str = "sequential", memory: Memory = KEEP, precision: str = "float32") -> "Unrolling":
        """resolve_mode's choice, with the schedule, memory mode and precision it was made for."""
        return cls(*resolve_mode(kind, use_peepholes, mode, on_gpu, num_steps, memory, placement, precision),
                   placement, memory, precision, on_gpu)

    @classmethod
    def for_config(cls, config, num_steps: int, on_gpu: bool = False, placement: str = "sequential",
                   memory: Memory = KEEP, precision: str = "float32", mode: str = None) -> "Unrolling":
        """How a job's stack runs: resolve for its config's cell, use_peepholes and rnn_mode (or `mode`), a
        combination that cannot run refused as bad input (UsageError, one line)."""
        try:
            return cls.resolve(config.cell, config.use_peepholes, mode or config.rnn_mode, on_gpu, num_steps,
                               placement, memory, precision)
        except ValueError as error:
            raise UsageError(str(error)) from None


def unroll(cell, inputs, state, mode: str = "dynamic", sequence_length=None, memory: Memory = KEEP):
    """Runs `cell` over time-major `inputs` (T, B, I) from `state`.

    sequence_length (B,) int, optional: outputs past a row's length are 0 and
    its final state is the state after its last valid step. memory: what an
    LSTM's backward pass keeps (see lstm_sequence.Memory). mode: a concrete mode (resolve_mode
    turns `auto` into one). Returns (outputs (T, B, H), final state).
    """
    if mode == "auto":
        raise ValueError("unroll runs a concrete mode: resolve_mode turns auto into one for the job's devices")
    _device_mode(cell.kind, cell.use_peepholes, mode, on_gpu=True, num_steps=None,
                 precision=inputs.dtype.name)  # refuses what cannot run
    if mode == "block":
        return fused.block_lstm(cell, inputs, state, sequence_length)
    if mode == "cudnn":
        return fused.cudnn_lstm(cell, inputs, state, sequence_length)
    if not CELL_KINDS[cell.kind].own_backward:
        return unroll_autodiff(cell, inputs, state, mode, sequence_length)
    mask = None
    if sequence_length is not None:
        mask = tf.transpose(tf.sequence_mask(sequence_length, tf.shape(inputs)[0], dtype=inputs.dtype))[:, :, None]
    outputs, [state] = lstm_stack(inputs, [tuple(state)], [lstm_layer(cell)], mask=mask, static=(mode == "static"),
                                  memory=memory)
    return outputs, state


def lstm_layer(cell, device: str = None) -> Layer:
    """An LSTMCell's weights as `lstm_stack` takes them."""
    return Layer(cell.kernel, cell.bias, cell.forget_bias, cell.peepholes(), device, cell.matmul)


def unroll_autodiff(cell, inputs, state, mode: str = "dynamic", sequence_length=None):
    """The generic loop over `cell.step`, differentiated by TensorFlow, in the inputs' dtype."""
    w_x, w_h = cell.split_kernel(inputs.dtype)
    projected = cell.project_inputs(inputs, w_x)
    state = tuple(state)
    if sequence_length is not None:
        sequence_length = tf.cast(sequence_length, tf.int32)

    def step(t, state):
        out, new = cell.step(projected[t], state, w_h)
        if sequence_length is None:
            return out, new
        valid = (t < sequence_length)[:, None]                 # (B, 1)
        new = tuple(tf.where(valid, n, s) for n, s in zip(new, state))
        return tf.where(valid, out, tf.zeros_like(out)), new

    if mode == "static":
        outputs = []
        for t in range(inputs.shape[0]):
            out, state = step(t, state)
            outputs.append(out)
        return tf.stack(outputs), state

    num_steps = tf.shape(inputs)[0]

    def body(t, state, outputs):
        out, state = step(t, state)
        return t + 1, state, outputs.write(t, out)

    _, state, outputs = tf.while_loop(
        lambda t, *_: t < num_steps, body, (tf.constant(0), state, tf.TensorArray(inputs.dtype, size=num_steps)))
    return outputs.stack(), state
