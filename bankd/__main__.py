"""python -m bankd: the bankd command."""

import sys

from .cli import main

sys.exit(main())
