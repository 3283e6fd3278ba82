"""Discovery parts that need no Kubernetes: the store, the endpoint/port rules as pure
functions, and the reflector against what a real API server cannot produce (malformed
watch events: a clearly named fake on 127.0.0.1) or an API server that is not there."""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from kproxy.config import parse
from kproxy.discovery import create_registry
from kproxy.discovery.cache import Store
from kproxy.discovery.reflector import Timing
from kproxy.discovery.apiserver import ApiConnection
from kproxy.discovery.endpoints import build_view, keep_unchanged, trim_endpoints, trim_service, trim_slice
from kproxy.discovery import kubernetes
from kproxy.discovery.kubernetes import KubernetesRegistry
from kproxy.node import Node

from .conftest import wait_until

TOKEN = "s3cr3t-token-never-shown"


def registry_config(**keys: str):
    lines = "\n".join(f"{k} = {v}" for k, v in {"type": "kubernetes", **keys}.items())
    return parse(f"[registry:test]\n{lines}\n").registries["test"]


def meta(name: str, namespace: str = "ns", rv: str = "1", labels: dict | None = None) -> dict:
    m: dict[str, Any] = {"name": name, "namespace": namespace, "resourceVersion": rv}
    if labels:
        m["labels"] = labels
    return m


# -- the store --

def test_store_replace_reports_only_differences_and_swaps_atomically():
    store = Store(index=lambda o: o["svc"])
    a, b = {"metadata": meta("a"), "svc": "x"}, {"metadata": meta("b"), "svc": "x"}
    assert [k for k, _, _ in store.replace([a, b], "5")] == [("ns", "a"), ("ns", "b")]
    assert store.resource_version == "5"
    b2 = {"metadata": meta("b", rv="6"), "svc": "y"}
    changes = store.replace([a, b2], "6")
    assert changes == [(("ns", "b"), b, b2)]
    assert store.by_index("x") == [a] and store.by_index("y") == [b2]
    assert store.replace([], "7") == [(("ns", "a"), a, None), (("ns", "b"), b2, None)]
    assert store.keys() == [] and store.by_index("x") == []


def test_store_apply_events_and_index():
    store = Store(index=lambda o: o["svc"])
    obj = {"metadata": meta("a", rv="3"), "svc": "x"}
    assert store.apply("ADDED", obj) == (("ns", "a"), None, obj)
    assert store.resource_version == "3"
    moved = {"metadata": meta("a", rv="4"), "svc": "y"}
    store.apply("MODIFIED", moved)
    assert store.by_index("x") == [] and store.by_index("y") == [moved]
    assert store.apply("DELETED", {"metadata": meta("a")}) == (("ns", "a"), moved, None)
    assert store.apply("DELETED", {"metadata": meta("a")}) is None
    assert store.index_values() == []


# -- endpoint and port rules (pure) --

def slice_(name: str, service: str, endpoints: list, ports=(("http", 8080),), address_type="IPv4") -> dict:
    return trim_slice({
        "metadata": meta(name, labels={"kubernetes.io/service-name": service}),
        "addressType": address_type,
        "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
        "endpoints": endpoints,
    })


def ep(address: str, **conditions) -> dict:
    return {"addresses": [address], "conditions": conditions}


def service(name: str, ports) -> dict:
    return trim_service({"metadata": meta(name), "spec": {"ports": [
        {"name": n, "port": p, "protocol": proto} for n, p, proto in ports]}})


def test_view_merges_slices_dedupes_and_prefers_ready():
    slices = [
        slice_("a", "web", [ep("10.0.0.1", ready=True), ep("10.0.0.2"), ep("10.0.0.3", ready=False)]),
        slice_("b", "web", [ep("10.0.0.1", ready=True), ep("fd00::4", ready=True)], address_type="IPv6"),
    ]
    view = build_view(slices, service("web", [("http", 80, "TCP")]))
    assert view.ports["80"] == (Node("10.0.0.1", 8080), Node("10.0.0.2", 8080), Node("fd00::4", 8080))
    assert view.ports["http"] is view.ports["80"]


def test_view_falls_back_to_serving_terminating_never_not_ready():
    draining = [slice_("a", "web", [ep("10.0.0.1", ready=False, serving=True, terminating=True),
                                    ep("10.0.0.2", ready=False, serving=False, terminating=True),
                                    ep("10.0.0.3", ready=False)])]
    view = build_view(draining, service("web", [("http", 80, "TCP")]))
    assert view.ports["80"] == (Node("10.0.0.1", 8080, terminating=True),)  # shown as draining
    dead = [slice_("a", "web", [ep("10.0.0.2", ready=False, serving=False), ep("10.0.0.3", ready=False)])]
    assert build_view(dead, service("web", [("http", 80, "TCP")])).ports["80"] == ()


def test_view_maps_service_port_to_endpoint_port_by_name():
    slices = [slice_("a", "web", [ep("10.0.0.1")], ports=(("http", 8080), ("metrics", 9100)))]
    svc = service("web", [("http", 80, "TCP"), ("metrics", 9090, "TCP"), ("dns", 53, "UDP")])
    view = build_view(slices, svc)
    assert view.ports["80"] == (Node("10.0.0.1", 8080),)
    assert view.ports["9090"] == view.ports["metrics"] == (Node("10.0.0.1", 9100),)
    assert "8080" not in view.ports and "53" not in view.ports  # container port, UDP port


def test_view_without_service_matches_endpoint_ports():
    unnamed = [trim_endpoints({"metadata": meta("web"), "subsets": [
        {"addresses": [{"ip": "10.0.0.1"}], "notReadyAddresses": [{"ip": "10.0.0.9"}], "ports": [{"port": 8080}]}]})]
    view = build_view(unnamed, None)
    assert view.source == "endpoints" and view.any_port == (Node("10.0.0.1", 8080),)
    named = [slice_("a", "web", [ep("10.0.0.1")], ports=(("http", 8080), ("admin", 9000)))]
    view = build_view(named, None)
    assert view.ports["http"] == view.ports["8080"] == (Node("10.0.0.1", 8080),)
    assert view.any_port is None and "80" not in view.ports


def test_unchanged_nodes_keep_their_tuple_object():
    slices = [slice_("a", "web", [ep("10.0.0.1")])]
    before = build_view(slices, None)  # endpoints listed before Services: matched by endpoint port
    assert before.ports["http"] is before.ports["8080"]
    after = keep_unchanged(build_view(slices, service("web", [("http", 80, "TCP")])), before)
    assert after.ports["80"] is after.ports["http"] is before.ports["http"]
    grown = keep_unchanged(build_view([slice_("a", "web", [ep("10.0.0.1"), ep("10.0.0.2")])],
                              service("web", [("http", 80, "TCP")])), after)
    assert grown.ports["80"] is not after.ports["80"] and len(grown.ports["80"]) == 2
    assert keep_unchanged(build_view(slices, service("web", [("http", 80, "TCP")])), after) is after


def test_slice_without_service_label_is_ignored():
    assert trim_slice({"metadata": meta("orphan"), "endpoints": [], "ports": []}) is None


# -- a fake API server, only for what a real one never sends --

class FakeApiServer:
    """A FAKE Kubernetes API server on 127.0.0.1 (not used anywhere else): it serves one
    Endpoints list and a watch stream of malformed events followed by a valid one, since
    a real API server cannot be made to send broken events. It forbids Services, as the
    seed's RBAC does; ``services_hang`` holds their list unanswered instead (a real server
    cannot be made to stall one resource and answer another)."""

    def __init__(self, watch_lines: list[bytes], services_hang: bool = False):
        self.watch_lines = watch_lines
        self.requests: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.closing = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake.requests.append(self.path)
                fake.headers.append(dict(self.headers))
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                if url.path.endswith("/services"):
                    if services_hang:
                        fake.closing.wait(30)
                    return self.json(403, {"kind": "Status", "code": 403, "reason": "Forbidden",
                                           "message": "services is forbidden"})
                if "watch" not in query:
                    return self.json(200, {"kind": "EndpointsList", "metadata": {"resourceVersion": "10"},
                                           "items": [{"metadata": meta("web", "fake", "10"), "subsets": [
                                               {"addresses": [{"ip": "127.0.0.1"}], "ports": [{"port": 8080}]}]}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for line in fake.watch_lines if len(fake.requests) <= 3 else []:
                    self.chunk(line + b"\n")
                fake.closing.wait(30)  # hold the watch open, like a quiet API server
                self.chunk(b"")

            def chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def json(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def registry(self) -> KubernetesRegistry:
        """A registry of its Endpoints in namespace "fake" (not started)."""
        return KubernetesRegistry(registry_config(api_server=self.url, token=TOKEN, namespace_pattern="fake",
                                                  resource="endpoints"))

    def stop(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


MALFORMED = [
    b"this is not json",
    b"[1, 2, 3]",
    b'{"type": "ADDED"}',
    b'{"type": "SURPRISE", "object": {"metadata": {"name": "web", "namespace": "fake"}}}',
    b'{"type": "ADDED", "object": {"kind": "Endpoints"}}',
    b'{"type": "BOOKMARK", "object": {"metadata": {}}}',
    b'{"type": "MODIFIED", "object": {"metadata": {"name": "web", "namespace": "fake", '
    b'"resourceVersion": "11"}, "subsets": "not a list of subsets"}}',
]
VALID = (b'{"type": "MODIFIED", "object": {"metadata": {"name": "web", "namespace": "fake", '
         b'"resourceVersion": "12"}, "subsets": [{"addresses": [{"ip": "127.0.0.1"}, {"ip": "127.0.0.2"}], '
         b'"ports": [{"port": 8080}]}]}}')


def test_malformed_watch_events_are_skipped_and_the_reflector_goes_on(caplog):
    fake = FakeApiServer(MALFORMED + [VALID])
    registry = fake.registry()
    try:
        with caplog.at_level(logging.DEBUG, logger="kproxy"):
            registry.start()
            wait_until(lambda: registry.ready)
            wait_until(lambda: len(registry.nodes("fake", "web", "80") or ()) == 2)
        assert registry.nodes("fake", "web", "80") == (Node("127.0.0.1", 8080), Node("127.0.0.2", 8080))
        stats = registry.dump()["informers"]["endpoints"]
        assert stats["malformed_events"] == len(MALFORMED)
        assert stats["state"] == "watching" and not stats["failing"] and stats["errors"] == 0
        assert stats["resource_version"] == "12" and stats["events"] == 1
        assert sum("skipped a malformed" in r.getMessage() for r in caplog.records) == len(MALFORMED)
        # the fake forbids services, as the seed's RBAC does: a warning, and still ready
        assert any("Services are not readable" in w for w in registry.dump()["warnings"])
        assert fake.headers[0]["Authorization"] == f"Bearer {TOKEN}"
        assert TOKEN not in json.dumps(registry.dump()) and TOKEN not in caplog.text
        # stop() ends the threads promptly although the watch is still open
        started = time.monotonic()
        registry.stop()
        assert time.monotonic() - started < 2
        assert registry.dump()["informers"]["endpoints"]["state"] == "stopped"
    finally:
        registry.stop()
        fake.stop()


def test_forbidden_services_do_not_hold_the_first_build(monkeypatch):
    monkeypatch.setattr(kubernetes, "SERVICES_WAIT", 60.0)  # a wait would outlast wait_until
    fake = FakeApiServer([])
    registry = fake.registry()
    try:
        registry.start()
        wait_until(lambda: registry.ready)
        assert registry.nodes("fake", "web", "8080") == (Node("127.0.0.1", 8080),)
    finally:
        registry.stop()
        fake.stop()


def test_a_services_list_that_hangs_holds_the_first_build_for_services_wait_only(monkeypatch):
    monkeypatch.setattr(kubernetes, "SERVICES_WAIT", 0.3)
    fake = FakeApiServer([], services_hang=True)
    registry = fake.registry()
    try:
        registry.start()
        # routed from the endpoints' own ports while the Services are still listing
        wait_until(lambda: registry.nodes("fake", "web", "8080") == (Node("127.0.0.1", 8080),))
        assert not registry.ready and registry.dump()["informers"]["services"]["state"] == "listing"
        assert registry.dump()["services"]["fake/web"]["port_source"] == "endpoints"
    finally:
        fake.closing.set()  # answers the Services' list, so the thread ends
        registry.stop()
        fake.stop()


@pytest.mark.parametrize("enabled", [True, False])
def test_the_collector_is_off_while_a_list_is_trimmed_and_as_it_was_after(monkeypatch, enabled):
    """A first list allocates every object of the cluster at once; a garbage collection
    on each burst walked all of them again. An application's own choice stays."""
    seen: list[bool] = []

    def trim(obj):
        seen.append(gc.isenabled())
        return trim_endpoints(obj)

    monkeypatch.setattr(kubernetes, "trim_endpoints", trim)
    fake = FakeApiServer([])
    registry = fake.registry()
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        registry.start()
        wait_until(lambda: registry.ready)
        assert seen == [False]
        assert gc.isenabled() is enabled
    finally:
        registry.stop()
        fake.stop()
        (gc.enable if was else gc.disable)()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_api_server_backs_off_and_reports_without_token(caplog):
    config = registry_config(api_server=f"https://127.0.0.1:{closed_port()}", token=TOKEN,
                             insecure_skip_tls_verify="true")
    registry = create_registry(config)
    assert registry.dump()["state"] == "not started"  # construction starts nothing
    with caplog.at_level(logging.DEBUG, logger="kproxy"):
        registry.start()
        time.sleep(3.2)
        dump = registry.dump()
        registry.stop()
    endpoints = dump["informers"]["endpoints"]
    # 0.8 s doubling (with +-20 % jitter): attempts at about 0, 0.8, 2.4 s; never a hot loop
    assert 2 <= endpoints["errors"] <= 4, endpoints
    assert dump["state"] == "error" and not dump["ready"]
    assert "refused" in endpoints["last_error"].lower() and endpoints["failing"]
    assert endpoints["last_sync"] is None
    assert TOKEN not in json.dumps(dump) and TOKEN not in caplog.text
    assert dump["config"]["auth"] == "token" and "token" not in dump["config"]


def test_missing_token_file_is_an_error_state_not_a_crash(tmp_path):
    registry = create_registry(registry_config(api_server="https://127.0.0.1:1",
                                               token_file=str(tmp_path / "absent")))
    registry.start()
    try:
        wait_until(lambda: registry.dump()["informers"]["endpoints"]["last_error"])
        assert "cannot read token_file" in registry.dump()["informers"]["endpoints"]["last_error"]
    finally:
        registry.stop()


def test_disabled_registry_starts_nothing():
    registry = create_registry(registry_config(api_server="https://127.0.0.1:1", token=TOKEN, enabled="false"))
    threads = threading.active_count()
    registry.start()
    assert threading.active_count() == threads
    assert registry.ready and registry.nodes("a", "b", "80") is None
    assert registry.dump()["state"] == "disabled"
    registry.stop()



# -- a changed token file ends the backoff --

class ProjectedVolume:
    """A directory laid out as the kubelet writes a projected service-account volume:
    ``token`` links to ``..data/token``, ``..data`` to a timestamped directory; a new token
    goes into a new directory, a new link is renamed over ``..data`` (atomic), and the old
    directory is removed (kubelet's AtomicWriter)."""

    def __init__(self, root: Path, token: str):
        self.root = root
        root.mkdir()
        self._writes = 0
        self._current: Path | None = None
        self.write(token)
        (root / "token").symlink_to("..data/token")
        self.path = root / "token"

    def write(self, token: str) -> None:
        self._writes += 1
        directory = self.root / f"..2026_01_01_00_00_{self._writes:02d}.{os.getpid()}"
        directory.mkdir()
        (directory / "token").write_text(token)
        link = self.root / "..data_tmp"
        link.symlink_to(directory.name)
        os.replace(link, self.root / "..data")
        if self._current is not None:
            shutil.rmtree(self._current)
        self._current = directory


def test_credentials_mark_sees_a_projected_volume_swap_even_with_equal_size_and_times(tmp_path):
    volume = ProjectedVolume(tmp_path / "sa", "A" * 40)
    api = ApiConnection(registry_config(api_server="https://127.0.0.1:1", token_file=str(volume.path)))
    before = api.credentials_mark()
    assert api.credentials_mark() == before  # nothing changed: no retry
    stat = os.stat(volume.path)
    volume.write("B" * 40)
    os.utime(volume.path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert api.credentials_mark() != before
    assert "A" * 40 not in repr(api.credentials_mark()) and "B" * 40 not in repr(api.credentials_mark())
    # no token file (a fixed token): nothing to watch
    assert ApiConnection(registry_config(api_server="https://127.0.0.1:1", token=TOKEN)).credentials_mark() is None


def failing_registry(token_file: Path) -> KubernetesRegistry:
    """A registry whose every attempt fails (nothing listens), with a 30 s backoff from the
    first failure on: the backoff at its cap, as after minutes of failing."""
    config = registry_config(api_server=f"https://127.0.0.1:{closed_port()}", token_file=str(token_file),
                             insecure_skip_tls_verify="true")
    return KubernetesRegistry(config, timing=Timing(backoff_initial=30.0, backoff_cap=30.0))


def attempts(registry: KubernetesRegistry) -> int:
    return registry.dump()["informers"]["endpoints"]["errors"]


def test_a_replaced_token_file_ends_the_backoff_at_once(tmp_path, caplog):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    volume = ProjectedVolume(tmp_path / "sa", TOKEN)
    plain, projected = failing_registry(token_file), failing_registry(volume.path)
    try:
        with caplog.at_level(logging.DEBUG, logger="kproxy"):
            plain.start()
            projected.start()
            wait_until(lambda: attempts(plain) == 1 and attempts(projected) == 1)
            time.sleep(1)  # several polls of an unchanged file: no retry
            assert attempts(plain) == 1 and attempts(projected) == 1
            (tmp_path / "token.new").write_text(TOKEN + "-2")
            os.replace(tmp_path / "token.new", token_file)  # as a secret-syncing sidecar would
            volume.write(TOKEN + "-2")                       # as the kubelet rotates a projected token
            wait_until(lambda: attempts(plain) == 2 and attempts(projected) == 2, timeout=2)
            # a failure right after the change starts the schedule afresh (30 s here, 0.8 s by default)
            assert plain.dump()["informers"]["endpoints"]["backoff_step"] == 1
        assert "the token file changed; retrying now" in caplog.text
        assert TOKEN not in caplog.text and TOKEN not in json.dumps(plain.dump())
    finally:
        plain.stop()
        projected.stop()


def test_a_token_file_that_appears_ends_the_backoff_at_once(tmp_path):
    token_file = tmp_path / "token"
    registry = failing_registry(token_file)
    try:
        registry.start()
        wait_until(lambda: attempts(registry) == 1)
        assert "cannot read token_file" in registry.dump()["informers"]["endpoints"]["last_error"]
        token_file.write_text(TOKEN)
        wait_until(lambda: attempts(registry) == 2, timeout=2)
        assert "refused" in registry.dump()["informers"]["endpoints"]["last_error"].lower()
    finally:
        registry.stop()
