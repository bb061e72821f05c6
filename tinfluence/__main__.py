"""`python -m tinfluence`: the `tinfluence` command."""

import sys

from .cli import main

sys.exit(main())
