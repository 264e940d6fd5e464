"""``python -m flowbridge`` is the ``flowbridge`` command."""

import sys

from flowbridge.cli import main

sys.exit(main())
