"""Prometheus metrics, with ``prometheus_client``.

Request metrics are recorded from each finished ``Exchange`` (``Gateway.observers``).
Under gunicorn, ``conf/gunicorn.conf.py`` sets ``PROMETHEUS_MULTIPROC_DIR`` before any
worker starts, and a scrape of any worker returns the sum over all workers. Discovery
metrics are read from the registries of the worker that answers the scrape: every worker
runs the same informers, so they describe what that worker routes by.

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
``kproxy_discovery_*``                                  registry (see ``DiscoveryCollector``)
======================================================  ==================================
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .app import Gateway
    from .exchange import Exchange

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


# labelled children, looked up once: ``labels()`` validates and locks on every call, which
# was a tenth of kproxy's own time per request (docs/performance.rst)
_request_children: dict[tuple[str, str, str, int], tuple[Any, Any]] = {}
_upstream_children: dict[tuple[str, int], tuple[Any, Any]] = {}


def observe(exchange: Exchange) -> None:
    """Record one finished request (a ``Gateway`` observer)."""
    method = exchange.method if exchange.method in _METHODS else "OTHER"  # clients choose methods
    key = (exchange.service, exchange.api, method, exchange.status // 100)
    children = _request_children.get(key)
    if children is None:
        children = _request_children.setdefault(key, (
            REQUESTS.labels(exchange.service, exchange.api, method, f"{key[3]}xx"),
            DURATION.labels(exchange.service)))
    children[0].inc()
    children[1].observe(time.perf_counter() - exchange.started)
    if exchange.upstream_status is not None:
        upstream_key = (exchange.service, exchange.upstream_status)
        upstream = _upstream_children.get(upstream_key)
        if upstream is None:
            upstream = _upstream_children.setdefault(upstream_key, (
                UPSTREAM_RESPONSES.labels(exchange.service, str(exchange.upstream_status)),
                UPSTREAM_DURATION.labels(exchange.service)))
        upstream[0].inc()
        upstream[1].observe(exchange.upstream_seconds or 0.0)
    for kind in exchange.failures:
        UPSTREAM_ERRORS.labels(exchange.service, kind).inc()
        if kind.startswith("connect") or kind == "tls":
            CONNECT_FAILURES.labels(exchange.service).inc()
    if exchange.attempts > 1:
        RETRIES.labels(exchange.service).inc(exchange.attempts - 1)
    if exchange.ejections:
        EJECTIONS.labels(exchange.service).inc(exchange.ejections)


class DiscoveryCollector(Collector):
    """Per-registry gauges from this worker's registries, built at scrape time."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway

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
        for name, registry in self.gateway.registries.items():
            stats = registry.stats() if hasattr(registry, "stats") else {}
            families["ready"].add_metric([name], 1.0 if registry.ready else 0.0)
            for key in ("services", "endpoints", "watch_restarts", "relists", "last_sync"):
                if stats.get(key) is not None:
                    families[key].add_metric([name], float(stats[key]))
            state.add_metric([name, str(stats.get("state", "unknown"))], 1.0)
        yield from families.values()
        yield state


def exposition(gateway: Gateway) -> tuple[bytes, str]:
    """The text a scrape gets: request metrics (summed over gunicorn workers) and this
    worker's discovery metrics."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY
        registry = REGISTRY
    output = generate_latest(registry)
    discovery = CollectorRegistry()
    discovery.register(DiscoveryCollector(gateway))
    return output + generate_latest(discovery), CONTENT_TYPE_LATEST
