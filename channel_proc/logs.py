"""The channel's log: JSON lines in `{logging_path}/{channel_id}` (rotated) and warnings on
stderr, with every known secret redacted from both."""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ipc.settings import Settings

#: Config keys whose values are secrets wherever they appear in the channel's properties.
SECRET_KEY_RE: Final = re.compile(r"pass|secret|token|auth|credential|key", re.IGNORECASE)
#: Shorter values are not redacted: replacing every "ab" would make logs unreadable.
MIN_SECRET_LENGTH: Final = 3
REDACTED: Final = "***"


class Redactor:
    """Replaces known secret values in log output. Secrets are added as they become known."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None

    def add(self, secrets: Iterable[str]) -> None:
        self._secrets.update(s for s in secrets if len(s) >= MIN_SECRET_LENGTH)
        # Longest first, so a secret containing another is replaced whole.
        ordered = sorted(self._secrets, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def add_from(self, properties: object) -> None:
        """Add every value under a secret-looking key anywhere in `properties`."""
        self.add(secret_values(properties))

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(REDACTED, text)


def secret_values(value: object, *, secret: bool = False) -> list[str]:
    """Values (strings and numbers) found under keys matching SECRET_KEY_RE, recursively."""
    if isinstance(value, dict):
        found: list[str] = []
        for key, item in value.items():
            found += secret_values(item, secret=secret or bool(SECRET_KEY_RE.search(str(key))))
        return found
    if isinstance(value, list | tuple):
        return [s for item in value for s in secret_values(item, secret=secret)]
    if secret and isinstance(value, str | int | float) and not isinstance(value, bool):
        return [str(value)]
    return []


def settings_secrets(settings: Settings) -> list[str]:
    found: list[str] = []
    if settings.redis is not None and settings.redis.password is not None:
        found.append(settings.redis.password.get_secret_value())
    if settings.amqp is not None:
        found.append(settings.amqp.password.get_secret_value())
    return found


class JsonLineFormatter(logging.Formatter):
    """One JSON object per line, in the shape `GET /channels/{id}/logs` returns."""

    def __init__(self, logger_name: str, redact: Redactor) -> None:
        super().__init__()
        self._logger_name = logger_name
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "logger": self._logger_name,
            "level": record.levelno,
            "timestamp": record.created,
            "message": self._redact(record.getMessage()),
        }
        if record.exc_info and record.exc_info[1] is not None:
            exc_type, exc, tb = record.exc_info
            entry["exception"] = {
                "class": self._redact(repr(exc_type)),
                "instance": self._redact(repr(exc)),
                "stack": [
                    self._redact(line) for line in traceback.format_exception(exc_type, exc, tb)
                ],
            }
        return json.dumps(entry)


class RedactingFormatter(logging.Formatter):
    def __init__(self, fmt: str, redact: Redactor) -> None:
        super().__init__(fmt)
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(super().format(record))


def configure_logging(settings: Settings, channel_id: str) -> Redactor:
    """Send INFO and up to the channel's log file and WARNING and up to stderr.

    Returns the Redactor both use; add the channel's secrets to it once they are loaded.
    """
    redact = Redactor()
    redact.add(settings_secrets(settings))
    log_dir = Path(settings.logging_path)
    log_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    file_handler = logging.handlers.RotatingFileHandler(
        log_dir / channel_id,
        maxBytes=settings.log_rotate_size,
        backupCount=settings.max_log_files,
        encoding="utf-8",
    )
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(JsonLineFormatter(channel_id, redact))
    stderr_handler = logging.StreamHandler(sys.stderr)
    stderr_handler.setLevel(logging.WARNING)
    stderr_handler.setFormatter(
        RedactingFormatter(f"channel {channel_id}: %(levelname)s %(name)s: %(message)s", redact)
    )
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(file_handler)
    root.addHandler(stderr_handler)
    # One line per webhook POST would drown what the transport did.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return redact
