"""kproxy: a Kubernetes-aware API gateway for Python WSGI stacks.

::

    from kproxy import KProxyMiddleware
    app.wsgi_app = KProxyMiddleware(app.wsgi_app, "kproxy.ini")

The gateway classes are imported on first use: ``prometheus_client`` picks single- or
multi-process storage when it is imported, and the gunicorn hooks must set that up first.
"""

__version__ = "0.1.0"
__all__ = ["Gateway", "KProxyMiddleware"]


def __getattr__(name: str):
    if name == "Gateway":
        from .app import Gateway
        return Gateway
    if name == "KProxyMiddleware":
        from .middleware import KProxyMiddleware
        return KProxyMiddleware
    raise AttributeError(f"module 'kproxy' has no attribute {name!r}")
