"""`python -m distrnn.ptb ARGS` with float16's loss scale starting at SCALE instead of 2^15, so that the
first steps overflow. Run by tests/test_horovod.py under horovodrun:

    python tests/loss_scale_from.py SCALE ARGS...
"""
import os
import sys

# This checkout's distrnn, wherever an installed one points (a script's own directory comes first on sys.path).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distrnn.numerics.precision import LossScale  # noqa: E402
from distrnn.ptb.cli import main  # noqa: E402

if __name__ == "__main__":
    LossScale.INITIAL = float(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
