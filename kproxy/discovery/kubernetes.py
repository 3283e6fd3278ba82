"""Kubernetes registry: live endpoints of Services, resolved to nodes by Service port.

One registry per ``[registry:NAME]`` section. ``start()`` (after fork, once per worker)
runs two informers: endpoints (EndpointSlices, or v1 Endpoints) and Services (for the port
mapping). The request path reads an immutable snapshot, without locks::

    registry = KubernetesRegistry(config.registries["my-k8s-cluster"])
    registry.start()
    registry.nodes("apisix", "httpbin", "80")   # (Node('10.1.2.3', 8080),) ; () ; None
    registry.ready                              # every watched resource listed once
    registry.dump()                             # JSON-able state, never a token

Port semantics: ``port`` is the Service port (``spec.ports[].port``) or its name. Its name
picks the endpoint ports of that name (``""`` for a single unnamed port), whatever their
numbers. When Services are not readable (the seed's RBAC grants only endpoints), the port
is matched against endpoint port names and numbers instead, and the dump says so; a single
unnamed endpoint port is the only port of its Service, so it answers any port number.

Endpoint semantics: every slice of a service is merged and de-duplicated by address and
port; ready endpoints (``ready`` unset counts as ready) are used; when none is ready, the
serving ones (terminating included), so a draining service still answers; never the rest.

``label_selector`` is sent to the server for the endpoints: it decides which services are
visible. Services themselves are listed without it, only to map ports, because
hand-written Endpoints often carry labels their Service lacks.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Mapping
from urllib.parse import urlencode

import urllib3

from ..config import RegistryConfig
from ..node import Node
from .cache import Change, Object, Store
from .informer import ApiStatusError, Informer, Timing

log = logging.getLogger("kproxy.discovery")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
READY, SERVING = 2, 1  # endpoint states kept by the trimmers; not-ready ones are dropped
SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
SERVICE_ACCOUNT_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
# TCP keepalive finds a silently vanished API server in about a minute, long before the
# watch's read timeout (which must outlast the server's own watch timeout)
KEEPALIVE = dict(idle=30, interval=10, count=3)
EMPTY: tuple[Node, ...] = ()

ServiceKey = tuple[str, str]


@dataclass(frozen=True)
class EndpointApi:
    group_version: str  # "v1" or "discovery.k8s.io/v1" / "discovery.k8s.io/v1beta1"
    resource: str       # "endpoints" or "endpointslices"

    def collection(self, namespace: str | None) -> str:
        return _collection(self.group_version, self.resource, namespace)

    def __str__(self) -> str:
        return f"{self.group_version} {self.resource}"


ENDPOINTS = EndpointApi("v1", "endpoints")


def _collection(group_version: str, resource: str, namespace: str | None) -> str:
    base = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    return f"{base}/namespaces/{namespace}/{resource}" if namespace else f"{base}/{resource}"


# -- the API connection --

class ApiConnection:
    """The API server as the ``kubernetes`` client configures it; raw responses, our headers.

    The official client resolves kubeconfig, in-cluster config, TLS and client certificates;
    requests go through its urllib3 pool unparsed (``preload_content=False``) because its
    models cost four times the CPU and twice the memory on large lists. The bearer token
    is read from ``token_file`` on every request (a watch is one request per reconnect) and
    again after a 401, so rotated service-account tokens work without a restart;
    ``credentials_mark()`` lets a failing informer see the file change and retry at once.
    """

    def __init__(self, config: RegistryConfig, connect_timeout: float = 10.0):
        self._config = config
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._client: Any = None  # kubernetes.client.ApiClient, built on first use
        in_cluster = not config.kubeconfig and not config.api_server
        self._token_file = config.token_file or (SERVICE_ACCOUNT_TOKEN if in_cluster and not config.token else None)
        self.tokens: list[str] = []  # recently used tokens, so error texts can be scrubbed

    def _api_client(self) -> Any:
        with self._lock:
            if self._client is None:
                from kubernetes import client as k8s
                self._client = k8s.ApiClient(self._configuration())
            return self._client

    def _configuration(self) -> Any:
        from kubernetes import client as k8s
        from kubernetes import config as k8s_config
        from kubernetes.utils.keepalive import tcp_keepalive_socket_options
        config = self._config
        c = k8s.Configuration()
        if config.kubeconfig:
            k8s_config.load_kube_config(config_file=config.kubeconfig, context=config.context,
                                        client_configuration=c, persist_config=False)
        elif config.api_server:
            c.host = config.api_server
        else:
            from kubernetes.config.incluster_config import InClusterConfigLoader
            InClusterConfigLoader(token_filename=config.token_file or SERVICE_ACCOUNT_TOKEN,
                                  cert_filename=config.ca_file or SERVICE_ACCOUNT_CA).load_and_set(c)
        # only the registry's own settings decide verification: urllib3 never reads
        # REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE, and no ca_file means the system CAs
        if config.ca_file:
            c.ssl_ca_cert = config.ca_file
        if config.insecure_skip_tls_verify:
            c.verify_ssl = False
        c.socket_options = tcp_keepalive_socket_options(**KEEPALIVE)
        return c

    def _authorization(self) -> str | None:
        if self._token_file:
            try:
                with open(self._token_file, encoding="utf-8") as f:
                    token = f.read().strip()
            except OSError as e:
                raise RuntimeError(f"cannot read token_file {self._token_file}: {e.strerror}") from None
            if not token:
                raise RuntimeError(f"token_file {self._token_file} is empty")
        elif self._config.token:
            token = self._config.token
        else:  # kubeconfig or in-cluster: the client's own (refreshing) credentials, if any
            auth = self._api_client().configuration.auth_settings().get("BearerToken")
            value = auth and auth.get("value")
            if not value:
                return None
            token = value.split(" ", 1)[-1]
        if token not in self.tokens:
            self.tokens = (self.tokens + [token])[-4:]
        return f"Bearer {token}"

    def credentials_mark(self) -> Hashable:
        """Changes whenever ``token_file`` may hold another token; None without a file.

        Only a stat and a symlink walk, never a read, so a failing informer can ask several
        times a second. The file's identity, size and times catch a rewrite or a rename over
        it; the resolved path catches a Kubernetes projected volume, where ``token`` links to
        ``..data/token`` and the kubelet swaps the ``..data`` link to a new directory.
        """
        if not self._token_file:
            return None
        try:
            st = os.stat(self._token_file)
            return (os.path.realpath(self._token_file), st.st_dev, st.st_ino, st.st_size,
                    st.st_mtime_ns, st.st_ctime_ns)
        except OSError as e:  # absent or unreadable now: appearing later is a change too
            return ("unreadable", e.errno)

    def get(self, path: str, params: Mapping[str, str], read_timeout: float) -> urllib3.BaseHTTPResponse:
        client = self._api_client()
        url = client.configuration.host.rstrip("/") + path + ("?" + urlencode(params) if params else "")
        authorization = self._authorization()
        response = self._request(client, url, authorization, read_timeout)
        if response.status == 401 and self._token_file:
            fresh = self._authorization()
            if fresh != authorization:  # the file was rotated under us: retry at once
                response.drain_conn()
                response.release_conn()
                response = self._request(client, url, fresh, read_timeout)
        return response

    def _request(self, client: Any, url: str, authorization: str | None,
                 read_timeout: float) -> urllib3.BaseHTTPResponse:
        headers = {"Accept": "application/json", "User-Agent": "kproxy"}
        if authorization:
            headers["Authorization"] = authorization
        return client.rest_client.pool_manager.request(
            "GET", url, headers=headers, preload_content=False, retries=False,
            timeout=urllib3.Timeout(connect=self._connect_timeout, read=read_timeout))

    def get_json(self, path: str, params: Mapping[str, str] | None = None) -> tuple[int, Any]:
        """A small GET (discovery, probes): status and parsed body."""
        response = self.get(path, params or {}, 30.0)
        try:
            data = response.data
        finally:
            response.release_conn()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, None

    def scrub(self, text: str | None) -> str | None:
        if text:
            for token in self.tokens:
                text = text.replace(token, "***")
        return text

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.rest_client.pool_manager.clear()


# -- trimming objects to what the port mapping needs --
# A trimmed endpoints object: {"metadata": {namespace, name, resourceVersion}, "service": name,
#   "groups": [(ports, endpoints)]} where ports = ((name, number), ...) and
#   endpoints = ((address, READY|SERVING), ...): every port of a group applies to every endpoint.

def _metadata(obj: Object) -> dict[str, str]:
    m = obj["metadata"]
    return {"namespace": m.get("namespace") or "", "name": m["name"],
            "resourceVersion": m.get("resourceVersion") or ""}


def _tcp_ports(ports: Iterable[dict[str, Any]] | None) -> tuple[tuple[str, int], ...]:
    out = []
    for p in ports or ():
        if (p.get("protocol") or "TCP") == "TCP" and isinstance(p.get("port"), int):
            name = p.get("name") or ""
            if not isinstance(name, str):
                raise ValueError(f"port name {name!r} is not a string")
            out.append((name, p["port"]))
    return tuple(out)


def _ip(value: Any) -> str | None:
    """An endpoint address as a canonical IP string; None for anything else (the API
    server only stores IPs; a hostname or junk here must not become a node)."""
    if not isinstance(value, str):
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def trim_endpoints(obj: Object) -> Object:
    """v1 Endpoints: ``addresses`` are ready; ``notReadyAddresses`` are never used."""
    groups = []
    for subset in obj.get("subsets") or ():
        ports = _tcp_ports(subset.get("ports"))
        addresses = tuple((ip, READY) for ip in (_ip(a.get("ip")) for a in subset.get("addresses") or ()) if ip)
        if ports and addresses:
            groups.append((ports, addresses))
    return {"metadata": _metadata(obj), "service": obj["metadata"]["name"], "groups": groups}


def trim_slice(obj: Object) -> Object | None:
    """EndpointSlice (v1 or v1beta1); None for a slice that belongs to no service."""
    service = (obj["metadata"].get("labels") or {}).get(SERVICE_NAME_LABEL)
    if not service:
        return None
    if not isinstance(service, str):
        raise ValueError(f"label {SERVICE_NAME_LABEL} is not a string")
    endpoints = []
    for endpoint in obj.get("endpoints") or ():
        addresses = endpoint.get("addresses") or ()
        if not isinstance(addresses, list) or not addresses or not _ip(addresses[0]):
            continue
        conditions = endpoint.get("conditions") or {}
        if conditions.get("ready") is not False:  # unset means ready
            state = READY
        elif conditions.get("serving") is True:  # not ready, but still serving (draining)
            state = SERVING
        else:
            continue
        # the addresses of one endpoint are fungible: consumers use the first
        endpoints.append((_ip(addresses[0]), state))
    ports = _tcp_ports(obj.get("ports"))
    groups = [(ports, tuple(endpoints))] if ports and endpoints else []
    return {"metadata": _metadata(obj), "service": service, "groups": groups}


def trim_service(obj: Object) -> Object:
    return {"metadata": _metadata(obj), "ports": _tcp_ports((obj.get("spec") or {}).get("ports"))}


def _service_key(obj: Object) -> ServiceKey:
    return obj["metadata"]["namespace"], obj["service"]


# -- the per-service view on the request path --

@dataclass(frozen=True)
class ServiceView:
    """Nodes of one service by config port string; immutable, shared with readers."""
    ports: Mapping[str, tuple[Node, ...]]
    any_port: tuple[Node, ...] | None = None  # without a Service: a single unnamed port
    source: str = "service"                    # "service" or "endpoints" (port matching)
    service_ports: tuple[tuple[str, int], ...] | None = None


def build_view(endpoint_objects: Iterable[Object], service: Object | None) -> ServiceView:
    """Merge a service's endpoints objects and map them to its ports (pure function)."""
    merged: dict[str, dict[tuple[str, int], int]] = {}  # port name -> (address, number) -> state
    for obj in endpoint_objects:
        for ports, endpoints in obj["groups"]:
            for name, number in ports:
                entries = merged.setdefault(name, {})
                for address, state in endpoints:
                    if entries.get((address, number), 0) < state:
                        entries[(address, number)] = state
    interned: dict[tuple[Node, ...], tuple[Node, ...]] = {}

    def usable(entries: Mapping[tuple[str, int], int]) -> tuple[Node, ...]:
        nodes = _usable(entries)
        return interned.setdefault(nodes, nodes)  # equal node lists share one tuple

    if service is not None:
        ports: dict[str, tuple[Node, ...]] = {}
        for name, number in service["ports"]:
            nodes = usable(merged.get(name, {}))
            ports.setdefault(str(number), nodes)
            if name:
                ports[name] = nodes
        return ServiceView(ports, None, "service", service["ports"])
    if set(merged) == {""}:
        return ServiceView({}, usable(merged[""]), "endpoints")
    ports = {}
    by_number: dict[int, dict[tuple[str, int], int]] = {}
    for name, entries in merged.items():
        if name:
            ports[name] = usable(entries)
        for (address, number), state in entries.items():
            by_number.setdefault(number, {})[(address, number)] = state
    for number, entries in by_number.items():
        ports.setdefault(str(number), usable(entries))
    return ServiceView(ports, None, "endpoints")


def _usable(entries: Mapping[tuple[str, int], int]) -> tuple[Node, ...]:
    chosen = [k for k, state in entries.items() if state == READY]
    if not chosen:
        chosen = [k for k, state in entries.items() if state == SERVING]
    return tuple(Node(address, number) for address, number in sorted(chosen)) if chosen else EMPTY


def _reuse(view: ServiceView, old: ServiceView | None) -> ServiceView:
    """Keep the old tuple objects where nothing changed: the balancer compares by identity."""
    if old is None:
        return view
    if view == old:
        return old
    previous = {nodes: nodes for nodes in old.ports.values()}
    if old.any_port is not None:
        previous.setdefault(old.any_port, old.any_port)

    def keep(key: str, nodes: tuple[Node, ...]) -> tuple[Node, ...]:
        before = old.ports.get(key)
        return before if before == nodes else previous.get(nodes, nodes)

    ports = {key: keep(key, nodes) for key, nodes in view.ports.items()}
    any_port = None if view.any_port is None else previous.get(view.any_port, view.any_port)
    return ServiceView(ports, any_port, view.source, view.service_ports)


# -- the registry --

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
        self.changes = 0           # snapshots published
        self.last_change: float | None = None
        namespace = config.single_namespace
        self._namespace = namespace
        self._endpoints_store = Store(index=_service_key)
        self._services_store = Store()
        # informer names appear in log lines: say which registry they belong to
        self._endpoints = Informer(
            f"registry {config.name} endpoints", self._api, self._endpoints_path, self._endpoints_store, self._endpoints_changed,
            params={"labelSelector": config.label_selector or ""}, transform=self._trim_endpoints,
            timing=timing, thread_name=f"kproxy-{config.name}-endpoints")
        self._services = Informer(
            f"registry {config.name} services", self._api, lambda: _collection("v1", "services", namespace),
            self._services_store, self._services_changed, transform=self._trim_service,
            on_error=self._services_failed, timing=timing, thread_name=f"kproxy-{config.name}-services")
        if config.insecure_skip_tls_verify:
            self._warnings["tls"] = "TLS verification of the API server is off (insecure_skip_tls_verify)"

    # -- lifecycle --

    def start(self) -> None:
        """Start the informer threads; call after fork, once per process."""
        if not self.config.enabled or self._started:
            return
        self._started = True
        if "tls" in self._warnings:
            log.warning("registry %s: %s", self.config.name, self._warnings["tls"])
        self._endpoints.start()
        self._services.start()

    def stop(self) -> None:
        self._stopped = True
        self._endpoints.stop()
        self._services.stop()
        self._api.close()

    def add_listener(self, callback: Callable[[], None]) -> None:
        """``callback()`` runs on an informer thread after every published change."""
        self._listeners.append(callback)

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

    # -- informer callbacks (informer threads) --

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
        if getattr(error, "status", None) == 403 and "services" not in self._warnings:
            self._warn("services", "Services are not readable (403 Forbidden): ports are matched against "
                       "endpoint port names and numbers, not spec.ports of the Service; grant list/watch "
                       "on services for the exact Service-port mapping")

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warnings:
            log.warning("registry %s: %s", self.config.name, message)
        self._warnings[key] = message

    def _endpoints_changed(self, changes: list[Change], relisted: bool) -> None:
        keys: set[ServiceKey] = set()
        for _, old, new in changes:
            for obj in (old, new):
                if obj is not None:
                    keys.add(_service_key(obj))
        self._rebuild(keys)

    def _services_changed(self, changes: list[Change], relisted: bool) -> None:
        if relisted and self._warnings.pop("services", None):
            log.info("registry %s: Services are readable now", self.config.name)
        self._rebuild({key for key, _, _ in changes})

    def _rebuild(self, keys: Iterable[ServiceKey]) -> None:
        with self._write_lock:
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
        return _reuse(build_view(endpoint_objects, service), old)

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

    def stats(self) -> dict[str, Any]:
        """Numbers for metrics: totals over this registry's informers and its snapshot."""
        informers = (self._endpoints, self._services)
        snapshot = self._snapshot
        addresses = set()
        services = 0
        for view in snapshot.values():
            nodes = {n for port in view.ports.values() for n in port} | set(view.any_port or ())
            services += bool(nodes)
            addresses |= nodes
        syncs = [t for i in informers for t in (i.last_sync, i.last_event) if t is not None]
        return {
            "state": self.state, "ready": self.ready, "services": services, "endpoints": len(addresses),
            "known_services": len(snapshot), "changes": self.changes,
            "last_sync": max(syncs) if syncs else None,
            **{key: sum(getattr(i, key) for i in informers)
               for key in ("lists", "relists", "watches", "watch_restarts", "events", "bookmarks",
                           "malformed", "errors")},
        }

    def dump(self) -> dict[str, Any]:
        """JSON-able state for the discovery endpoint; holds no token or token file content."""
        c = self.config
        informers = {}
        for key, informer in (("endpoints", self._endpoints), ("services", self._services)):
            stats = informer.stats()
            stats["last_error"] = self._api.scrub(stats["last_error"])
            informers[key] = stats
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
            "informers": informers,
            "changes": self.changes, "last_change": self.last_change,
            "services": services,
        }
