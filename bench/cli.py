"""The command-line pieces every gateway benchmark shares: service flags, --out, running."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    import argparse
    from collections.abc import Awaitable, Callable


def add_service_args(
    parser: argparse.ArgumentParser, *, timeout: float | None, redis: bool = True
) -> None:
    """--redis-host/--redis-port (when `redis`), --amqp-host/--amqp-port, --timeout (when
    given a default) and --out."""
    if redis:
        parser.add_argument("--redis-host", default="127.0.0.1")
        parser.add_argument("--redis-port", type=int, default=6379)
    parser.add_argument("--amqp-host", default="127.0.0.1")
    parser.add_argument("--amqp-port", type=int, default=5672)
    if timeout is not None:
        parser.add_argument("--timeout", type=float, default=timeout, help="seconds per wait")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")


def check_ranges(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    ranges: dict[str, tuple[float, float]],
) -> None:
    """Exit with a usage error naming the first flag outside its [low, high] range."""
    for name, (low, high) in ranges.items():
        value = getattr(args, name.lstrip("-").replace("-", "_"))
        if not low <= value <= high:
            parser.error(f"{name} must be between {low:g} and {high:g}")


def run_main(
    main_async: Callable[[argparse.Namespace], Awaitable[dict[str, Any]]],
    args: argparse.Namespace,
) -> None:
    """Run the benchmark under trio and write its result as JSON when --out was given."""
    result = trio.run(main_async, args)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
