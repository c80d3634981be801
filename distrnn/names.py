"""The names distrnn's parts choose among, defined once, in a module that imports nothing (the cells'
capabilities included): the command line offers them before TensorFlow loads, and the parts that
implement them are built from (or checked against) them at import.
"""

import dataclasses
from typing import Optional

RNN_MODES = ("static", "dynamic", "block", "cudnn", "auto")  # distrnn.rnn.unroll
FUSED_MODES = ("block", "cudnn")  # whole-sequence kernels (TensorFlow's BlockLSTM, cuDNN)


@dataclasses.dataclass(frozen=True)
class CellKind:
    """What a kind of cell can do: the one table every part that chooses by cell reads (config's checks,
    the unrolling, the stack, the models, the memory plan, the OOM retry); no code compares cell names or
    classes elsewhere. A cell class in distrnn.rnn.cells names its kind, and a subclass names its own
    (a layer-normalised LSTM is not "lstm": it must not run the LSTM's fused or hand-written kernels)."""
    name: str
    gates: int                   # gate blocks in its kernel over [inputs, h]
    fused: tuple = ()            # the whole-sequence kernels that run it (FUSED_MODES)
    peepholes: bool = False      # may have peephole connections (Gers & Schmidhuber 2000)
    own_backward: bool = False   # lstm_stack's hand-written backward runs it: interleaved layers, swap, recompute
    forget_gate: bool = False    # has a forget gate, and so a forget bias

    def mode_problem(self, mode: str, use_peepholes: bool) -> Optional[str]:
        """Why rnn_mode `mode` cannot run this cell (None: it can); the one place that decides it."""
        if use_peepholes and not self.peepholes:
            return (f"use_peepholes needs cell {' or '.join(k.name for k in CELL_KINDS.values() if k.peepholes)}, "
                    f"got cell {self.name!r}; drop --use_peepholes")
        if mode in FUSED_MODES and mode not in self.fused:
            return f"rnn_mode {mode} runs LSTM cells only; use --rnn_mode auto, static or dynamic for {self.name}"
        if mode == "cudnn" and use_peepholes:
            return "cuDNN has no peephole LSTM; use --rnn_mode block, static or dynamic with --use_peepholes"
        return None


CELL_KINDS = {kind.name: kind for kind in (
    CellKind("lstm", 4, fused=FUSED_MODES, peepholes=True, own_backward=True, forget_gate=True),
    CellKind("gru", 3),
    CellKind("rnn", 1),
)}
CELLS = tuple(CELL_KINDS)
STRATEGIES = ("round_robin", "balanced")   # how model parts are mapped to devices (distrnn.parallel.placement)
PLACEMENTS = ("sequential", "pipeline")    # how the layers' devices take turns
LR_SCALINGS = ("none", "linear", "sqrt")   # the learning rate against global batch / batch_size
ENGINES = ("auto", "horovod", "tensorflow")  # what runs the collectives among processes (distrnn.parallel.join)
DATASETS = ("mnist", "fashion_mnist")      # the published image data sets (distrnn.mnist.idx)
PRECISIONS = ("float32", "bfloat16", "float16")  # what a model computes in (distrnn.numerics.precision)
PRECISION_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
