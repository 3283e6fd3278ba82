"""Balancing against a real cluster and real nodes: zones as the cluster states them,
slow start of an endpoint that joins, active health checks, all through ``kproxy serve``.

The test API server (v1.20) serves EndpointSlices only as v1beta1, with ``topology``; it
cannot store v1's ``zone``, ``hints`` or a Service's ``trafficDistribution``. So: v1beta1
zones and ``topology = prefer-zone`` run for real (a real kube-apiserver, real upstream
servers, ``kproxy serve``); hints, v1 ``zone`` and ``trafficDistribution`` run on
RECORDED v1 objects (as a v1.33 API server returns them), through the same trimming,
view and balancer."""

from __future__ import annotations

import collections
import time

import pytest

from kproxy.discovery.endpoints import build_view, trim_service, trim_slice
from kproxy.upstream import Upstream

from .conftest import EchoApp, discovery_ini, session, wait_until

BETA = "discovery.k8s.io/v1beta1"


def zoned_slice(namespace: str, name: str, port: int, zone: str, ready: bool = True) -> dict:
    return {"apiVersion": BETA, "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": namespace, "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": ready},
                           "topology": {"topology.kubernetes.io/zone": zone, "kubernetes.io/hostname": f"node-{zone}"}}]}


def test_prefer_zone_follows_v1beta1_topology_and_falls_back_without_errors(kube, namespace, upstream,
                                                                              gateway_process, token_file):
    near, far = upstream(EchoApp("near")), upstream(EchoApp("far"))
    kube.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": namespace},
                "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
    kube.apply(zoned_slice(namespace, "web-a", near.port, "zone-a"))
    kube.apply(zoned_slice(namespace, "web-b", far.port, "zone-b"))
    gw = gateway_process("serve", discovery_ini(kube, namespace, token_file, "web", port=80,
                                                kproxy={"zone": "zone-a"}, cluster={"topology": "prefer-zone"}))
    client = session()

    def served_by(count: int) -> collections.Counter:
        answers = [client.get(gw.url + "/x", headers={"Host": "web.test"}, timeout=10) for _ in range(count)]
        assert all(a.status_code == 200 for a in answers), [a.status_code for a in answers]
        return collections.Counter(a.json()["node"] for a in answers)

    gw.wait_ready()
    wait_until(lambda: served_by(1) == {"near": 1}, timeout=10)
    assert served_by(20) == {"near": 20}
    dump = client.get(gw.url + "/-/discovery", timeout=5).json()["registries"]["k"]["services"][f"{namespace}/web"]
    assert dump["placement"]["127.0.0.1"]["zone"] in ("zone-a", "zone-b")  # one address, two ports
    # the zone's only endpoint stops being ready: the other zone serves, with no 5xx at the switch
    kube.apply(zoned_slice(namespace, "web-a", near.port, "zone-a", ready=False))
    wait_until(lambda: served_by(1) == {"far": 1}, timeout=10)
    kube.apply(zoned_slice(namespace, "web-a", near.port, "zone-a"))
    wait_until(lambda: served_by(1) == {"near": 1}, timeout=10)
    metrics = client.get(gw.url + "/-/metrics", timeout=5).text
    assert 'kproxy_upstream_zone_requests_total{locality="same",service="web"}' in metrics
    assert 'kproxy_upstream_zone_requests_total{locality="other",service="web"}' in metrics


# -- RECORDED v1 objects (Kubernetes 1.33+): hints, zone, trafficDistribution --

RECORDED_SLICE_WITH_HINTS = {  # kubectl get endpointslice -o json, trafficDistribution: PreferClose
    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
    "metadata": {"name": "web-x7k2p", "namespace": "shop", "resourceVersion": "91823",
                 "labels": {"kubernetes.io/service-name": "web", "endpointslice.kubernetes.io/managed-by":
                            "endpointslice-controller.k8s.io"}},
    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    "endpoints": [
        {"addresses": ["10.8.1.4"], "conditions": {"ready": True, "serving": True, "terminating": False},
         "nodeName": "gke-pool-1-a1", "zone": "europe-west1-b", "hints": {"forZones": [{"name": "europe-west1-b"}]}},
        {"addresses": ["10.8.2.9"], "conditions": {"ready": True, "serving": True, "terminating": False},
         "nodeName": "gke-pool-1-c7", "zone": "europe-west1-c", "hints": {"forZones": [{"name": "europe-west1-c"}]}},
        {"addresses": ["10.8.2.10"], "conditions": {"ready": True, "serving": True, "terminating": False},
         "nodeName": "gke-pool-1-c8", "zone": "europe-west1-c",
         "hints": {"forZones": [{"name": "europe-west1-b"}]}},  # the controller moved capacity to b
    ],
}
RECORDED_SERVICE = {
    "apiVersion": "v1", "kind": "Service",
    "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "91700"},
    "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
             "trafficDistribution": "PreferClose"},
}


def nodes_of(slice_: dict, service: dict | None) -> tuple:
    return build_view([trim_slice(slice_)], trim_service(service) if service else None).ports["80"]


def test_recorded_v1_hints_steer_traffic_to_the_zones_they_name():
    nodes = nodes_of(RECORDED_SLICE_WITH_HINTS, RECORDED_SERVICE)
    assert [(n.host, n.zone, n.placement.node_name) for n in nodes] == [
        ("10.8.1.4", "europe-west1-b", "gke-pool-1-a1"), ("10.8.2.10", "europe-west1-c", "gke-pool-1-c8"),
        ("10.8.2.9", "europe-west1-c", "gke-pool-1-c7")]
    in_b = Upstream("web", lambda: nodes, zone="europe-west1-b")
    assert {in_b.pick().host for _ in range(20)} == {"10.8.1.4", "10.8.2.10"}  # hints, not zones
    in_c = Upstream("web", lambda: nodes, zone="europe-west1-c")
    assert {in_c.pick().host for _ in range(20)} == {"10.8.2.9"}
    off = Upstream("web", lambda: nodes, zone="europe-west1-c", topology="off")
    assert len({off.pick().host for _ in range(20)}) == 3


def test_recorded_v1_zone_and_traffic_distribution_without_hints():
    unhinted = {**RECORDED_SLICE_WITH_HINTS,
                "endpoints": [{k: v for k, v in e.items() if k != "hints"} for e in RECORDED_SLICE_WITH_HINTS["endpoints"]]}
    nodes = nodes_of(unhinted, RECORDED_SERVICE)
    assert {n.placement.distribution for n in nodes} == {"PreferClose"}
    in_c = Upstream("web", lambda: nodes, zone="europe-west1-c")
    assert {in_c.pick().host for _ in range(20)} == {"10.8.2.9", "10.8.2.10"}
    # the same Service without trafficDistribution: auto follows nothing, every zone serves
    plain = nodes_of(unhinted, {**RECORDED_SERVICE, "spec": {"ports": RECORDED_SERVICE["spec"]["ports"]}})
    anywhere = Upstream("web", lambda: plain, zone="europe-west1-c")
    assert len({anywhere.pick().host for _ in range(20)}) == 3


def test_an_endpoint_that_joins_under_load_ramps_up_over_slow_start(kube, namespace, upstream, gateway_process,
                                                                    token_file):
    """The issue's measure: B joins A with slow_start = 10; B gets <= 30% of the requests
    in its first 3 s and 35-65% after 12 s. Shares, not rates: robust on a busy machine."""
    a, b = upstream(EchoApp("a")), upstream(EchoApp("b"))
    kube.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": namespace},
                "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
    kube.apply(zoned_slice(namespace, "web-a", a.port, "z"))
    gw = gateway_process("serve", discovery_ini(kube, namespace, token_file, "web", port=80,
                                                cluster={"slow_start": 10}))
    client = session()
    gw.wait_ready()

    def served_for(seconds: float) -> collections.Counter:
        seen: collections.Counter = collections.Counter()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            answer = client.get(gw.url + "/x", headers={"Host": "web.test"}, timeout=10)
            assert answer.status_code == 200
            seen[answer.json()["node"]] += 1
        return seen
    wait_until(lambda: set(served_for(0.2)) == {"a"}, timeout=10)
    kube.apply(zoned_slice(namespace, "web-b", b.port, "z"))
    wait_until(lambda: client.get(gw.url + "/x", headers={"Host": "web.test"}, timeout=10).json()["node"] == "b",
               timeout=10, interval=0.01)
    joined = time.monotonic()
    first = served_for(3.0 - (time.monotonic() - joined))
    time.sleep(max(0.0, 12 - (time.monotonic() - joined)))
    later = served_for(2.0)
    assert first["b"] / sum(first.values()) <= 0.30, first
    assert 0.35 <= later["b"] / sum(later.values()) <= 0.65, later


def test_a_node_whose_health_check_fails_gets_no_traffic_and_returns_when_it_passes(upstream, gateway_process):
    echo = EchoApp("flaky")
    health = {"status": "500 Internal Server Error"}

    def flaky(environ, start_response):  # serves requests with 200 while /healthz says it is broken
        if environ["PATH_INFO"] == "/healthz":
            start_response(health["status"], [("Content-Length", "0")])
            return []
        return echo(environ, start_response)
    good, bad = upstream(EchoApp("good")), upstream(flaky)
    gw = gateway_process("serve", f"""
[service:web]
host = web.test
nodes = 127.0.0.1:{good.port} 127.0.0.1:{bad.port}
health_check_path = /healthz
health_check_interval = 0.2
health_check_timeout = 0.1
unhealthy_threshold = 2
healthy_threshold = 2

[api:web]
service = web
path = /
""")
    client = session()

    def nodes_seen(count: int = 10) -> set:
        return {client.get(gw.url + "/x", headers={"Host": "web.test"}, timeout=10).json()["node"]
                for _ in range(count)}
    wait_until(lambda: nodes_seen() == {"good"}, timeout=10)
    assert nodes_seen(30) == {"good"}
    health["status"] = "200 OK"
    wait_until(lambda: nodes_seen() == {"good", "flaky"}, timeout=10)


def test_a_hung_node_is_out_of_rotation_within_a_few_seconds_and_shows_in_metrics(upstream, raw_upstream,
                                                                                  gateway_process):
    """The issue's shape: interval 1 s, timeout 0.5 s; a node that accepts and never
    answers. After the first few seconds no request touches it (none waits for its
    read_timeout of 30 s), and the checks show in /-/discovery and /-/metrics."""
    hung = raw_upstream(lambda conn: time.sleep(60))
    good = upstream(EchoApp("good"))
    gw = gateway_process("serve", f"""
[kproxy]
read_timeout = 30

[service:web]
host = web.test
nodes = 127.0.0.1:{good.port} 127.0.0.1:{hung.port}
health_check_path = /healthz
health_check_interval = 1
health_check_timeout = 0.5
retries = 0

[api:web]
service = web
path = /
""")
    client = session()
    hung_address = f"127.0.0.1:{hung.port}"

    def out_of_rotation() -> bool:
        checks = client.get(gw.url + "/-/discovery", timeout=5).json().get("health_checks", {})
        node = checks.get("web", {}).get("nodes", {}).get(hung_address)
        return node is not None and node["streak"] <= -3
    wait_until(out_of_rotation, timeout=10)
    started = time.monotonic()
    answers = [client.get(gw.url + "/x", headers={"Host": "web.test"}, timeout=10) for _ in range(20)]
    assert [a.status_code for a in answers] == [200] * 20 and {a.json()["node"] for a in answers} == {"good"}
    assert time.monotonic() - started < 5  # none waited on the hung node
    metrics = client.get(gw.url + "/-/metrics", timeout=5).text
    assert 'kproxy_health_checks_total{result="fail",service="web"}' in metrics
    assert 'kproxy_upstream_nodes{service="web",state="unhealthy"} 1.0' in metrics


@pytest.mark.parametrize("workers", [1, 2])
def test_health_checks_send_the_host_their_service_says(upstream, gateway_process, workers):
    """``pass_host = pass`` has no client Host to pass: a check sends the node's address;
    ``rewrite`` sends ``upstream_host``; ``health_check_host`` overrides both. The same
    when the pod's discovery process runs the checks (workers > 1)."""
    hosts: dict[str, set] = collections.defaultdict(set)

    def app(environ, start_response):
        hosts[environ["PATH_INFO"]].add(environ.get("HTTP_HOST"))
        start_response("200 OK", [("Content-Length", "0")])
        return []
    node = upstream(app)
    services = {"plain": "", "rewritten": "pass_host = rewrite\nupstream_host = internal.test\n",
                "named": "pass_host = rewrite\nupstream_host = internal.test\nhealth_check_host = health.test\n"}
    gateway_process("serve", f"[kproxy]\nworkers = {workers}\n" + "".join(f"""
[service:{name}]
host = {name}.test
nodes = 127.0.0.1:{node.port}
health_check_path = /healthz/{name}
health_check_interval = 0.2
health_check_timeout = 0.1
{extra}
[api:{name}]
service = {name}
path = /
""" for name, extra in services.items()))
    wait_until(lambda: len(hosts) == 3, timeout=15)
    assert dict(hosts) == {"/healthz/plain": {f"127.0.0.1:{node.port}"}, "/healthz/rewritten": {"internal.test"},
                           "/healthz/named": {"health.test"}}
