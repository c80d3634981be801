"""distrnn's own recurrent cells and the loops that unroll them over time."""
from distrnn.rnn.cells import CELLS, BasicRNNCell, GRUCell, LSTMCell
from distrnn.rnn.lstm_sequence import KEEP, Memory
from distrnn.rnn.unroll import UNROLL_MODES, Unrolling, resolve_mode, supported, unroll, unroll_autodiff

__all__ = ["CELLS", "BasicRNNCell", "GRUCell", "KEEP", "LSTMCell", "Memory", "UNROLL_MODES", "Unrolling",
           "resolve_mode", "supported", "unroll", "unroll_autodiff"]
