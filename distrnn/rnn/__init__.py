"""distrnn's own recurrent cells (cells) and the loops that unroll them over time (unroll: static, dynamic,
fused, cuDNN), a stack of layers on devices (stack), and the LSTM kernels with a hand-written backward
that swap or recompute to save memory (lstm_sequence, fused)."""
from distrnn.rnn.cells import CELLS, BasicRNNCell, GRUCell, LSTMCell
from distrnn.rnn.lstm_sequence import KEEP, Memory
from distrnn.rnn.unroll import UNROLL_MODES, Unrolling, resolve_mode, supported, unroll, unroll_autodiff

__all__ = ["CELLS", "BasicRNNCell", "GRUCell", "KEEP", "LSTMCell", "Memory", "UNROLL_MODES", "Unrolling",
           "resolve_mode", "supported", "unroll", "unroll_autodiff"]
