"""``python -m latro_engine ...`` is the ``latro`` command."""

import sys

from latro_engine.cli import main

sys.exit(main())
