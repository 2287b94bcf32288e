"""python -m bankd: the bankd command."""

import sys

from bankd.cli import main

sys.exit(main())
