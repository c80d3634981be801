import sys

from distrnn.mnist.cli import main

sys.exit(main())
