"""The Kubernetes registry against a real etcd + kube-apiserver v1.20 on 127.0.0.1.

One apiserver for the module, a namespace per test. Under CI=true the server must be
provided (the tests fail otherwise); elsewhere they skip with the reason. Faults are real:
the apiserver is restarted, etcd is compacted, a token is revoked. To cut kproxy's
connections without stopping the server, tests route them through ``TcpRelay``, a plain
TCP pass-through (TLS stays end to end); it is not a fake server.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from kproxy.config import parse
from kproxy.discovery.reflector import Timing
from kproxy.discovery.kubernetes import KubernetesRegistry
from kproxy.node import Node
from kproxy_tools.testenv import KubeAPIServer

from .conftest import EchoApp, TcpRelay, UpstreamServer, discovery_ini, session, wait_until
from .test_discovery_reflector import ProjectedVolume

# short backoff so fault tests recover in about a second; the default schedule
# (0.8 s doubling to 30 s) is checked without a server in test_discovery_reflector.py
FAST = Timing(backoff_initial=0.2, backoff_cap=1.0)
SERVICE_NAME = "kubernetes.io/service-name"


def _progress(message: str) -> None:
    print(message, file=sys.__stderr__, flush=True)  # a first 5-minute build must not look hung


_numbers = itertools.count()


@pytest.fixture
def namespace(kube: KubeAPIServer, request: pytest.FixtureRequest) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower().removeprefix("test_"))[:40].strip("-")
    name = f"{base}-{next(_numbers)}"
    kube.apply({"kind": "Namespace", "metadata": {"name": name}})
    return name


def registry_config(**keys: str):
    lines = "\n".join(f"{k} = {v}" for k, v in {"type": "kubernetes", **keys}.items())
    return parse(f"[registry:test]\n{lines}\n").registries["test"]


@pytest.fixture
def registries() -> Iterator[Callable[..., KubernetesRegistry]]:
    made: list[KubernetesRegistry] = []

    def make(timing: Timing = FAST, **keys: str) -> KubernetesRegistry:
        registry = KubernetesRegistry(registry_config(**keys), timing=timing)
        made.append(registry)
        registry.start()
        return registry
    yield make
    for registry in made:
        registry.stop()


def admin(kube: KubeAPIServer, url: str | None = None) -> dict[str, str]:
    return {"api_server": url or kube.url, "token": kube.admin_token, "ca_file": kube.ca_file}



# -- Kubernetes objects --

def service(ns: str, name: str, ports=(("http", 80),), labels: dict | None = None) -> dict:
    spec_ports = [{**({"name": n} if n else {}), "port": p, "protocol": "TCP"} for n, p in ports]
    return {"kind": "Service", "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": {"ports": spec_ports}}  # selector-less: its endpoints are written by hand


def endpoint_slice(ns: str, name: str, svc: str, endpoints: list[dict], ports=(("http", 8080),),
                   address_type: str = "IPv4", labels: dict | None = None) -> dict:
    return {"kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": {SERVICE_NAME: svc, **(labels or {})}},
            "addressType": address_type,
            "ports": [{**({"name": n} if n else {}), "port": p, "protocol": "TCP"} for n, p in ports],
            "endpoints": endpoints}


def ready(address: str) -> dict:
    return {"addresses": [address], "conditions": {"ready": True}}


def endpoints(ns: str, name: str, addresses: list[str], port: int, port_name: str = "",
              not_ready: list[str] = (), labels: dict | None = None) -> dict:
    subset: dict[str, Any] = {"ports": [{**({"name": port_name} if port_name else {}), "port": port}]}
    if addresses:
        subset["addresses"] = [{"ip": a} for a in addresses]
    if not_ready:
        subset["notReadyAddresses"] = [{"ip": a} for a in not_ready]
    return {"kind": "Endpoints", "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "subsets": [subset] if addresses or not_ready else []}


def nodes(*addresses: str, port: int = 8080) -> tuple[Node, ...]:
    return tuple(Node(a, port) for a in sorted(addresses))  # the registry sorts by address


# -- test tools: a pass-through relay, a poller, an upstream --

@pytest.fixture
def relay(kube: KubeAPIServer) -> Iterator[TcpRelay]:
    r = TcpRelay(kube.port)
    yield r
    r.close()


class Poller:
    """Reads ``registry.nodes`` in a loop, as the request path does, recording every
    reading that would have been a 503 (None or no nodes)."""

    def __init__(self, registry: KubernetesRegistry, *keys: tuple[str, str, str]):
        self.registry, self.keys = registry, keys
        self.bad: list[tuple[tuple[str, str, str], Any]] = []
        self.readings = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key in self.keys:
                value = self.registry.nodes(*key)
                if not value:
                    self.bad.append((key, value))
            self.readings += 1
            time.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class NamedUpstream:
    """A real HTTP server on 127.0.0.1 that answers with its name."""

    def __init__(self, name: str):
        body = json.dumps({"node": name}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def get_via(node: Node) -> dict:
    return session().get(f"http://{node.address}/anything", timeout=5).json()


# -- port mapping and endpoint rules --

def test_service_port_maps_to_the_named_endpoint_port(kube, namespace, registries):
    kube.apply(service(namespace, "web", ports=(("http", 80), ("metrics", 9090))))
    kube.apply(endpoint_slice(namespace, "web-1", "web", [ready("127.0.0.1"), ready("127.0.0.2")],
                              ports=(("http", 8080), ("metrics", 9100))))
    kube.apply(service(namespace, "other"))
    registry = registries(**admin(kube), namespace_pattern=namespace)
    wait_until(lambda: registry.ready)
    assert registry.dump()["endpoints_api"] == "discovery.k8s.io/v1beta1 endpointslices"
    web = registry.nodes(namespace, "web", "80")
    assert web == nodes("127.0.0.1", "127.0.0.2")          # service port 80 -> "http" -> 8080
    assert registry.nodes(namespace, "web", "http") is web
    assert registry.nodes(namespace, "web", "9090") == nodes("127.0.0.1", "127.0.0.2", port=9100)
    assert registry.nodes(namespace, "web", "8080") == ()    # a container port is not a Service port
    assert registry.nodes(namespace, "other", "80") == ()    # known, no endpoints
    assert registry.nodes(namespace, "absent", "80") is None
    # an unrelated change leaves web's tuple object alone: the balancer compares by identity
    kube.apply(endpoint_slice(namespace, "other-1", "other", [ready("127.0.0.9")]))
    wait_until(lambda: registry.nodes(namespace, "other", "80"))
    assert registry.nodes(namespace, "web", "80") is web
    # the Service's port renamed: the mapping follows the Service, not the number
    kube.apply(service(namespace, "web", ports=(("metrics", 80), ("http", 9090))))
    wait_until(lambda: registry.nodes(namespace, "web", "80") == nodes("127.0.0.1", "127.0.0.2", port=9100))
    entry = registry.dump()["services"][f"{namespace}/web"]
    assert entry["port_source"] == "service" and entry["ports"]["9090"] == ["127.0.0.1:8080", "127.0.0.2:8080"]


SEED_RBAC = [
    {"kind": "ClusterRole", "metadata": {"name": "apisix-k8s-sd-watcher"},
     "rules": [{"apiGroups": [""], "resources": ["endpoints"], "verbs": ["list", "watch"]}]},
    {"kind": "ClusterRoleBinding", "metadata": {"name": "apisix-k8s-sd-watcher-binding"},
     "subjects": [{"kind": "ServiceAccount", "name": "apisix-k8s-sd-sa", "namespace": "apisix"}],
     "roleRef": {"kind": "ClusterRole", "name": "apisix-k8s-sd-watcher", "apiGroup": "rbac.authorization.k8s.io"}},
    {"kind": "ServiceAccount", "metadata": {"name": "apisix-k8s-sd-sa", "namespace": "apisix"}},
]


def test_seed_minimal_rbac_works_and_warns(kube, registries, caplog):
    """The seed's rbac.yaml as written: list/watch on endpoints only."""
    kube.apply({"kind": "Namespace", "metadata": {"name": "apisix"}})
    for obj in SEED_RBAC:
        kube.apply(obj)
    token = kube.create_token("apisix", "apisix-k8s-sd-sa")
    httpbin = NamedUpstream("httpbin")
    try:
        # `kubectl expose pod/httpbin --port 80`: one unnamed port
        kube.apply(service("apisix", "httpbin", ports=(("", 80),)))
        kube.apply(endpoints("apisix", "httpbin", ["127.0.0.1"], httpbin.port))
        kube.apply(service("apisix", "named", ports=(("http", 80),)))
        kube.apply(endpoints("apisix", "named", ["127.0.0.2"], 8080, port_name="http"))
        with caplog.at_level(logging.INFO, logger="kproxy"):
            registry = registries(api_server=kube.url, token=token, ca_file=kube.ca_file,
                                  namespace_pattern="apisix")
            wait_until(lambda: registry.ready)
        node = registry.nodes("apisix", "httpbin", "80")
        assert node == (Node("127.0.0.1", httpbin.port),)
        assert get_via(node[0]) == {"node": "httpbin"}
        # without the Service, a named endpoint port answers to its name (and its number)
        assert registry.nodes("apisix", "named", "http") == nodes("127.0.0.2")
        dump = registry.dump()
        assert dump["endpoints_api"] == "v1 endpoints" and dump["state"] == "ok"
        warnings = " ".join(dump["warnings"])
        assert "Services are not readable" in warnings and "EndpointSlices are not readable" in warnings
        assert "Services are not readable" in caplog.text
        assert dump["services"]["apisix/httpbin"]["port_source"] == "endpoints"
        assert dump["services"]["apisix/httpbin"]["ports"] == {"*": [f"127.0.0.1:{httpbin.port}"]}
        stats = registry.stats()
        assert (stats.services, stats.endpoints, stats.lists, stats.state) == (2, 2, 1, "ok")
        assert dump["informers"]["services"]["last_status"] == 403
        assert token not in json.dumps(dump) and token not in caplog.text
    finally:
        httpbin.close()


def test_endpointslices_merge_dedupe_ready_serving_terminating(kube, namespace, registries):
    kube.apply(service(namespace, "web"))
    kube.apply(endpoint_slice(namespace, "web-a", "web", [
        ready("127.0.0.1"),
        {"addresses": ["127.0.0.2"]},                                   # ready unset: counts as ready
        {"addresses": ["127.0.0.3"], "conditions": {"ready": False}},  # never used
    ]))
    kube.apply(endpoint_slice(namespace, "web-b", "web", [ready("127.0.0.1"), ready("127.0.0.4")]))
    kube.apply(endpoint_slice(namespace, "web-v6", "web", [ready("::1")], address_type="IPv6"))
    registry = registries(**admin(kube), namespace_pattern=namespace)
    wait_until(lambda: registry.ready)
    assert registry.nodes(namespace, "web", "80") == nodes("127.0.0.1", "127.0.0.2", "127.0.0.4", "::1")
    assert Node("::1", 8080).address == "[::1]:8080"
    # nothing ready any more: the draining (serving + terminating) ones keep answering
    draining = {"ready": False, "serving": True, "terminating": True}
    kube.apply(endpoint_slice(namespace, "web-a", "web", [
        {"addresses": ["127.0.0.1"], "conditions": draining},
        {"addresses": ["127.0.0.3"], "conditions": {"ready": False, "serving": False, "terminating": True}},
    ]))
    kube.delete(endpoint_slice(namespace, "web-b", "web", []))
    kube.delete(endpoint_slice(namespace, "web-v6", "web", []))
    wait_until(lambda: registry.nodes(namespace, "web", "80") == (Node("127.0.0.1", 8080, terminating=True),))
    # a ready endpoint comes back: the draining one is dropped
    kube.apply(endpoint_slice(namespace, "web-b", "web", [ready("127.0.0.5")]))
    wait_until(lambda: registry.nodes(namespace, "web", "80") == nodes("127.0.0.5"))
    kube.apply(endpoint_slice(namespace, "web-b", "web", [{"addresses": ["127.0.0.5"],
                                                           "conditions": {"ready": False}}]))
    kube.apply(endpoint_slice(namespace, "web-a", "web", []))
    wait_until(lambda: registry.nodes(namespace, "web", "80") == ())


def test_scale_up_and_down_reaches_nodes_quickly(kube, namespace, registries):
    kube.apply(service(namespace, "web"))
    registry = registries(**admin(kube), namespace_pattern=namespace)
    wait_until(lambda: registry.ready)
    assert registry.nodes(namespace, "web", "80") == ()
    heard = threading.Semaphore(0)
    registry.add_listener(heard.release)
    latencies = []
    for count in (1, 10, 3, 0, 5):
        addresses = [f"127.0.1.{i + 1}" for i in range(count)]
        kube.apply(endpoint_slice(namespace, "web-1", "web", [ready(a) for a in addresses]))
        written = time.monotonic()
        wait_until(lambda: registry.nodes(namespace, "web", "80") == nodes(*addresses), timeout=5, interval=0.0005)
        latencies.append(time.monotonic() - written)
        assert heard.acquire(timeout=1)  # listeners hear of every change
    assert max(latencies) < 1.0, latencies
    kube.delete(endpoint_slice(namespace, "web-1", "web", []))
    wait_until(lambda: registry.nodes(namespace, "web", "80") == ())
    kube.delete(service(namespace, "web"))
    wait_until(lambda: registry.nodes(namespace, "web", "80") is None)


def test_endpoints_resource_via_kubeconfig(kube, namespace, registries):
    for i in range(25):
        kube.apply(endpoints(namespace, f"svc-{i}", [f"127.0.2.{i + 1}"], 8080,
                             not_ready=["127.0.3.1"]))
    registry = registries(timing=Timing(page_size=10), kubeconfig=kube.kubeconfig,
                          context="kproxy", namespace_pattern=namespace, resource="endpoints")
    wait_until(lambda: registry.ready)
    stats = registry.dump()["informers"]["endpoints"]
    assert stats["objects"] == 25 and stats["lists"] == 1
    assert registry.dump()["config"]["auth"] == "kubeconfig"
    for i in range(25):  # notReadyAddresses are never used
        assert registry.nodes(namespace, f"svc-{i}", "80") == nodes(f"127.0.2.{i + 1}")


# -- scoping: namespaces and label selectors --

def test_namespace_filtering_plain_name_and_regex(kube, namespace, registries):
    for suffix in ("a", "b", "ab"):
        kube.apply({"kind": "Namespace", "metadata": {"name": f"{namespace}-{suffix}"}})
        kube.apply(service(f"{namespace}-{suffix}", "web"))
        kube.apply(endpoint_slice(f"{namespace}-{suffix}", "web-1", "web", [ready("127.0.0.1")]))
    plain = registries(**admin(kube), namespace_pattern=f"{namespace}-a")
    regex = registries(**admin(kube), namespace_pattern=f"{namespace}-(a|b)")
    wait_until(lambda: plain.ready and regex.ready)
    assert f"/namespaces/{namespace}-a/" in plain.dump()["informers"]["endpoints"]["path"]
    assert "/namespaces/" not in regex.dump()["informers"]["endpoints"]["path"]  # cluster-wide
    assert [plain.nodes(f"{namespace}-{s}", "web", "80") is not None for s in ("a", "b", "ab")] == [True, False, False]
    assert [regex.nodes(f"{namespace}-{s}", "web", "80") is not None for s in ("a", "b", "ab")] == [True, True, False]
    # watched events respect the filter too
    kube.apply(endpoint_slice(f"{namespace}-ab", "web-1", "web", [ready("127.0.0.2")]))
    kube.apply(endpoint_slice(f"{namespace}-b", "web-1", "web", [ready("127.0.0.2")]))
    wait_until(lambda: regex.nodes(f"{namespace}-b", "web", "80") == nodes("127.0.0.2"))
    assert regex.nodes(f"{namespace}-ab", "web", "80") is None
    assert {k.split("/")[0] for k in regex.dump()["services"]} <= {f"{namespace}-a", f"{namespace}-b"}


def test_label_selector_goes_to_the_server(kube, namespace, registries):
    kube.apply(service(namespace, "blue"))
    kube.apply(service(namespace, "red"))
    kube.apply(endpoint_slice(namespace, "blue-1", "blue", [ready("127.0.0.1")], labels={"team": "blue"}))
    kube.apply(endpoint_slice(namespace, "red-1", "red", [ready("127.0.0.2")], labels={"team": "red"}))
    registry = registries(**admin(kube), namespace_pattern=namespace, label_selector="team in (blue)")
    wait_until(lambda: registry.ready)
    assert "labelSelector" in registry._endpoints._params
    assert registry.nodes(namespace, "blue", "80") == nodes("127.0.0.1")
    assert registry.nodes(namespace, "red", "80") is None
    # relabelled: the server's watch moves them in and out of the selection
    kube.apply(endpoint_slice(namespace, "red-1", "red", [ready("127.0.0.2")], labels={"team": "blue"}))
    kube.apply(endpoint_slice(namespace, "blue-1", "blue", [ready("127.0.0.1")], labels={"team": "red"}))
    wait_until(lambda: registry.nodes(namespace, "red", "80") == nodes("127.0.0.2")
               and registry.nodes(namespace, "blue", "80") is None)


# -- faults --

def test_410_after_compaction_relists_without_lost_stale_or_empty_services(kube, namespace, registries, relay):
    for name in ("keep", "change", "gone"):
        kube.apply(service(namespace, name))
        kube.apply(endpoint_slice(namespace, f"{name}-1", name, [ready("127.0.0.1")]))
    registry = registries(**admin(kube, relay.url), namespace_pattern=namespace)
    wait_until(lambda: registry.ready)
    poller = Poller(registry, (namespace, "keep", "80"), (namespace, "change", "80"))
    try:
        relay.pause()  # the watch is down ...
        wait_until(lambda: registry.dump()["informers"]["endpoints"]["failing"])
        kube.apply(endpoint_slice(namespace, "change-1", "change", [ready("127.0.0.2")]))
        kube.delete(endpoint_slice(namespace, "gone-1", "gone", []))
        kube.delete(service(namespace, "gone"))
        kube.apply(service(namespace, "new"))
        kube.apply(endpoint_slice(namespace, "new-1", "new", [ready("127.0.0.3")]))
        kube.compact(kube.etcd_revision())  # ... and its resourceVersion is compacted away
        kube.restart_apiserver()            # (a fresh watch cache cannot replay it either)
        relay.resume()
        wait_until(lambda: registry.nodes(namespace, "new", "80") == nodes("127.0.0.3"), timeout=20)
        assert registry.nodes(namespace, "change", "80") == nodes("127.0.0.2")
        assert registry.nodes(namespace, "gone", "80") is None
        assert registry.nodes(namespace, "keep", "80") == nodes("127.0.0.1")
    finally:
        poller.stop()
    assert poller.bad == [] and poller.readings > 100
    stats = registry.dump()["informers"]
    assert stats["endpoints"]["relists"] >= 1 and stats["services"]["relists"] >= 1
    assert registry.stats().relists >= 2
    assert not stats["endpoints"]["failing"] and registry.dump()["state"] == "ok"


def test_the_first_list_comes_from_the_watch_cache_and_a_relist_after_410_from_etcd_in_pages(
        kube, namespace, relay):
    """As client-go's reflector: the first LIST asks for resourceVersion=0, which the API
    server answers from its watch cache in one piece; a relist after 410 Gone must not be
    older than what was seen, so it reads etcd (no resourceVersion), page by page."""
    for i in range(25):
        kube.apply(endpoints(namespace, f"svc-{i}", [f"127.0.2.{i + 1}"], 8080))
    registry = KubernetesRegistry(registry_config(**admin(kube, relay.url), namespace_pattern=namespace,
                                                  resource="endpoints"),
                                  timing=Timing(backoff_initial=0.2, backoff_cap=1.0, page_size=10))
    lists: list[dict[str, str]] = []
    get = registry._api.get

    def recording_get(path: str, params: dict[str, str], read_timeout: float):
        if path.endswith("/endpoints") and "watch" not in params:
            lists.append(dict(params))
        return get(path, params, read_timeout)

    registry._api.get = recording_get  # the registry's real connection, each LIST's query noted
    try:
        registry.start()
        wait_until(lambda: registry.ready)
        assert [(p.get("resourceVersion"), "continue" in p) for p in lists] == [("0", False)]
        assert registry.dump()["informers"]["endpoints"]["objects"] == 25
        relay.pause()
        wait_until(lambda: registry.dump()["informers"]["endpoints"]["failing"])
        kube.apply(endpoints(namespace, "svc-0", ["127.0.4.1"], 8080))
        kube.compact(kube.etcd_revision())
        kube.restart_apiserver()
        relay.resume()
        wait_until(lambda: registry.nodes(namespace, "svc-0", "8080") == nodes("127.0.4.1"), timeout=20)
        relist = lists[1:]
        assert [(p.get("resourceVersion"), "continue" in p, p["limit"]) for p in relist] == [
            (None, False, "10"), (None, True, "10"), (None, True, "10")]
        assert registry.dump()["informers"]["endpoints"]["relists"] == 1
        assert all(registry.nodes(namespace, f"svc-{i}", "8080") == nodes(f"127.0.2.{i + 1}") for i in range(1, 25))
    finally:
        registry.stop()


def test_the_first_sync_builds_each_view_once_with_its_service_ports(kube, namespace, registries):
    """The endpoints' first list waits for the Services' (whichever comes first), so the
    snapshot is built once: not from the endpoints' ports first and again when the
    Services arrive (on 5,000 Services, building every view twice doubled the sync)."""
    for i in range(20):
        kube.apply(service(namespace, f"web-{i}", ports=(("http", 80),)))
        kube.apply(endpoint_slice(namespace, f"web-{i}-1", f"web-{i}", [ready("127.0.0.1")]))
    kube.apply(service(namespace, "idle"))
    registry = registries(**admin(kube), namespace_pattern=namespace)
    wait_until(lambda: registry.ready)
    assert registry.changes == 1
    services = registry.dump()["services"]
    assert len(services) == 21 and {s["port_source"] for s in services.values()} == {"service"}
    assert registry.nodes(namespace, "web-7", "80") == nodes("127.0.0.1")
    assert registry.nodes(namespace, "idle", "80") == ()


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_apiserver_restart_keeps_last_nodes_and_resumes(kube, namespace, registries, relay):
    kube.apply(service(namespace, "web"))
    kube.apply(endpoint_slice(namespace, "web-1", "web", [ready("127.0.0.1")]))
    registry = registries(**admin(kube, relay.url), namespace_pattern=namespace)
    wait_until(lambda: registry.ready)
    poller = Poller(registry, (namespace, "web", "80"))
    try:
        stopping = threading.Thread(target=kube.stop_apiserver)
        stopping.start()  # SIGTERM: the server stops accepting at once ...
        wait_until(lambda: not accepts(kube.port))
        # ... but v1.20 holds open watches until it is SIGKILLed 20 s later; end ours now
        relay.cut()
        stopping.join(30)
        wait_until(lambda: registry.dump()["informers"]["endpoints"]["failing"])
        dump = registry.dump()
        assert dump["state"] == "degraded" and dump["ready"]
        assert dump["informers"]["endpoints"]["last_error"]
        assert registry.nodes(namespace, "web", "80") == nodes("127.0.0.1")
        kube.start_apiserver()
        kube.apply(endpoint_slice(namespace, "web-1", "web", [ready("127.0.0.1"), ready("127.0.0.2")]))
        wait_until(lambda: registry.nodes(namespace, "web", "80") == nodes("127.0.0.1", "127.0.0.2"), timeout=20)
    finally:
        poller.stop()
    assert poller.bad == []
    assert registry.dump()["state"] == "ok"


def service_account(kube: KubeAPIServer, namespace: str) -> dict:
    """A ServiceAccount ``sd`` allowed to list and watch discovery objects in ``namespace``
    (a Role + RoleBinding in the one watched namespace is enough RBAC)."""
    kube.apply({"kind": "Role", "metadata": {"name": "sd", "namespace": namespace}, "rules": [
        {"apiGroups": ["", "discovery.k8s.io"], "resources": ["endpoints", "endpointslices", "services"],
         "verbs": ["list", "watch"]}]})
    kube.apply({"kind": "RoleBinding", "metadata": {"name": "sd", "namespace": namespace},
                "subjects": [{"kind": "ServiceAccount", "name": "sd", "namespace": namespace}],
                "roleRef": {"kind": "Role", "name": "sd", "apiGroup": "rbac.authorization.k8s.io"}})
    account = {"kind": "ServiceAccount", "metadata": {"name": "sd", "namespace": namespace}}
    kube.apply(account)
    return account


def revoke(kube: KubeAPIServer, account: dict, token: str) -> None:
    """Delete the account, which revokes every token of it, and wait until the server
    rejects ``token`` (it caches a successful authentication for 10 s)."""
    kube.delete(account)
    namespace = account["metadata"]["namespace"]
    wait_until(lambda: kube.request("GET", f"/api/v1/namespaces/{namespace}/endpoints",
                                    token=token).status_code == 401, timeout=20, interval=0.5)


class TokenFile:
    """A token file replaced as a secret-syncing sidecar does: a new file renamed over it."""

    def __init__(self, path: Path, token: str):
        self.path = path
        self.write(token)

    def write(self, token: str) -> None:
        self.path.with_name(self.path.name + ".new").write_text(token)
        os.replace(self.path.with_name(self.path.name + ".new"), self.path)


# every failure waits 24-36 s: the backoff at its cap, as after minutes of failing, from
# the first 401 on; a registry that waited it out would miss the 10 s bound by far. The
# server ends each watch after 2 s (as it does after 5-10 min by default), so the next
# request, with the revoked token, comes soon
CAPPED = Timing(backoff_initial=30.0, backoff_cap=30.0, watch_timeout=(2, 2))


@pytest.mark.parametrize("shape", ["file", "projected-volume"])
def test_revoked_token_keeps_nodes_then_rotated_token_file_recovers(
        kube, namespace, registries, tmp_path, caplog, shape):
    """While the token is revoked the last known nodes serve; once the file holds a valid
    token, the current endpoints are routed within 10 s, however long the backoff."""
    account = service_account(kube, namespace)
    first = kube.create_token(namespace, "sd")
    tokens = TokenFile(tmp_path / "token", first) if shape == "file" else ProjectedVolume(tmp_path / "sa", first)
    kube.apply(service(namespace, "web"))
    kube.apply(endpoint_slice(namespace, "web-1", "web", [ready("127.0.0.1")]))
    with caplog.at_level(logging.DEBUG, logger="kproxy"):
        registry = registries(timing=CAPPED, api_server=kube.url, token_file=str(tokens.path),
                              ca_file=kube.ca_file, namespace_pattern=namespace)
        wait_until(lambda: registry.ready)
        assert registry.dump()["warnings"] == []
        revoke(kube, account, first)
        reflectors = lambda: registry.dump()["informers"].values()
        wait_until(lambda: all(i["last_status"] == 401 for i in reflectors()))
        dump = registry.dump()
        assert dump["state"] == "degraded" and "401" in dump["informers"]["endpoints"]["last_error"]
        assert all(i["state"] == "backoff" for i in reflectors())
        kube.apply(endpoint_slice(namespace, "web-1", "web", [ready("127.0.0.2")]))  # unseen so far
        assert registry.nodes(namespace, "web", "80") == nodes("127.0.0.1")  # the last known nodes stay
        kube.apply(account)
        second = kube.create_token(namespace, "sd")
        tokens.write(second)
        replaced = time.monotonic()
        wait_until(lambda: registry.nodes(namespace, "web", "80") == nodes("127.0.0.2")
                   and registry.dump()["state"] == "ok", timeout=10, interval=0.01)
        elapsed = time.monotonic() - replaced
        print(f"{shape}: the new endpoints routed {elapsed:.2f} s after the token was replaced")
        kube.apply(endpoint_slice(namespace, "web-1", "web", [ready("127.0.0.3")]))  # watching again
        wait_until(lambda: registry.nodes(namespace, "web", "80") == nodes("127.0.0.3"))
        text = json.dumps(registry.dump())
    assert "the token file changed; retrying now" in caplog.text
    for token in (first, second):
        assert token not in text and token not in caplog.text


def test_a_watch_open_when_its_token_is_revoked_keeps_delivering(kube, namespace, registries, relay, tmp_path):
    """What kube-apiserver v1.20 does: it authenticates a request when it starts, so a
    watch opened before the revocation stays open and delivers every event; only new
    requests get 401. So the open watch is left alone, and its events are routed."""
    account = service_account(kube, namespace)
    first = kube.create_token(namespace, "sd")
    tokens = ProjectedVolume(tmp_path / "sa", first)
    kube.apply(service(namespace, "web"))
    kube.apply(endpoint_slice(namespace, "web-1", "web", [ready("127.0.0.1")]))
    registry = registries(api_server=relay.url, token_file=str(tokens.path), ca_file=kube.ca_file,
                          namespace_pattern=namespace)
    wait_until(lambda: registry.ready)
    revoke(kube, account, first)
    kube.apply(endpoint_slice(namespace, "web-1", "web", [ready("127.0.0.2")]))
    wait_until(lambda: registry.nodes(namespace, "web", "80") == nodes("127.0.0.2"), timeout=5)
    endpoints_reflector = registry.dump()["informers"]["endpoints"]
    assert endpoints_reflector["watch_restarts"] == 0 and endpoints_reflector["errors"] == 0
    assert registry.dump()["state"] == "ok"
    # the token replaced, then the watch cut: it comes back with the new token at once
    kube.apply(account)
    tokens.write(kube.create_token(namespace, "sd"))
    relay.cut()
    kube.apply(endpoint_slice(namespace, "web-1", "web", [ready("127.0.0.3")]))
    wait_until(lambda: registry.nodes(namespace, "web", "80") == nodes("127.0.0.3"), timeout=10)
    assert registry.dump()["informers"]["endpoints"]["last_status"] is None


def discovery_by_worker(gw: Any, until: Callable[[dict[int, dict]], bool], timeout: float) -> dict[int, dict]:
    """Ask ``/-/discovery`` over new connections (each may reach either worker) until
    ``until`` holds for the latest registry dump of every worker seen."""
    latest: dict[int, dict] = {}

    def check() -> bool:
        dump = session().get(gw.url + "/-/discovery", timeout=5).json()["registries"]["k"]
        latest[dump["pid"]] = dump
        return until(latest)
    wait_until(check, timeout=timeout, interval=0.01)
    return latest


def test_every_gunicorn_worker_routes_the_new_endpoints_within_10_s_of_a_token_swap(
        kube, namespace, relay, tmp_path, gateway_process):
    old_node, new_node = UpstreamServer(EchoApp("old")), UpstreamServer(EchoApp("new"))
    try:
        account = service_account(kube, namespace)
        first = kube.create_token(namespace, "sd")
        tokens = ProjectedVolume(tmp_path / "sa", first)
        kube.apply(service(namespace, "web"))
        kube.apply(endpoint_slice(namespace, "web-1", "web", [ready("127.0.0.1")], ports=(("http", old_node.port),)))
        gw = gateway_process("gunicorn", discovery_ini(kube, namespace, tokens.path, "web", api_server=relay.url,
                                                       kproxy={"workers": 2}))

        def answered_by() -> list[str]:
            """Which node answered 20 requests, each on a new connection (either worker)."""
            return [session().get(gw.url + "/x", headers={"Host": "web.test"}, timeout=5).json()["node"]
                    for _ in range(20)]
        wait_until(lambda: answered_by() == ["old"] * 20, timeout=30)
        discovery_by_worker(gw, lambda seen: len(seen) == 2 and all(d["state"] == "ok" for d in seen.values()), 30)

        revoke(kube, account, first)
        relay.cut()
        # both workers fail 6 times (0.8 + 1.6 + ... + 12.8 s): each now waits 20-31 s
        discovery_by_worker(gw, lambda seen: len(seen) == 2 and all(
            d["informers"]["endpoints"]["backoff_step"] >= 6 and d["informers"]["endpoints"]["last_status"] == 401
            for d in seen.values()), 60)
        kube.apply(account)
        second = kube.create_token(namespace, "sd")
        tokens.write(second)
        replaced = time.monotonic()
        kube.apply(endpoint_slice(namespace, "web-1", "web", [ready("127.0.0.1")], ports=(("http", new_node.port),)))
        new_address = [f"127.0.0.1:{new_node.port}"]
        discovery_by_worker(gw, lambda seen: len(seen) == 2 and all(
            d["state"] == "ok" and d["services"][f"{namespace}/web"]["ports"]["80"] == new_address
            for d in seen.values()), 10)
        elapsed = time.monotonic() - replaced
        print(f"gunicorn -w 2: every worker routes the new endpoints {elapsed:.2f} s after the token swap")
        assert answered_by() == ["new"] * 20
        old_node.stop()  # the old node dies: nothing is sent to it any more
        assert answered_by() == ["new"] * 20
        metrics = session().get(gw.url + "/-/metrics", timeout=5).text
    finally:
        old_node.stop()
        new_node.stop()
    gw.stop()
    for token in (first, second):
        assert token not in gw.logs() and token not in metrics
    assert "the token file changed; retrying now" in gw.logs() and "Traceback" not in gw.logs()


def test_tls_is_verified_whatever_requests_ca_bundle_says(kube, namespace, registries, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", kube.ca_file)  # must not make the server trusted
    monkeypatch.setenv("CURL_CA_BUNDLE", kube.ca_file)
    untrusted = registries(api_server=kube.url, token=kube.admin_token, namespace_pattern=namespace)
    wait_until(lambda: untrusted.dump()["informers"]["endpoints"]["last_error"])
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.dump()["informers"]["endpoints"]["last_error"]
    assert not untrusted.ready
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent/ca.pem")  # nor break an insecure one
    insecure = registries(api_server=kube.url, token=kube.admin_token, namespace_pattern=namespace,
                          insecure_skip_tls_verify="true")
    wait_until(lambda: insecure.ready)
    assert any("TLS verification" in w for w in insecure.dump()["warnings"])


def test_in_cluster_configuration(kube, namespace, registries, monkeypatch, tmp_path):
    """No api_server: the address comes from the pod's environment, as in a cluster."""
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(kube.port))
    token_file = tmp_path / "token"
    token_file.write_text(kube.admin_token + "\n")
    kube.apply(service(namespace, "web"))
    kube.apply(endpoint_slice(namespace, "web-1", "web", [ready("127.0.0.1")]))
    registry = registries(token_file=str(token_file), ca_file=kube.ca_file, namespace_pattern=namespace)
    wait_until(lambda: registry.ready)
    assert registry.nodes(namespace, "web", "80") == nodes("127.0.0.1")
    assert registry.dump()["config"]["auth"] == "token_file"
