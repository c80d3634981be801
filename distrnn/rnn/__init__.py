"""distrnn's own recurrent cells and the loops that unroll them over time."""
from distrnn.rnn.cells import LSTMCell
from distrnn.rnn.unroll import unroll, UNROLL_MODES

__all__ = ["LSTMCell", "unroll", "UNROLL_MODES"]
