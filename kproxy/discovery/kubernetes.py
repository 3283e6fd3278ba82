"""Kubernetes registry: live endpoints of Services, resolved to nodes by Service port.

One registry per ``[registry:NAME]`` section. ``start()`` (after fork, once per worker)
runs two reflectors: endpoints (EndpointSlices, or v1 Endpoints) and Services (for the port
mapping). The request path reads an immutable snapshot, without locks::

    registry = KubernetesRegistry(config.registries["my-k8s-cluster"])
    registry.start()
    registry.nodes("apisix", "httpbin", "80")   # (Node('10.1.2.3', 8080),) ; () ; None
    registry.ready                              # every watched resource listed once
    registry.dump()                             # JSON-able state, never a token

What endpoints mean (ports, readiness) is ``endpoints``; the connection is ``apiserver``.

``label_selector`` is sent to the server for the endpoints: it decides which services are
visible. Services themselves are listed without it, only to map ports, because
hand-written Endpoints often carry labels their Service lacks.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict
from typing import Any, Callable, Iterable, Mapping

from ..config import RegistryConfig
from ..node import Node, Placement
from . import RegistryStats
from .apiserver import ENDPOINTS, ApiConnection, EndpointApi, collection_path
from .cache import Change, Object, Store
from .endpoints import (EMPTY, ServiceKey, ServiceView, build_view, keep_unchanged, service_key, trim_endpoints,
                        trim_service, trim_slice)
from .reflector import ApiStatusError, Reflector, Timing, collection_paused

log = logging.getLogger("kproxy.discovery")

# how long the endpoints' first list waits for the Services' before building every view
SERVICES_WAIT = 5.0


class KubernetesRegistry:
    """Endpoints of the Services of one cluster, kept current by list+watch."""

    type = "kubernetes"

    def __init__(self, config: RegistryConfig, *, timing: Timing = Timing()):
        self.config = config
        self._timing = timing
        self._api = ApiConnection(config)
        self._snapshot: dict[ServiceKey, ServiceView] = {}
        self._write_lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._endpoint_api: EndpointApi | None = None
        self._warnings: dict[str, str] = {}
        self._started = self._stopped = False
        # the first build of the snapshot waits for both first lists (or the Services'
        # failure, or SERVICES_WAIT), so each view is built once, with its Service's ports
        self._built = False
        self._services_settled = threading.Event()
        self.changes = 0           # snapshots published
        self.last_change: float | None = None
        namespace = config.single_namespace
        self._namespace = namespace
        self._endpoints_store = Store(index=service_key)
        self._services_store = Store()
        # reflector names appear in log lines: say which registry they belong to
        self._endpoints = Reflector(
            f"registry {config.name} endpoints", self._api, self._endpoints_path, self._endpoints_store, self._endpoints_changed,
            params={"labelSelector": config.label_selector or ""}, transform=self._trim_endpoints,
            timing=timing, thread_name=f"kproxy-{config.name}-endpoints")
        self._services = Reflector(
            f"registry {config.name} services", self._api, lambda: collection_path("v1", "services", namespace),
            self._services_store, self._services_changed, transform=self._trim_service,
            on_error=self._services_failed, timing=timing, thread_name=f"kproxy-{config.name}-services")
        if config.insecure_skip_tls_verify:
            self._warnings["tls"] = "TLS verification of the API server is off (insecure_skip_tls_verify)"

    # -- lifecycle --

    def start(self) -> None:
        """Start the reflector threads; call after fork, once per process."""
        if not self.config.enabled or self._started:
            return
        self._started = True
        if "tls" in self._warnings:
            log.warning("registry %s: %s", self.config.name, self._warnings["tls"])
        self._endpoints.start()
        self._services.start()

    def stop(self) -> None:
        self._stopped = True
        self._services_settled.set()  # an endpoints list waiting for the Services ends now
        self._endpoints.stop()
        self._services.stop()
        self._api.close()

    def add_listener(self, callback: Callable[[], None]) -> None:
        """``callback()`` runs on a reflector thread after every published change."""
        self._listeners.append(callback)

    def snapshot(self) -> Mapping[ServiceKey, ServiceView]:
        """The current immutable snapshot (for the discovery process, which diffs by identity)."""
        return self._snapshot

    # -- the request path --

    def nodes(self, namespace: str, service: str, port: str) -> tuple[Node, ...] | None:
        """Nodes for a service port: None = unknown service, () = no usable endpoints.

        Lock-free: one read of the current immutable snapshot. The same tuple object comes
        back until that port's nodes change.
        """
        view = self._snapshot.get((namespace, service))
        if view is None:
            return None
        nodes = view.ports.get(port)
        if nodes is not None:
            return nodes
        if view.any_port is not None and port.isdigit():
            return view.any_port
        return EMPTY

    @property
    def ready(self) -> bool:
        """Every watched resource has completed its first full list."""
        if not self.config.enabled:
            return True
        return self._endpoints.synced and (self._services.synced or self.services_forbidden)

    @property
    def services_forbidden(self) -> bool:
        return not self._services.synced and self._services.last_status == 403

    # -- reflector callbacks (reflector threads) --

    def _endpoints_path(self) -> str:
        if self._endpoint_api is None:
            self._endpoint_api = self._choose_endpoint_api()
        return self._endpoint_api.collection(self._namespace)

    def _choose_endpoint_api(self) -> EndpointApi:
        if self.config.resource == "endpoints":
            return ENDPOINTS
        for version in ("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1"):
            status, body = self._api.get_json(f"/apis/{version}")
            if status == 404:
                continue
            if status != 200 or not isinstance(body, dict):
                raise ApiStatusError(status, "discovery", f"GET /apis/{version} failed")
            if not any(r.get("name") == "endpointslices" for r in body.get("resources") or ()):
                continue
            api = EndpointApi(version, "endpointslices")
            # RBAC such as the seed's grants only endpoints: probe before committing
            params = {"limit": "1", "labelSelector": self.config.label_selector or ""}
            status, _ = self._api.get_json(api.collection(self._namespace), {k: v for k, v in params.items() if v})
            if status == 200:
                log.info("registry %s: watching %s", self.config.name, api)
                return api
            if status == 403:
                self._warn("endpointslices", "EndpointSlices are not readable (403 Forbidden): watching "
                           "v1 Endpoints instead; grant list/watch on endpointslices to use them")
                return ENDPOINTS
            raise ApiStatusError(status, "probe", f"listing {api} failed")
        log.info("registry %s: EndpointSlices are not served; watching v1 Endpoints", self.config.name)
        return ENDPOINTS

    def _trim_endpoints(self, obj: Object) -> Object | None:
        if not self.config.watches_namespace(obj["metadata"].get("namespace") or ""):
            return None
        if self._endpoint_api is not None and self._endpoint_api.resource == "endpointslices":
            return trim_slice(obj)
        return trim_endpoints(obj)

    def _trim_service(self, obj: Object) -> Object | None:
        if not self.config.watches_namespace(obj["metadata"].get("namespace") or ""):
            return None
        return trim_service(obj)

    def _services_failed(self, error: Exception) -> None:
        self._services_settled.set()  # the endpoints' first build does not wait for a failing list
        if getattr(error, "status", None) == 403 and "services" not in self._warnings:
            self._warn("services", "Services are not readable (403 Forbidden): ports are matched against "
                       "endpoint port names and numbers, not spec.ports of the Service; grant list/watch "
                       "on services for the exact Service-port mapping")

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warnings:
            log.warning("registry %s: %s", self.config.name, message)
        self._warnings[key] = message

    def _endpoints_changed(self, changes: list[Change], relisted: bool) -> None:
        if not self._built:
            # the first list: building every view now and again when the Services arrive
            # would double a first sync's largest cost; the endpoints' watch starts after this
            # returns and picks up every change made meanwhile from the list's resourceVersion
            self._services_settled.wait(SERVICES_WAIT)
            self._rebuild(self._endpoints_store.index_values() + self._services_store.keys(), first=True)
            return
        keys: set[ServiceKey] = set()
        for _, old, new in changes:
            for obj in (old, new):
                if obj is not None:
                    keys.add(service_key(obj))
        self._rebuild(keys)

    def _services_changed(self, changes: list[Change], relisted: bool) -> None:
        if relisted and self._warnings.pop("services", None):
            log.info("registry %s: Services are readable now", self.config.name)
        self._services_settled.set()
        self._rebuild({key for key, _, _ in changes})

    def _rebuild(self, keys: Iterable[ServiceKey], first: bool = False) -> None:
        with self._write_lock, collection_paused():  # a first build makes every node at once
            if not (self._built or first):
                return  # the first build reads both stores whole
            self._built = True
            old = self._snapshot
            new: dict[ServiceKey, ServiceView] | None = None
            for key in keys:
                view = self._build(key, old.get(key))
                if view is old.get(key):
                    continue
                if new is None:
                    new = dict(old)  # copy on write: readers keep the snapshot they hold
                if view is None:
                    new.pop(key, None)
                else:
                    new[key] = view
            if new is None:
                return
            self._snapshot = new
            self.changes += 1
            self.last_change = time.time()
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:
                log.exception("registry %s: listener failed", self.config.name)

    def _build(self, key: ServiceKey, old: ServiceView | None) -> ServiceView | None:
        endpoint_objects = self._endpoints_store.by_index(key)
        service = self._services_store.get(key)
        if not endpoint_objects and (service is None or self.config.label_selector):
            return None  # with a label selector, only services with matching endpoints exist
        return keep_unchanged(build_view(endpoint_objects, service), old)

    # -- reporting --

    @property
    def state(self) -> str:
        if not self.config.enabled:
            return "disabled"
        if self._stopped:
            return "stopped"
        if not self._started:
            return "not started"
        if self._endpoints.failing:
            return "degraded" if self._endpoints.synced else "error"
        if not self.ready:
            return "syncing"
        if self._services.failing and not self.services_forbidden:
            return "degraded"
        return "ok"

    def stats(self) -> RegistryStats:
        """Numbers for metrics: totals over this registry's reflectors and its snapshot."""
        reflectors = (self._endpoints, self._services)
        snapshot = self._snapshot
        addresses = set()
        services = 0
        for view in snapshot.values():
            nodes = {n for port in view.ports.values() for n in port} | set(view.any_port or ())
            services += bool(nodes)
            addresses |= nodes
        syncs = [t for r in reflectors for t in (r.last_sync, r.last_event) if t is not None]
        counts = self._endpoints.counts + self._services.counts
        return RegistryStats(self.state, self.ready, services, len(addresses), len(snapshot), self.changes,
                             max(syncs) if syncs else None, **asdict(counts))

    def dump(self) -> dict[str, Any]:
        """JSON-able state for the discovery endpoint; holds no token or token file content."""
        c = self.config
        reflectors = {}
        for key, reflector in (("endpoints", self._endpoints), ("services", self._services)):
            stats = reflector.stats()
            stats["last_error"] = self._api.scrub(stats["last_error"])
            reflectors[key] = stats
        services = {}
        for (namespace, name), view in sorted(self._snapshot.items()):
            entry: dict[str, Any] = {
                "namespace": namespace, "service": name, "port_source": view.source,
                "ports": {port: [n.address for n in nodes] for port, nodes in sorted(view.ports.items())},
            }
            if view.service_ports is not None:
                entry["service_ports"] = [{"name": n, "port": p} for n, p in view.service_ports]
            if view.any_port is not None:  # a single unnamed endpoint port answers any number
                entry["ports"]["*"] = [n.address for n in view.any_port]
            nodes = {n for port in view.ports.values() for n in port} | set(view.any_port or ())
            placed = {n.host: n.placement for n in nodes if n.placement is not None}
            if placed:  # where each address runs, and where the cluster wants its traffic from
                entry["placement"] = {host: _placement_json(p) for host, p in sorted(placed.items())}
            terminating = sorted({n.host for n in nodes if n.terminating})
            if terminating:
                entry["terminating"] = terminating
            services[f"{namespace}/{name}"] = entry
        warnings = list(self._warnings.values())
        return {
            "name": c.name, "type": self.type, "state": self.state, "ready": self.ready,
            "pid": os.getpid(),  # each gunicorn worker has its own registry: say whose this is
            "config": {
                "api_server": c.api_server, "kubeconfig": c.kubeconfig, "context": c.context,
                "auth": ("token_file" if c.token_file else "token" if c.token else
                         "kubeconfig" if c.kubeconfig else "in-cluster" if not c.api_server else "none"),
                "token_file": c.token_file, "ca_file": c.ca_file,
                "insecure_skip_tls_verify": c.insecure_skip_tls_verify,
                "namespace_pattern": c.namespace_pattern.pattern if c.namespace_pattern else None,
                "single_namespace": c.single_namespace, "label_selector": c.label_selector,
                "resource": c.resource, "enabled": c.enabled,
            },
            "endpoints_api": str(self._endpoint_api) if self._endpoint_api else None,
            "warnings": warnings,
            "informers": reflectors,  # the key scripts read since 0.1: one entry per reflector
            "changes": self.changes, "last_change": self.last_change,
            "services": services,
        }


def _placement_json(placement: Placement) -> dict[str, Any]:
    out: dict[str, Any] = {"zone": placement.zone, "node": placement.node_name}
    if placement.for_zones is not None:
        out["hints_for_zones"] = sorted(placement.for_zones)
    if placement.for_nodes is not None:
        out["hints_for_nodes"] = sorted(placement.for_nodes)
    if placement.distribution is not None:
        out["traffic_distribution"] = placement.distribution
    return out
