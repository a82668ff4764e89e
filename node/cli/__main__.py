"""``python -m node.cli``: the ``microgrid`` command."""

import sys

from node.cli import main

sys.exit(main())
