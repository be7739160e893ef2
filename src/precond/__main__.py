"""``python -m precond``."""

from precond.cli import main

raise SystemExit(main())
