"""The gateway as a WSGI application, and as middleware in front of another app.

::

    from kproxy import Gateway, KProxyMiddleware
    application = Gateway.from_file("conf/static-example.ini")     # a whole gateway
    app.wsgi_app = KProxyMiddleware(app.wsgi_app, "kproxy.ini")      # or in front of an app

A request flows: admin endpoints -> route (host, path, method) -> upstream (pick a node,
retry on the next one where safe) -> forward (stream both ways). Everything a route
needs per request is computed once, when the config is loaded (``RouteTarget``).
Discovery threads start in ``start()``, which ``kproxy serve`` and the gunicorn hooks
call after fork; a gateway that was not started starts itself on its first request.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import quote, unquote

from . import accesslog, metrics
from . import config as configmod
from .config import Config, ServiceConfig
from .forward import (BodyReader, BodyTooLarge, BrokenBody, ClientDisconnected, ConnectFailed, UpstreamFailure, NO_BODY_STATUSES, TLSPolicy,
                      Transport, request_headers, response_headers, stream)
from .forwarded import client_address, peer_is_trusted
from .node import Node
from .routing import MethodNotAllowed, NoRoute, Router
from .upstream import NoNodes, Upstream

log = logging.getLogger("kproxy")

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


@dataclass(frozen=True, slots=True)
class RouteTarget:
    """What a matched api needs to forward a request, computed at config load."""
    api: str
    service: ServiceConfig
    upstream: Upstream
    strip: str          # path prefix to remove before forwarding ("" for none)
    tls: TLSPolicy | None


@dataclass(slots=True)
class Exchange:
    """What happened to one request: read by the access log and metrics when it ends."""
    method: str
    path: str
    client: str
    request_id: str
    started: float
    service: str = "-"
    api: str = "-"
    node: Node | None = None
    upstream_status: int | None = None
    upstream_seconds: float | None = None
    status: int = 0
    bytes_sent: int = 0
    attempts: int = 0
    failures: list[str] = field(default_factory=list)  # UpstreamFailure kinds, in order
    ejections: int = 0
    error: str | None = None


class Routes:
    """One loaded config: its router and the registries its upstreams read. Swapped whole
    on reload, so a request sees one config from start to end."""

    def __init__(self, config: Config, registries: dict[str, Any]):
        self.config = config
        self.registries = registries  # filled by Gateway.start(), after fork
        self.router = Router()
        upstreams = {name: self._upstream(service) for name, service in config.services.items()}
        for api in config.apis.values():
            service = config.services[api.service]
            tls = None
            if service.scheme == "https":
                tls = TLSPolicy(service.ca_file, not service.insecure_skip_tls_verify)
            target = RouteTarget(api.name, service, upstreams[service.name],
                                 service.path_prefix if api.strip_prefix else "", tls)
            self.router.add(service.host, service.path_prefix + api.path, api.match, api.methods, target)
        self.router.build()

    def _upstream(self, service: ServiceConfig) -> Upstream:
        if service.nodes is not None:
            nodes = service.nodes
            source = lambda: nodes  # noqa: E731 - the same tuple every time: no rebuilds
        else:
            registries = self.registries
            registry_name, ns, name, port = service.registry, service.namespace, service.service_name, service.port

            def source() -> tuple[Node, ...] | None:
                registry = registries.get(registry_name)
                return registry.nodes(ns, name, port) if registry is not None else None
        return Upstream(service.name, source, self.config.gateway.node_cooldown)


class Gateway:
    def __init__(self, config: Config, fallback: WSGIApp | None = None,
                 registry_factory: Callable[[Any], Any] | None = None):
        self.fallback = fallback
        self._registry_factory = registry_factory
        self._started_pid: int | None = None
        self._lock = threading.Lock()
        gateway = config.gateway
        self.transport = Transport(gateway.threads, gateway.connect_timeout, gateway.read_timeout)
        self.routes = Routes(config, {})
        self.observers: list[Callable[[Exchange], None]] = [metrics.observe]
        if gateway.access_log:
            self.observers.append(accesslog.observer(gateway.access_log_format))
        from .admin import Admin
        self.admin = Admin(self)

    @classmethod
    def from_file(cls, path: str, fallback: WSGIApp | None = None) -> Gateway:
        return cls(configmod.load(path), fallback)

    @property
    def config(self) -> Config:
        return self.routes.config

    @property
    def registries(self) -> dict[str, Any]:
        return self.routes.registries

    # -- lifecycle --

    def start(self) -> None:
        """Start discovery in this process (idempotent; again after a fork)."""
        with self._lock:
            if self._started_pid == os.getpid():
                return
            self._started_pid = os.getpid()
            registries = self.routes.registries
            registries.clear()  # objects inherited through fork have no threads: start anew
            for name, registry_config in self.config.registries.items():
                if registry_config.enabled:
                    registries[name] = self._create_registry(registry_config)
            for registry in registries.values():
                registry.start()

    def stop(self) -> None:
        for registry in self.registries.values():
            registry.stop()
        self.transport.close()

    def reload(self, config: Config, ready_timeout: float = 10.0) -> None:
        """Serve ``config`` from now on. Registries whose settings did not change are kept
        with their cache and watches; new or changed ones are started and given up to
        ``ready_timeout`` seconds to list before the switch, so their services do not
        answer 503 in between. Requests in flight finish on the config they started with."""
        with self._lock:
            old = self.routes
            registries: dict[str, Any] = {}
            fresh = []
            for name, registry_config in config.registries.items():
                if not registry_config.enabled:
                    continue
                if old.config.registries.get(name) == registry_config and name in old.registries:
                    registries[name] = old.registries[name]
                else:
                    registries[name] = self._create_registry(registry_config)
                    fresh.append(registries[name])
            for registry in fresh:
                registry.start()
            deadline = time.monotonic() + ready_timeout
            while fresh and not all(r.ready for r in fresh) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.transport.timeout = Transport.timeouts(config.gateway.connect_timeout,
                                                        config.gateway.read_timeout)
            self.routes = Routes(config, registries)
            self.admin = type(self.admin)(self)
        for name, registry in old.registries.items():
            if registries.get(name) is not registry:
                registry.stop()
        log.info("reloaded %s: %d services, %d apis, %d new registries", config.path,
                 len(config.services), len(config.apis), len(fresh))

    def _create_registry(self, registry_config: Any) -> Any:
        if self._registry_factory is not None:
            return self._registry_factory(registry_config)
        from .discovery import create_registry
        return create_registry(registry_config)

    @property
    def ready(self) -> bool:
        routes = self.routes
        enabled = [n for n, r in routes.config.registries.items() if r.enabled]
        return all(name in routes.registries and routes.registries[name].ready for name in enabled)

    # -- requests --

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if self._started_pid != os.getpid():
            self.start()
        routes = self.routes
        gateway = routes.config.gateway
        method = environ["REQUEST_METHOD"]
        path = _decoded_path(environ)
        client_id = environ.get("HTTP_X_REQUEST_ID", "")
        exchange = Exchange(method, path, client_address(environ, gateway.trusted_proxies),
                            client_id if _REQUEST_ID.fullmatch(client_id) else uuid.uuid4().hex,
                            time.perf_counter())
        if _unsafe_path(path):
            return self._error(exchange, start_response, 400, "bad_path",
                               "the path has a '.' or '..' segment or a control character")
        admin_prefix = gateway.admin_prefix
        if path.startswith(admin_prefix):
            answer = self.admin.handle(environ, path[len(admin_prefix):], exchange)
            if answer is not None:
                return self._respond_local(exchange, start_response, *answer)
        try:
            target = routes.router.match(environ.get("HTTP_HOST"), path, method)
        except NoRoute:
            if self.fallback is not None:
                return self.fallback(environ, start_response)
            return self._error(exchange, start_response, 404, "route_not_found",
                               f"no route for host {environ.get('HTTP_HOST', '')!r} and path {path!r}")
        except MethodNotAllowed as e:
            return self._error(exchange, start_response, 405, "method_not_allowed",
                               f"{method} is not allowed here", [("Allow", ", ".join(e.allowed))])
        exchange.service, exchange.api = target.service.name, target.api
        return self._forward(environ, start_response, target, exchange, routes)

    def _forward(self, environ: dict, start_response: Callable, target: RouteTarget,
                 exchange: Exchange, routes: Routes) -> Iterable[bytes]:
        service = target.service
        upstream = target.upstream
        try:
            nodes = upstream.nodes()
        except NoNodes:
            return self._no_upstream(exchange, start_response, service, routes)
        try:
            body, chunked = _request_body(environ, routes.config.gateway.max_body_size)
        except BadRequest as e:
            return self._error(exchange, start_response, 400, "bad_request", str(e))
        except BodyTooLarge as e:
            return self._error(exchange, start_response, 413, "body_too_large", str(e))
        replayable = body is None and exchange.method in IDEMPOTENT
        retries = service.retries if service.retries is not None else len(nodes) - 1
        headers = self._upstream_headers(environ, service, exchange, routes)
        request_target = _forward_target(environ, target.strip)
        tried: list[Node] = []
        failure: UpstreamFailure | None = None
        while len(tried) <= retries:
            try:
                node = upstream.pick(exclude=tried)
            except NoNodes:
                break
            tried.append(node)
            if service.pass_host == "node":
                headers["Host"] = node.address
            exchange.node, exchange.attempts = node, len(tried)
            sent = time.perf_counter()
            try:
                response = self.transport.send(node, exchange.method, request_target, headers, body,
                                               chunked, service.scheme, target.tls)
            except ClientDisconnected as e:
                exchange.error = str(e)
                return self._error(exchange, start_response, 400, "client_disconnected", str(e))
            except BodyTooLarge as e:
                exchange.error = str(e)
                return self._error(exchange, start_response, 413, "body_too_large", str(e))
            except UpstreamFailure as e:
                failure = e
                exchange.failures.append(e.kind)
                if isinstance(e, ConnectFailed) or e.timed_out:
                    upstream.failed(node)
                    exchange.ejections += 1
                log.warning("upstream %s node %s: %s (request %s)", service.name, node.address, e.reason,
                            exchange.request_id)
                if isinstance(e, ConnectFailed) or replayable:
                    continue
                break
            exchange.upstream_seconds = time.perf_counter() - sent
            exchange.upstream_status = response.status
            return self._relay(exchange, start_response, response, environ)
        if failure is None:
            return self._no_upstream(exchange, start_response, service, routes)
        exchange.error = str(failure)
        if failure.timed_out:
            return self._error(exchange, start_response, 504, "upstream_timeout",
                               f"upstream {service.name} did not answer in time", service=service.name)
        kind = "upstream_unreachable" if isinstance(failure, ConnectFailed) else "upstream_error"
        return self._error(exchange, start_response, 502, kind,
                           f"upstream {service.name}: {failure.reason}", service=service.name)

    def _upstream_headers(self, environ: dict, service: ServiceConfig, exchange: Exchange,
                          routes: Routes) -> dict[str, str]:
        host = service.upstream_host if service.pass_host == "rewrite" else None
        headers = request_headers(environ, host)
        peer = environ.get("REMOTE_ADDR", "")
        prior = headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        ours = {"X-Forwarded-Host": environ.get("HTTP_HOST"), "X-Forwarded-Proto": environ.get("wsgi.url_scheme", "http"),
                "X-Forwarded-Port": str(environ.get("SERVER_PORT", ""))}
        keep_theirs = peer_is_trusted(environ, routes.config.gateway.trusted_proxies)
        for name, value in ours.items():
            if keep_theirs and name in headers:
                continue
            if value is None:
                headers.pop(name, None)
            else:
                headers[name] = value
        headers["X-Request-Id"] = exchange.request_id
        return headers

    def _relay(self, exchange: Exchange, start_response: Callable, response: Any,
               environ: dict) -> Iterable[bytes]:
        status = response.status
        headers = response_headers(response)
        headers.append(("X-Kproxy-Upstream-Status", str(status)))
        headers.append(("X-Request-Id", exchange.request_id))
        exchange.status = status
        start_response(f"{status} {response.reason or ''}".rstrip(), headers)
        if exchange.method == "HEAD" or status in NO_BODY_STATUSES or 100 <= status < 200:
            response.release_conn()
            self._finish(exchange)
            return []
        return _RelayedBody(response, exchange, self._finish, environ.get("gunicorn.socket"))

    # -- local answers --

    def _no_upstream(self, exchange: Exchange, start_response: Callable, service: ServiceConfig,
                     routes: Routes) -> Iterable[bytes]:
        if service.registry and not routes.config.registries[service.registry].enabled:
            why = f"registry {service.registry} is disabled"
        elif service.registry:
            why = (f"no ready endpoints for {service.namespace}/{service.service_name} port {service.port} "
                   f"in registry {service.registry}")
        else:
            why = "no nodes"
        return self._error(exchange, start_response, 503, "no_upstream", why, service=service.name)

    def _error(self, exchange: Exchange, start_response: Callable, status: int, error: str, message: str,
               extra_headers: list[tuple[str, str]] = (), **fields: str) -> Iterable[bytes]:
        payload = {"error": error, **fields, "message": message, "request_id": exchange.request_id}
        return self._respond_local(exchange, start_response, status, json.dumps(payload).encode() + b"\n",
                                   "application/json", list(extra_headers))

    def _respond_local(self, exchange: Exchange, start_response: Callable, status: int, body: bytes,
                       content_type: str, extra_headers: list[tuple[str, str]] = ()) -> Iterable[bytes]:
        from werkzeug.http import HTTP_STATUS_CODES
        exchange.status = status
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))),
                   ("X-Request-Id", exchange.request_id), *extra_headers]
        start_response(f"{status} {HTTP_STATUS_CODES.get(status, '')}", headers)
        if exchange.method == "HEAD":
            body = b""
        exchange.bytes_sent = len(body)
        self._finish(exchange)
        return [body]

    def _finish(self, exchange: Exchange) -> None:
        for observer in self.observers:
            try:
                observer(exchange)
            except Exception:  # an observer must never break a response
                log.exception("observer %r failed", observer)


class _RelayedBody:
    """The upstream body as a WSGI iterable. ``close`` (called by every WSGI server, also
    when the client went away) returns the connection to the pool if the body was read to
    the end, and drops it otherwise, so an abandoned stream never pins a pooled
    connection."""

    __slots__ = ("_response", "_exchange", "_finish", "_client", "_done")

    def __init__(self, response: Any, exchange: Exchange, finish: Callable[[Exchange], None],
                 client: socket.socket | None):
        self._response, self._exchange, self._finish = response, exchange, finish
        self._client = client
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        exchange = self._exchange
        try:
            for chunk in stream(self._response):
                exchange.bytes_sent += len(chunk)
                yield chunk
        except BrokenBody as e:
            exchange.error = f"upstream broke off mid-body: {e}"
            exchange.failures.append("broken_body")
            log.warning("upstream %s node %s: %s (request %s)", exchange.service,
                        exchange.node.address if exchange.node else "-", exchange.error, exchange.request_id)
            # The client must see a truncated answer, never a complete-looking one. Where the
            # server hands us its socket (gunicorn), end the connection here, quietly; elsewhere
            # raising is the only way to make the server abort it.
            if self._client is None:
                raise
            try:
                self._client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        if not self._response.isclosed():  # not read to the end: the connection cannot be reused
            self._response.close()
        self._response.release_conn()
        self._finish(self._exchange)


class KProxyMiddleware:
    """Put the gateway in front of an existing WSGI app: requests that match a route (or
    the admin prefix) are proxied; everything else goes to ``app``::

        app.wsgi_app = KProxyMiddleware(app.wsgi_app, "kproxy.ini")
    """

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


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # kept from the client; else a new one
_PATH_SEGMENT = re.compile(r"[/\\]")


def _unsafe_path(path: str) -> bool:
    """Dot-segments, or control characters, in the decoded path. The path is routed as
    decoded, and upstreams that decode %2F and resolve '..' would see another path than
    the one routed: refusing these keeps routes from being bypassed (docs/security.rst)."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return True
    return "." in path and any(segment in (".", "..") for segment in _PATH_SEGMENT.split(path))


def _decoded_path(environ: dict) -> str:
    # WSGI gives PATH_INFO as latin-1 text of the percent-decoded bytes; route on real text
    raw = environ.get("PATH_INFO", "") or "/"
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return raw


def _request_body(environ: dict, limit: int) -> tuple[BodyReader | None, bool]:
    """The body to forward and whether it goes chunked. The framing is kproxy's own, from
    what the server decoded: the upstream sees the same body boundary kproxy saw."""
    length = environ.get("CONTENT_LENGTH", "")
    if length:
        if not length.isdigit():
            raise BadRequest("invalid Content-Length")
        n = int(length)
        if limit and n > limit:
            raise BodyTooLarge(limit)
        return (BodyReader(environ["wsgi.input"], n), False) if n else (None, False)
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return BodyReader(environ["wsgi.input"], None, limit), True
    return None, False


class BadRequest(ValueError):
    pass


def _forward_target(environ: dict, strip: str) -> str:
    """The request-target to send upstream: the client's bytes (percent-encoding and query
    kept exactly), minus the stripped prefix."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw and not environ.get("SCRIPT_NAME"):
        if raw.startswith(("http://", "https://")):  # absolute-form request-target
            raw = "/" + raw.split("/", 3)[3] if raw.count("/") >= 3 else "/"
        path, sep, query = raw.partition("?")
    else:
        path = quote(environ.get("PATH_INFO", "") or "/", safe="/;=,:@!$&'()*+~")
        query = environ.get("QUERY_STRING", "")
        sep = "?" if query else ""
    if strip:
        path = _strip_prefix(path, strip)
    return path + sep + query


def _strip_prefix(path: str, prefix: str) -> str:
    if path.startswith(prefix):
        return path[len(prefix):] or "/"
    # the client percent-encoded part of the prefix; find where the decoded prefix ends
    for end in range(len(prefix), len(path) + 1):
        if unquote(path[:end]) == prefix and (end == len(path) or path[end] == "/"):
            return path[end:] or "/"
    return path
