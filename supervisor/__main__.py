"""`python -m supervisor` runs the same CLI as the `junebug-supervisor` / `jb` scripts."""

from __future__ import annotations

import sys

from supervisor.main import main

sys.exit(main())
