"""An existing WSGI app with the gateway mounted in front of it (KProxyMiddleware)."""

import os

from kproxy import KProxyMiddleware


def existing_app(environ, start_response):
    body = f"existing app: {environ['PATH_INFO']}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


app = KProxyMiddleware(existing_app, os.environ["KPROXY_CONFIG"])
