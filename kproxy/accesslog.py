"""The access log: one line per request on the ``kproxy.access`` logger.

Text lines (``access_log_format = text``)::

    2026-11-29T13:31:01.123Z 127.0.0.1 "GET /v1/anything" 200 319 0.0042 sd-app anything 10.0.0.7:80 200 0.0031 rid=3f2a...

fields: time (UTC), client, method and path, status, body bytes sent, seconds, service,
api, upstream node, upstream status, upstream seconds (time to headers), request id;
``-`` where a field does not apply. ``json`` lines carry the same fields by name.
The query string is left out: it is where clients put tokens (``?access_token=``), and
no header is ever logged, so neither tokens nor ``Authorization`` values reach the log.

``kproxy serve`` and ``conf/gunicorn.conf.py`` send this logger to stdout through an
``AccessLogHandler``; an app that mounts ``KProxyMiddleware`` configures
``logging.getLogger("kproxy.access")`` itself, and every line goes through logging.

Where the logger's only handler is an ``AccessLogHandler`` (and nothing filters), lines
go to it straight, not through a ``LogRecord`` each, and it writes them as nginx's
``access_log ... buffer= flush=`` does: up to 64 KiB at once, at least once a second, and
on exit. The logging machinery and a write per line were a tenth of what a proxied
request cost (docs/performance.rst).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .record import RequestRecord

log = logging.getLogger("kproxy.access")


def _now() -> str:
    """UTC time with milliseconds; the part up to the second is formatted once a second."""
    global _second, _second_text
    now = time.time()
    second = int(now)
    if second != _second:
        _second_text = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        _second = second
    return f"{_second_text}.{int((now - second) * 1000):03d}Z"


_second, _second_text = -1, ""


def fields(record: RequestRecord) -> dict:
    out = {
        "time": _now(),
        "client": record.client,
        "method": record.method,
        "path": record.path,
        "status": record.status,
        "bytes": record.bytes_sent,
        "duration": round(time.perf_counter() - record.started, 6),
        "service": record.service,
        "api": record.api,
        "upstream": record.node.address if record.node else None,
        "upstream_status": record.upstream_status,
        "upstream_duration": None if record.upstream_seconds is None else round(record.upstream_seconds, 6),
        "request_id": record.request_id,
        "error": record.error,
    }
    if record.bytes_received is not None:  # a tunnel: the bytes each way
        out["bytes_received"] = record.bytes_received
    return out


def _text(e: RequestRecord) -> str:
    # built straight from the record: this runs for every request
    upstream = f"{e.node.address} {e.upstream_status}" if e.node and e.upstream_status is not None else (
        f"{e.node.address} -" if e.node else "- -")
    seconds = "-" if e.upstream_seconds is None else f"{e.upstream_seconds:.4f}"
    line = (f'{_now()} {e.client} "{e.method} {_printable(e.path)}" {e.status} {e.bytes_sent} '
            f'{time.perf_counter() - e.started:.4f} {e.service} {e.api} {upstream} {seconds} rid={e.request_id}')
    if e.bytes_received is not None:  # a tunnel: bytes from the client too
        line += f" received={e.bytes_received}"
    if e.error:
        line += f' error="{_printable(e.error)}"'
    return line


def _printable(text: str) -> str:
    # a client controls the path: keep one request on one line, whatever it sent
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return text.encode("unicode_escape").decode("ascii").replace('"', '\\"')


class AccessLogHandler(logging.Handler):
    """Writes access log lines to a stream in batches: when 64 KiB are waiting, and at
    most ``flush_interval`` seconds after a line came (a daemon thread), and on
    ``flush()``/``close()`` (logging flushes every handler at exit)."""

    BUFFER = 64 * 1024

    def __init__(self, stream: IO[str], flush_interval: float = 1.0):
        super().__init__()
        self.stream = stream
        self.flush_interval = flush_interval
        self._lines: list[str] = []
        self._size = 0
        self._closed = False
        self._wake = threading.Event()
        self._flusher: threading.Thread | None = None
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        # threads do not survive a fork; and a forked worker writes only its own lines
        self._lines, self._size, self._wake, self._flusher = [], 0, threading.Event(), None

    def write(self, line: str) -> None:
        with self.lock:
            if self._flusher is None:
                # started by the first line, not at fork: a thread started before the
                # gunicorn hooks hold SIGHUP back would take the signal and end the worker
                self._flusher = threading.Thread(target=self._flush_periodically, name="kproxy-access-log",
                                                 daemon=True)
                self._flusher.start()
            self._lines.append(line)
            self._size += len(line) + 1
            if self._size >= self.BUFFER:
                self._write_out()
            elif len(self._lines) == 1:
                self._wake.set()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record))
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        with self.lock:
            self._write_out()

    def close(self) -> None:
        self.flush()
        self._closed = True
        self._wake.set()
        super().close()

    def _write_out(self) -> None:  # with the lock held
        if self._lines:
            lines, self._lines, self._size = self._lines, [], 0
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # stdout closed or full: lose lines, not requests
                pass

    def _flush_periodically(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            time.sleep(self.flush_interval)
            self.flush()


def _direct_handler() -> AccessLogHandler | None:
    """The handler to write to straight, when logging would do nothing else with a line."""
    handlers = log.handlers
    if (len(handlers) == 1 and type(handlers[0]) is AccessLogHandler and not log.filters
            and not handlers[0].filters and not log.propagate and log.isEnabledFor(logging.INFO)
            and handlers[0].level <= logging.INFO):
        return handlers[0]
    return None


def observer(form: str) -> Callable[[RequestRecord], None]:
    """A ``Gateway`` observer that logs each record as ``text`` or ``json``."""
    render = (lambda e: json.dumps(fields(e), separators=(",", ":"))) if form == "json" else _text

    def log_line(record: RequestRecord) -> None:
        handler = _direct_handler()
        if handler is not None:
            handler.write(render(record))
        elif log.isEnabledFor(logging.INFO):
            log.info("%s", render(record))
    return log_line
