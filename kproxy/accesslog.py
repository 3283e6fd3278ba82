"""The access log: one line per request on the ``kproxy.access`` logger.

Text lines (``access_log_format = text``)::

    2026-11-29T13:31:01.123Z 127.0.0.1 "GET /v1/anything" 200 319 0.0042 sd-app anything 10.0.0.7:80 200 0.0031 rid=3f2a...

fields: time (UTC), client, method and path, status, body bytes sent, seconds, service,
api, upstream node, upstream status, upstream seconds (time to headers), request id;
``-`` where a field does not apply. ``json`` lines carry the same fields by name.
The query string is left out: it is where clients put tokens (``?access_token=``), and
no header is ever logged, so neither tokens nor ``Authorization`` values reach the log.

``kproxy serve`` and ``conf/gunicorn.conf.py`` send this logger to stdout; an app that
mounts ``KProxyMiddleware`` configures ``logging.getLogger("kproxy.access")`` itself.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .exchange import Exchange

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


def fields(exchange: Exchange) -> dict:
    return {
        "time": _now(),
        "client": exchange.client,
        "method": exchange.method,
        "path": exchange.path,
        "status": exchange.status,
        "bytes": exchange.bytes_sent,
        "duration": round(time.perf_counter() - exchange.started, 6),
        "service": exchange.service,
        "api": exchange.api,
        "upstream": exchange.node.address if exchange.node else None,
        "upstream_status": exchange.upstream_status,
        "upstream_duration": None if exchange.upstream_seconds is None else round(exchange.upstream_seconds, 6),
        "request_id": exchange.request_id,
        "error": exchange.error,
    }


def _text(e: Exchange) -> str:
    # built straight from the exchange: this runs for every request
    upstream = f"{e.node.address} {e.upstream_status}" if e.node and e.upstream_status is not None else (
        f"{e.node.address} -" if e.node else "- -")
    seconds = "-" if e.upstream_seconds is None else f"{e.upstream_seconds:.4f}"
    line = (f'{_now()} {e.client} "{e.method} {_printable(e.path)}" {e.status} {e.bytes_sent} '
            f'{time.perf_counter() - e.started:.4f} {e.service} {e.api} {upstream} {seconds} rid={e.request_id}')
    if e.error:
        line += f' error="{_printable(e.error)}"'
    return line


def _printable(text: str) -> str:
    # a client controls the path: keep one request on one line, whatever it sent
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return text.encode("unicode_escape").decode("ascii").replace('"', '\\"')


def observer(form: str) -> Callable[[Exchange], None]:
    """A ``Gateway`` observer that logs each exchange as ``text`` or ``json``."""
    render = (lambda e: json.dumps(fields(e), separators=(",", ":"))) if form == "json" else _text

    def record(exchange: Exchange) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info("%s", render(exchange))
    return record
