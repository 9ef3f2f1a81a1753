"""``python -m geventpool``: the command line (see :mod:`geventpool.cli`)."""

from __future__ import annotations

import sys

from geventpool.cli import main

if __name__ == "__main__":
    sys.exit(main())
