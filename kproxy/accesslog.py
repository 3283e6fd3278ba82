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


def fields(exchange: Exchange) -> dict:
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
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


def _text(f: dict) -> str:
    def dash(value: object) -> str:
        return "-" if value is None else str(value)
    line = (f'{f["time"]} {f["client"]} "{f["method"]} {_printable(f["path"])}" {f["status"]} {f["bytes"]} '
            f'{f["duration"]:.4f} {f["service"]} {f["api"]} {dash(f["upstream"])} {dash(f["upstream_status"])} '
            f'{"-" if f["upstream_duration"] is None else format(f["upstream_duration"], ".4f")} rid={f["request_id"]}')
    if f["error"]:
        line += f' error="{_printable(f["error"])}"'
    return line


def _printable(text: str) -> str:
    # a client controls the path: keep one request on one line, whatever it sent
    return text.encode("unicode_escape").decode("ascii").replace('"', '\\"')


def observer(form: str) -> Callable[[Exchange], None]:
    """A ``Gateway`` observer that logs each exchange as ``text`` or ``json``."""
    render = (lambda f: json.dumps(f, separators=(",", ":"))) if form == "json" else _text

    def record(exchange: Exchange) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info("%s", render(fields(exchange)))
    return record
