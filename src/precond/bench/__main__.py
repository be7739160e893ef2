"""``python -m precond.bench``: the benchmark harness (same options as ``precond bench``)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
