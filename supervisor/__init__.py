"""The root process: configuration, spawning and watching the API and channel children."""

from __future__ import annotations
