"""`python -m api`: see api.main."""

from __future__ import annotations

from api.main import main

raise SystemExit(main())
