"""``kproxy demo``: the walkthrough on this machine, run as a user runs it.

The demo runs as a real subprocess (``python -m kproxy.cli demo``) with its own state
directory; the tests send the requests it prints, run the scale-out command it prints, and
check that Ctrl-C (SIGINT) and ``--stop`` leave no process and no listening port behind.
The Kubernetes tests need the test environment (built once, about 5 minutes): under CI=true
they fail without it, elsewhere they skip with the reason. The static fallback and the
unit tests run everywhere.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml
from werkzeug.test import Client

from kproxy import config as configmod
from kproxy_tools import demo as demomod
from kproxy_tools.common import terminate
from kproxy_tools.testenv import TestEnvUnavailable, provision

from .conftest import ROOT, free_port, session, wait_until

IN_CI = os.environ.get("CI") == "true"
READY_TIMEOUT = 180.0  # the binary is provisioned by the fixture; this covers a slow start


def _progress(message: str) -> None:
    sys.stderr.write(message + "\n")


@pytest.fixture(scope="module")
def kube_env() -> None:
    """The test Kubernetes environment is provisioned (built on first use, then cached)."""
    try:
        provision(log=_progress)
    except TestEnvUnavailable as e:
        if IN_CI:
            pytest.fail(f"CI must provide the kube-apiserver test environment: {e}")
        pytest.skip(f"kube-apiserver test environment unavailable: {e}")


class DemoRun:
    """``kproxy demo ARGS`` as a subprocess in its own session, its output collected."""

    def __init__(self, state_dir: Path, *args: str, env: dict[str, str] | None = None):
        self.state_dir = state_dir
        self.env = {**os.environ, "KPROXY_DEMO_DIR": str(state_dir), **(env or {})}
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kproxy.cli", "demo", *args], cwd=ROOT, env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if predicate(line):
                    return line
            if self.process.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"demo output has no such line (exit {self.process.poll()}):\n{self.output()}")

    def state(self) -> dict:
        return json.loads((self.state_dir / "state.json").read_text())

    def command(self, line: str) -> list[str]:
        """A printed ``kproxy ...`` command, run with this interpreter."""
        words = shlex.split(line)
        assert words[0] == "kproxy", line
        return [sys.executable, "-m", "kproxy.cli", *words[1:]]

    def run(self, line: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(line), cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def cleanup(self, state: dict | None) -> None:
        """After a failed test: stop the demo (it tears down), then anything left."""
        terminate(self.process, grace=90)
        if state:
            demomod._cleanup_leftovers(state)


def _printed_curl(demo: DemoRun) -> tuple[str, dict[str, str]]:
    """The seed's request as the demo printed it: (url, headers)."""
    line = demo.wait_for(lambda l: l.strip().startswith("curl http") and "/v1/anything" in l, 5).strip()
    words = shlex.split(line)
    assert words[0] == "curl" and words[2] == "-H" and words[4] == "-i", line
    name, _, value = words[3].partition(": ")
    return words[1], {name: value}


def _check_seed_answer(url: str, headers: dict[str, str]) -> None:
    r = session().get(url, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"args", "data", "files", "form", "headers", "json", "method", "origin", "url"}
    assert body["url"] == "http://sd.httpbin.org/anything"
    assert body["headers"]["Host"] == "sd.httpbin.org"
    assert body["headers"]["X-Forwarded-Host"] == "sd.httpbin.org"
    assert body["method"] == "GET" and body["args"] == {} and body["json"] is None
    assert r.headers["X-Kproxy-Upstream-Status"] == "200"


def _access_lines(demo: DemoRun) -> list[str]:
    return [l for l in demo.lines if '"GET /v1/anything" 200' in l]


def _both_nodes_answer(demo: DemoRun, url: str, headers: dict[str, str], nodes: list[str]) -> None:
    """Requests alternate over both nodes: the access log names each of them."""
    seen_before = len(_access_lines(demo))
    s = session()
    for _ in range(6):
        assert s.get(url, headers=headers, timeout=10).status_code == 200
    s.close()

    def named() -> set[str]:
        return {n for l in _access_lines(demo)[seen_before:] for n in nodes if f" {n} " in l}
    wait_until(lambda: named() == set(nodes), timeout=10)


def _ports(state: dict) -> list[int]:
    ports = [int(state["listen"].rpartition(":")[2])]
    ports += [int(a.rpartition(":")[2]) for a in state["upstreams"]]
    if state.get("kube"):
        ports += [int(state["kube"]["url"].rpartition(":")[2]), state["kube"]["etcd_port"]]
    return ports


def _check_nothing_left(state: dict, demo_pid: int) -> None:
    processes = state["processes"]
    assert {p["role"] for p in processes} >= {"gateway", *(f"httpbin {a}" for a in state["upstreams"])}
    if state["mode"] == "kubernetes":
        assert {"etcd"} <= {p["name"] for p in processes}
        assert any(p["name"].startswith("kube-apiserver") for p in processes)
    # every process started by the demo ran in its own session (gunicorn workers included)
    sessions = {p["pid"] for p in processes} | {demo_pid}
    markers = [state["run_dir"]] + ([state["kube"]["workdir"]] if state.get("kube") else [])
    left = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fields[0] == "Z":
            continue
        if int(fields[2]) in sessions or int(fields[3]) in sessions or any(m in cmdline for m in markers):
            left.append(f"{entry.name}: {cmdline}")
    assert not left, f"processes left behind: {left}"
    for port in _ports(state):
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still listens"
    assert not Path(state["run_dir"]).exists()
    if state.get("kube"):
        assert not Path(state["kube"]["workdir"]).exists()


def test_demo_serves_the_seed_request_scales_out_and_stops_on_ctrl_c(kube_env, tmp_path):
    port = free_port()
    demo = DemoRun(tmp_path / "state", "--listen", f"127.0.0.1:{port}")
    state = None
    try:
        t0 = time.monotonic()
        demo.wait_for(lambda l: l.startswith("Ready in"), READY_TIMEOUT)
        demo.wait_for(lambda l: "Ctrl-C stops everything" in l, 10)
        print(f"demo ready in {time.monotonic() - t0:.1f} s")
        state = demo.state()
        assert state["mode"] == "kubernetes", demo.output()
        assert "static nodes" not in demo.output()

        url, headers = _printed_curl(demo)
        assert (url, headers) == (f"http://127.0.0.1:{port}/v1/anything", {"Host": "sd.httpbin.org"})
        _check_seed_answer(url, headers)
        first, second = state["upstreams"]
        demo.wait_for(lambda l: '"GET /v1/anything" 200' in l and f" {first} " in l, 10)
        assert demomod.discovered_nodes(state["url"]) == {first}

        scale = demo.wait_for(lambda l: l.strip().startswith("kproxy demo --scale"), 5).strip()
        assert scale == "kproxy demo --scale 2"
        done = demo.run(scale)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "now has 2 nodes" in done.stdout
        assert demomod.discovered_nodes(state["url"]) == {first, second}
        _both_nodes_answer(demo, url, headers, [first, second])
        # the demo's own readiness probes stay out of the access log it shows
        assert not any(demomod.PROBE in l for l in demo.lines)

        state = demo.state()
        os.killpg(demo.process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        assert demo.process.wait(timeout=90) == 0, demo.output()
        demo.reader.join(timeout=5)
        assert "stopped; nothing of it is left running" in demo.output()
        _check_nothing_left(state, demo.process.pid)
        assert not (tmp_path / "state" / "state.json").exists()
    finally:
        demo.cleanup(state)


def test_demo_keep_then_stop(kube_env, tmp_path):
    port = free_port()
    state_dir = tmp_path / "state"
    env = {**os.environ, "KPROXY_DEMO_DIR": str(state_dir)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    demo_cmd = [sys.executable, "-m", "kproxy.cli", "demo"]
    state = None
    try:
        kept = subprocess.run([*demo_cmd, "--keep", "--listen", f"127.0.0.1:{port}"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=READY_TIMEOUT + 60)
        assert kept.returncode == 0, kept.stdout + kept.stderr
        assert "Ready in" in kept.stdout and "kproxy demo --stop" in kept.stdout
        state = json.loads((state_dir / "state.json").read_text())
        assert state["mode"] == "kubernetes" and state["status"] == "ready" and state["keep"]
        assert demomod._alive(state["pid"], state["start_time"])
        _check_seed_answer(f"http://127.0.0.1:{port}/v1/anything", {"Host": "sd.httpbin.org"})
        wait_until(lambda: state["upstreams"][0] in (state_dir / "demo.log").read_text(), timeout=10)

        again = subprocess.run([*demo_cmd, "--keep", "--listen", f"127.0.0.1:{free_port()}"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "already running" in again.stderr

        stopped = subprocess.run([*demo_cmd, "--stop"], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=180)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert "stopped" in stopped.stdout
        assert not demomod._alive(state["pid"], state["start_time"])
        _check_nothing_left(state, state["pid"])
        assert not (state_dir / "state.json").exists() and not (state_dir / "demo.log").exists()

        nothing = subprocess.run([*demo_cmd, "--stop"], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=60)
        assert nothing.returncode == 0 and "no demo is running" in nothing.stdout
        state = None
    finally:
        if state:
            demomod.stop_demo(demomod.Paths(state_dir))


def test_demo_without_kubernetes_or_httpbin_falls_back_to_static_nodes_and_the_stand_in(tmp_path):
    """No Kubernetes environment (KPROXY_DEMO_KUBE=off) and no httpbin package (an
    ``httpbin`` that fails to import shadows the real one): still a working gateway."""
    shadow = tmp_path / "shadow" / "httpbin"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('simulated: httpbin is not installed')\n")
    pythonpath = os.pathsep.join(p for p in (str(shadow.parent), os.environ.get("PYTHONPATH")) if p)
    port = free_port()
    demo = DemoRun(tmp_path / "state", "--listen", f"127.0.0.1:{port}",
                   env={"KPROXY_DEMO_KUBE": "off", "PYTHONPATH": pythonpath})
    state = None
    try:
        demo.wait_for(lambda l: l.startswith("Ready in"), 60)
        demo.wait_for(lambda l: "Ctrl-C stops everything" in l, 10)
        text = " ".join(demo.lines)
        assert "Kubernetes discovery is not available, so this demo uses static nodes" in text
        assert "the httpbin package is not installed" in text
        state = demo.state()
        assert state["mode"] == "static" and state["kube"] is None
        assert state["upstream_app"] == "kproxy_tools.demo:echo_app"
        url, headers = _printed_curl(demo)
        _check_seed_answer(url, headers)
        done = demo.run(demo.wait_for(lambda l: l.strip().startswith("kproxy demo --scale"), 5).strip())
        assert done.returncode == 0, done.stdout + done.stderr
        first, second = state["upstreams"]

        def both() -> bool:  # the reload is asynchronous: ask until the second node shows up
            assert session().get(url, headers=headers, timeout=10).status_code == 200
            return any(f" {second} " in l for l in _access_lines(demo))
        wait_until(both, timeout=15, interval=0.1)
        _both_nodes_answer(demo, url, headers, [first, second])

        os.killpg(demo.process.pid, signal.SIGINT)
        assert demo.process.wait(timeout=60) == 0, demo.output()
        _check_nothing_left(state, demo.process.pid)
    finally:
        demo.cleanup(state)


def test_scale_and_stop_without_a_running_demo(tmp_path):
    env = {**os.environ, "KPROXY_DEMO_DIR": str(tmp_path)}
    scale = subprocess.run([sys.executable, "-m", "kproxy.cli", "demo", "--scale", "2"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
    assert scale.returncode == 1 and "no demo is running" in scale.stderr
    stop = subprocess.run([sys.executable, "-m", "kproxy.cli", "demo", "--stop"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0 and "no demo is running" in stop.stdout


def test_demo_refuses_a_busy_listen_address(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "KPROXY_DEMO_DIR": str(tmp_path), "KPROXY_DEMO_KUBE": "off"}
        r = subprocess.run([sys.executable, "-m", "kproxy.cli", "demo", "--listen", f"127.0.0.1:{port}"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "--listen" in r.stderr
    assert not (tmp_path / "state.json").exists()


# -- the parts, without processes --

def test_demo_ini_is_the_walkthrough_config():
    ini = demomod.demo_ini(("127.0.0.1", 9080), api_server="https://127.0.0.1:6443", token_file="/x/token",
                           ca_file="/x/ca.crt")
    config = configmod.parse(ini)
    registry = config.registries["my-k8s-cluster"]
    assert (registry.type, registry.api_server, registry.token_file, registry.ca_file) == (
        "kubernetes", "https://127.0.0.1:6443", "/x/token", "/x/ca.crt")
    assert registry.namespace_pattern.pattern == "apisix"
    service = config.services["sd-app"]
    assert (service.host, service.path_prefix, service.registry, service.namespace, service.service_name,
            service.port, service.nodes) == ("sd.httpbin.org", "/v1", "my-k8s-cluster", "apisix", "httpbin",
                                             "80", None)
    api = config.apis["anything"]
    assert (api.service, api.path, api.match, api.strip_prefix, api.methods) == (
        "sd-app", "/anything", "prefix", True, None)
    assert config.gateway.listen == ("127.0.0.1", 9080)

    static = configmod.parse(demomod.demo_ini(("127.0.0.1", 9080), nodes=["127.0.0.1:8001"]))
    assert static.registries == {}
    assert [n.address for n in static.services["sd-app"].nodes] == ["127.0.0.1:8001"]


def test_seed_rbac_is_applied_as_written_plus_the_discovery_role():
    objects = list(yaml.safe_load_all(demomod.SEED_RBAC_YAML))
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("ClusterRole", "apisix-k8s-sd-watcher"), ("ClusterRoleBinding", "apisix-k8s-sd-watcher-binding"),
        ("ServiceAccount", "apisix-k8s-sd-sa")]
    assert objects[0]["rules"] == [{"apiGroups": [""], "resources": ["endpoints"], "verbs": ["list", "watch"]}]
    role, binding = demomod.DISCOVERY_RBAC
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == {("", "services"), ("discovery.k8s.io", "endpointslices")}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "apisix-k8s-sd-sa", "namespace": "apisix"}]


def test_endpoint_objects_follow_the_scale():
    nodes = ["127.0.0.1:8001", "127.0.0.1:8002"]
    apply, delete = demomod.endpoint_objects(nodes[:1], nodes)
    slices = [o for o in apply if o["kind"] == "EndpointSlice"]
    (endpoints,) = [o for o in apply if o["kind"] == "Endpoints"]
    assert [s["metadata"]["name"] for s in slices] == ["httpbin-1"]
    assert slices[0]["metadata"]["labels"]["kubernetes.io/service-name"] == "httpbin"
    assert slices[0]["ports"] == [{"name": "http", "port": 8001, "protocol": "TCP"}]
    assert [d["metadata"]["name"] for d in delete] == ["httpbin-2"]
    assert endpoints["subsets"] == [{"addresses": [{"ip": "127.0.0.1"}],
                                     "ports": [{"name": "http", "port": 8001, "protocol": "TCP"}]}]
    apply, delete = demomod.endpoint_objects(nodes, nodes)
    assert len([o for o in apply if o["kind"] == "EndpointSlice"]) == 2 and delete == []
    apply, delete = demomod.endpoint_objects([], nodes)
    assert [o["subsets"] for o in apply] == [[]] and len(delete) == 2


@pytest.mark.parametrize("request_args", [
    lambda: dict(path="/anything?a=1&a=2&b=3", method="GET"),
    lambda: dict(path="/anything?show_env=1", method="GET"),
    lambda: dict(path="/anything/x", method="POST", data={"k": "v", "f": (io.BytesIO(b"file body"), "f.txt")}),
    lambda: dict(path="/anything", method="PUT", json={"n": [1, 2]}),
    lambda: dict(path="/anything", method="POST", data=b"raw body", content_type="text/plain"),
    lambda: dict(path="/anything", method="POST", data=b"\xff\xfe", content_type="application/octet-stream"),
], ids=["query", "show_env", "form+file", "json", "text", "binary"])
def test_builtin_echo_answers_like_httpbin(request_args):
    """The stand-in used when httpbin is not installed gives httpbin's answer, field by field
    (headers as kproxy forwards them: httpbin hides the X-Forwarded-For/Proto/Port ones)."""
    import httpbin
    headers = {"Host": "sd.httpbin.org", "X-Forwarded-For": "10.0.0.1", "X-Forwarded-Host": "sd.httpbin.org",
               "X-Forwarded-Proto": "http", "X-Forwarded-Port": "9080", "X-Request-Id": "abc"}
    ours = Client(demomod.echo_app).open(headers=headers, **request_args())
    theirs = Client(httpbin.app).open(headers=headers, **request_args())
    assert ours.status_code == theirs.status_code == 200
    ours, theirs = ours.get_json(), theirs.get_json()
    for answer in (ours, theirs):  # a multipart body has a random boundary, so its own length
        answer["headers"].pop("Content-Length", None)
        answer["headers"]["Content-Type"] = answer["headers"].get("Content-Type", "").partition(";")[0]
    assert ours == theirs
