"""Long-lived traffic (issue #14): slow upstreams at high concurrency and event streams,
through kproxy as a user runs it (``kproxy serve``, gunicorn with conf/gunicorn.conf.py),
against a real asyncio upstream (``bench.slow_upstreams.SlowUpstream``); and the request
thread pool at its bound. The throughput and latency figures against nginx are
``python bench/slow_upstreams.py``'s (docs/performance.rst)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from bench.slow_upstreams import EVENTS, HOST, SlowUpstream, hold_clients, sse_clients
from kproxy.threads import RequestThreads

KINDS = ["serve", "gunicorn"]

# every [kproxy] setting at its default
DEFAULT_CONFIG = """
[service:slow]
host = {host}
nodes = 127.0.0.1:{port}

[api:all]
service = slow
path = /
"""


@pytest.fixture(scope="module")
def slow_upstream():
    upstream = SlowUpstream().start()
    yield upstream
    upstream.stop()


def assert_no_traceback(gw):
    assert "Traceback" not in (gw.log_dir / f"{gw.kind}.stderr").read_text()


@pytest.mark.parametrize("kind", KINDS)
def test_200_concurrent_slow_requests_on_the_default_config(kind, gateway_process, slow_upstream):
    """200 clients at once, each answered by the upstream after 200 ms: every one gets its
    200, and all are done well within a second (a behaviour bound: with the old default
    of 8 request threads they were served 8 at a time and the last waited 5 s)."""
    gw = gateway_process(kind, DEFAULT_CONFIG.format(host=HOST, port=slow_upstream.port))
    result = asyncio.run(hold_clients(gw.port, 200, "/slow"))
    assert result["statuses"] == {"200": 200}, result
    assert result["slowest_s"] < 2.5, result
    assert_no_traceback(gw)


@pytest.mark.parametrize("kind", KINDS)
def test_200_event_streams_get_every_event_as_it_is_sent(kind, gateway_process, slow_upstream):
    """200 concurrent text/event-stream clients (chunked, 10 events 200 ms apart): every
    client gets every event, once and in order, and none is held back (a stream relayed
    only at its end would deliver the first event 1.8 s late)."""
    gw = gateway_process(kind, DEFAULT_CONFIG.format(host=HOST, port=slow_upstream.port))
    result = asyncio.run(sse_clients(gw.port, 200))
    assert result["complete"] == 200 and result["events"] == 200 * EVENTS, result
    assert result["delay_max_ms"] < 1000, result
    assert_no_traceback(gw)


@pytest.mark.parametrize("kind", KINDS)
def test_a_stream_gets_its_head_before_its_first_event(kind, gateway_process, slow_upstream):
    """The upstream sends the head at once and the first event 2 s later: the client has
    the head (200, text/event-stream) long before that, as from nginx and Envoy, not held
    back to leave with the first event."""
    gw = gateway_process(kind, DEFAULT_CONFIG.format(host=HOST, port=slow_upstream.port))

    async def head_then_first_event() -> tuple[float, float, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            started = time.monotonic()
            writer.write(f"GET /sse?every=2 HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            head_at = time.monotonic() - started
            await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)
            return head_at, time.monotonic() - started, head
        finally:
            writer.close()
    head_at, event_at, head = asyncio.run(head_then_first_event())
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head, head
    assert head_at < 1.0 and event_at > 1.9, (head_at, event_at)


OVERLOAD_CONFIG = """
[kproxy]
threads = 2
queue_timeout = 0.5

[service:slow]
host = {host}
nodes = 127.0.0.1:{port}

[api:all]
service = slow
path = /
"""


@pytest.mark.parametrize("kind", KINDS)
def test_at_the_thread_bound_a_request_waits_queue_timeout_then_gets_503_overloaded(kind, gateway_process,
                                                                                    slow_upstream):
    """threads = 2, queue_timeout = 0.5 s, an upstream taking 1 s: of 6 requests at once, 2
    are served; the other 4 waited 1 s for a thread, more than queue_timeout, and are
    answered 503 with the JSON error ``overloaded`` (logged and counted as any answer),
    not served late. Then the worker serves again."""
    gw = gateway_process(kind, OVERLOAD_CONFIG.format(host=HOST, port=slow_upstream.port))
    result = asyncio.run(hold_clients(gw.port, 6, "/slow?delay=1"))
    assert result["statuses"] == {"200": 2, "503": 4}, result
    answers = [json.loads(body) for body in result["other_bodies"]]
    assert len(answers) == 4 and len({a["request_id"] for a in answers}) == 4, answers
    assert all(a["error"] == "overloaded" and "queue_timeout" in a["message"] for a in answers), answers
    assert asyncio.run(hold_clients(gw.port, 2, "/slow?delay=0"))["statuses"] == {"200": 2}
    stdout = gw.log_dir / f"{gw.kind}.stdout"
    deadline = time.monotonic() + 10  # the access log is written in batches
    while stdout.read_text().count(" 503 ") < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    log = stdout.read_text()
    assert log.count(" 503 ") == 4 and log.count('error="overloaded') == 4, log[-2000:]
    assert_no_traceback(gw)


# -- the pool itself --

def test_threads_are_made_only_when_every_one_is_busy():
    pool = RequestThreads(limit=8)
    try:
        done = threading.Event()
        for _ in range(20):  # one after another: one thread serves them all
            done.clear()
            pool.submit(done.set)
            assert done.wait(5)
            time.sleep(0.01)  # back in the idle list
        assert pool.started == 1
        gate = threading.Event()
        ran = []
        for i in range(12):  # 12 at once with 8 at most: 8 threads, 4 wait their turn
            pool.submit(lambda i=i: (gate.wait(5), ran.append(i)))
        deadline = time.monotonic() + 5
        while pool.busy < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.started == 8 and pool.queued == 4
        gate.set()
        while len(ran) < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(ran) == list(range(12)) and pool.started == 8
    finally:
        pool.shutdown()


def test_a_request_that_waited_past_queue_timeout_is_refused_not_served():
    refused, served = [], []
    pool = RequestThreads(limit=1, queue_timeout=0.2, refuse=refused.append)
    try:
        gate = threading.Event()
        pool.submit(lambda: gate.wait(5))
        pool.submit(served.append, "late")     # waits 0.4 s > 0.2 s
        time.sleep(0.4)
        gate.set()
        deadline = time.monotonic() + 5
        while not refused and time.monotonic() < deadline:
            time.sleep(0.01)
        pool.submit(served.append, "in time")  # a free thread: served
        while not served and time.monotonic() < deadline:
            time.sleep(0.01)
        assert refused == ["late"] and served == ["in time"]
    finally:
        pool.shutdown()


def test_threads_made_for_a_burst_end_once_idle_and_the_pool_still_serves():
    pool = RequestThreads(limit=32)
    pool.idle_timeout = 0.3
    try:
        gate = threading.Event()
        for _ in range(20):  # a burst: 20 threads at once
            pool.submit(gate.wait, 5)
        deadline = time.monotonic() + 5
        while pool.started < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.started == 20
        gate.set()
        while pool.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pool.started == 0  # idle past idle_timeout: every one ended
        done = threading.Event()
        pool.submit(done.set)  # and a new request gets a new thread
        assert done.wait(5) and pool.started == 1
    finally:
        pool.shutdown()


def test_shutdown_ends_the_idle_threads():
    pool = RequestThreads(limit=4, name="test-shutdown")  # apart from the threads other tests leave ending
    done = threading.Event()
    pool.submit(done.set)
    assert done.wait(5)
    ours = [t for t in threading.enumerate() if t.name.startswith(f"{pool.name}-")]
    assert len(ours) == 1
    pool.shutdown()
    ours[0].join(5)
    assert not ours[0].is_alive() and pool.started == 0
