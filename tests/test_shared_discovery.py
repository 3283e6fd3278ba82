"""Shared discovery (issue #15): with workers > 1, one discovery process holds the pod's
watches and feeds every worker (kproxy.discovery.shared). Against the real kube-apiserver:
watch connections counted from the pod's process group, each worker checked on a
connection pinned to it, the discovery process killed under traffic, workers restarted,
reloads, readiness, and no process left behind."""

from __future__ import annotations

import errno
import http.client
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from kproxy_tools.common import is_discovery_process, process_group

from .conftest import ROOT, EchoApp, GatewayProcess, discovery_ini, free_port, ini_lines, session, wait_until
from .test_discovery_kubernetes import TcpRelay
from .test_operations import Traffic

HOST = "echo.test"


def ini(kube, namespace: str, token_file: Path, workers: int, api_server: str | None = None,
        label_selector: str = "", extra_api: bool = False) -> str:
    text = discovery_ini(kube, namespace, token_file, host=HOST, api_server=api_server,
                         kproxy={"workers": workers, "threads": 4, "keepalive_timeout": 120},
                         registry={"label_selector": label_selector})
    if extra_api:
        text += "\n[service:extra]\nhost = extra.test\nnodes = 127.0.0.1:9\n\n[api:extra]\nservice = extra\npath = /\n"
    return text


def echo_service(kube, namespace: str, node_port: int) -> None:
    kube.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": namespace},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": node_port}]}})
    point_at(kube, namespace, node_port)


def point_at(kube, namespace: str, node_port: int) -> None:
    kube.apply({"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
                "metadata": {"name": "echo-1", "namespace": namespace,
                             "labels": {"kubernetes.io/service-name": "echo", "tier": "web"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": node_port}],
                "endpoints": [{"addresses": ["127.0.0.1"]}]})



@pytest.fixture
def nodes(upstream):
    return upstream(EchoApp("a")), upstream(EchoApp("b"))


# -- the pod's processes, from /proc --

def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def discovery_processes(pgid: int) -> list[int]:
    return [p for p in process_group(pgid) if is_discovery_process(p)]


def parent(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    except OSError:
        pass
    return inodes


def _tcp_table() -> list[tuple[int, int, str, int]]:
    """(local port, remote port, state, inode) of every IPv4 TCP socket."""
    rows = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            rows.append((int(parts[1].split(":")[1], 16), int(parts[2].split(":")[1], 16), parts[3], int(parts[9])))
    return rows


ESTABLISHED = "01"


def api_connections(pgid: int, api_port: int) -> int:
    """Established connections from the process group to the API server."""
    inodes = set().union(*(_socket_inodes(p) for p in process_group(pgid)))
    return sum(1 for _, remote, state, inode in _tcp_table()
               if remote == api_port and state == ESTABLISHED and inode in inodes)


def worker_pids(gw: GatewayProcess) -> list[int]:
    return sorted(p for p in process_group(gw.process.pid) if p != gw.process.pid and not is_discovery_process(p))


class Pinned:
    """One kept-alive connection to each worker, each found by which worker holds the
    server side of a new connection (/proc/net/tcp and the workers' fds)."""

    def __init__(self, gw: GatewayProcess, workers: int, timeout: float = 30.0):
        self.conns: dict[int, http.client.HTTPConnection] = {}
        # a worker accepts once it has booted: on a loaded machine the last one may take
        # seconds, so this tries for ``timeout`` seconds, not for a number of connections
        deadline = time.monotonic() + timeout
        while len(self.conns) < workers and time.monotonic() < deadline:
            pids = worker_pids(gw)
            conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
            conn.request("GET", "/-/healthz")
            local = conn.sock.getsockname()[1]
            response = conn.getresponse()
            response.read()
            inode = next((i for lport, rport, _, i in _tcp_table() if lport == gw.port and rport == local), None)
            pid = next((p for p in pids if inode in _socket_inodes(p)), None)
            if not response.will_close and pid is not None and pid not in self.conns:
                self.conns[pid] = conn
            else:
                conn.close()
                time.sleep(0.01)
        if len(self.conns) < workers:
            self.close()
            raise AssertionError(f"reached {len(self.conns)} of {workers} workers")

    def get(self, pid: int, path: str, host: str = HOST) -> tuple[int, bytes]:
        conn = self.conns[pid]
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read()

    def node(self, pid: int) -> str | None:
        status, body = self.get(pid, "/x")
        return json.loads(body)["node"] if status == 200 else None

    def every(self, path: str, host: str = HOST) -> dict[int, tuple[int, bytes]]:
        return {pid: self.get(pid, path, host) for pid in self.conns}

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()


def dump(gw: GatewayProcess) -> dict:
    return session().get(gw.url + "/-/discovery", timeout=10).json()["registries"]["k"]


def discovery_metrics(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if line.startswith("kproxy_discovery_"))


@pytest.fixture
def gateways(tmp_path) -> Iterator:
    """``start(kind, ini_text, env)``: a gateway; at the end each is stopped and no
    discovery process of its group survives it."""
    started: list[GatewayProcess] = []

    def start(kind: str, text: str, env: dict | None = None) -> GatewayProcess:
        path = tmp_path / f"{kind}-{len(started)}.ini"
        path.write_text(text)
        gw = GatewayProcess(kind, path, free_port(), env)
        started.append(gw)
        return gw.start()
    yield start
    for gw in started:
        gw.stop()


def stop_and_check_nothing_left(gw: GatewayProcess, discovery: list[int]) -> None:
    gw.stop()
    wait_until(lambda: not any(alive(p) for p in discovery) and not process_group(gw.process.pid), timeout=10)


# -- the tests --

@pytest.mark.parametrize("kind", ["gunicorn", "serve"])
def test_four_workers_hold_the_watches_of_one_and_every_worker_routes_each_change(
        kube, namespace, token_file, nodes, gateways, kind):
    a, b = nodes
    echo_service(kube, namespace, a.port)

    single = gateways(kind, ini(kube, namespace, token_file, workers=1))
    wait_until(lambda: session().get(single.url + "/-/readyz", timeout=5).status_code == 200, timeout=30)
    assert discovery_processes(single.process.pid) == []  # one worker: discovery stays in it
    wait_until(lambda: api_connections(single.process.pid, kube.port) >= 2, timeout=10)
    time.sleep(0.5)
    one_worker = api_connections(single.process.pid, kube.port)
    stop_and_check_nothing_left(single, [])

    gw = gateways(kind, ini(kube, namespace, token_file, workers=4))
    pinned = Pinned(gw, 4)
    try:
        wait_until(lambda: all(pinned.node(pid) == "a" for pid in pinned.conns), timeout=30)
        assert {status for status, _ in pinned.every("/-/readyz").values()} == {200}
        discovery = discovery_processes(gw.process.pid)
        assert len(discovery) == 1, [cmdline(p) for p in process_group(gw.process.pid)]
        assert parent(discovery[0]) == gw.process.pid  # the master started it, beside the workers
        wait_until(lambda: api_connections(gw.process.pid, kube.port) == one_worker, timeout=10)
        assert api_connections(gw.process.pid, kube.port) == one_worker >= 2
        for pid in pinned.conns:  # a worker holds no connection to the API server
            assert not _socket_inodes(pid) & {i for _, r, _, i in _tcp_table() if r == kube.port}

        point_at(kube, namespace, b.port)
        wait_until(lambda: all(pinned.node(pid) == "b" for pid in pinned.conns), timeout=10)

        dumps = {pid: json.loads(body)["registries"]["k"] for pid, (_, body) in pinned.every("/-/discovery").items()}
        assert {d["pid"] for d in dumps.values()} == set(pinned.conns)  # who answered
        bodies = {json.dumps({k: v for k, v in d.items() if k not in ("pid", "worker")}, sort_keys=True)
                  for d in dumps.values()}
        assert len(bodies) == 1, "workers answer /-/discovery differently"
        first = next(iter(dumps.values()))
        assert first["discovery_pid"] == discovery[0] and first["informers"]["endpoints"]["lists"] == 1
        assert [d["worker"]["spawned"] for d in dumps.values()] == [0] * 4
        assert first["services"][f"{namespace}/echo"]["ports"]["http"] == [f"127.0.0.1:{b.port}"]
        assert kube.admin_token not in json.dumps(dumps)
        metrics = {pid: discovery_metrics(body.decode()) for pid, (_, body) in pinned.every("/-/metrics").items()}
        assert len({tuple(m) for m in metrics.values()}) == 1, "workers answer the discovery metrics differently"
        assert 'kproxy_discovery_endpoints{registry="k"} 1.0' in next(iter(metrics.values()))
    finally:
        pinned.close()
    logs = gw.logs()
    stop_and_check_nothing_left(gw, discovery)
    assert kube.admin_token not in logs and "Traceback" not in logs


def test_a_killed_discovery_process_is_replaced_and_no_request_fails_meanwhile(
        kube, namespace, token_file, nodes, gateways):
    a, b = nodes
    echo_service(kube, namespace, a.port)
    gw = gateways("gunicorn", ini(kube, namespace, token_file, workers=4))
    wait_until(lambda: session().get(gw.url + "/-/readyz", timeout=5).status_code == 200, timeout=30)
    traffic = Traffic(gw.url)
    pinned = None
    seen = []
    try:
        wait_until(lambda: len(traffic.answers) > 50)
        first, = discovery_processes(gw.process.pid)
        seen.append(first)
        os.kill(first, signal.SIGKILL)
        killed = time.monotonic()
        second = wait_until(lambda: [p for p in discovery_processes(gw.process.pid) if p != first], timeout=10)[0]
        seen.append(second)
        assert time.monotonic() - killed <= 10
        wait_until(lambda: dump(gw).get("discovery_pid") == second and dump(gw)["ready"], timeout=20)
        pinned = Pinned(gw, 4)
        wait_until(lambda: all(json.loads(body)["registries"]["k"]["worker"]["snapshot_from"] == second
                               for _, body in pinned.every("/-/discovery").values()), timeout=10)
        mark = len(traffic.answers)
        point_at(kube, namespace, b.port)  # made after the new process has listed
        wait_until(lambda: all(pinned.node(pid) == "b" for pid in pinned.conns), timeout=10)
        wait_until(lambda: traffic.nodes_since(mark) >= {"b"} and len(traffic.answers) > mark + 50)
    finally:
        if pinned:
            pinned.close()
        traffic.stop()
    assert traffic.errors == []
    assert {status for status, _ in traffic.answers} == {200}, "a request failed while discovery was replaced"
    assert len(discovery_processes(gw.process.pid)) == 1
    stop_and_check_nothing_left(gw, seen)


def test_restarted_workers_get_the_snapshot_without_a_list(kube, namespace, token_file, nodes, gateways):
    a, b = nodes
    echo_service(kube, namespace, a.port)
    gw = gateways("gunicorn", ini(kube, namespace, token_file, workers=4),
                  env={"GUNICORN_CMD_ARGS": "--max-requests 25"})
    wait_until(lambda: session().get(gw.url + "/-/readyz", timeout=5).status_code == 200, timeout=30)
    first, = discovery_processes(gw.process.pid)  # the master's: a worker starts the next
    os.kill(first, signal.SIGKILL)
    discovery = wait_until(lambda: [p for p in discovery_processes(gw.process.pid) if p != first], timeout=10)[0]
    wait_until(lambda: dump(gw).get("discovery_pid") == discovery and dump(gw)["ready"], timeout=20)
    before = set(worker_pids(gw))
    # the worker that started the discovery process crashes: the process outlives it
    starter = parent(discovery)
    assert starter in before
    os.kill(starter, signal.SIGKILL)
    for _ in range(300):  # new connections: every worker serves a share and is recycled
        status = session().get(gw.url + "/x", headers={"Host": HOST}, timeout=10).status_code
        assert status == 200
    wait_until(lambda: len(worker_pids(gw)) == 4, timeout=20)
    after = set(worker_pids(gw))
    assert not before & after, "every worker was restarted"
    # workers keep being recycled (a pinned connection would end with its worker): new
    # connections, which any worker may take, must all reach the new node
    point_at(kube, namespace, b.port)

    def answers() -> list[str]:
        replies = [session().get(gw.url + "/x", headers={"Host": HOST}, timeout=10) for _ in range(40)]
        assert {r.status_code for r in replies} == {200}
        return [r.json()["node"] for r in replies]
    wait_until(lambda: answers() == ["b"] * 40, timeout=10)
    d = dump(gw)
    assert discovery_processes(gw.process.pid) == [discovery] and d["discovery_pid"] == discovery
    assert d["informers"]["endpoints"]["lists"] == 1 and d["informers"]["services"]["lists"] == 1
    stop_and_check_nothing_left(gw, [discovery])


def test_reload_keeps_an_unchanged_registry_and_restarts_a_changed_one(kube, namespace, token_file, nodes, gateways):
    a, _ = nodes
    echo_service(kube, namespace, a.port)
    gw = gateways("gunicorn", ini(kube, namespace, token_file, workers=4))
    wait_until(lambda: session().get(gw.url + "/-/readyz", timeout=5).status_code == 200, timeout=30)
    discovery, = discovery_processes(gw.process.pid)
    wait_until(lambda: api_connections(gw.process.pid, kube.port) >= 2, timeout=10)
    connections = api_connections(gw.process.pid, kube.port)
    traffic = Traffic(gw.url)
    try:
        wait_until(lambda: len(traffic.answers) > 20)
        gw.config_path.write_text(ini(kube, namespace, token_file, workers=4, extra_api=True))
        gw.signal(signal.SIGHUP)
        pinned = Pinned(gw, 4)
        try:
            wait_until(lambda: all(status == 502 for status, _ in pinned.every("/", "extra.test").values()),
                       timeout=15)
        finally:
            pinned.close()
        d = dump(gw)
        assert d["informers"]["endpoints"]["lists"] == 1 and d["informers"]["endpoints"]["watch_restarts"] == 0
        assert api_connections(gw.process.pid, kube.port) == connections

        mark = len(traffic.answers)
        gw.config_path.write_text(ini(kube, namespace, token_file, workers=4, extra_api=True,
                                      label_selector="tier=web"))
        gw.signal(signal.SIGHUP)
        wait_until(lambda: dump(gw)["config"]["label_selector"] == "tier=web", timeout=15)
        d = dump(gw)
        assert d["informers"]["endpoints"]["lists"] == 1 and d["discovery_pid"] == discovery
        wait_until(lambda: len(traffic.answers) > mark + 50)
        # the old registry's watches end once no worker follows it (GRACE, 10 s)
        wait_until(lambda: api_connections(gw.process.pid, kube.port) == connections, timeout=30)
    finally:
        traffic.stop()
    assert traffic.errors == []
    assert {status for status, _ in traffic.answers} == {200}, "a request failed during a reload"
    stop_and_check_nothing_left(gw, [discovery])


def test_every_worker_is_not_ready_until_it_has_the_snapshot(kube, namespace, token_file, nodes, gateways):
    a, _ = nodes
    echo_service(kube, namespace, a.port)
    relay = TcpRelay(kube.port)
    try:
        relay.pause()  # the API server cannot be reached: nothing lists
        gw = gateways("gunicorn", ini(kube, namespace, token_file, workers=4, api_server=relay.url))
        pinned = Pinned(gw, 4)
        try:
            for status, body in pinned.every("/-/readyz").values():
                assert status == 503, body
            for status, _ in pinned.every("/x").values():
                assert status == 503
            relay.resume()
            wait_until(lambda: all(status == 200 for status, _ in pinned.every("/-/readyz").values()), timeout=30)
            assert all(pinned.node(pid) == "a" for pid in pinned.conns)
        finally:
            pinned.close()
        discovery = discovery_processes(gw.process.pid)
        stop_and_check_nothing_left(gw, discovery)
    finally:
        relay.close()


def test_a_worker_loads_no_kubernetes_client_and_the_discovery_process_ends_with_its_master(
        kube, namespace, token_file, nodes, tmp_path):
    """A stand-in master (this script's parent) forks one worker that follows the
    registry; the worker must route without the Kubernetes client, the reflector, the
    API connection or requests (and the codecs its charset detector loads) in its modules; once the master exits, so does the discovery process."""
    a, _ = nodes
    echo_service(kube, namespace, a.port)
    config = tmp_path / "kproxy.ini"
    config.write_text(ini(kube, namespace, token_file, workers=4))
    directory = tmp_path / "pod"
    directory.mkdir(mode=0o700)
    script = textwrap.dedent(f"""
        import json, os, sys, time
        pid = os.fork()
        if pid == 0:
            from kproxy.config import load
            from kproxy.discovery.shared import SharedRegistry
            import kproxy.app  # all a worker routes with
            registry = SharedRegistry(load({str(config)!r}).registries["k"], {str(directory)!r})
            registry.start()
            for _ in range(600):
                if registry.ready:
                    break
                time.sleep(0.05)
            nodes = registry.nodes({namespace!r}, "echo", "http")
            heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("kubernetes", "requests")
                           or m in ("kproxy.discovery.kubernetes", "kproxy.discovery.reflector",
                                    "kproxy.discovery.apiserver"))
            print(json.dumps({{"ready": registry.ready, "nodes": [n.address for n in nodes or ()],
                              "heavy": heavy, "discovery": registry.discovery_pid}}), flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.splitlines()[-1])
    assert answer["ready"] and answer["nodes"] == [f"127.0.0.1:{a.port}"]
    assert answer["heavy"] == []
    wait_until(lambda: not alive(answer["discovery"]), timeout=10)
    assert not (directory / "socket").exists()


def test_a_worker_keeps_the_node_tuples_of_unchanged_services_through_deltas_and_new_snapshots(tmp_path):
    """The frames a discovery process sends, applied by a worker's registry: a delta changes
    only what it names, a removed Service is gone, the worker's compact snapshot is
    rewritten once changes pile up, and a new discovery process's full snapshot replaces
    it; through all of it an unchanged Service keeps its node tuple (the balancer keeps
    its state by it)."""
    from kproxy.config import RegistryConfig
    from kproxy.discovery.endpoints import ServiceView
    from kproxy.discovery.shared import SharedRegistry, frame, full_body, record, encode_view
    from kproxy.node import Node, Placement

    def view(i: int, *hosts: str) -> ServiceView:
        nodes = tuple(Node(h, 8080) for h in hosts or [f"10.0.{i >> 8}.{i & 255}", "10.1.0.1"])
        return ServiceView({"8080": nodes}, nodes, "endpoints", None)

    views = {("ns", f"svc-{i:04d}"): view(i) for i in range(1000)}
    views[("ns", "mixed")] = ServiceView({"http": (Node("fd00::1", 80), Node("10.0.0.1", 80, 3, Placement("z"), True))},
                                         None, "service", (("http", 80),))
    registry = SharedRegistry(RegistryConfig("k", "kubernetes"), str(tmp_path))
    registry._apply(frame("full", 1, [full_body(views)]), first=True)
    assert registry.ready and len(registry._snapshot) == 1001
    kept = registry.nodes("ns", "svc-0001", "8080")
    assert [n.address for n in kept] == ["10.0.0.1:8080", "10.1.0.1:8080"]
    assert registry.nodes("ns", "mixed", "http") == views[("ns", "mixed")].ports["http"]
    assert registry.nodes("ns", "svc-0001", "9999") == kept  # any port, as in-process discovery
    assert registry.nodes("ns", "nothing", "8080") is None and registry.nodes("other", "svc-0001", "8080") is None

    registry._apply(frame("delta", 2, [record(("ns", "svc-0002"), encode_view(view(2, "10.9.9.9"))),
                                       record(("ns", "svc-0003"), b""),
                                       record(("new", "a"), encode_view(view(0, "10.8.8.8")))]), first=False)
    assert registry.nodes("ns", "svc-0001", "8080") is kept
    assert [n.address for n in registry.nodes("ns", "svc-0002", "8080")] == ["10.9.9.9:8080"]
    assert registry.nodes("ns", "svc-0003", "8080") is None
    assert [n.address for n in registry.nodes("new", "a", "8080")] == ["10.8.8.8:8080"]
    assert len(registry._snapshot) == 1001

    for round_ in range(3):  # more changes than a quarter of the snapshot: it is rewritten
        registry._apply(frame("delta", 3 + round_, [record(("ns", f"svc-{i:04d}"), encode_view(view(i, "10.7.7.7")))
                                                    for i in range(100 + 100 * round_, 200 + 100 * round_)]),
                        first=False)
    assert not registry._snapshot.changes, "the changes were not folded into the snapshot"
    assert registry.nodes("ns", "svc-0001", "8080") is kept
    assert [n.address for n in registry.nodes("ns", "svc-0250", "8080")] == ["10.7.7.7:8080"]
    assert registry.nodes("ns", "svc-0003", "8080") is None and len(registry._snapshot) == 1001

    # a new discovery process: its full snapshot, with svc-0001 as it was and svc-0002 changed back
    views[("ns", "svc-0002")] = view(2, "10.6.6.6")
    registry._apply(frame("full", 1, [full_body(views)]), first=False)
    assert registry.nodes("ns", "svc-0001", "8080") is kept
    assert [n.address for n in registry.nodes("ns", "svc-0002", "8080")] == ["10.6.6.6:8080"]
    assert registry.nodes("new", "a", "8080") is None and registry.nodes("ns", "svc-0003", "8080") is not None
    assert registry.dump()["worker"]["services"] == 1001


# -- active health checks, once per pod (issue #16) --

class Checked:
    """A node that echoes requests and answers ``/healthz`` with ``status``, counting the
    checks it gets."""

    def __init__(self, name: str):
        self.echo = EchoApp(name)
        self.status = "200 OK"
        self.checks = 0
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        if environ["PATH_INFO"] != "/healthz":
            return self.echo(environ, start_response)
        with self._lock:
            self.checks += 1
        start_response(self.status, [("Content-Length", "0")])
        return []


HEALTH = {"health_check_path": "/healthz", "health_check_interval": 0.2, "health_check_timeout": 0.1,
          "unhealthy_threshold": 2, "healthy_threshold": 2}


def static_ini(nodes, workers: int, health: bool = True) -> str:
    return f"""
[kproxy]
workers = {workers}
threads = 4
keepalive_timeout = 120

[service:echo]
host = {HOST}
nodes = {" ".join(f"127.0.0.1:{n.port}" for n in nodes)}
{ini_lines(HEALTH) if health else ""}
[api:echo]
service = echo
path = /
"""


def health_dumps(pinned: Pinned) -> dict[int, dict]:
    return {pid: json.loads(body)["health_checks"]["echo"] for pid, (_, body) in pinned.every("/-/discovery").items()}


def checks_metric(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kproxy_health_checks_total{") and 'service="echo"' in line)


@pytest.mark.parametrize("kind", ["gunicorn", "serve"])
def test_four_workers_check_each_node_once_per_interval_and_all_follow_the_verdict(upstream, gateways, kind):
    good, flaky = Checked("good"), Checked("flaky")
    flaky.status = "500 Internal Server Error"
    servers = upstream(good), upstream(flaky)
    gw = gateways(kind, static_ini(servers, workers=4))
    pinned = Pinned(gw, 4)
    try:
        def every_worker_sends_to(names: set[str]) -> bool:
            return all({pinned.node(pid) for _ in range(6)} == names for pid in pinned.conns)
        wait_until(lambda: every_worker_sends_to({"good"}), timeout=15)

        # one checker per pod: 0.2 s apart, whatever the number of workers (4 would be ~4 x)
        before, started = (good.checks, flaky.checks), time.monotonic()
        time.sleep(3)
        rounds = (time.monotonic() - started) / HEALTH["health_check_interval"]
        for server, checks in zip((good, flaky), before):
            assert rounds / 3 <= server.checks - checks <= rounds * 1.5, (server.checks - checks, rounds)

        discovery, = discovery_processes(gw.process.pid)
        assert parent(discovery) == gw.process.pid  # checks alone are work enough to start it with the pod
        dumps = health_dumps(pinned)
        assert {d["checked_by"] for d in dumps.values()} == {discovery}
        assert all(d["connected"] and d["nodes"][f"127.0.0.1:{servers[1].port}"]["last"] == "fail: status 500"
                   for d in dumps.values())
        # counted once, where the checks run: the metric is the checks the nodes got
        counted = checks_metric(session().get(gw.url + "/-/metrics", timeout=5).text)
        assert abs(counted - (good.checks + flaky.checks)) <= 4, (counted, good.checks, flaky.checks)

        flaky.status = "200 OK"
        wait_until(lambda: every_worker_sends_to({"good", "flaky"}), timeout=15)
    finally:
        pinned.close()
    logs = gw.logs()
    stop_and_check_nothing_left(gw, [discovery])
    assert "Traceback" not in logs


def test_a_pod_with_nothing_to_discover_or_check_runs_no_discovery_process(upstream, gateways):
    gw = gateways("gunicorn", static_ini([upstream(EchoApp("a"))], workers=2, health=False))
    wait_until(lambda: session().get(gw.url + "/-/readyz", timeout=5).status_code == 200, timeout=30)
    for _ in range(10):
        assert session().get(gw.url + "/x", headers={"Host": HOST}, timeout=5).json()["node"] == "a"
    time.sleep(1.0)  # longer than a discovery process takes to appear
    assert discovery_processes(gw.process.pid) == []
    assert len(worker_pids(gw)) == 2


def test_a_node_stays_out_while_the_discovery_process_is_replaced(upstream, gateways):
    """The verdict outlives the process that made it: workers keep it while no discovery
    process runs, and the new one starts from it, so the broken node never gets a request."""
    good, flaky = Checked("good"), Checked("flaky")
    flaky.status = "500 Internal Server Error"
    servers = upstream(good), upstream(flaky)
    gw = gateways("gunicorn", static_ini(servers, workers=4))
    pinned = Pinned(gw, 4)
    try:
        wait_until(lambda: all(pinned.node(pid) == "good" for pid in pinned.conns for _ in range(4)), timeout=15)
        first, = discovery_processes(gw.process.pid)
        os.kill(first, signal.SIGKILL)
        answers = []
        deadline = time.monotonic() + 4  # past the new process's start and first rounds
        while time.monotonic() < deadline:
            answers += [pinned.node(pid) for pid in pinned.conns]
        second, = [p for p in discovery_processes(gw.process.pid) if p != first]
        assert set(answers) == {"good"}, answers.count("flaky")
        assert {d["checked_by"] for d in health_dumps(pinned).values()} == {second}
    finally:
        pinned.close()
    stop_and_check_nothing_left(gw, [first, second])


@pytest.mark.parametrize("workers", [1, 4])
def test_a_reload_keeps_an_unhealthy_node_out(upstream, gateways, workers):
    """The checkers of the new config start from the old ones' verdict: one worker's own
    checker (without that, a fresh one let the node back in: 174 requests), or, with four
    workers, the pod's (the same checks, kept across the reload; the worker's copy of its
    verdict closes a window of milliseconds that this test does not resolve)."""
    good, flaky = Checked("good"), Checked("flaky")
    flaky.status = "500 Internal Server Error"
    servers = upstream(good), upstream(flaky)
    gw = gateways("gunicorn", static_ini(servers, workers).replace("health_check_interval = 0.2",
                                                                     "health_check_interval = 0.5"))
    pinned = Pinned(gw, workers)
    try:
        wait_until(lambda: all(pinned.node(pid) == "good" for pid in pinned.conns for _ in range(4)), timeout=15)
        gw.config_path.write_text(static_ini(servers, workers).replace("health_check_interval = 0.2",
                                                                       "health_check_interval = 0.5")
                                  + "\n[service:extra]\nhost = extra.test\nnodes = 127.0.0.1:9\n"
                                    "\n[api:extra]\nservice = extra\npath = /\n")
        gw.signal(signal.SIGHUP)
        answers = []
        deadline = time.monotonic() + 15
        while not all(pinned.get(pid, "/", "extra.test")[0] == 502 for pid in pinned.conns):
            assert time.monotonic() < deadline, "the reload did not take effect"
            answers += [pinned.node(pid) for pid in pinned.conns]
        reloaded = time.monotonic()
        while time.monotonic() < reloaded + 1.5:  # three intervals: a fresh checker would let it in
            answers += [pinned.node(pid) for pid in pinned.conns]
        assert set(answers) == {"good"}, answers.count("flaky")
    finally:
        pinned.close()
    stop_and_check_nothing_left(gw, discovery_processes(gw.process.pid))


def test_a_discovered_node_is_checked_once_per_pod_and_not_after_discovery_removed_it(
        kube, namespace, token_file, upstream, gateways):
    good, flaky = Checked("good"), Checked("flaky")
    flaky.status = "500 Internal Server Error"
    servers = upstream(good), upstream(flaky)
    kube.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": namespace},
                "spec": {"ports": [{"name": "http", "port": 80}]}})

    def slice_for(name: str, port: int) -> dict:
        return {"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
                "metadata": {"name": f"echo-{name}", "namespace": namespace,
                             "labels": {"kubernetes.io/service-name": "echo"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": port}],
                "endpoints": [{"addresses": ["127.0.0.1"]}]}
    for name, server in zip(("good", "flaky"), servers):
        kube.apply(slice_for(name, server.port))
    gw = gateways("gunicorn", discovery_ini(kube, namespace, token_file, host=HOST, cluster=HEALTH,
                                            kproxy={"workers": 2, "threads": 4, "keepalive_timeout": 120}))
    pinned = Pinned(gw, 2)
    try:
        wait_until(lambda: all(pinned.node(pid) == "good" for pid in pinned.conns for _ in range(4)), timeout=30)
        before, started = flaky.checks, time.monotonic()
        time.sleep(2)
        rounds = (time.monotonic() - started) / HEALTH["health_check_interval"]
        assert rounds / 3 <= flaky.checks - before <= rounds * 1.5  # 2 workers, one checker
        discovery, = discovery_processes(gw.process.pid)
        assert {d["checked_by"] for d in health_dumps(pinned).values()} == {discovery}

        kube.request("DELETE", f"/apis/discovery.k8s.io/v1beta1/namespaces/{namespace}/endpointslices/echo-flaky")
        wait_until(lambda: all(f"127.0.0.1:{servers[1].port}" not in d["nodes"]
                               for d in health_dumps(pinned).values()), timeout=10)
        gone = flaky.checks
        time.sleep(1)
        assert flaky.checks == gone, "a node discovery removed is still checked"
        assert good.checks > 0 and all(pinned.node(pid) == "good" for pid in pinned.conns)
    finally:
        pinned.close()
    stop_and_check_nothing_left(gw, [discovery])


def test_a_discovery_process_that_cannot_be_started_is_tried_again(tmp_path, monkeypatch, caplog):
    """Out of processes or memory, starting the discovery process fails: the worker's
    follower logs it, lives on and tries again, once a second (not in a tight loop)."""
    from kproxy.config import RegistryConfig
    from kproxy.discovery import shared
    from kproxy.discovery.shared import SharedRegistry
    real, attempts = subprocess.Popen, []

    def popen(*args, **kwargs):
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return real(*args, **kwargs)
    monkeypatch.setattr(shared.subprocess, "Popen", popen)
    registry = SharedRegistry(RegistryConfig("k", "kubernetes"), str(tmp_path))
    try:
        registry.start()
        wait_until(lambda: registry.connected, timeout=15)
    finally:
        registry.stop()
        if registry._child is not None:
            registry._child.terminate()
            registry._child.wait(10)
    assert len(attempts) == 3 and registry.spawned == 1
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert all(gap >= shared.SPAWN_INTERVAL * 0.9 for gap in gaps), gaps
    assert caplog.text.count("cannot start the discovery process") == 2


def test_a_worker_that_found_a_process_starting_replaces_it_at_once_when_it_dies(tmp_path, monkeypatch):
    """While the master's discovery process boots, workers find its lock held and wait; if
    it dies then, the next worker to look starts another as soon as the pod's backoff
    allows (at once here: no start on record). Finding one starting is not a start of the
    worker's own, and does not count against its one-a-second bound."""
    import fcntl

    from kproxy.config import RegistryConfig
    from kproxy.discovery import shared
    from kproxy.discovery.shared import SharedRegistry
    started = []
    monkeypatch.setattr(shared.subprocess, "Popen", lambda *args, **kwargs: started.append(args) or FakeChild())
    registry = SharedRegistry(RegistryConfig("k", "kubernetes"), str(tmp_path))
    booting = os.open(tmp_path / shared.LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(booting, fcntl.LOCK_EX)  # the master's process, still booting
    registry._elect()
    assert started == [] and registry.spawned == 0
    os.close(booting)  # it died before it listened
    registry._elect()
    assert len(started) == 1 and registry.spawned == 1
    registry._elect()  # the fake child holds no lock: its start is what keeps a second out
    assert len(started) == 1


class FakeChild:
    pid = 0

    def poll(self) -> None:
        return None


def test_a_discovery_process_that_keeps_dying_before_it_lists_is_started_ever_later(tmp_path, monkeypatch, caplog):
    """Four workers, and a discovery process that dies as soon as it starts (as one killed
    for memory while it lists a large cluster would): the pod waits 1, 2, 4 ... s between
    starts, whichever worker starts it, instead of LISTing the cluster again every time."""
    from kproxy.config import RegistryConfig
    from kproxy.discovery import shared
    from kproxy.discovery.shared import SharedRegistry
    real, starts = subprocess.Popen, []

    def popen(command, **kwargs):  # the lock is handed over as before; the process exits at once
        starts.append(time.monotonic())
        return real([sys.executable, "-c", "pass"], **kwargs)
    monkeypatch.setattr(shared.subprocess, "Popen", popen)
    workers = [SharedRegistry(RegistryConfig("k", "kubernetes"), str(tmp_path)) for _ in range(4)]
    try:
        for worker in workers:
            worker.start()
        time.sleep(6.5)
    finally:
        for worker in workers:
            worker.stop()
    gaps = [round(b - a, 2) for a, b in zip(starts, starts[1:])]
    assert len(starts) == 3, gaps  # at 0, 1 and 3 s; the next would be at 7 s
    assert gaps[0] >= shared.backoff(1) and gaps[1] >= shared.backoff(2), gaps
    assert "2 starts in a row ended before listing" in caplog.text


def test_a_discovery_process_that_listed_is_replaced_at_once(tmp_path, monkeypatch):
    from kproxy.discovery import shared
    started = []
    monkeypatch.setattr(shared.subprocess, "Popen", lambda *args, **kwargs: started.append(args) or FakeChild())
    for _ in range(3):  # three that died before they listed
        shared._write_starts(str(tmp_path), shared._read_starts(str(tmp_path))[0] + 1, time.monotonic())
    assert shared.start_process(str(tmp_path), os.getpid()) is None  # 4 s to wait
    shared.settled(str(tmp_path))  # what the next one writes once its first list is done
    assert shared.start_process(str(tmp_path), os.getpid()) is not None and len(started) == 1
