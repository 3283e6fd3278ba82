"""Shared test parts: real upstream servers on 127.0.0.1, and the gateway run the three
ways the contract names (``kproxy serve``, gunicorn, the middleware), each as a real
process that every test stops."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import pytest
import requests
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wsgi import get_input_stream

from kproxy_tools.common import free_port, gunicorn_workers, session, terminate

ROOT = Path(__file__).resolve().parent.parent


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    return free_port()


def wait_until(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def raw_http(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes exactly as given (no client normalising anything) and read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


# -- upstreams --

class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: object) -> None:  # thousands of lines would bury failures
        pass


class UpstreamServer:
    """A real HTTP server on 127.0.0.1 running a WSGI app in threads."""

    def __init__(self, app: Callable):
        self.server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler)
        self.port = self.server.server_port
        self.address = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class EchoApp:
    """An upstream that tells what it received, plus a few special paths:

    ``/status/N``, ``/sleep/S``, ``/redirect``, ``/cookies``, ``/gzip``, ``/stream/MiB``
    (MiB in 64 KiB chunks), ``/slowstream`` (endless, slow; records when it was abandoned)."""

    def __init__(self, name: str):
        self.name = name
        self.abandoned = threading.Event()

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        parts = path.strip("/").split("/")
        head = parts[-2] if len(parts) >= 2 else ""
        if head == "status":
            code = int(parts[-1])
            start_response(f"{code} Status", [("Content-Length", "0")] if code not in (204, 304) else [])
            return []
        if head == "sleep":
            time.sleep(float(parts[-1]))
        if parts[-1] == "redirect":
            start_response("302 Found", [("Location", "/elsewhere"), ("Content-Length", "0")])
            return []
        if parts[-1] == "cookies":
            start_response("200 OK", [("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; Path=/"),
                                      ("Content-Length", "0")])
            return []
        if parts[-1] == "gzip":
            body = gzip.compress(b"compressed " * 100)
            start_response("200 OK", [("Content-Encoding", "gzip"), ("Content-Type", "text/plain"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        if head == "stream":
            mib = int(parts[-1])
            start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                      ("Content-Length", str(mib << 20))])
            return (b"x" * 65536 for _ in range(mib * 16))
        if parts[-1] == "slowstream":
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            return self._slow()
        body = get_input_stream(environ).read()  # bounded by Content-Length, or to the last chunk
        answer = {
            "node": self.name,
            "method": environ["REQUEST_METHOD"],
            "raw_uri": environ.get("RAW_URI"),
            "headers": {k[5:].replace("_", "-").title(): v for k, v in environ.items() if k.startswith("HTTP_")},
            "content_length": environ.get("CONTENT_LENGTH"),
            "body_length": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
        data = json.dumps(answer).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]

    def _slow(self):
        try:
            for _ in range(600):
                yield b"y" * 1024
                time.sleep(0.05)
        finally:
            self.abandoned.set()


@pytest.fixture(scope="session")
def upstream() -> Iterable[Callable[..., UpstreamServer]]:
    """Start real upstream servers: ``upstream(app)``; all stopped at the end."""
    servers: list[UpstreamServer] = []

    def start(app: Callable) -> UpstreamServer:
        server = UpstreamServer(app)
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def httpbin_server(upstream) -> UpstreamServer:
    """The seed's backend: the real ``httpbin`` package."""
    import httpbin
    return upstream(httpbin.app)


# -- the gateway as a process --

class GatewayProcess:
    """kproxy started one of three ways, as the contract names them."""

    KINDS = ("serve", "gunicorn", "middleware")

    def __init__(self, kind: str, config_path: Path, port: int, env: dict | None = None):
        self.kind, self.config_path, self.port = kind, config_path, port
        self.url = f"http://127.0.0.1:{port}"
        self.log_dir = config_path.parent
        inherited = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        self.env = {**inherited, "KPROXY_CONFIG": str(config_path), **(env or {})}
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        bind = f"127.0.0.1:{self.port}"
        if self.kind == "serve":
            return [sys.executable, "-m", "kproxy.cli", "serve", "-c", str(self.config_path), "--listen", bind]
        if self.kind == "gunicorn":
            return [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "conf" / "gunicorn.conf.py"), "-b", bind,
                    "kproxy.wsgi:application"]
        # an app that knows nothing of kproxy's hooks: plain gunicorn, the middleware in front
        return [sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "8", "-b", bind,
                "--no-control-socket", "tests.apps.mounted:app"]

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        self.stdout = open(self.log_dir / f"{self.kind}.stdout", "wb")
        self.stderr = open(self.log_dir / f"{self.kind}.stderr", "wb")
        self.process = subprocess.Popen(self.command(), cwd=ROOT, env=self.env, stdout=self.stdout,
                                        stderr=self.stderr, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:  # never leave a half-started gateway running
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.kind} exited with {self.process.returncode}:\n{self.logs()}")
            try:
                if session().get(self.url + "/-/healthz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:  # not listening yet, or slow on a busy machine
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.kind} did not start:\n{self.logs()}")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until ``/-/readyz`` answers 200: every registry has listed once."""
        wait_until(lambda: session().get(self.url + "/-/readyz", timeout=5).status_code == 200, timeout=timeout)

    def pids(self) -> list[int]:
        """The process and its gunicorn workers (not the pod's discovery process)."""
        assert self.process is not None
        return [self.process.pid, *gunicorn_workers(self.process.pid)]

    def logs(self) -> str:
        out = []
        for name in ("stdout", "stderr"):
            path = self.log_dir / f"{self.kind}.{name}"
            if path.exists():
                out.append(f"--- {name}\n" + path.read_text(errors="replace")[-5000:])
        return "\n".join(out)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def stop(self) -> None:
        terminate(self.process, grace=15)
        for log in (getattr(self, "stdout", None), getattr(self, "stderr", None)):
            if log is not None:
                log.close()


@pytest.fixture
def gateway_process(tmp_path) -> Iterable[Callable[..., GatewayProcess]]:
    """``gateway_process(kind, ini_text)``: a started gateway, stopped after the test."""
    started: list[GatewayProcess] = []

    def start(kind: str, ini: str, env: dict | None = None) -> GatewayProcess:
        path = tmp_path / f"{kind}-{len(started)}.ini"
        path.write_text(ini)
        process = GatewayProcess(kind, path, free_port(), env)
        started.append(process)
        return process.start()
    yield start
    for process in started:
        process.stop()


# -- the real Kubernetes API server: one per test session, a namespace per test --

@pytest.fixture(scope="session")
def kube():
    """A real etcd + kube-apiserver on loopback (kproxy_tools.testenv). Outside CI it skips
    with the reason when it cannot be provisioned; under CI=true that is a failure."""
    from kproxy_tools import testenv

    def progress(line: str) -> None:  # past pytest's capture: a first 5-minute build must not look hung
        print(line, file=sys.__stderr__, flush=True)
    try:
        binary = testenv.provision(log=progress)
        # v1.20 drops EndpointSlice serving/terminating conditions unless this (alpha) gate is on
        server = testenv.KubeAPIServer(binary, log=progress,
                                       extra_args=["--feature-gates=EndpointSliceTerminatingCondition=true"])
        server.start()
    except testenv.TestEnvUnavailable as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the test Kubernetes API server is required under CI: {e}")
        pytest.skip(f"no test Kubernetes API server here: {e}")
    yield server
    server.stop()


@pytest.fixture
def token_file(kube, tmp_path) -> Path:
    """A file holding the test API server's admin token, as a pod's service-account token."""
    path = tmp_path / "token"
    path.write_text(kube.admin_token)
    return path


def ini_lines(options: dict) -> str:
    return "".join(f"{key} = {value}\n" for key, value in options.items())


def kube_registry(kube, namespace: str, token_file, api_server: str | None = None, **options) -> str:
    """``[registry:k]`` on the test API server (or ``api_server``, a relay in front of it)
    watching ``namespace``, with any further registry ``options``."""
    return f"""
[registry:k]
type = kubernetes
api_server = {api_server or kube.url}
token_file = {token_file}
ca_file = {kube.ca_file}
namespace_pattern = {namespace}
{ini_lines(options)}"""


def discovery_ini(kube, namespace: str, token_file, service: str = "echo", *, host: str | None = None,
                  port: str = "http", api_server: str | None = None, kproxy: dict | None = None,
                  registry: dict | None = None, cluster: dict | None = None) -> str:
    """A config whose ``[service:<service>]`` is the Kubernetes Service of that name in
    ``namespace``, found by ``[registry:k]`` and routed at ``/`` for host
    ``<service>.test`` (``host=""``: any host). ``kproxy``, ``registry`` and ``cluster``
    add options to the [kproxy], [registry:k] and [service:<service>] sections."""
    host = f"{service}.test" if host is None else host
    return f"""
[kproxy]
{ini_lines(kproxy or {})}{kube_registry(kube, namespace, token_file, api_server, **(registry or {}))}
[service:{service}]
{f"host = {host}" if host else ""}
registry = k
namespace = {namespace}
service_name = {service}
port = {port}
{ini_lines(cluster or {})}
[api:{service}]
service = {service}
path = /
"""


_namespaces = iter(range(1, 1_000_000))


@pytest.fixture
def namespace(kube, request) -> Iterable[str]:
    """A fresh namespace for one test (no controller deletes its objects, so names are
    never reused)."""
    name = f"t{next(_namespaces)}-{os.getpid() % 10000}-" + request.node.name.lower().replace("_", "-")[:30].strip("-")
    name = "".join(c for c in name if c.isalnum() or c == "-").strip("-")
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    kube.delete({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})


class TcpRelay:
    """Plain TCP pass-through to the API server (bytes untouched, TLS end to end), so a
    test can cut kproxy's connections or refuse new ones while the server stays up."""

    def __init__(self, target_port: int):
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self._open = True
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                if not self._open:
                    raise OSError("relay paused")
                server = socket.create_connection(("127.0.0.1", self._target), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:  # a pause that came while connecting must not miss this pair
                if not self._open:
                    client.close()
                    server.close()
                    continue
                self._sockets |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """Drop every open connection (new ones are accepted unless paused)."""
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def pause(self) -> None:
        with self._lock:
            self._open = False
        self.cut()

    def resume(self) -> None:
        self._open = True

    def close(self) -> None:
        self.pause()
        self._listener.close()


class RawUpstream:
    """A small raw-socket server for upstream failures a well-behaved server never shows:
    ``behaviour(conn)`` gets each accepted connection after its request head was read."""

    def __init__(self, behaviour: Callable[[socket.socket], None]):
        self.behaviour = behaviour
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.accepted = 0
        self._stop = threading.Event()
        self._connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            self._connections.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            self.behaviour(conn)
        except OSError:
            pass

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        for conn in self._connections:
            try:
                conn.close()
            except OSError:
                pass


@pytest.fixture
def raw_upstream() -> Iterable[Callable[[Callable[[socket.socket], None]], RawUpstream]]:
    servers: list[RawUpstream] = []

    def start(behaviour: Callable[[socket.socket], None]) -> RawUpstream:
        server = RawUpstream(behaviour)
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.stop()
