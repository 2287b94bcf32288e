"""``python -m tinyalign ...`` (and ``torchrun -m tinyalign ...``): the ``tinyalign`` command."""

import sys

from .cli import main

sys.exit(main())
