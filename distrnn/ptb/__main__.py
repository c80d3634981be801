import sys

from distrnn.ptb.cli import main

sys.exit(main())
