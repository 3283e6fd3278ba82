"""The gateway as a WSGI application (``KProxyMiddleware`` mounts it in front of another).

::

    from kproxy import Gateway
    application = Gateway.from_file("conf/static-example.ini")

A request flows: request (path, body, id: ``request``) -> admin endpoints (``admin``) ->
route (host, path, method: ``routing``) -> upstream (pick a node, retry on the next one
where safe: ``upstream``) -> forward (stream both ways: ``forward``). Everything a route
needs per request is computed once, when the config is loaded (``RouteTarget``).
Discovery threads start in ``start()``, which ``kproxy serve`` and the gunicorn hooks
call after fork; a gateway that was not started starts itself on its first request.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from werkzeug.http import HTTP_STATUS_CODES

from . import accesslog, metrics
from . import config as configmod
from .config import Config, ServiceConfig
from .exchange import Exchange
from .body import BodyTooLarge, ClientDisconnected, RelayedBody
from .client import client_address
from .headers import add_forwarded_headers, request_headers, response_headers
from .http1 import InvalidRequest
from .pool import TLSPolicy
from .transport import NO_BODY_STATUSES, ConnectFailed, Transport, UpstreamFailure
from .node import Node
from .request import BadRequest, Target, forward_target, parse_target, request_body, request_id
from .routing import MethodNotAllowed, NoRoute, Router
from .upstream import NoNodes, Upstream

log = logging.getLogger("kproxy")

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

_pid = os.getpid()  # asked again after a fork, not per request (it is a system call)


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


@dataclass(frozen=True, slots=True)
class RouteTarget:
    """What a matched api needs to forward a request, computed at config load."""
    api: str
    service: ServiceConfig
    upstream: Upstream
    strip: str          # path prefix to remove before forwarding ("" for none)
    tls: TLSPolicy | None


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
        self.transport = Transport(gateway.threads, gateway.connect_timeout, gateway.read_timeout,
                                   keepalive_timeout=gateway.upstream_keepalive_timeout)
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
            self.transport.keepalive_timeout = config.gateway.upstream_keepalive_timeout
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
        if self._started_pid != _pid:
            self.start()
        routes = self.routes
        gateway = routes.config.gateway
        method = environ["REQUEST_METHOD"]
        client = client_address(environ, gateway.trusted_proxies)
        try:
            request = parse_target(environ)
        except BadRequest as e:
            exchange = Exchange(method, environ.get("PATH_INFO", ""), client, request_id(environ), time.perf_counter())
            return self._error(exchange, start_response, 400, e.error, str(e))
        path = request.path
        exchange = Exchange(method, path, client, request_id(environ), time.perf_counter())
        admin_prefix = gateway.admin_prefix
        if path.startswith(admin_prefix):
            answer = self.admin.handle(environ, path[len(admin_prefix):], exchange)
            if answer is not None:
                return self._respond_local(exchange, start_response, *answer)
        try:
            target = routes.router.match(request.host, path, method)
        except NoRoute:
            if self.fallback is not None:
                return self.fallback(environ, start_response)
            return self._error(exchange, start_response, 404, "route_not_found",
                               f"no route for host {request.host or ''!r} and path {path!r}")
        except MethodNotAllowed as e:
            return self._error(exchange, start_response, 405, "method_not_allowed",
                               f"{method} is not allowed here", [("Allow", ", ".join(e.allowed))])
        exchange.service, exchange.api = target.service.name, target.api
        return self._forward(environ, start_response, target, request, exchange, routes)

    def _forward(self, environ: dict, start_response: Callable, target: RouteTarget, request: Target,
                 exchange: Exchange, routes: Routes) -> Iterable[bytes]:
        service = target.service
        upstream = target.upstream
        try:
            nodes = upstream.nodes()
        except NoNodes:
            return self._no_upstream(exchange, start_response, service, routes)
        try:
            request_target = forward_target(request, target.strip)
            body, length = request_body(environ, routes.config.gateway.max_body_size)
        except BadRequest as e:
            return self._error(exchange, start_response, 400, e.error, str(e))
        except BodyTooLarge as e:
            return self._error(exchange, start_response, 413, "body_too_large", str(e))
        replayable = body is None and exchange.method in IDEMPOTENT
        retries = service.retries if service.retries is not None else len(nodes) - 1
        headers = request_headers(environ)
        if service.pass_host == "rewrite":
            headers["Host"] = service.upstream_host
        elif request.host is not None:
            headers["Host"] = request.host
        if length is not None:
            headers["Content-Length"] = str(length)
        chunked = body is not None and length is None
        add_forwarded_headers(headers, environ, routes.config.gateway.trusted_proxies, request.host,
                              exchange.client)
        headers["X-Request-Id"] = exchange.request_id
        tried: list[Node] = []
        failure: UpstreamFailure | None = None
        while len(tried) <= retries:
            try:
                node = upstream.pick(exclude=tried, nodes=nodes)
            except NoNodes:
                break
            tried.append(node)
            if service.pass_host == "node":
                headers["Host"] = node.address
            exchange.node, exchange.attempts = node, len(tried)
            sent = time.perf_counter()
            try:
                response = self.transport.send(node, exchange.method, request_target, headers, body,
                                               chunked, service.scheme, target.tls, replayable)
            except InvalidRequest as e:
                return self._error(exchange, start_response, 400, "bad_request", str(e))
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
        return RelayedBody(response, exchange, self._finish, environ.get("gunicorn.socket"))

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


