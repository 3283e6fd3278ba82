"""The gateway as a WSGI application (``KProxyMiddleware`` mounts it in front of another).

::

    from kproxy import Gateway
    application = Gateway.from_file("conf/static-example.ini")

A request flows: request (path, body, id: ``request``) -> admin endpoints (``admin``) ->
route (host, path, method: ``routing``) -> upstream (pick a node, retry on the next one
where safe, eject failing ones: ``upstream``) -> node (``transport`` sends the request on
a pooled connection: ``pool``) -> the answer relayed as it comes (``body``). Everything a route
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
from typing import Any, Callable, Iterable, Mapping

from werkzeug.http import HTTP_STATUS_CODES

from . import accesslog, metrics, tunnel
from .admin import Admin
from .status import record_reload
from . import config as configmod
from .config import Config, RegistryConfig, ServiceConfig
from .record import RequestRecord
from .body import BodyTooLarge, ClientDisconnected, RelayedBody
from .client import client_address
from .discovery import Registry, all_ready, create_registry
from .health import HealthCheck, HealthChecker, SharedHealthChecker
from .headers import add_forwarded_headers, request_headers, response_headers, upgrade_protocol
from .http1 import InvalidRequest
from .pool import TLSPolicy
from .transport import NO_BODY_STATUSES, ConnectFailed, Transport, UpstreamFailure
from .request import BadRequest, Target, forward_target, parse_target, request_body, request_id
from .routing import MethodNotAllowed, NoRoute, Router
from .upstream import NodeSource, NoNodes, RegistryNodes, StaticNodes, Upstream

log = logging.getLogger("kproxy")

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]

_pid = os.getpid()  # asked again after a fork, not per request (it is a system call)
_NODE_NAME = os.environ.get("KPROXY_NODE_NAME") or None  # for PreferSameNode (the Downward API gives it)


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


class ActiveConfig:
    """One loaded config made ready to serve: its router, its upstreams and the registries
    they read. Swapped whole on reload, so a request sees one config from start to end."""

    def __init__(self, config: Config, registries: Mapping[str, Registry]):
        self.config = config
        self.registries = registries
        # started with the registries, after fork
        self.health_checkers: list[HealthChecker | SharedHealthChecker] = []
        self.router = Router()
        upstreams = {name: self._upstream(service) for name, service in config.services.items()}
        for api in config.apis.values():
            service = config.services[api.service]
            target = RouteTarget(api.name, service, upstreams[service.name],
                                 service.path_prefix if api.strip_prefix else "")
            self.router.add(service.host, service.path_prefix + api.path, api.match, api.methods, target)
        self.router.build()
        self.admin = Admin(config.gateway.admin_allow, config.registries, registries, config, upstreams,
                           self.health_checkers)

    def _upstream(self, service: ServiceConfig) -> Upstream:
        if service.nodes is not None:
            source: NodeSource = StaticNodes(service.nodes)
        else:
            source = RegistryNodes(self.registries.get(service.registry), service.namespace,
                                   service.service_name, service.port)
        tls = None
        if service.scheme == "https":
            tls = TLSPolicy(service.ca_file, not service.insecure_skip_tls_verify)
        upstream = Upstream(service.name, source, self.config.gateway.node_cooldown, scheme=service.scheme,
                            tls=tls, pass_host=service.pass_host, upstream_host=service.upstream_host,
                            retries=service.retries, zone=self.config.gateway.zone, node_name=_NODE_NAME,
                            topology=service.topology, slow_start=service.slow_start)
        if service.health_check_path:
            check = HealthCheck(service.health_check_path, service.health_check_interval,
                                service.health_check_timeout, service.healthy_threshold,
                                service.unhealthy_threshold,
                                service.health_check_host
                                or (service.upstream_host if service.pass_host == "rewrite" else None))
            self.health_checkers.append(self._health_checker(upstream, check, service))
        return upstream

    def _health_checker(self, upstream: Upstream, check: HealthCheck,
                        service: ServiceConfig) -> HealthChecker | SharedHealthChecker:
        from .discovery import shared
        if not shared.enabled():
            return HealthChecker(upstream, check)
        # workers > 1: the pod's discovery process checks, once for every worker
        if service.nodes is not None:
            source: dict[str, Any] = {"nodes": [[n.host, n.port, n.weight] for n in service.nodes]}
        else:
            source = {"registry": list(shared.registry_key(self.config.registries[service.registry])),
                      "namespace": service.namespace, "service": service.service_name, "port": service.port}
        return SharedHealthChecker(upstream, check, source)


class Gateway:
    """``transport`` sends each request to the node its upstream picked (one per process;
    by default built from the config's timeouts). ``registry_factory`` makes a registry
    from its config (tests give their own)."""

    def __init__(self, config: Config, fallback: WSGIApp | None = None,
                 registry_factory: Callable[[RegistryConfig], Registry] | None = None,
                 transport: Transport | None = None):
        self.fallback = fallback
        self._registry_factory = registry_factory
        self._started_pid: int | None = None
        self._lock = threading.Lock()
        gateway = config.gateway
        if transport is None:
            transport = Transport(gateway.threads, gateway.connect_timeout, gateway.read_timeout,
                                  keepalive_timeout=gateway.upstream_keepalive_timeout)
        self.transport = transport
        self.active = ActiveConfig(config, {})
        self.observers: list[Callable[[RequestRecord], None]] = [metrics.observe]
        if gateway.access_log:
            self.observers.append(accesslog.observer(gateway.access_log_format))

    @classmethod
    def from_file(cls, path: str, fallback: WSGIApp | None = None) -> Gateway:
        return cls(configmod.load(path), fallback)

    @property
    def config(self) -> Config:
        return self.active.config

    @property
    def registries(self) -> Mapping[str, Registry]:
        return self.active.registries

    # -- lifecycle --

    def start(self) -> None:
        """Start discovery in this process (idempotent; again after a fork)."""
        with self._lock:
            if self._started_pid == os.getpid():
                return
            self._started_pid = os.getpid()
            # registries inherited through fork have no threads: this process makes its own
            registries = {name: self._create_registry(registry_config)
                          for name, registry_config in self.config.registries.items() if registry_config.enabled}
            self.active = ActiveConfig(self.config, registries)
            for registry in registries.values():
                registry.start()
            for checker in self.active.health_checkers:
                checker.start()

    def stop(self) -> None:
        for checker in self.active.health_checkers:
            checker.stop()
        for registry in self.registries.values():
            registry.stop()
        self.transport.close()

    def reload(self, config: Config, ready_timeout: float = 10.0) -> None:
        """Serve ``config`` from now on. Registries whose settings did not change are kept
        with their cache and watches; new or changed ones are started and given up to
        ``ready_timeout`` seconds to list before the switch, so their services do not
        answer 503 in between. Requests in flight finish on the config they started with."""
        with self._lock:
            old = self.active
            registries: dict[str, Registry] = {}
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
            active = ActiveConfig(config, registries)
            previous = {checker.upstream.name: checker for checker in old.health_checkers}
            for checker in active.health_checkers:
                if checker.upstream.name in previous:
                    checker.take_over(previous[checker.upstream.name])
            self.active = active
            if self._started_pid == os.getpid():
                for checker in self.active.health_checkers:
                    checker.start()
        for checker in old.health_checkers:
            checker.stop()
        for name, registry in old.registries.items():
            if registries.get(name) is not registry:
                registry.stop()
        record_reload(config.path)  # for the dashboard
        log.info("reloaded %s: %d services, %d apis, %d new registries", config.path,
                 len(config.services), len(config.apis), len(fresh))

    def _create_registry(self, registry_config: RegistryConfig) -> Registry:
        if self._registry_factory is not None:
            return self._registry_factory(registry_config)
        from .discovery import shared
        if shared.enabled():  # a gunicorn master with workers > 1: one discovery process for all
            return shared.SharedRegistry(registry_config)
        return create_registry(registry_config)

    @property
    def ready(self) -> bool:
        return all_ready(self.active.config.registries, self.active.registries)

    # -- requests --

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if self._started_pid != _pid:
            self.start()
        active = self.active
        gateway = active.config.gateway
        method = environ["REQUEST_METHOD"]
        client = client_address(environ, gateway.trusted_proxies)
        try:
            request = parse_target(environ)
        except BadRequest as e:
            record = RequestRecord(method, environ.get("PATH_INFO", ""), client, request_id(environ), time.perf_counter())
            return self._error(record, start_response, 400, e.error, str(e))
        path = request.path
        record = RequestRecord(method, path, client, request_id(environ), time.perf_counter())
        admin_prefix = gateway.admin_prefix
        if path.startswith(admin_prefix):
            answer = active.admin.handle(environ, path[len(admin_prefix):], record)
            if answer is not None:
                return self._respond_local(record, start_response, *answer)
        try:
            target = active.router.match(request.host, path, method)
        except NoRoute:
            if self.fallback is not None:
                return self.fallback(environ, start_response)
            return self._error(record, start_response, 404, "route_not_found",
                               f"no route for host {request.host or ''!r} and path {path!r}")
        except MethodNotAllowed as e:
            return self._error(record, start_response, 405, "method_not_allowed",
                               f"{method} is not allowed here", [("Allow", ", ".join(e.allowed))])
        record.service, record.api = target.service.name, target.api
        return self._forward(environ, start_response, target, request, record, active)

    def _forward(self, environ: dict, start_response: Callable, target: RouteTarget, request: Target,
                 record: RequestRecord, active: ActiveConfig) -> Iterable[bytes]:
        service = target.service
        upstream = target.upstream
        upgrade = upgrade_protocol(environ)
        if upgrade is not None and (take_over := tunnel.hand_over(environ)) is None:
            return self._error(record, start_response, 501, "upgrade_not_supported",
                               f"Upgrade: {upgrade} needs kproxy serve or gunicorn with kproxy's worker; "
                               "this server does not hand its connection over")
        try:
            nodes = upstream.nodes()
        except NoNodes:
            return self._no_upstream(record, start_response, service, active)
        try:
            request_target = forward_target(request, target.strip)
            body, length = request_body(environ, active.config.gateway.max_body_size)
        except BadRequest as e:
            return self._error(record, start_response, 400, e.error, str(e))
        except BodyTooLarge as e:
            return self._error(record, start_response, 413, "body_too_large", str(e))
        headers = request_headers(environ)
        if length is not None:
            headers["Content-Length"] = str(length)
        chunked = body is not None and length is None
        add_forwarded_headers(headers, environ, active.config.gateway.trusted_proxies, request.host,
                              record.client)
        headers["X-Request-Id"] = record.request_id
        if upgrade is not None:
            headers["Connection"], headers["Upgrade"] = "upgrade", upgrade
        try:
            response = upstream.send(self.transport.upgrades if upgrade else self.transport, record,
                                     request_target, headers, body, chunked, request.host, nodes)
        except NoNodes:
            return self._no_upstream(record, start_response, service, active)
        except InvalidRequest as e:
            return self._error(record, start_response, 400, "bad_request", str(e))
        except ClientDisconnected as e:
            record.error = str(e)
            return self._error(record, start_response, 400, "client_disconnected", str(e))
        except BodyTooLarge as e:
            record.error = str(e)
            return self._error(record, start_response, 413, "body_too_large", str(e))
        except UpstreamFailure as failure:
            record.error = str(failure)
            if failure.timed_out:
                return self._error(record, start_response, 504, "upstream_timeout",
                                   f"upstream {service.name} did not answer in time", service=service.name)
            kind = "upstream_unreachable" if isinstance(failure, ConnectFailed) else "upstream_error"
            return self._error(record, start_response, 502, kind,
                               f"upstream {service.name}: {failure.reason}", service=service.name)
        if response.status == 101:  # only ever the answer to an upgrade (http1.read_response)
            return tunnel.start(start_response, response, record, take_over, self._finish,
                                active.config.gateway.tunnel_idle_timeout)
        return self._relay(record, start_response, response, environ)

    def _relay(self, record: RequestRecord, start_response: Callable, response: Any,
               environ: dict) -> Iterable[bytes]:
        status = response.status
        headers = response_headers(response)
        headers.append(("X-Kproxy-Upstream-Status", str(status)))
        headers.append(("X-Request-Id", record.request_id))
        record.status = status
        start_response(f"{status} {response.reason or ''}".rstrip(), headers)
        if record.method == "HEAD" or status in NO_BODY_STATUSES or 100 <= status < 200:
            response.release_conn()
            self._finish(record)
            return []
        return RelayedBody(response, record, self._finish, environ.get("gunicorn.socket"))

    # -- local answers --

    def _no_upstream(self, record: RequestRecord, start_response: Callable, service: ServiceConfig,
                     active: ActiveConfig) -> Iterable[bytes]:
        if service.registry and not active.config.registries[service.registry].enabled:
            why = f"registry {service.registry} is disabled"
        elif service.registry:
            why = (f"no ready endpoints for {service.namespace}/{service.service_name} port {service.port} "
                   f"in registry {service.registry}")
        else:
            why = "no nodes"
        return self._error(record, start_response, 503, "no_upstream", why, service=service.name)

    def _error(self, record: RequestRecord, start_response: Callable, status: int, error: str, message: str,
               extra_headers: list[tuple[str, str]] = (), **fields: str) -> Iterable[bytes]:
        payload = {"error": error, **fields, "message": message, "request_id": record.request_id}
        return self._respond_local(record, start_response, status, json.dumps(payload).encode() + b"\n",
                                   "application/json", list(extra_headers))

    def _respond_local(self, record: RequestRecord, start_response: Callable, status: int, body: bytes,
                       content_type: str, extra_headers: list[tuple[str, str]] = ()) -> Iterable[bytes]:
        record.status = status
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))),
                   ("X-Request-Id", record.request_id), *extra_headers]
        start_response(f"{status} {HTTP_STATUS_CODES.get(status, '')}", headers)
        if record.method == "HEAD":
            body = b""
        record.bytes_sent = len(body)
        self._finish(record)
        return [body]

    def _finish(self, record: RequestRecord) -> None:
        for observer in self.observers:
            try:
                observer(record)
            except Exception:  # an observer must never break a response
                log.exception("observer %r failed", observer)


