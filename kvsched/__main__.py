"""``python -m kvsched``."""

from kvsched.cli import main

raise SystemExit(main())
