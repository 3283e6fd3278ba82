"""Specification of upstreams (kproxy/upstream.py): smooth weighted round robin, thread
safety, passive-health ejection on an injected clock, ``exclude``, node-list changes that
keep the state of the nodes that stay; and one request's tries (``send``): which failures
move on to another node, how many, and the Host each node sees, on real sockets."""

from __future__ import annotations

import sys
import threading
from collections import Counter

import pytest

from kproxy.record import RequestRecord
from kproxy.node import Node
from kproxy.transport import ConnectFailed, ExchangeFailed, Transport
from kproxy.upstream import NoNodes, Upstream

from .conftest import closed_port

A, B, C, D = Node("10.0.0.1", 80), Node("10.0.0.2", 80), Node("10.0.0.3", 80), Node("10.0.0.4", 80)


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Source:
    """A node source whose node list a test can change; returns the same tuple object
    until it changes, as the discovery cache does."""

    def __init__(self, *nodes: Node):
        self.nodes: tuple[Node, ...] | None = tuple(nodes)

    def set(self, *nodes: Node) -> None:
        self.nodes = tuple(nodes)

    def __call__(self) -> tuple[Node, ...] | None:
        return self.nodes


def names(upstream: Upstream, count: int, legend: dict[Node, str], **kwargs) -> str:
    return "".join(legend[upstream.pick(**kwargs)] for _ in range(count))


# -- smooth weighted round robin --

def test_weights_5_1_1_give_nginx_smooth_sequence():
    a, b, c = Node("a", 1, 5), Node("b", 1, 1), Node("c", 1, 1)
    upstream = Upstream("svc", Source(a, b, c))
    assert names(upstream, 14, {a: "a", b: "b", c: "c"}) == "aabacaa" * 2


def test_equal_weights_alternate():
    upstream = Upstream("svc", Source(A, B))
    assert names(upstream, 6, {A: "a", B: "b"}) == "ababab"


def test_equal_weights_of_three_nodes_rotate():
    upstream = Upstream("svc", Source(A, B, C))
    assert names(upstream, 9, {A: "a", B: "b", C: "c"}) == "abcabcabc"


def test_each_cycle_of_total_weight_picks_each_node_weight_times():
    nodes = (Node("a", 1, 3), Node("b", 1, 2), Node("c", 1, 1))
    upstream = Upstream("svc", Source(*nodes))
    for _ in range(4):
        cycle = Counter(upstream.pick() for _ in range(6))
        assert cycle == {nodes[0]: 3, nodes[1]: 2, nodes[2]: 1}


def test_single_node_is_always_picked():
    upstream = Upstream("svc", Source(A))
    assert {upstream.pick() for _ in range(10)} == {A}


@pytest.fixture
def frequent_thread_switches():
    """Make the interpreter switch threads as often as it can, so that an unlocked
    read-modify-write in the balancer shows up as lost or doubled picks."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def test_concurrent_picks_are_exactly_proportional_to_weights(frequent_thread_switches):
    nodes = (Node("a", 1, 5), Node("b", 1, 2), Node("c", 1, 1))   # total weight 8
    threads, picks = 16, 1000                                     # 16,000 picks = 2,000 cycles
    for _ in range(5):  # a race need not show in every run; five runs make it show
        upstream = Upstream("svc", Source(*nodes))
        start = threading.Barrier(threads)
        counts: list[Counter] = [Counter() for _ in range(threads)]

        def run(i: int) -> None:
            start.wait()
            for _ in range(picks):
                counts[i][upstream.pick()] += 1

        workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert sum(counts, Counter()) == {nodes[0]: 10000, nodes[1]: 4000, nodes[2]: 2000}


# -- passive health: ejection --

def test_failed_node_is_skipped_until_the_cooldown_passes():
    clock = FakeClock()
    upstream = Upstream("svc", Source(A, B, C), cooldown=10.0, clock=clock)
    upstream.failed(A)
    assert upstream.ejected() == [A]
    assert A not in {upstream.pick() for _ in range(20)}
    clock.now += 9.9
    assert A not in {upstream.pick() for _ in range(20)}
    assert upstream.ejected() == [A]
    clock.now += 0.1
    assert upstream.ejected() == []
    assert A in {upstream.pick() for _ in range(3)}


def test_remaining_nodes_keep_rotating_while_one_is_ejected():
    clock = FakeClock()
    upstream = Upstream("svc", Source(A, B, C), clock=clock)
    upstream.failed(B)
    assert names(upstream, 6, {A: "a", C: "c"}) == "acacac"


def test_failing_again_restarts_the_cooldown():
    clock = FakeClock()
    upstream = Upstream("svc", Source(A, B), cooldown=10.0, clock=clock)
    upstream.failed(A)
    clock.now += 8
    upstream.failed(A)
    clock.now += 8                       # 16 s after the first failure, 8 s after the second
    assert upstream.ejected() == [A]
    assert {upstream.pick() for _ in range(4)} == {B}


def test_when_every_node_is_ejected_picks_still_rotate_over_all_nodes():
    clock = FakeClock()
    upstream = Upstream("svc", Source(A, B), clock=clock)
    upstream.failed(A)
    upstream.failed(B)
    assert names(upstream, 4, {A: "a", B: "b"}) == "abab"


def test_ejection_uses_the_configured_cooldown():
    clock = FakeClock()
    upstream = Upstream("svc", Source(A, B), cooldown=2.5, clock=clock)
    upstream.failed(A)
    clock.now += 2.4
    assert upstream.ejected() == [A]
    clock.now += 0.1
    assert upstream.ejected() == []


# -- exclude --

def test_exclude_skips_the_given_nodes():
    upstream = Upstream("svc", Source(A, B, C))
    assert {upstream.pick(exclude={A}) for _ in range(10)} == {B, C}
    assert {upstream.pick(exclude=[A, B]) for _ in range(10)} == {C}


def test_exclude_of_every_node_raises_no_nodes():
    upstream = Upstream("svc", Source(A, B))
    with pytest.raises(NoNodes):
        upstream.pick(exclude={A, B})


def test_exclude_wins_over_ejection_when_only_ejected_nodes_remain():
    clock = FakeClock()
    upstream = Upstream("svc", Source(A, B), clock=clock)
    upstream.failed(A)
    assert upstream.pick(exclude={B}) == A   # a retry still has somewhere to go


# -- no nodes --

@pytest.mark.parametrize("nodes", [None, ()], ids=["unknown-or-disabled", "no-endpoints"])
def test_empty_or_missing_node_list_raises_no_nodes(nodes):
    upstream = Upstream("sd-app", lambda: nodes)
    with pytest.raises(NoNodes) as info:
        upstream.pick()
    assert str(info.value) == "sd-app"
    with pytest.raises(NoNodes):
        upstream.nodes()


def test_no_nodes_is_a_lookup_error():
    assert issubclass(NoNodes, LookupError)


# -- node-list changes --

def test_node_list_is_read_from_the_source_on_every_pick():
    source = Source(A)
    upstream = Upstream("svc", source)
    assert upstream.pick() == A
    source.set(B)
    assert upstream.pick() == B
    source.nodes = None
    with pytest.raises(NoNodes):
        upstream.pick()


def test_scale_out_keeps_the_rotation_of_nodes_that_stay():
    source = Source(A, B)
    upstream = Upstream("svc", source)
    assert upstream.pick() == A          # now A is behind, B ahead
    source.set(A, B, C)
    # kept state: B (ahead) goes next; a reset rotation would start again with A
    assert names(upstream, 6, {A: "a", B: "b", C: "c"}) == "bcabca"


def test_scale_out_keeps_the_ejection_of_nodes_that_stay():
    clock = FakeClock()
    source = Source(A, B)
    upstream = Upstream("svc", source, cooldown=10.0, clock=clock)
    upstream.failed(A)
    source.set(A, B, C)
    assert A not in {upstream.pick() for _ in range(10)}
    assert upstream.ejected() == [A]


def test_removed_node_loses_its_ejection():
    clock = FakeClock()
    source = Source(A, B)
    upstream = Upstream("svc", source, cooldown=10.0, clock=clock)
    upstream.failed(A)
    source.set(B)
    upstream.pick()
    assert upstream.ejected() == []
    source.set(A, B)                     # A comes back (a new pod with the same address)
    assert A in {upstream.pick() for _ in range(2)}


def test_removed_node_comes_back_with_a_fresh_rotation():
    source = Source(A, B, C)
    upstream = Upstream("svc", source)
    assert upstream.pick() == A          # A is now furthest behind
    source.set(B, C)
    assert upstream.pick() == B
    source.set(A, B, C)
    # A starts fresh (even with the others), so it is picked right after C;
    # had it kept its old deficit, B would come before it
    assert names(upstream, 2, {A: "a", B: "b", C: "c"}) == "ca"


def test_same_tuple_object_is_not_rebuilt(monkeypatch):
    adopted: list[tuple[Node, ...]] = []
    original = Upstream._adopt

    def spy(self, nodes):
        adopted.append(nodes)
        original(self, nodes)

    monkeypatch.setattr(Upstream, "_adopt", spy)
    source = Source(A, B)
    upstream = Upstream("svc", source)
    for _ in range(100):
        upstream.pick()
    assert len(adopted) == 1
    source.set(A, B)                     # equal nodes, but a new tuple: a change to adopt
    upstream.pick()
    assert len(adopted) == 2


# -- one request's tries (Upstream.send): retry policy next to ejection, on real sockets --

def answer_ok(conn) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")


def hang_up(conn) -> None:
    conn.close()  # the request reached the node, and no answer came


def tries(method: str = "GET", retries: int | None = None, *nodes: Node, body=None):
    upstream = Upstream("svc", Source(*nodes), retries=retries)
    record = RequestRecord(method, "/", "127.0.0.1", "id", 0.0)
    transport = Transport(connect_timeout=2, read_timeout=2)
    try:
        response = upstream.send(transport, record, "/", {"Host": "svc"}, body, chunked=body is not None)
        response.release_conn()
        return upstream, record, response.status
    except Exception as e:  # the failure, for the test to look at
        return upstream, record, e
    finally:
        transport.close()


def node_of(server) -> Node:
    return Node("127.0.0.1", server.port)


def test_a_refused_connection_moves_on_to_the_next_node_whatever_the_method(raw_upstream):
    refused, good = Node("127.0.0.1", closed_port()), node_of(raw_upstream(answer_ok))
    upstream, record, status = tries("POST", None, refused, good, body=[b"x"])
    assert status == 200 and record.attempts == 2 and record.failures == ["connect_refused"]
    assert upstream.ejected() == [refused] and record.ejections == 1


def test_a_request_that_reached_a_node_is_sent_again_only_when_replayable(raw_upstream):
    broken, good = node_of(raw_upstream(hang_up)), node_of(raw_upstream(answer_ok))
    for method, body, replayed in [("GET", None, True), ("POST", None, False), ("PUT", [b"x"], False)]:
        upstream = None
        for _ in range(2):  # round robin: once with the broken node first
            upstream, record, result = tries(method, None, broken, good, body=body)
            if record.failures:
                break
        assert record.failures == ["bad_response"], method
        if replayed:
            assert result == 200 and record.attempts == 2
        else:
            assert isinstance(result, ExchangeFailed) and record.attempts == 1, method
        assert upstream.ejected() == []  # a bad answer is not an ejection: the node is up


def test_retries_bound_the_tries_and_the_last_failure_is_raised():
    nodes = [Node("127.0.0.1", closed_port()) for _ in range(4)]
    for retries, attempts in [(0, 1), (2, 3), (None, 4)]:
        _, record, result = tries("GET", retries, *nodes)
        assert isinstance(result, ConnectFailed) and record.attempts == attempts, retries


def test_pass_host_decides_the_host_each_node_sees(raw_upstream):
    node = node_of(raw_upstream(answer_ok))
    transport = Transport()
    try:
        for pass_host, upstream_host, expected in [("pass", None, "client.test"), ("node", None, node.address),
                                                   ("rewrite", "internal.test", "internal.test")]:
            upstream = Upstream("svc", Source(node), pass_host=pass_host, upstream_host=upstream_host)
            headers: dict[str, str] = {}
            upstream.send(transport, RequestRecord("GET", "/", "c", "id", 0.0), "/", headers, host="client.test").release_conn()
            assert headers["Host"] == expected, pass_host
    finally:
        transport.close()


def test_no_node_to_try_is_no_nodes():
    with pytest.raises(NoNodes):
        Upstream("svc", Source()).send(Transport(), RequestRecord("GET", "/", "c", "id", 0.0), "/", {})
