"""WSGI apps of the contestants that are not kproxy, served by gunicorn with the same
settings as kproxy (``--pythonpath bench _apps:hello``):

- ``hello``: the ceiling, a hello-world app answering the upstream's ~100-byte JSON;
- ``peer``: werkzeug's ``ProxyMiddleware`` forwarding ``/v1/`` to ``$BENCH_UPSTREAM``
  (what a Python user gets today; it opens a new connection per request).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's bench, kproxy, kproxy_tools

from bench._common import BODY  # noqa: E402

_HEADERS = [("Content-Type", "application/json"), ("Content-Length", str(len(BODY)))]


def hello(environ: dict, start_response) -> list[bytes]:
    start_response("200 OK", _HEADERS)
    return [BODY]


def _not_found(environ: dict, start_response) -> list[bytes]:
    start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "9")])
    return [b"not found"]


def _peer():
    from werkzeug.middleware.http_proxy import ProxyMiddleware
    upstream = os.environ.get("BENCH_UPSTREAM")
    if not upstream:
        return _not_found
    return ProxyMiddleware(_not_found, {"/v1/": {"target": upstream}})


peer = _peer()
