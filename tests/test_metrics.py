"""Request metrics are counted in memory and written in batches (kproxy/metrics.py): what
a scrape shows must be what prometheus_client itself would have counted."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram

from kproxy import metrics
from kproxy.record import RequestRecord
from kproxy.node import Node


def samples(metric) -> list[tuple[str, dict, float]]:
    return [(s.name.split("_", 1)[1], s.labels, s.value) for family in metric.collect() for s in family.samples
            if not s.name.endswith("_created")]


def test_a_batch_counts_what_prometheus_client_counts():
    direct, batched = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("a_seconds", "", buckets=metrics._BUCKETS, registry=direct)
    histogram = Histogram("b_seconds", "", buckets=metrics._BUCKETS, registry=batched)
    reference_count, count = Counter("a", "", registry=direct), Counter("b", "", registry=batched)
    batch = metrics._Batch()
    for value in (0.0, 0.0005, 0.001, 0.0011, 0.3, 7.0, 60.0, 100.0, 0.001):
        reference.observe(value)
        batch.observe(histogram, value)
        reference_count.inc()
        batch.inc(count)
    assert samples(histogram) != samples(reference)  # nothing is written before a flush
    batch.flush()
    assert samples(histogram) == samples(reference)
    assert samples(count) == samples(reference_count)
    batch.flush()  # a second flush adds nothing
    assert samples(histogram) == samples(reference)


def test_a_scrape_shows_every_request_finished_before_it():
    record = RequestRecord("GET", "/x", "127.0.0.1", "rid", time.perf_counter(), service="scrape-test", api="a",
                        node=Node("127.0.0.1", 1), upstream_status=200, upstream_seconds=0.002, status=200)
    for _ in range(3):
        metrics.observe(record)

    text = metrics.exposition({})[0].decode()
    assert 'kproxy_requests_total{api="a",code="2xx",method="GET",service="scrape-test"} 3.0' in text
    assert 'kproxy_upstream_duration_seconds_bucket{le="0.0025",service="scrape-test"} 3.0' in text
