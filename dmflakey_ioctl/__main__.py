"""``python -m dmflakey_ioctl``: the dmflakey command."""

import sys

from .cli import main

sys.exit(main())
