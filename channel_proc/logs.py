"""The channel's log: JSON lines in `{logging_path}/{channel_id}` (rotated) and warnings on
stderr (unless JUNEBUG_DISABLE_LOGGING), with every known secret redacted from both and from
Sentry events. Lines written inside `message_context(id)` carry `"message_id"`, which
`GET /channels/{id}/logs?message_id=` filters on."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import logging.handlers
import os
import re
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ipc.observability import logging_disabled

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from types import TracebackType

    from ipc.settings import Settings

#: Config keys whose values are secrets wherever they appear in the channel's properties.
SECRET_KEY_RE: Final = re.compile(r"pass|secret|token|auth|credential|key", re.IGNORECASE)
#: Shorter values are not redacted: replacing every "ab" would make logs unreadable.
MIN_SECRET_LENGTH: Final = 3
REDACTED: Final = "***"

#: The message the current task is handling (trio copies context into each task, and into
#: worker threads, so concurrent sends each see their own).
_MESSAGE_ID: Final = contextvars.ContextVar[str | None]("junebug_message_id", default=None)


def message_context(message_id: str | None) -> contextlib.AbstractContextManager[None]:
    """While active in this task, every channel log line carries `"message_id": message_id`
    (None: lines carry none, e.g. between messages)."""
    return _message_scope(message_id)


@contextlib.contextmanager
def _message_scope(message_id: str | None) -> Iterator[None]:
    token = _MESSAGE_ID.set(message_id)
    try:
        yield
    finally:
        _MESSAGE_ID.reset(token)


def current_message_id() -> str | None:
    return _MESSAGE_ID.get()


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


def exception_class_name(exc_type: type[BaseException]) -> str:
    """The class name: "ValueError" for builtins (as the docs show), else "module.Class"."""
    if exc_type.__module__ == "builtins":
        return exc_type.__qualname__
    return f"{exc_type.__module__}.{exc_type.__qualname__}"


def exception_entry(
    exc_type: type[BaseException],
    exc: BaseException,
    tb: TracebackType | None,
    redact: Callable[[str], str],
) -> dict[str, Any]:
    """The `exception` object of a log entry (docs 1.8.1): class, instance, stack of strings."""
    return {
        "class": redact(exception_class_name(exc_type)),
        "instance": redact(repr(exc)),
        # One string per traceback chunk (a frame, a "During handling..." line, the error).
        "stack": [
            redact(chunk.rstrip("\n")) for chunk in traceback.format_exception(exc_type, exc, tb)
        ],
    }


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
        # An explicit `extra={"message_id": ...}` wins over the task's message.
        message_id = getattr(record, "message_id", None) or _MESSAGE_ID.get()
        if message_id is not None:
            entry["message_id"] = str(message_id)
        if record.exc_info and record.exc_info[1] is not None:
            _, exc, tb = record.exc_info
            entry["exception"] = exception_entry(type(exc), exc, tb, self._redact)
        return json.dumps(entry)


class RedactingFormatter(logging.Formatter):
    def __init__(self, fmt: str, redact: Redactor) -> None:
        super().__init__(fmt)
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(super().format(record))


class ChannelLogHandler(logging.handlers.RotatingFileHandler):
    """Rotation as the original's twisted LogFile: `X` -> `X.1`, `X.1` -> `X.2`, ...; rotated
    files numbered `max_files` and up are deleted, and `max_files` 0 keeps them all (the
    stdlib handler would stop rotating instead and let one file grow without bound)."""

    def __init__(self, path: Path, *, max_bytes: int, max_files: int) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=max_files, encoding="utf-8")

    def emit(self, record: logging.LogRecord) -> None:
        """Format once, then rotate if the line would pass max_bytes, then write.

        The stdlib's emit formats each record twice (shouldRollover formats it to measure it,
        FileHandler.emit again to write it) and stats the path twice per record; with JSON
        lines and redaction that was a fifth of a busy channel process's CPU.
        """
        try:
            line = self.format(record) + self.terminator
            if self.stream is None:
                self.stream = self._open()
            # The stream's position is its size (append mode); seeking is Windows' concern.
            if self.maxBytes > 0 and self.stream.tell() + len(line) >= self.maxBytes:
                # Reopens the stream (delay is never set here).
                self.doRollover()
            self.stream.write(line)
            self.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's contract: a failed emit must not raise
            self.handleError(record)

    def rotated_paths(self) -> list[str]:
        """The existing rotated files `X.1`, `X.2`, ... up to the first gap (the API's view)."""
        found: list[str] = []
        while os.path.exists(path := f"{self.baseFilename}.{len(found) + 1}"):
            found.append(path)
        return found

    def doRollover(self) -> None:  # noqa: N802 - the stdlib's name
        if self.stream:
            self.stream.close()
            self.stream = None
        for index, path in reversed(list(enumerate(self.rotated_paths(), start=1))):
            if self.backupCount and index >= self.backupCount:
                os.remove(path)
            else:
                os.replace(path, f"{self.baseFilename}.{index + 1}")
        if os.path.exists(self.baseFilename):
            os.replace(self.baseFilename, f"{self.baseFilename}.1")
        if not self.delay:
            self.stream = self._open()


def configure_logging(settings: Settings, channel_id: str) -> Redactor:
    """Send INFO and up to the channel's log file and WARNING and up to stderr.

    The file is the data of `GET /channels/{id}/logs`, so JUNEBUG_DISABLE_LOGGING turns off
    only stderr. Returns the Redactor both use; add the channel's secrets to it once they are
    loaded.
    """
    redact = Redactor()
    redact.add(settings_secrets(settings))
    _skip_unused_record_fields()
    log_dir = Path(settings.logging_path)
    log_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    file_handler = ChannelLogHandler(
        log_dir / channel_id,
        max_bytes=settings.log_rotate_size,
        max_files=settings.max_log_files,
    )
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(JsonLineFormatter(channel_id, redact))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(file_handler)
    if not logging_disabled():
        stderr_handler = logging.StreamHandler(sys.stderr)
        stderr_handler.setLevel(logging.WARNING)
        stderr_handler.setFormatter(
            RedactingFormatter(f"channel {channel_id}: %(levelname)s %(name)s: %(message)s", redact)
        )
        root.addHandler(stderr_handler)
    # One line per webhook POST would drown what the transport did.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return redact


def _skip_unused_record_fields() -> None:
    """Stop logging from filling record fields no channel log line shows: the caller's file
    and line (a stack walk per record), thread and process names. The logging HOWTO's
    "Optimization" section gives these switches; they save a third of the cost of a record,
    and a busy channel writes one per PDU."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def redact_strings(value: Any, redact: Callable[[str], str]) -> Any:
    """`value` with `redact` applied to every string in it (dicts, lists, tuples).

    Exceptions (e.g. Sentry's log-message arguments, rendered later with repr) become their
    redacted repr.
    """
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, BaseException):
        return redact(repr(value))
    if isinstance(value, dict):
        return {key: redact_strings(item, redact) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_strings(item, redact) for item in value]
    return value
