"""The names distrnn's parts choose among, defined once, in a module that imports nothing: the
command line offers them before TensorFlow loads, and the parts that implement them are built from
(or checked against) them at import.
"""

CELL_GATES = {"lstm": 4, "gru": 3, "rnn": 1}  # gate blocks in each cell's kernel (distrnn.rnn.cells)
CELLS = tuple(CELL_GATES)
RNN_MODES = ("static", "dynamic", "block", "cudnn", "auto")  # distrnn.rnn.unroll
STRATEGIES = ("round_robin", "balanced")   # how model parts are mapped to devices (distrnn.placement)
PLACEMENTS = ("sequential", "pipeline")    # how the layers' devices take turns
LR_SCALINGS = ("none", "linear", "sqrt")   # the learning rate against global batch / batch_size
DATASETS = ("mnist", "fashion_mnist")      # the published image data sets (distrnn.mnist.idx)
PRECISIONS = ("float32", "bfloat16", "float16")  # what a model computes in (distrnn.precision)
PRECISION_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
