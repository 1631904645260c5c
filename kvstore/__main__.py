"""``python -m kvstore`` is the ``kvstore`` command (works where the script dir is not on PATH)."""

import sys

from kvstore.cli import main

sys.exit(main())
