"""What the operator dashboard shows, as JSON (``GET <admin_prefix>status``), and the page
itself (``GET <admin_prefix>``, files in ``kproxy/static/``).

The JSON's shape is part of the contract (README.rst, "Dashboard"): fields may be added,
none renamed or removed while ``schema`` stays 1.

Traffic comes from the counters kproxy already keeps for Prometheus: each status request
reads their totals (under gunicorn, summed over every worker's files, as ``/-/metrics``
is), keeps them in a ring of samples, and derives rates and latency quantiles over the
last minute from the differences, as Prometheus' ``rate()`` and ``histogram_quantile()``
would. Nothing is counted twice and nothing runs while no one looks.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

from . import __version__, metrics
from .upstream import NoNodes

if TYPE_CHECKING:
    from .config import Config, RegistryConfig, ServiceConfig
    from .discovery import Registry
    from .upstream import Upstream

SCHEMA = 1
WINDOW = 60.0          # seconds that rates and quantiles are computed over
MIN_SAMPLE_GAP = 0.25  # seconds: several open pages share one reading of the counters
BALANCER_STATES = frozenset({"ejected", "unhealthy", "slow-starting"})
ADMIN_SERVICE = "-admin"  # the dashboard's own polling is not traffic

_started = time.time()  # this process (a gunicorn worker imports kproxy after fork)


def _forked() -> None:
    global _started
    _started = time.time()
    _window.clear()


os.register_at_fork(after_in_child=_forked)


# -- the last reload, recorded by Gateway.reload --

@dataclass
class Reload:
    time: float
    result: str          # "ok", or "refused: ..." (by the master)
    config_file: str


_last_reload: Reload | None = None


def record_reload(config_file: str) -> None:
    """Gateway.reload calls this once the new config serves."""
    global _last_reload
    _last_reload = Reload(time.time(), "ok", config_file)


def last_reload() -> Reload | None:
    """The newer of what this worker applied and what the gunicorn master last made of a
    HUP (``$KPROXY_RELOAD_STATUS``, written by kproxy.server): a refused reload shows too."""
    master = None
    path = os.environ.get("KPROXY_RELOAD_STATUS")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            master = Reload(float(data["time"]), str(data["result"]), str(data["config_file"]))
        except (OSError, ValueError, KeyError, TypeError):
            master = None
    known = [r for r in (_last_reload, master) if r is not None]
    return max(known, key=lambda r: r.time) if known else None


# -- traffic: counter totals, sampled on demand --

@dataclass
class Totals:
    """One service's cumulative counts at one moment."""
    requests: float = 0.0
    errors: float = 0.0                     # answers with a 5xx status
    buckets: dict[float, float] = field(default_factory=dict)  # duration histogram: le -> count


def read_totals() -> dict[str, Totals]:
    """Every service's totals now: over all workers when metrics are multiprocess."""
    metrics.flush()  # this worker's batch; other workers write theirs within a second
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        families: Iterable[Any] = multiprocess.MultiProcessCollector(None).collect()
    else:
        families = [*metrics.REQUESTS.collect(), *metrics.DURATION.collect()]
    totals: dict[str, Totals] = {}
    for family in families:
        for sample in family.samples:
            if sample.name == "kproxy_requests_total":
                entry = totals.setdefault(sample.labels["service"], Totals())
                entry.requests += sample.value
                if sample.labels.get("code") == "5xx":
                    entry.errors += sample.value
            elif sample.name == "kproxy_request_duration_seconds_bucket":
                entry = totals.setdefault(sample.labels["service"], Totals())
                le = float(sample.labels["le"])
                entry.buckets[le] = entry.buckets.get(le, 0.0) + sample.value
    return totals


class Window:
    """A ring of (time, totals) samples covering the last ``WINDOW`` seconds."""

    def __init__(self, read: Callable[[], dict[str, Totals]] = read_totals,
                 clock: Callable[[], float] = time.monotonic):
        self._read, self._clock = read, clock
        self._lock = threading.Lock()
        self._samples: deque[tuple[float, dict[str, Totals]]] = deque()

    def clear(self) -> None:
        self._samples = deque()
        self._lock = threading.Lock()

    def traffic(self) -> tuple[dict[str, Totals], dict[str, dict[str, Any]], float | None]:
        """(totals now, per-service traffic over the window, the window's length in
        seconds, None until there are two samples)."""
        with self._lock:
            now = self._clock()
            if self._samples and now - self._samples[-1][0] < MIN_SAMPLE_GAP:
                now, current = self._samples[-1]
            else:
                current = self._read()
                self._samples.append((now, current))
            # keep the newest sample at least WINDOW old as the base, drop the older ones
            while len(self._samples) > 2 and now - self._samples[1][0] >= WINDOW:
                self._samples.popleft()
            # after a long time unwatched the base would average over more than a minute
            if now - self._samples[0][0] > 2 * WINDOW:
                self._samples = deque([self._samples[-1]])
            base_time, base = self._samples[0]
        span = now - base_time
        if span <= 0:
            return current, {name: _traffic(t, None, None) for name, t in current.items()}, None
        return current, {name: _traffic(t, base.get(name), span) for name, t in current.items()}, span


def _traffic(now: Totals, base: Totals | None, span: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {"requests": int(now.requests), "errors": int(now.errors),
                           "requests_per_second": None, "errors_per_second": None, "error_ratio": None,
                           "p50_seconds": None, "p99_seconds": None}
    if span is None:
        return out
    base = base or Totals()
    requests, errors = now.requests - base.requests, now.errors - base.errors
    if requests < 0:  # the counters started again (a single process reloaded its module)
        base = Totals()
        requests, errors = now.requests, now.errors
    out["requests_per_second"] = round(requests / span, 3)
    out["errors_per_second"] = round(errors / span, 3)
    out["error_ratio"] = round(errors / requests, 4) if requests else None
    delta = sorted((le, count - base.buckets.get(le, 0.0)) for le, count in now.buckets.items())
    out["p50_seconds"] = quantile(0.5, delta)
    out["p99_seconds"] = quantile(0.99, delta)
    return out


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a cumulative histogram [(upper bound, count), ...] sorted by
    bound, the last +Inf, interpolated linearly within a bucket (Prometheus'
    ``histogram_quantile``); None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower  # beyond the largest bound: the largest bound is all we know
            if count == below:
                return upper
            return round(lower + (upper - lower) * (rank - below) / (count - below), 6)
        lower, below = upper, count
    return lower


_window = Window()


# -- the document --

def status(config: Config, upstreams: Mapping[str, Upstream], registries: Mapping[str, Registry],
           registry_configs: Mapping[str, RegistryConfig], loaded: float, server: str | None,
           window: Window | None = None) -> dict[str, Any]:
    """The JSON the dashboard polls. ``loaded``: when this config started serving;
    ``server``: the WSGI server's SERVER_SOFTWARE."""
    totals, traffic, span = (window or _window).traffic()
    routes = [{
        "api": api.name, "host": config.services[api.service].host or None,
        "path": config.services[api.service].path_prefix + api.path, "match": api.match,
        "methods": sorted(api.methods) if api.methods else None, "strip_prefix": api.strip_prefix,
        "service": api.service,
    } for api in sorted(config.apis.values(), key=lambda a: (a.name,))]
    services = [_service(s, upstreams.get(s.name), registries, traffic)
                for s in sorted(config.services.values(), key=lambda s: s.name)]
    registry_list = [_registry(name, registry_configs[name], registries.get(name))
                     for name in sorted(registry_configs)]
    nodes = [n for s in services for n in s["nodes"]]
    # everything clients sent, routed or not, except the admin endpoints themselves
    clients = {name: t for name, t in traffic.items() if name != ADMIN_SERVICE}
    rps = sum(t["requests_per_second"] or 0 for t in clients.values()) if span is not None else None
    eps = sum(t["errors_per_second"] or 0 for t in clients.values()) if span is not None else None
    now = time.time()
    return {
        "schema": SCHEMA,
        "time": now,
        "window_seconds": round(span, 3) if span is not None else None,
        "summary": {
            "routes": len(routes), "services": len(services),
            "nodes_ready": sum(n["state"] == "ready" for n in nodes), "nodes_total": len(nodes),
            "registries_ok": sum(r["healthy"] for r in registry_list), "registries_total": len(registry_list),
            "requests": int(sum(t.requests for name, t in totals.items() if name != ADMIN_SERVICE)),
            "requests_per_second": round(rps, 3) if rps is not None else None,
            "error_ratio": round(eps / rps, 4) if rps else None,
        },
        "routes": routes,
        "services": services,
        "registries": registry_list,
        "process": {
            "version": __version__, "pid": os.getpid(), "server": server,
            "workers": config.gateway.workers,
            "metrics_from_all_workers": bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR")),
            "started": _started, "uptime_seconds": round(now - _started, 1),
            "config_file": config.path, "config_loaded": loaded,
            "last_reload": ({"time": reload.time, "result": reload.result,
                             "config_file": reload.config_file} if (reload := last_reload()) else None),
        },
    }


def _service(service: ServiceConfig, upstream: Upstream | None, registries: Mapping[str, Registry],
             traffic: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    if service.nodes is not None:
        source: dict[str, Any] = {"type": "static"}
        state = "ok"
    else:
        source = {"type": "registry", "registry": service.registry, "namespace": service.namespace,
                  "service": service.service_name, "port": service.port}
        registry = registries.get(service.registry)
        if registry is None:
            state = "registry disabled"
        elif registry.nodes(service.namespace, service.service_name, service.port) is None:
            state = "unknown service"
        else:
            state = "ok"
    nodes = []
    if upstream is not None:
        try:
            current = upstream.nodes()
        except NoNodes:
            current = ()
        # the balancer's marks (ejected, unhealthy, slow-starting) on the nodes it has seen
        # by the service's last request; readiness from the registry's current nodes
        seen = {(s.node.host, s.node.port): s for s in upstream.states()}
        for n in current:
            mark = seen.get((n.host, n.port))
            if mark is not None and mark.state in BALANCER_STATES:
                node_state = mark.state
            else:
                node_state = "serving-terminating" if n.terminating else "ready"
            nodes.append({"address": n.address, "state": node_state, "zone": n.zone, "weight": n.weight,
                          "effective_weight": round(mark.weight, 3) if mark is not None else float(n.weight)})
    if state == "ok" and not nodes:
        state = "no nodes"
    empty = _traffic(Totals(), None, None)
    return {"name": service.name, "host": service.host or None, "path_prefix": service.path_prefix,
            "scheme": service.scheme, "pass_host": service.pass_host, "retries": service.retries,
            "upstream": source, "state": state, "nodes": nodes,
            "traffic": traffic.get(service.name, empty)}


def _registry(name: str, config: RegistryConfig, registry: Registry | None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "type": config.type, "api_server": _api_server(config),
                           "state": "disabled" if not config.enabled else "not started", "healthy": False,
                           "ready": False, "last_sync": None, "last_error": None, "last_error_at": None,
                           "objects": {}, "services": 0, "endpoints": 0}
    if registry is None:
        return out
    stats = registry.stats()
    dump = registry.dump()  # its errors are scrubbed of tokens by the registry itself
    reflectors = dump.get("informers") or {}
    errors = [(r.get("last_error_at") or 0, r.get("last_error")) for r in reflectors.values()
              if r.get("failing") and r.get("last_error")]
    last_error = max(errors, key=lambda e: e[0]) if errors else (None, None)
    out.update(state=stats.state, healthy=stats.state == "ok", ready=stats.ready, last_sync=stats.last_sync,
               last_error=last_error[1], last_error_at=last_error[0] or None,
               objects={key: r.get("objects", 0) for key, r in reflectors.items()},
               services=stats.services, endpoints=stats.endpoints)
    return out


def _api_server(config: RegistryConfig) -> str:
    if config.api_server:
        parts = urlsplit(config.api_server)
        if parts.username or parts.password:  # credentials in a URL are a secret too
            parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
        return urlunsplit(parts)
    if config.kubeconfig:
        return "kubeconfig"
    return "in-cluster"


# -- the page --

STATIC = {
    "": ("index.html", "text/html; charset=utf-8"),
    "dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "favicon.svg": ("favicon.svg", "image/svg+xml"),
}

# nothing from another origin, no inline script or style, never framed
HEADERS = [
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]

_files: dict[str, bytes] = {}


def static_file(name: str) -> tuple[bytes, str] | None:
    """The page's file for admin path ``name``, or None."""
    entry = STATIC.get(name)
    if entry is None:
        return None
    filename, content_type = entry
    data = _files.get(filename)
    if data is None:
        data = _files[filename] = resources.files("kproxy").joinpath("static", filename).read_bytes()
    return data, content_type
