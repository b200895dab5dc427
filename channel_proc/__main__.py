"""`python -m channel_proc run --channel-id CID` / `python -m channel_proc describe`."""

from __future__ import annotations

import sys

from channel_proc.main import main

sys.exit(main())
