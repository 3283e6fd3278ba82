"""Balancing that follows the cluster (kproxy/upstream.py, kproxy/health.py): topology
tiers from zones, EndpointSlice hints and trafficDistribution; slow start; active health
checks. Policy on injected clocks, checks against real HTTP servers on 127.0.0.1. The
Kubernetes side (v1beta1 topology read from a real API server; hints, v1 zone and
trafficDistribution from recorded v1 objects) is in test_balancing_cluster.py."""

from __future__ import annotations

import threading
import time
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.health import HealthCheck, HealthChecker, probe
from kproxy.node import Node, Placement
from kproxy.upstream import Upstream, topology_tiers

from .conftest import EchoApp, closed_port


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Source:
    def __init__(self, *nodes: Node):
        self.nodes = tuple(nodes)

    def __call__(self) -> tuple[Node, ...]:
        return self.nodes


def placed(host: str, zone: str | None = None, node_name: str | None = None, for_zones=None, for_nodes=None,
           distribution: str | None = None) -> Node:
    return Node(host, 80, placement=Placement(zone, node_name, None if for_zones is None else frozenset(for_zones),
                                              None if for_nodes is None else frozenset(for_nodes), distribution))


def shares(upstream: Upstream, count: int, **kwargs) -> Counter:
    return Counter(upstream.pick(**kwargs).host for _ in range(count))


# -- zones --

A1, A2, B1 = placed("10.0.1.1", "a"), placed("10.0.1.2", "a"), placed("10.0.2.1", "b")


def test_prefer_zone_sends_everything_to_kproxys_zone_while_it_has_a_ready_node():
    clock = Clock()
    upstream = Upstream("svc", Source(A1, A2, B1), zone="a", topology="prefer-zone", clock=clock)
    assert shares(upstream, 100) == {"10.0.1.1": 50, "10.0.1.2": 50}
    upstream.failed(A1)
    upstream.failed(A2)  # no preferred node left: all ready nodes serve, no 5xx in between
    assert shares(upstream, 10) == {"10.0.2.1": 10}
    clock.now += 11  # they come back: the zone is preferred again
    assert set(shares(upstream, 10)) == {"10.0.1.1", "10.0.1.2"}


def test_prefer_zone_falls_back_to_all_when_its_zone_has_no_node_or_kproxy_has_no_zone():
    assert set(shares(Upstream("svc", Source(A1, B1), zone="c", topology="prefer-zone"), 10)) == {"10.0.1.1", "10.0.2.1"}
    assert set(shares(Upstream("svc", Source(A1, B1), zone=None, topology="prefer-zone"), 10)) == {"10.0.1.1", "10.0.2.1"}


def test_off_ignores_zones_and_auto_ignores_them_without_hints_or_distribution():
    for topology in ("off", "auto"):
        assert set(shares(Upstream("svc", Source(A1, A2, B1), zone="a", topology=topology), 30)) == \
            {"10.0.1.1", "10.0.1.2", "10.0.2.1"}


def test_auto_follows_hints_for_zones_when_every_endpoint_has_them():
    # the EndpointSlice controller may send zone b's share to a node in zone a: hints win
    hinted = (placed("10.0.1.1", "a", for_zones={"a"}), placed("10.0.1.2", "a", for_zones={"b"}),
              placed("10.0.2.1", "b", for_zones={"b"}))
    assert set(shares(Upstream("svc", Source(*hinted), zone="b"), 20)) == {"10.0.1.2", "10.0.2.1"}
    partly = hinted[:2] + (placed("10.0.2.1", "b"),)  # one endpoint without hints: kube-proxy ignores them
    assert len(shares(Upstream("svc", Source(*partly), zone="b"), 30)) == 3


def test_auto_follows_traffic_distribution_without_hints():
    for distribution in ("PreferClose", "PreferSameZone"):
        nodes = [placed(n.host, n.zone, distribution=distribution) for n in (A1, A2, B1)]
        assert set(shares(Upstream("svc", Source(*nodes), zone="b"), 10)) == {"10.0.2.1"}, distribution
    same_node = [placed("10.0.1.1", "a", "n1", distribution="PreferSameNode"),
                 placed("10.0.1.2", "a", "n2", distribution="PreferSameNode"),
                 placed("10.0.2.1", "b", "n3", distribution="PreferSameNode")]
    assert set(shares(Upstream("svc", Source(*same_node), zone="a", node_name="n2"), 10)) == {"10.0.1.2"}
    # no node of its own: the zone, then everyone
    assert set(shares(Upstream("svc", Source(*same_node), zone="a", node_name="n9"), 10)) == {"10.0.1.1", "10.0.1.2"}
    hinted_nodes = [placed("10.0.1.1", "a", "n1", for_zones={"a"}, for_nodes={"n1"}, distribution="PreferSameNode"),
                    placed("10.0.1.2", "a", "n2", for_zones={"a"}, for_nodes={"n2"}, distribution="PreferSameNode")]
    assert set(shares(Upstream("svc", Source(*hinted_nodes), zone="a", node_name="n1"), 10)) == {"10.0.1.1"}


zones = st.sampled_from(["a", "b", "c", None])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(zones, st.booleans()), min_size=1, max_size=8), zones,
       st.sampled_from(["auto", "prefer-zone", "off"]),
       st.sampled_from([None, "PreferClose", "PreferSameZone"]))
def test_every_pick_is_a_ready_node_of_the_most_preferred_tier_that_has_one(spec, zone, topology, distribution):
    """The invariant of zone preference: never a node outside the service, never an
    ejected node while another is ready, and a node of kproxy's zone whenever one is
    ready and the policy prefers zones."""
    nodes = [placed(f"10.0.0.{i}", z, distribution=distribution) for i, (z, _) in enumerate(spec)]
    clock = Clock()
    upstream = Upstream("svc", Source(*nodes), zone=zone, topology=topology, clock=clock)
    ejected = {n for n, (_, down) in zip(nodes, spec) if down}
    for n in ejected:
        upstream.failed(n)
    ready = [n for n in nodes if n not in ejected]
    prefers = zone is not None and (topology == "prefer-zone" or (topology == "auto" and distribution))
    for _ in range(2 * len(nodes)):
        node = upstream.pick()
        assert node in nodes
        if ready:
            assert node in ready
            if prefers and any(n.zone == zone for n in ready):
                assert node.zone == zone
    assert topology_tiers(tuple(nodes), topology, zone, None)[-1] == tuple(nodes)


def test_locality_and_states_say_where_each_node_is():
    upstream = Upstream("svc", Source(A1, B1, Node("10.0.9.9", 80)), zone="a")
    assert [(s.node.host, s.locality, s.state) for s in upstream.states()] == []  # nothing adopted yet
    upstream.pick()
    assert [(s.node.host, s.locality) for s in upstream.states()] == [
        ("10.0.1.1", "same"), ("10.0.2.1", "other"), ("10.0.9.9", "unknown")]


# -- slow start --

A, B = Node("10.0.0.1", 80), Node("10.0.0.2", 80)


def ramp_shares(slow_start: float, first: float, until: float, rps: int = 100) -> float:
    """B's share of the requests from ``first`` to ``until`` s after it joins A."""
    clock = Clock()
    source = Source(A)
    upstream = Upstream("svc", source, clock=clock, slow_start=slow_start)
    upstream.pick()  # the first sync: A alone
    source.nodes = (A, B)
    upstream.pick()
    start = clock.now
    picks = Counter()
    clock.now = start + first
    while clock.now < start + until:
        picks[upstream.pick()] += 1
        clock.now += 1 / rps
    return picks[B] / sum(picks.values())


def test_a_joining_node_ramps_up_over_slow_start():
    # the figures: <= 30% in its first 3 s, 35-65% after 12 s (slow_start = 10)
    assert ramp_shares(10, 0, 3) <= 0.30
    assert 0.35 <= ramp_shares(10, 12, 15) <= 0.65
    shares_by_second = [ramp_shares(10, t, t + 1) for t in range(0, 11, 2)]
    assert shares_by_second == sorted(shares_by_second)  # rising, not stepping back


def test_without_slow_start_a_joining_node_takes_its_share_at_once():
    assert 0.45 <= ramp_shares(0, 0, 3) <= 0.55


def test_the_first_sync_and_a_lone_node_are_never_slowed():
    clock = Clock()
    upstream = Upstream("svc", Source(A, B), clock=clock, slow_start=10)
    assert shares(upstream, 100) == {A.host: 50, B.host: 50}  # both came with the first sync
    source = Source(A)
    lone = Upstream("svc", source, clock=clock, slow_start=10)
    lone.pick()
    source.nodes = (B,)  # A replaced: B is all there is
    assert shares(lone, 10) == {B.host: 10}


def test_a_node_back_from_ejection_ramps_up_again():
    clock = Clock()
    upstream = Upstream("svc", Source(A, B), clock=clock, slow_start=10, cooldown=5)
    upstream.pick()
    upstream.failed(B)
    clock.now += 5  # the cool-down ends: B comes back at 10% of its weight
    assert [s.state for s in upstream.states()] == ["ready", "slow-starting"]
    assert shares(upstream, 100)[B.host] <= 15
    clock.now += 10
    assert [s.state for s in upstream.states()] == ["ready", "ready"]


def test_picks_stay_consistent_across_threads_during_a_ramp():
    clock = Clock()
    source = Source(A)
    upstream = Upstream("svc", source, clock=clock, slow_start=10)
    upstream.pick()
    source.nodes = (A, B)
    counts: list[Counter] = []

    def work() -> None:
        counts.append(Counter(upstream.pick() for _ in range(2000)))
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(counts, Counter())
    assert sum(total.values()) == 8000 and total[B] <= 0.12 * 8000  # 10% of the weight: ~9%


# -- active health checks, against real servers --

def test_a_probe_passes_on_2xx_and_3xx_and_fails_otherwise(upstream):
    ok = upstream(EchoApp("ok"))
    assert probe(Node("127.0.0.1", ok.port), HealthCheck("/healthz", timeout=2)) is None
    assert probe(Node("127.0.0.1", ok.port), HealthCheck("/status/503", timeout=2)) == "status 503"
    assert probe(Node("127.0.0.1", ok.port), HealthCheck("/status/302", timeout=2)) is None
    refused = probe(Node("127.0.0.1", closed_port()), HealthCheck("/healthz", timeout=2))
    assert refused is not None and "refused" in refused.lower()


def test_a_node_that_accepts_connections_and_never_answers_fails_its_checks_in_time(raw_upstream):
    silent = raw_upstream(lambda conn: time.sleep(5))
    started = time.monotonic()
    assert probe(Node("127.0.0.1", silent.port), HealthCheck("/healthz", timeout=0.5)) == "timed out"
    assert time.monotonic() - started < 2


def test_thresholds_take_a_node_out_and_bring_it_back_slowly(upstream):
    ok = upstream(EchoApp("ok"))
    good, bad = Node("127.0.0.1", ok.port), Node("127.0.0.1", closed_port())
    pool = Upstream("svc", Source(good, bad), slow_start=10)
    pool.pick()
    answers = {}  # a node's answer to its checks from now on; the others are checked for real

    def check(node, *args):
        return answers[node] if node in answers else probe(node, *args)
    checker = HealthChecker(pool, HealthCheck("/healthz", timeout=1, healthy_threshold=2, unhealthy_threshold=3),
                            probe=check)
    for _ in range(2):
        checker.check_all()
    assert not pool.is_unhealthy(bad)  # two failures: not yet
    checker.check_all()
    assert pool.is_unhealthy(bad) and not pool.is_unhealthy(good)
    assert checker.unhealthy == {(bad.host, bad.port)}
    assert {pool.pick() for _ in range(10)} == {good}
    assert [s.state for s in pool.states()] == ["ready", "unhealthy"]
    # the node recovers: back after healthy_threshold passes, ramping
    answers[bad] = None
    checker.check_all()
    assert pool.is_unhealthy(bad)
    checker.check_all()
    assert not pool.is_unhealthy(bad) and [s.state for s in pool.states()] == ["ready", "slow-starting"]
    assert checker.unhealthy == set()


def test_a_verdict_on_a_node_the_upstream_has_not_seen_yet_applies_when_it_joins():
    """Health verdicts go by address: a node marked before discovery brought it to this
    upstream (the pod's checks may see it first) is out of rotation from its first pick."""
    a, b = Node("127.0.0.1", 1001), Node("127.0.0.1", 1002)
    source = Source(a)
    pool = Upstream("svc", source)
    assert pool.pick() == a
    pool.set_unhealthy({("127.0.0.1", 1002)})
    source.nodes = (a, b)
    assert {pool.pick() for _ in range(10)} == {a}
    assert [s.state for s in pool.states()] == ["ready", "unhealthy"]
    pool.set_unhealthy(())
    assert {pool.pick() for _ in range(10)} == {a, b}


def test_a_status_200_node_whose_health_endpoint_says_broken_is_taken_out(upstream):
    echo = EchoApp("broken")

    def says_broken(environ, start_response):  # answers requests, but its health endpoint fails
        if environ["PATH_INFO"] == "/healthz":
            start_response("500 Internal Server Error", [("Content-Length", "0")])
            return []
        return echo(environ, start_response)
    healthy, broken = upstream(EchoApp("fine")), upstream(says_broken)
    pool = Upstream("svc", Source(Node("127.0.0.1", healthy.port), Node("127.0.0.1", broken.port)))
    pool.pick()
    checker = HealthChecker(pool, HealthCheck("/healthz", interval=0.05, timeout=1, unhealthy_threshold=2))
    checker.start()
    try:
        deadline = time.monotonic() + 5
        while not pool.is_unhealthy(Node("127.0.0.1", broken.port)) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        checker.stop()
    assert pool.is_unhealthy(Node("127.0.0.1", broken.port))
    assert {pool.pick().port for _ in range(10)} == {healthy.port}
