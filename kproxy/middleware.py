"""``KProxyMiddleware``: the gateway in front of an existing WSGI app.

::

    from kproxy import KProxyMiddleware
    app.wsgi_app = KProxyMiddleware(app.wsgi_app, "kproxy.ini")

Requests that match a route (or the admin prefix) are proxied; everything else goes to
``app``. Discovery starts in each process on its first request; call ``start()`` from a
post-fork hook to start it sooner.
"""

from __future__ import annotations

from typing import Callable, Iterable

from . import config as configmod
from .app import Gateway, WSGIApp
from .config import Config


class KProxyMiddleware:
    def __init__(self, app: WSGIApp, config: str | Config):
        cfg = config if isinstance(config, Config) else configmod.load(config)
        self.app = app
        self.gateway = Gateway(cfg, fallback=app)

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        return self.gateway(environ, start_response)

    def start(self) -> None:
        self.gateway.start()

    def stop(self) -> None:
        self.gateway.stop()
