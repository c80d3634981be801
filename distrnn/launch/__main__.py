import sys

from distrnn.launch.local import main

sys.exit(main())
