"""``python -m dynamicrafter``: the ``dynamicrafter`` command (videos, ``convert``, ``train``)."""

import sys

from .cli import main

sys.exit(main())
