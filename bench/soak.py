"""Load and soak: kproxy under gunicorn, nodes from Kubernetes discovery, 200 concurrent
keep-alive clients, mixed GET/POST with bodies from 0 B to 5 MB (never part of the tests;
``tests/test_soak.py`` is the short version that is).

    python bench/soak.py [--clients 200] [--duration 60] [--workers 2] [--threads 32]

What it does (everything on 127.0.0.1; every process it starts is stopped in ``finally``):

1. A real etcd + kube-apiserver (``kproxy_tools.testenv``; the cached binary, or the
   first-time build ``python -m kproxy_tools.testenv provision`` does).
2. ``--nodes`` (2) upstream servers, each a gunicorn (gthread, 64 threads, keep-alive
   ``--upstream-keepalive``, 2 s as gunicorn's default: kproxy's pooled upstream
   connections are reused, and the nodes close the idle ones, which kproxy must never
   reuse as they close; the werkzeug development server closes every connection) running ``SoakUpstream``:
   ``GET /blob/N`` answers N known bytes, any other request answers the length and CRC-32
   of the body it read, and every answer names the node.
3. A Service ``soak/soak`` (port ``http``) and one ``discovery.k8s.io/v1beta1``
   EndpointSlice per node (127.0.0.1, the node's port).
4. kproxy under gunicorn (``conf/gunicorn.conf.py``, ``kproxy.wsgi:application``) with
   ``workers`` = 2 and ``threads`` = 32, the service's nodes from the registry; access log
   and metrics on, as in production. Why 32 threads: the clients are closed-loop, so 200
   requests are outstanding at any time; 2 x 32 are served at once and the rest wait in
   gunicorn's queue (a parked keep-alive connection holds no thread). More threads buy no
   throughput on a GIL-bound worker, cost memory, and each may hold an upstream
   connection (the upstream pool per node is ``threads`` large).
5. Clients: ``--client-procs`` processes (4) share ``--clients`` threads, each with its own
   ``requests.Session`` holding ONE keep-alive connection, in a closed loop (no think
   time). The mix, from a seeded RNG: 40 % GET of a small answer, 15 % GET of a body
   (``/blob/N``), 35 % POST with a Content-Length body, 5 % chunked POST, 5 % empty POST.
   Body sizes: 70 % 1 B-16 KiB, 22 % 16-512 KiB, 7 % 512 KiB-5 MiB, 1 % exactly 5 MiB
   (capped by ``--max-body``). Every answer is checked: status 200, passed through kproxy
   (``X-Kproxy-Upstream-Status``), and the bytes (CRC-32 and length of what the upstream
   received; the exact bytes of a ``/blob``).
6. A warm-up run (``--warmup`` s), the clients leave, the workers settle; then the START
   sample (per worker: RSS, open descriptors by kind, threads); the measured run, sampled
   every second (peaks, and client connections held per worker from ``/proc/net/tcp``);
   the clients leave, the workers settle, the END sample; ``/-/metrics`` and the logs.

Targets (exit 1 if one is missed; 2 if the soak could not be set up):

- errors: 0 (listed by kind), in the warm-up and in the measured run;
- connections: the workers held ``--clients`` client connections at once (the server's
  side, counted in ``/proc/net/tcp``);
- RSS of each worker: END under START + 10 %;
- descriptors of each worker: no client socket left at END; descriptors other than pooled
  upstream connections at END <= START + 2; pooled upstream connections <= threads x nodes
  (the pool bound: they come and go with load, they do not accumulate);
- threads of each worker: peak <= ``threads`` + 8 (the request pool, the main thread, the
  discovery reflectors);
- no worker restarted, no traceback in kproxy's log, no upstream error or 5xx answer in
  its metrics.

For diagnosis: ``--env NAME=VALUE`` sets kproxy's environment (e.g. ``MALLOC_ARENA_MAX=2``),
``--gunicorn-conf FILE`` runs kproxy with another gunicorn config (one that execs
conf/gunicorn.conf.py and adds hooks), ``--keep`` keeps the logs, ``--json FILE`` writes
every figure. Figures of real runs, and what the RSS figures mean, are in
docs/reliability.rst.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's bench, kproxy, kproxy_tools

from bench._common import Proc, say  # noqa: E402
from kproxy_tools.common import free_port, gunicorn_workers, session as loopback_session  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
HOST = "soak.test"
NAMESPACE = "soak"
SERVICE = "soak"
MiB = 1024 * 1024
KiB = 1024
MAX_BODY = 5 * MiB
CHUNK = 64 * KiB
SMALL = 16 * KiB
LARGE = 512 * KiB

RSS_GROWTH_LIMIT = 0.10     # END RSS under START + 10 %
FD_MARGIN = 2               # non-pooled descriptors may differ by this much
THREAD_SLACK = 8            # threads beyond the request pool: main thread, reflectors, ...

# -- the payload: the same deterministic bytes in the clients and the upstreams --

_payload: bytes | None = None
_payload_lock = threading.Lock()


def payload() -> bytes:
    """MAX_BODY + 64 KiB of seeded random bytes (bodies are slices at random offsets)."""
    global _payload
    with _payload_lock:
        if _payload is None:
            _payload = random.Random(20240607).randbytes(MAX_BODY + CHUNK)
        return _payload


# -- the upstream --

class SoakUpstream:
    """WSGI app of an upstream node. ``GET /blob/N``: the first N payload bytes. Anything
    else: reads the whole body (Content-Length or chunked) and answers
    ``{"node", "length", "crc32"}``. Every answer carries ``X-Node``."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        from werkzeug.wsgi import get_input_stream
        path = environ.get("PATH_INFO", "")
        if path.startswith("/blob/") and environ["REQUEST_METHOD"] in ("GET", "HEAD"):
            n = min(int(path.rsplit("/", 1)[1] or 0), MAX_BODY)
            start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                      ("Content-Length", str(n)), ("X-Node", self.name)])
            view = memoryview(payload())
            return (bytes(view[i:min(i + CHUNK, n)]) for i in range(0, n, CHUNK))
        stream = get_input_stream(environ)  # bounded by Content-Length, or to the last chunk
        crc = length = 0
        while chunk := stream.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
            length += len(chunk)
        body = json.dumps({"node": self.name, "length": length, "crc32": crc}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                  ("X-Node", self.name)])
        return [body]


def upstream_app() -> SoakUpstream:
    """gunicorn app factory of an upstream node (``soak:upstream_app()``), named by $SOAK_NODE."""
    payload()
    return SoakUpstream(os.environ.get("SOAK_NODE", "node"))


def start_upstream(name: str, log: Path, threads: int = 64, timeout: float = 30.0,
                   keepalive: int = 2) -> "Proc":
    """An upstream node: gunicorn (gthread, 1 worker, ``threads`` threads, keep-alive 2 s,
    gunicorn's default: the node closes idle pooled connections, and kproxy must never reuse
    one it is closing) running ``SoakUpstream`` on a free loopback port. Returns the
    process, with ``.port`` set."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["SOAK_NODE"] = name
    cmd = [PYTHON, "-m", "gunicorn", "-k", "gthread", "-w", "1", "--threads", str(threads), "--keep-alive",
           str(keepalive), "--worker-connections", "1000", "--no-control-socket", "-b", "127.0.0.1:0",
           "bench.soak:upstream_app()"]
    proc = Proc(f"upstream {name}", cmd, log, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
        if found and "Booting worker" in log.read_text(errors="replace"):
            proc.port = int(found.group(1))
            return proc
        if proc.popen.poll() is not None:
            break
        time.sleep(0.1)
    proc.stop(grace=5)
    raise RuntimeError(f"upstream {name} did not start:\n{log.read_text(errors='replace')[-2000:]}")


# -- the clients --

KINDS = (("get_small", 40), ("get_blob", 15), ("post", 35), ("post_chunked", 5), ("post_empty", 5))


def body_size(rng: random.Random, max_body: int) -> int:
    r = rng.random()
    if r < 0.70:
        n = rng.randint(1, SMALL)
    elif r < 0.92:
        n = rng.randint(SMALL, LARGE)
    elif r < 0.99:
        n = rng.randint(LARGE, MAX_BODY)
    else:
        n = MAX_BODY
    return min(n, max_body)


class ClientStats:
    """What one client thread (or a whole client process, merged) saw."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors: Counter[str] = Counter()
        self.error_samples: dict[str, str] = {}
        self.latency_ms: dict[str, list[float]] = {}   # per kind, and "small"/"large"
        self.nodes: Counter[str] = Counter()
        self.bytes_up = self.bytes_down = 0
        self.connections_opened = 0
        self.clients = 0

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        self.error_samples.setdefault(kind, detail[:300])

    def merge(self, other: "ClientStats | dict") -> None:
        data = other if isinstance(other, dict) else other.to_json()
        self.requests += data["requests"]
        self.errors.update(data["errors"])
        for kind, detail in data["error_samples"].items():
            self.error_samples.setdefault(kind, detail)
        for kind, values in data["latency_ms"].items():
            self.latency_ms.setdefault(kind, []).extend(values)
        self.nodes.update(data["nodes"])
        self.bytes_up += data["bytes_up"]
        self.bytes_down += data["bytes_down"]
        self.connections_opened += data["connections_opened"]
        self.clients += data["clients"]

    def to_json(self) -> dict:
        return {"requests": self.requests, "errors": dict(self.errors), "error_samples": self.error_samples,
                "latency_ms": {k: [round(v, 3) for v in vs] for k, vs in self.latency_ms.items()},
                "nodes": dict(self.nodes), "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "connections_opened": self.connections_opened, "clients": self.clients}

    def all_latencies(self) -> list[float]:
        return [v for k, vs in self.latency_ms.items() if k in dict(KINDS) for v in vs]


def _chunks(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for i in range(0, len(data), CHUNK):
        yield bytes(view[i:i + CHUNK])


def client_loop(url: str, duration: float, seed: int, max_body: int, stats: ClientStats,
                stop: threading.Event | None = None, start: threading.Barrier | None = None) -> None:
    """One keep-alive client: a Session with one connection, requests back to back for
    ``duration`` seconds from when every client passed ``start`` (a request in flight then
    finishes; each is bounded by its timeouts)."""
    import requests
    from requests.adapters import HTTPAdapter

    data = payload()
    rng = random.Random(seed)
    names, weights = zip(*KINDS)
    session = loopback_session()
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
    session.mount("http://", adapter)
    stats.clients += 1
    try:
        if start is not None:
            try:
                start.wait(timeout=60)
            except threading.BrokenBarrierError:
                stats.error("client not started", "the other clients did not start within 60 s")
                return
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            kind = rng.choices(names, weights)[0]
            method, path, body, size_up, size_down = "GET", "/small", None, 0, 0
            if kind == "get_blob":
                size_down = body_size(rng, max_body)
                path = f"/blob/{size_down}"
            elif kind.startswith("post"):
                method, path = "POST", f"/upload/{kind}"
                size_up = 0 if kind == "post_empty" else body_size(rng, max_body)
                offset = rng.randrange(CHUNK)
                body = data[offset:offset + size_up]
            sent = body if kind != "post_chunked" else _chunks(body)
            started = time.perf_counter()
            stats.requests += 1
            try:
                response = session.request(method, url + path, data=sent, headers={"Host": HOST},
                                           timeout=(10, 60), allow_redirects=False)
                content = response.content
            except requests.RequestException as e:
                stats.error(type(e).__name__, f"{method} {path}: {e}")
                continue
            elapsed = (time.perf_counter() - started) * 1000
            problem = _check(kind, response, content, body, size_down, data)
            if problem:
                stats.error(problem, f"{method} {path}: {response.status_code} {content[:200]!r}")
                continue
            stats.nodes[response.headers.get("X-Node", "?")] += 1
            stats.bytes_up += size_up
            stats.bytes_down += len(content)
            stats.latency_ms.setdefault(kind, []).append(elapsed)
            if size_up <= SMALL and size_down <= SMALL:
                stats.latency_ms.setdefault("small", []).append(elapsed)
            elif size_up >= LARGE or size_down >= LARGE:
                stats.latency_ms.setdefault("large", []).append(elapsed)
    finally:
        pools = adapter.poolmanager.pools
        for key in list(pools.keys()):  # urllib3 counts the connections it made
            stats.connections_opened += pools[key].num_connections
        session.close()


def _check(kind: str, response: Any, content: bytes, body: bytes | None, size_down: int, data: bytes) -> str | None:
    if response.status_code != 200:
        try:
            reason = response.json().get("error", "")
        except ValueError:
            reason = ""
        return f"status {response.status_code} {reason}".strip()
    if "X-Kproxy-Upstream-Status" not in response.headers:
        return "not through kproxy"
    if kind == "get_blob":
        if len(content) != size_down:
            return "truncated download"
        if content != data[:size_down]:
            return "corrupt download"
        return None
    if kind == "get_small":
        return None
    try:
        seen = json.loads(content)
    except ValueError:
        return "invalid JSON answer"
    if seen.get("length") != len(body or b""):
        return "upload length differs"
    if seen.get("crc32") != zlib.crc32(body or b""):
        return "upload bytes differ"
    return None


def run_clients(url: str, clients: int, duration: float, seed: int, max_body: int) -> ClientStats:
    """``clients`` client threads in this process, together for ``duration`` seconds."""
    stop = threading.Event()
    # the clock starts once every thread runs: on a loaded machine starting 50 threads
    # took half of a 6 s run, which then never had all its connections at once
    start = threading.Barrier(clients)
    per_thread = [ClientStats() for _ in range(clients)]
    threads = [threading.Thread(target=client_loop, args=(url, duration, seed * 100_003 + i, max_body,
                                                           per_thread[i], stop, start), daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60 + duration
    for t in threads:  # each request is bounded by (10, 60) s timeouts
        t.join(timeout=max(0.0, deadline - time.monotonic()) + 90)
    stop.set()
    total = ClientStats()
    for s in per_thread:
        total.merge(s)
    hung = sum(t.is_alive() for t in threads)
    if hung:
        total.error("client hung", f"{hung} client threads still in a request 90 s after the end")
    return total


def client_process_main(args: argparse.Namespace) -> None:
    stats = run_clients(args.url, args.clients, args.duration, args.seed, args.max_body)
    Path(args.out).write_text(json.dumps(stats.to_json()))


# -- process facts from /proc --

def proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_kib(pid: int) -> int:
    return proc_status(pid, "VmRSS")


def thread_count(pid: int) -> int:
    return proc_status(pid, "Threads")


def tcp_sockets() -> dict[int, tuple[int, int, str]]:
    """inode -> (local port, remote port, state) of every TCP socket on this machine."""
    table: dict[int, tuple[int, int, str]] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            table[int(f[9])] = (int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16), f[3])
    return table


def fd_kinds(pid: int, listen_port: int, node_ports: set[int], api_port: int | None,
             tcp: dict[int, tuple[int, int, str]] | None = None) -> dict[str, int]:
    """Open descriptors of a process by kind: client (connections to kproxy), upstream
    (to a node), apiserver, other sockets, pipes, files, other; and total."""
    tcp = tcp if tcp is not None else tcp_sockets()
    kinds: Counter[str] = Counter()
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / entry)
        except OSError:
            continue  # closed meanwhile
        kinds["total"] += 1
        if target.startswith("socket:["):
            local, remote, state = tcp.get(int(target[8:-1]), (0, 0, ""))
            if local == listen_port and state != "0A":
                kinds["client"] += 1
            elif remote in node_ports:
                kinds["upstream"] += 1
            elif api_port and remote == api_port:
                kinds["apiserver"] += 1
            else:
                kinds["socket"] += 1
        elif target.startswith("pipe:"):
            kinds["pipe"] += 1
        elif target.startswith("/"):
            kinds["file"] += 1
        else:
            kinds["other"] += 1
    return dict(kinds)


def established_clients(listen_port: int) -> int:
    return sum(1 for local, _, state in tcp_sockets().values() if local == listen_port and state == "01")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)  # nearest rank
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


# -- kube objects and config --

def register(kube: Any, namespace: str, name: str, ports: list[int]) -> None:
    """A selector-less Service ``name`` (port ``http``) and one v1beta1 EndpointSlice per
    node (127.0.0.1:port), as a controller would write them for pods on one host."""
    kube.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
    for i, port in enumerate(ports):
        kube.apply({"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
                    "metadata": {"name": f"{name}-{i}", "namespace": namespace,
                                 "labels": {"kubernetes.io/service-name": name}},
                    "addressType": "IPv4", "ports": [{"name": "http", "port": port}],
                    "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]})


def ini(kube: Any, namespace: str, token_file: str, workers: int, threads: int, listen: str = "",
        service: str = SERVICE) -> str:
    return f"""
[kproxy]
{f"listen = {listen}" if listen else ""}
workers = {workers}
threads = {threads}
keepalive_timeout = 5
max_body_size = 8m

[registry:k]
type = kubernetes
api_server = {kube.url}
token_file = {token_file}
ca_file = {kube.ca_file}
namespace_pattern = {namespace}

[service:soak]
host = {HOST}
registry = k
namespace = {namespace}
service_name = {service}
port = http

[api:soak]
service = soak
path = /
"""


def metric_sum(text: str, name: str, label_filter: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in "{ ") and label_filter in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- the soak --

def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception:
            value = None
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"{what}: not within {timeout:.0f} s")


def get(url: str, timeout: float = 5.0, host: str | None = None) -> Any:
    with loopback_session() as s:
        return s.get(url, timeout=timeout, headers={"Host": host} if host else None)


class Sampler:
    """Per-worker peaks (RSS, descriptors, threads, client connections) sampled every
    ``interval`` seconds in a thread, plus the peak of client connections over all."""

    def __init__(self, workers: list[int], listen_port: int, node_ports: set[int], api_port: int,
                 interval: float = 1.0):
        self.workers, self.listen_port, self.node_ports, self.api_port = workers, listen_port, node_ports, api_port
        self.interval = interval
        self.peak: dict[int, dict[str, int]] = {pid: {} for pid in workers}
        self.rss_timeline: dict[int, list[int]] = {pid: [] for pid in workers}  # KiB, one per sample
        self.peak_clients = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        tcp = tcp_sockets()
        clients = 0
        for pid in self.workers:
            try:
                values = fd_kinds(pid, self.listen_port, self.node_ports, self.api_port, tcp)
                values["rss_kib"] = rss_kib(pid)
                values["threads"] = thread_count(pid)
            except OSError:
                continue
            clients += values.get("client", 0)
            self.rss_timeline[pid].append(values["rss_kib"])
            peak = self.peak[pid]
            for key, value in values.items():
                peak[key] = max(peak.get(key, 0), value)
        self.peak_clients = max(self.peak_clients, clients)
        self.samples += 1


def snapshot(workers: list[int], listen_port: int, node_ports: set[int], api_port: int) -> dict[int, dict[str, int]]:
    tcp = tcp_sockets()
    out = {}
    for pid in workers:
        values = fd_kinds(pid, listen_port, node_ports, api_port, tcp)
        values["rss_kib"] = rss_kib(pid)
        values["threads"] = thread_count(pid)
        out[pid] = values
    return out


def settle(workers: list[int], listen_port: int, timeout: float = 20.0, interval: float = 1.0) -> None:
    """Wait until the clients' connections are gone from the workers and their descriptor
    counts have stopped moving (bounded)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        tcp = tcp_sockets()
        now = [fd_kinds(pid, listen_port, set(), None, tcp) for pid in workers]
        if all(n.get("client", 0) == 0 for n in now) and now == last:
            break
        last = now
        time.sleep(interval)
    time.sleep(interval / 2)


def drive(url: str, clients: int, procs: int, duration: float, seed: int, max_body: int,
          workdir: Path, label: str) -> ClientStats:
    """Run ``clients`` client threads spread over ``procs`` processes for ``duration`` s."""
    procs = max(1, min(procs, clients))
    share = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    started: list[tuple[Proc, Path]] = []
    total = ClientStats()
    try:
        for i, n in enumerate(share):
            out = workdir / f"clients-{label}-{i}.json"
            cmd = [PYTHON, str(Path(__file__).resolve()), "--client-proc", "--url", url, "--clients", str(n),
                   "--duration", str(duration), "--seed", str(seed * 1000 + i), "--max-body", str(max_body),
                   "--out", str(out)]
            started.append((Proc(f"clients {label} {i}", cmd, workdir / f"clients-{label}-{i}.log"), out))
        deadline = time.monotonic() + duration + 150
        for proc, out in started:
            try:
                proc.popen.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                total.error("client process hung", f"{proc.log} did not finish")
                continue
            if proc.popen.returncode != 0 or not out.exists():
                total.error("client process failed", proc.log.read_text(errors="replace")[-1000:])
                continue
            total.merge(json.loads(out.read_text()))
    finally:
        for proc, _ in started:
            proc.stop(grace=5)
    return total


def soak(args: argparse.Namespace) -> int:
    from kproxy_tools import testenv

    workdir = Path(tempfile.mkdtemp(prefix="kproxy-soak-"))
    say(f"kproxy soak: {args.clients} clients for {args.duration:g} s (+{args.warmup:g} s warm-up), "
        f"{args.workers} workers x {args.threads} threads, {args.nodes} nodes from discovery, "
        f"bodies up to {args.max_body} B; {os.cpu_count()} CPUs; logs in {workdir}")
    kube = None
    upstreams: list[Proc] = []
    gateway: Proc | None = None
    failed = True
    try:
        try:
            binary = testenv.provision(log=say)
            kube = testenv.KubeAPIServer(binary, log=say)
            kube.start()
        except testenv.TestEnvUnavailable as e:
            say(f"cannot run: no test Kubernetes API server here: {e}")
            return 2
        for i in range(args.nodes):
            upstreams.append(start_upstream(f"node-{i}", workdir / f"upstream-{i}.log",
                                            keepalive=args.upstream_keepalive))
        node_ports = {p.port for p in upstreams}
        kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        register(kube, NAMESPACE, SERVICE, sorted(node_ports))

        token = workdir / "token"
        token.write_text(kube.admin_token)
        token.chmod(0o600)
        listen_port = free_port()
        config = workdir / "kproxy.ini"
        config.write_text(ini(kube, NAMESPACE, str(token), args.workers, args.threads,
                              listen=f"127.0.0.1:{listen_port}"))
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        env.update(args.env)
        env["KPROXY_CONFIG"] = str(config)
        gateway = Proc("kproxy", [PYTHON, "-m", "gunicorn", "-c", str(args.gunicorn_conf),
                        "kproxy.wsgi:application"], workdir / "kproxy.log", env=env)
        # gunicorn's stdout (the access log, on as in production) and stderr share one file
        url = f"http://127.0.0.1:{listen_port}"
        wait_for(lambda: gateway.popen.poll() is None and get(url + "/-/readyz").status_code == 200,
                 60, "kproxy ready")
        workers = wait_for(lambda: (w := gunicorn_workers(gateway.pid)) and len(w) == args.workers and w, 30,
                           f"{args.workers} gunicorn workers")
        for _ in range(4 * args.workers):  # fresh connections: every worker routes to discovered nodes
            wait_for(lambda: get(url + "/small", timeout=10, host=HOST).status_code == 200, 30, "a routed request")
        api_port = int(kube.url.rsplit(":", 1)[1])

        say(f"warm-up: {args.warmup:g} s")
        warm = drive(url, args.clients, args.client_procs, args.warmup, args.seed, args.max_body, workdir, "warmup")
        settle(workers, listen_port)
        start = snapshot(workers, listen_port, node_ports, api_port)

        say(f"measured run: {args.duration:g} s")
        t0 = time.monotonic()
        with Sampler(workers, listen_port, node_ports, api_port) as sampler:
            run = drive(url, args.clients, args.client_procs, args.duration, args.seed + 1, args.max_body,
                        workdir, "run")
        elapsed = time.monotonic() - t0
        settle(workers, listen_port)
        end = snapshot(workers, listen_port, node_ports, api_port)
        metrics = get(url + "/-/metrics").text
        workers_after = gunicorn_workers(gateway.pid)
        log_text = gateway.log.read_text(errors="replace")

        failed = report(args, warm, run, elapsed, start, end, sampler, workers, workers_after, metrics, log_text)
        return 1 if failed else 0
    except Exception as e:
        say(f"soak could not run: {type(e).__name__}: {e}")
        if gateway is not None:
            say(gateway.log.read_text(errors="replace")[-3000:])
        return 2
    finally:
        if gateway is not None:
            gateway.stop(grace=15)
        for proc in upstreams:
            proc.stop(grace=5)
        if kube is not None:
            kube.stop()
        if failed or args.keep:
            say(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def report(args: argparse.Namespace, warm: ClientStats, run: ClientStats, elapsed: float,
           start: dict[int, dict[str, int]], end: dict[int, dict[str, int]], sampler: Sampler,
           workers: list[int], workers_after: list[int], metrics: str, log_text: str) -> bool:
    """Print the figures and the targets; True if a target was missed."""
    lat = run.all_latencies()
    say("")
    say(f"requests      {run.requests} in {elapsed:.1f} s ({run.requests / elapsed:.0f}/s); warm-up {warm.requests}")
    say(f"errors        {sum(run.errors.values())} (warm-up {sum(warm.errors.values())})")
    for kind, n in (run.errors + warm.errors).most_common():
        sample = run.error_samples.get(kind) or warm.error_samples.get(kind)
        say(f"    {n:6d}  {kind}: {sample}")
    say(f"latency       p50 {percentile(lat, 50):.1f} ms, p99 {percentile(lat, 99):.1f} ms, "
        f"max {max(lat, default=float('nan')):.0f} ms")
    say(f"connections   {run.clients} clients opened {run.connections_opened} connections (keep-alive); "
        f"the workers held {sampler.peak_clients} at once")
    say(f"bytes         up {run.bytes_up / MiB:.0f} MiB, down {run.bytes_down / MiB:.0f} MiB; "
        f"answers by node: {dict(sorted(run.nodes.items()))}")
    say("")
    rows = [("kind", "requests", "p50 ms", "p99 ms", "max ms")]
    for kind in [k for k, _ in KINDS] + ["small", "large"]:
        values = run.latency_ms.get(kind, [])
        rows.append((kind, str(len(values)), f"{percentile(values, 50):.1f}", f"{percentile(values, 99):.1f}",
                     f"{max(values, default=float('nan')):.0f}"))
    say(table(rows))
    say("")
    rows = [("worker", "RSS start MiB", "RSS end MiB", "growth", "fds start", "fds end", "fds peak",
             "upstream fds end", "threads start/end/peak", "clients held")]
    for pid in workers:
        s, e, p = start[pid], end[pid], sampler.peak[pid]
        growth = (e["rss_kib"] - s["rss_kib"]) / s["rss_kib"]
        rows.append((str(pid), f"{s['rss_kib'] / 1024:.1f}", f"{e['rss_kib'] / 1024:.1f}", f"{growth:+.1%}",
                     str(s["total"]), str(e["total"]), str(p.get("total", 0)), str(e.get("upstream", 0)),
                     f"{s['threads']}/{e['threads']}/{p.get('threads', 0)}", str(p.get("client", 0))))
    say(table(rows))
    say("RSS under load, MiB, at 0/25/50/75/100 % of the run: " + "; ".join(
        f"{pid}: " + " ".join(f"{v / 1024:.1f}" for v in quartiles(sampler.rss_timeline[pid])) for pid in workers))
    say("descriptors at end by kind: " + "; ".join(
        f"{pid}: " + ", ".join(f"{k} {v}" for k, v in sorted(end[pid].items()) if k not in ("rss_kib", "threads", "total"))
        for pid in workers))

    upstream_errors = metric_sum(metrics, "kproxy_upstream_errors_total")
    answered_5xx = metric_sum(metrics, "kproxy_requests_total", 'code="5xx"')
    tracebacks = log_text.count("Traceback")
    checks: list[tuple[str, bool, str]] = []
    errors = sum(run.errors.values()) + sum(warm.errors.values())
    checks.append(("errors = 0", errors == 0, f"{errors}"))
    checks.append((f"{args.clients} client connections held at once", sampler.peak_clients >= args.clients,
                   f"{sampler.peak_clients}"))
    for pid in workers:
        s, e, p = start[pid], end[pid], sampler.peak[pid]
        growth = (e["rss_kib"] - s["rss_kib"]) / s["rss_kib"]
        checks.append((f"worker {pid}: RSS growth < {RSS_GROWTH_LIMIT:.0%}", growth < RSS_GROWTH_LIMIT,
                       f"{s['rss_kib'] / 1024:.1f} -> {e['rss_kib'] / 1024:.1f} MiB ({growth:+.1%})"))
        fixed_s = s["total"] - s.get("upstream", 0)
        fixed_e = e["total"] - e.get("upstream", 0)
        checks.append((f"worker {pid}: no descriptor leak", e.get("client", 0) == 0 and fixed_e <= fixed_s + FD_MARGIN
                       and e.get("upstream", 0) <= args.threads * args.nodes,
                       f"{s['total']} -> {e['total']} (without pooled upstream connections {fixed_s} -> {fixed_e}; "
                       f"pooled {s.get('upstream', 0)} -> {e.get('upstream', 0)} <= {args.threads * args.nodes}; "
                       f"client sockets left {e.get('client', 0)})"))
        checks.append((f"worker {pid}: threads <= {args.threads + THREAD_SLACK}",
                       p.get("threads", 0) <= args.threads + THREAD_SLACK, f"peak {p.get('threads', 0)}"))
    checks.append(("no worker restarted", workers_after == workers, f"{workers} -> {workers_after}"))
    checks.append(("no traceback in kproxy's log", tracebacks == 0, f"{tracebacks}"))
    checks.append(("no upstream error or 5xx in kproxy's metrics", upstream_errors == 0 and answered_5xx == 0,
                   f"upstream errors {upstream_errors:.0f}, 5xx answers {answered_5xx:.0f}"))
    say("")
    missed = False
    for name, ok, detail in checks:
        say(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
        missed |= not ok
    if args.json:
        Path(args.json).write_text(json.dumps({
            "clients": args.clients, "duration": args.duration, "workers": args.workers, "threads": args.threads,
            "requests": run.requests, "warmup_requests": warm.requests, "elapsed": elapsed,
            "errors": dict(run.errors + warm.errors), "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
            "latency_by_kind": {k: {"n": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99)}
                                for k, v in run.latency_ms.items()},
            "connections_opened": run.connections_opened, "peak_clients_held": sampler.peak_clients,
            "bytes_up": run.bytes_up, "bytes_down": run.bytes_down, "nodes": dict(run.nodes),
            "start": start, "end": end, "peak": sampler.peak, "rss_timeline_kib": sampler.rss_timeline,
            "checks": [{"check": n, "ok": ok, "detail": d} for n, ok, d in checks]}, indent=1, default=str))
    return missed


def quartiles(series: list[int]) -> list[int]:
    if not series:
        return []
    return [series[min(len(series) - 1, round(q * (len(series) - 1)))] for q in (0, 0.25, 0.5, 0.75, 1)]


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmM]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(m.group(1)) * {"": 1, "k": KiB, "m": MiB}[m.group(2).lower()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200, help="concurrent keep-alive clients (200)")
    parser.add_argument("--duration", type=float, default=60, help="seconds of the measured run (60)")
    parser.add_argument("--warmup", type=float, default=15, help="seconds of warm-up before START (15)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (2)")
    parser.add_argument("--threads", type=int, default=32, help="request threads per worker (32)")
    parser.add_argument("--nodes", type=int, default=2, help="upstream nodes (2)")
    parser.add_argument("--upstream-keepalive", type=int, default=2,
                        help="the nodes' keep-alive in seconds (2, gunicorn's default)")
    parser.add_argument("--client-procs", type=int, default=4, help="processes the clients run in (4)")
    parser.add_argument("--max-body", type=parse_size, default=MAX_BODY, help="largest body, e.g. 512k (5m)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment of kproxy's gunicorn, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    parser.add_argument("--gunicorn-conf", default=str(ROOT / "conf" / "gunicorn.conf.py"),
                        help="gunicorn config of kproxy (conf/gunicorn.conf.py); another one for diagnosis")
    parser.add_argument("--keep", action="store_true", help="keep the logs directory")
    # internal mode: the client processes this script starts
    parser.add_argument("--client-proc", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client_proc:
        client_process_main(args)
        return 0
    if args.clients < 1 or args.duration <= 0 or args.workers < 1 or args.threads < 1 or args.nodes < 1:
        parser.error("--clients, --duration, --workers, --threads and --nodes must be positive")
    args.max_body = min(args.max_body, MAX_BODY)
    try:
        args.env = dict(item.split("=", 1) for item in args.env)
    except ValueError:
        parser.error("--env takes NAME=VALUE")
    return soak(args)


if __name__ == "__main__":
    sys.exit(main())
