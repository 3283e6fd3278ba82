"""Prometheus metrics, with ``prometheus_client``.

Request metrics are recorded from each finished ``RequestRecord`` (``Gateway.observers``).
Under gunicorn, ``conf/gunicorn.conf.py`` sets ``PROMETHEUS_MULTIPROC_DIR`` before any
worker starts, and a scrape of any worker returns the sum over all workers. Discovery
metrics are read from the registries of the worker that answers the scrape: every worker
runs the same reflectors, so they describe what that worker routes by.

======================================================  ==================================
``kproxy_requests_total``                               service, api, method, code (2xx..)
``kproxy_request_duration_seconds``                     service (histogram)
``kproxy_upstream_responses_total``                     service, code (upstream status)
``kproxy_upstream_duration_seconds``                    service (time to response headers)
``kproxy_upstream_connect_failures_total``              service
``kproxy_upstream_errors_total``                        service, kind (connect_refused, connect_timeout,
                                                        tls, read_timeout, bad_response, broken_body)
``kproxy_upstream_retries_total``                       service
``kproxy_upstream_ejections_total``                     service (passive health)
``kproxy_tunnels_open``                                  service (gauge: Upgrade tunnels being relayed)
``kproxy_tunnels_total``                                 service (tunnels opened)
``kproxy_tunnel_bytes_total``                            service, direction (to_upstream, to_client;
                                                        counted when the tunnel closes)
``kproxy_discovery_*``                                  registry (see ``DiscoveryCollector``)
======================================================  ==================================

Request metrics are counted in memory and written to prometheus_client's values at most
a second later (and before every scrape this worker answers, and at exit): in
multiprocess mode each value written is a lock, a ``getpid()`` and a write to a mapped
file, six per request, which cost more than the rest of the metrics together. A worker
killed outright loses at most its last second of counts.
"""

from __future__ import annotations

import atexit
import bisect
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .discovery import Registry
    from .upstream import Upstream
    from .record import RequestRecord

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})
_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)

# Metrics live in the default registry; in multiprocess mode their values go to files.
REQUESTS = Counter("kproxy_requests", "Requests answered", ["service", "api", "method", "code"])
DURATION = Histogram("kproxy_request_duration_seconds", "Time from request to the end of the answer",
                     ["service"], buckets=_BUCKETS)
UPSTREAM_RESPONSES = Counter("kproxy_upstream_responses", "Upstream responses by status", ["service", "code"])
UPSTREAM_DURATION = Histogram("kproxy_upstream_duration_seconds", "Time to the upstream's response headers",
                              ["service"], buckets=_BUCKETS)
CONNECT_FAILURES = Counter("kproxy_upstream_connect_failures", "Connections to nodes that failed", ["service"])
UPSTREAM_ERRORS = Counter("kproxy_upstream_errors", "Failed exchanges with nodes, by kind", ["service", "kind"])
RETRIES = Counter("kproxy_upstream_retries", "Requests sent again to another node", ["service"])
EJECTIONS = Counter("kproxy_upstream_ejections", "Nodes taken out of rotation by passive health", ["service"])
HEALTH_CHECKS = Counter("kproxy_health_checks", "Active health checks of nodes, by result (pass, fail)",
                        ["service", "result"])
ZONE_REQUESTS = Counter("kproxy_upstream_zone_requests", "Requests sent to a node in kproxy's zone (same), "
                        "in another (other), or where either zone is unknown", ["service", "locality"])
TUNNELS_OPEN = Gauge("kproxy_tunnels_open", "Upgrade tunnels (WebSockets) being relayed", ["service"],
                     multiprocess_mode="livesum")
TUNNELS = Counter("kproxy_tunnels", "Upgrade tunnels opened", ["service"])
TUNNEL_BYTES = Counter("kproxy_tunnel_bytes", "Bytes relayed through closed tunnels", ["service", "direction"])


FLUSH_INTERVAL = 1.0  # seconds


class _Batch:
    """Counter increments and histogram observations not yet written to their values."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[Any, float] = {}            # counter child -> amount
        self._observed: dict[Any, list[float]] = {}    # histogram child -> [sum, per-bucket counts...]

    def inc(self, child: Any, amount: float = 1.0) -> None:
        with self._lock:
            self._counts[child] = self._counts.get(child, 0.0) + amount

    def observe(self, child: Any, value: float) -> None:
        # the bucket prometheus_client's Histogram.observe would count it in: the first
        # upper bound >= value (the last is +Inf)
        bucket = bisect.bisect_left(child._upper_bounds, value)
        with self._lock:
            tally = self._observed.get(child)
            if tally is None:
                tally = self._observed[child] = [0.0] * (len(child._upper_bounds) + 1)
            tally[0] += value
            tally[bucket + 1] += 1

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {}
            observed, self._observed = self._observed, {}
        for child, amount in counts.items():
            child.inc(amount)
        for child, (total, *buckets) in observed.items():
            child._sum.inc(total)
            for value, n in zip(child._buckets, buckets):
                if n:
                    value.inc(n)


_batch = _Batch()


def flush() -> None:
    """Write what was counted so far (a scrape of this worker calls it first)."""
    _batch.flush()


def _flush_periodically() -> None:
    while True:
        time.sleep(FLUSH_INTERVAL)
        _batch.flush()


_flusher: threading.Thread | None = None
_flusher_lock = threading.Lock()


def _start_flusher() -> None:
    # started by the first request, not at import or fork: a thread started before the
    # gunicorn hooks hold SIGHUP back would take the signal and end the new worker
    global _flusher
    with _flusher_lock:
        if _flusher is None:
            _flusher = threading.Thread(target=_flush_periodically, name="kproxy-metrics", daemon=True)
            _flusher.start()


def _forked() -> None:
    global _flusher
    _flusher = None  # threads do not survive a fork


os.register_at_fork(after_in_child=_forked)
atexit.register(flush)

# labelled children, looked up once: ``labels()`` validates and locks on every call, which
# was a tenth of kproxy's own time per request (docs/performance.rst)
_request_children: dict[tuple[str, str, str, int], tuple[Any, Any]] = {}
_upstream_children: dict[tuple[str, int], tuple[Any, Any]] = {}
_zone_children: dict[tuple[str, str], Any] = {}


def observe(record: RequestRecord) -> None:
    """Record one finished request (a ``Gateway`` observer)."""
    if _flusher is None:
        _start_flusher()
    method = record.method if record.method in _METHODS else "OTHER"  # clients choose methods
    key = (record.service, record.api, method, record.status // 100)
    children = _request_children.get(key)
    if children is None:
        children = _request_children.setdefault(key, (
            REQUESTS.labels(record.service, record.api, method, f"{key[3]}xx"),
            DURATION.labels(record.service)))
    batch = _batch
    batch.inc(children[0])
    batch.observe(children[1], time.perf_counter() - record.started)
    if record.upstream_status is not None:
        upstream_key = (record.service, record.upstream_status)
        upstream = _upstream_children.get(upstream_key)
        if upstream is None:
            upstream = _upstream_children.setdefault(upstream_key, (
                UPSTREAM_RESPONSES.labels(record.service, str(record.upstream_status)),
                UPSTREAM_DURATION.labels(record.service)))
        batch.inc(upstream[0])
        batch.observe(upstream[1], record.upstream_seconds or 0.0)
    for kind in record.failures:
        UPSTREAM_ERRORS.labels(record.service, kind).inc()
        if kind.startswith("connect") or kind == "tls":
            CONNECT_FAILURES.labels(record.service).inc()
    if record.node is not None and record.locality != "unknown":  # every request, once zones are known
        zone_key = (record.service, record.locality)
        zone = _zone_children.get(zone_key)
        if zone is None:
            zone = _zone_children.setdefault(zone_key, ZONE_REQUESTS.labels(*zone_key))
        batch.inc(zone)
    if record.attempts > 1:
        RETRIES.labels(record.service).inc(record.attempts - 1)
    if record.ejections:
        EJECTIONS.labels(record.service).inc(record.ejections)


class DiscoveryCollector(Collector):
    """Per-registry gauges from this worker's registries, built at scrape time."""

    def __init__(self, registries: Mapping[str, Registry]):
        self.registries = registries

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {
            "ready": GaugeMetricFamily("kproxy_discovery_ready", "1 once the registry has listed everything",
                                       labels=["registry"]),
            "services": GaugeMetricFamily("kproxy_discovery_services", "Services with endpoints",
                                          labels=["registry"]),
            "endpoints": GaugeMetricFamily("kproxy_discovery_endpoints", "Usable endpoints (nodes)",
                                           labels=["registry"]),
            "watch_restarts": GaugeMetricFamily("kproxy_discovery_watch_restarts",
                                                "Watches started again since start", labels=["registry"]),
            "relists": GaugeMetricFamily("kproxy_discovery_relists", "Full lists after the first",
                                         labels=["registry"]),
            "last_sync": GaugeMetricFamily("kproxy_discovery_last_sync_timestamp_seconds",
                                           "Time of the last successful list or watch event",
                                           labels=["registry"]),
        }
        state = GaugeMetricFamily("kproxy_discovery_state", "1 for the registry's current state",
                                  labels=["registry", "state"])
        for name, registry in self.registries.items():
            stats = registry.stats()
            families["ready"].add_metric([name], 1.0 if registry.ready else 0.0)
            for key in ("services", "endpoints", "watch_restarts", "relists", "last_sync"):
                value = getattr(stats, key)
                if value is not None:
                    families[key].add_metric([name], float(value))
            state.add_metric([name, stats.state], 1.0)
        yield from families.values()
        yield state


def exposition(registries: Mapping[str, Registry], upstreams: Mapping[str, Upstream] | None = None) -> tuple[bytes, str]:
    """The text a scrape gets: request metrics (summed over gunicorn workers), and this
    worker's discovery metrics and node states."""
    flush()
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY
        registry = REGISTRY
    output = generate_latest(registry)
    discovery = CollectorRegistry()
    discovery.register(DiscoveryCollector(registries))
    if upstreams:
        discovery.register(UpstreamCollector(upstreams))
    return output + generate_latest(discovery), CONTENT_TYPE_LATEST


def health_checked(service: str, passed: bool) -> None:
    HEALTH_CHECKS.labels(service, "pass" if passed else "fail").inc()


class UpstreamCollector(Collector):
    """This worker's nodes per service and state (ready, ejected, unhealthy, ...), at scrape time."""

    def __init__(self, upstreams: Mapping[str, Upstream]):
        self.upstreams = upstreams

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nodes = GaugeMetricFamily("kproxy_upstream_nodes", "Nodes of each service by state, as this worker sees "
                                  "them (ejections are each worker's own; with workers > 1, health checks the pod's)",
                                  labels=["service", "state"])
        for name, upstream in self.upstreams.items():
            counts: dict[str, int] = {}
            for state in upstream.states():
                counts[state.state] = counts.get(state.state, 0) + 1
            for state, count in sorted(counts.items()):
                nodes.add_metric([name, state], float(count))
        yield nodes


def tunnel_opened(service: str) -> None:
    TUNNELS.labels(service).inc()
    TUNNELS_OPEN.labels(service).inc()


def tunnel_closed(service: str, to_upstream: int, to_client: int) -> None:
    TUNNELS_OPEN.labels(service).dec()
    TUNNEL_BYTES.labels(service, "to_upstream").inc(to_upstream)
    TUNNEL_BYTES.labels(service, "to_client").inc(to_client)
