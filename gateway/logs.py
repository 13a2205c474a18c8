"""Log output: one JSON object a line, or plain text; ``auto`` (the default) picks text on a
terminal and JSON otherwise. The log settings (:class:`LogConfig`) are declared here.

Call sites pass structured data as ``extra={"fields": {...}}``; values are whatever the caller
decided is safe (fingerprints, never tokens).

Output is batched (:class:`BatchWriter`): inside the event loop, lines are gathered and written
in one go at least every 100 ms whatever the volume (sooner at 256 lines; at once for warnings
and errors, and at shutdown), so a busy gateway makes one write a batch, not one a line. The
per-request access line (:func:`access_sink`, :func:`json_line`) skips ``logging`` altogether
when our JSON handler is the only one: it is preformatted straight into the batch, byte for byte
the line ``JsonFormatter`` would make.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import sys
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, ClassVar, Final

from gateway.config_values import choice, parse_audit_target
from gateway.declare import setting

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


@dataclass(frozen=True)
class LogConfig:
    """Log level and format."""

    SECTION: ClassVar[str] = "logging"

    log_level: str = setting(
        "GATEWAY_LOG_LEVEL", choice("debug", "info", "warning", "error"), "info",
        "Log level: debug, info, warning or error.")
    log_format: str = setting(
        "GATEWAY_LOG_FORMAT", choice("auto", "json", "text"), "auto",
        "Log format: json (one object a line), text, or auto: text on a terminal, json "
        "otherwise.")
    audit_log: str = setting(
        "GATEWAY_AUDIT_LOG", parse_audit_target, "stderr",
        "Where the audit trail goes (one JSON line per mutating request, logger 'audit', "
        "written at once): stderr (with the logs), stdout (apart from them), an absolute "
        "file path (appended), or off.")


#: Write a batch at least this often (seconds), and when it reaches this many lines.
FLUSH_EVERY: Final = 0.1
FLUSH_LINES: Final = 256


def iso_ms(created: float) -> str:
    """``2026-11-29T12:00:00.123Z``: the ``ts`` of every JSON line."""
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


class _Timestamps:
    """:func:`iso_ms` with the last second's and the last millisecond's text kept: the same
    text, cheaper (under load several lines share a millisecond). Like
    ``datetime.fromtimestamp`` it first rounds to the microsecond (half to even), then
    ``isoformat`` cuts to the millisecond. Each cache is one tuple, replaced whole, so a
    thread that logs meanwhile never pairs one second's text with another's."""

    def __init__(self) -> None:
        self._second: tuple[int, str] = (-1, "")
        self._last: tuple[int, int, str] = (-1, -1, "")

    def __call__(self, created: float) -> str:
        frac, whole = math.modf(created)
        us = round(frac * 1e6)
        second = int(whole)
        if us >= 1_000_000:
            second += 1
            us -= 1_000_000
        elif us < 0:
            second -= 1
            us += 1_000_000
        ms = us // 1000
        last = self._last
        if last[0] == second and last[1] == ms:
            return last[2]
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, datetime.fromtimestamp(second, UTC).strftime(
                "%Y-%m-%dT%H:%M:%S"))
        text = f"{cached[1]}.{ms:03d}Z"
        self._last = (second, ms, text)
        return text


fast_iso_ms = _Timestamps()


def json_line(created: float, level: str, logger: str, msg: str,
              fields: dict[str, Any]) -> str:
    """A JSON log line (with its newline) as :class:`JsonFormatter` writes it."""
    out: dict[str, Any] = {"ts": fast_iso_ms(created), "level": level, "logger": logger,
                           "msg": msg}
    out.update(fields)
    return _ENCODER.encode(out) + "\n"


#: What ``json.dumps(obj, default=str)`` builds on every call, built once (same output).
_ENCODER: Final = json.JSONEncoder(default=str)


#: The most one write may carry and stay whole on a pipe shared with other processes (POSIX
#: PIPE_BUF): batches are cut at line ends below it, so workers' lines never interleave.
ATOMIC_WRITE: Final = 4096


class BatchWriter:
    """Text to a stream in batches: at least every :data:`FLUSH_EVERY` seconds while an event
    loop runs in the writing thread, at once otherwise (or when :meth:`flush` is called)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._lock = threading.Lock()
        self._batch: list[str] = []
        self._armed: asyncio.AbstractEventLoop | None = None  # the loop whose timer flushes

    def write(self, text: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Batch ``text``. ``loop``: the running loop, when the caller knows it is on it (the
        access line: asking asyncio costs a ``getpid`` system call)."""
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop in this thread: nothing would flush later
                loop = None
        with self._lock:
            self._batch.append(text)
            later = (loop is not None and len(self._batch) < FLUSH_LINES
                     and (self._armed is loop or self._armed is None))
            arm = later and self._armed is None
            if arm:
                self._armed = loop
        if not later:  # no loop, a full batch, or a timer on another (maybe closed) loop
            self.flush()
        elif arm:
            assert loop is not None
            loop.call_later(FLUSH_EVERY, self.flush)

    def flush(self) -> None:
        with self._lock:
            batch, self._batch = self._batch, []
            self._armed = None
            if batch:
                try:
                    for chunk in _chunks(batch):
                        self.stream.write(chunk)
                        self.stream.flush()
                except (OSError, ValueError):
                    pass  # a closed or broken stream: logging must never take the gateway down


def _chunks(lines: list[str]) -> list[str]:
    """Lines joined into writes of at most :data:`ATOMIC_WRITE` bytes, cut at line ends (a
    longer line goes alone)."""
    out: list[str] = []
    part: list[str] = []
    size = 0
    for line in lines:
        n = len(line) if line.isascii() else len(line.encode())
        if part and size + n > ATOMIC_WRITE:
            out.append("".join(part))
            part, size = [], 0
        part.append(line)
        size += n
    if part:
        out.append("".join(part))
    return out


class BatchedHandler(logging.Handler):
    """A logging handler that writes through a :class:`BatchWriter`; warnings and errors (and
    everything before them) go out at once."""

    def __init__(self, writer: BatchWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.writer.write(line + "\n")
        if record.levelno >= logging.WARNING:
            self.writer.flush()

    def flush(self) -> None:
        self.writer.flush()


_installed: BatchedHandler | None = None


def access_sink(logger: logging.Logger) -> BatchWriter | None:
    """The batch to write an access line straight into, or None to go through ``logging``:
    only when nothing but our JSON handler on the root would see the record (no other handler,
    filter or ``propagate=False`` from ``logger`` up) and ``logger`` logs at info."""
    handler = _installed
    if handler is None or not isinstance(handler.formatter, JsonFormatter):
        return None
    if not logger.isEnabledFor(logging.INFO) or handler.filters:
        return None
    node: logging.Logger | None = logger
    while node is not None and node is not logging.root:
        if node.handlers or node.filters or not node.propagate:
            return None
        node = node.parent
    handlers = logging.root.handlers
    if len(handlers) != 1 or handlers[0] is not handler or logging.root.filters:
        return None
    return handler.writer


def flush() -> None:
    """Write out what is batched (at shutdown)."""
    if _installed is not None:
        _installed.flush()


#: The credential profile a line is about, where a gateway has several: set for each request
#: (admission) and around each profile's background work; every line then says
#: ``"credential"`` (unless its fields name one). Unset with one profile: lines as before.
CREDENTIAL: Final = contextvars.ContextVar[str | None]("credential", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": iso_ms(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        credential = CREDENTIAL.get()
        if credential is not None:
            out.setdefault("credential", credential)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            extras = " ".join(f"{k}={v}" for k, v in fields.items()
                              if v is not None and k != "event")
            line = f"{line} {extras}" if extras else line
        credential = CREDENTIAL.get()
        if credential is not None and not (isinstance(fields, dict) and "credential" in fields):
            line = f"{line} credential={credential}"
        return line


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


AUDIT: Final = "audit"


def setup_audit(target: str) -> None:
    """The ``audit`` logger: its own handler, JSON whatever the log format, written and
    flushed line by line (never batched), not passed on to the root logger's handlers."""
    audit = logging.getLogger(AUDIT)
    for old in [h for h in audit.handlers if getattr(h, "_repairy_gateway", False)]:
        audit.removeHandler(old)
        old.close()
    audit.propagate = False
    audit.disabled = target == "off"
    if target == "off":
        return
    handler: logging.Handler = (
        logging.StreamHandler(sys.stderr if target == "stderr" else sys.stdout)
        if target in ("stderr", "stdout") else logging.FileHandler(target, encoding="utf-8"))
    handler.setFormatter(JsonFormatter())
    setattr(handler, "_repairy_gateway", True)  # noqa: B010 (ours to replace later)
    audit.addHandler(handler)
    audit.setLevel(logging.INFO)


def setup_logging(level: str, fmt: str, stream: Any = None) -> logging.Handler:
    """Configure the root logger (idempotent: replaces our previous handler); returns it.

    ``fmt`` is ``json``, ``text`` or ``auto`` (text when ``stream`` is a terminal)."""
    global _installed
    flush()
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if _is_terminal(stream) else "json"
    handler = BatchedHandler(BatchWriter(stream))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    _installed = handler
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_repairy_gateway", False)]:
        root.removeHandler(old)
    handler._repairy_gateway = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return handler
