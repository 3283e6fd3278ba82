"""Long-lived traffic (issue #14): slow upstreams at high concurrency, and event streams,
through kproxy's DEFAULT config under ``kproxy serve`` and under gunicorn
(``conf/gunicorn.conf.py``), side by side with nginx as a reverse proxy in the same run
(never part of the tests; tests/test_long_lived.py imports the upstream and the clients).

    python bench/slow_upstreams.py [--rounds 3] [--duration 5] [--connections 200]
                                   [--sse-clients 200] [--hold 200,800] [--json FILE]

What it does (everything on 127.0.0.1; every process it starts is stopped in ``finally``):

1. One upstream (``SlowUpstream``, asyncio, keep-alive, one Python process):
   ``GET /slow`` answers a small JSON after 200 ms (``?delay=S`` another wait);
   ``GET /sse`` answers ``text/event-stream``, chunked: the head at once, then 10 events
   200 ms apart, each carrying the ``CLOCK_MONOTONIC`` time it was written at.
2. Contestants, each with one worker process: nginx (``upstream { keepalive 512; }``,
   ``proxy_http_version 1.1``, ``proxy_set_header Connection ""``, ``worker_connections
   4096``, ``proxy_buffering off`` for ``/sse``), ``kproxy serve`` and kproxy under gunicorn,
   both on an INI that sets only the service and its api (every ``[kproxy]`` setting at
   its default; the access log on, to a file).
3. Concurrency: ``wrk -t2 -c200 -d5s --latency`` on ``/slow``, rounds alternating the
   contestants; medians of req/s, p50, p99 and of the per-round ratios to nginx.
4. Streams: ``--sse-clients`` clients (a separate asyncio process) open ``/sse`` at once;
   per event, the delay from its write by the upstream to its arrival at the client;
   per client, whether it got all 10 and how long its response head took.
5. Cost of a waiting request: N clients (``--hold``) each wait for a ``/slow?delay=4``
   answer; the worker's RSS and thread count idle and while they wait, and its CPU over
   2 s of the wait; the CPU per proxied request from the wrk runs.

Targets (exit 1 if one is missed): kproxy req/s >= 0.9 x nginx's, p99 <= 1.5 x nginx's,
0 errors, under both servers; every SSE client gets every event, p99 delay <= 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's bench, kproxy, kproxy_tools

from bench._common import (PYTHON, Proc, cpu_snapshot, foreign_share, median, percentile, rss_mb, say,  # noqa: E402
                           table, wait_http)
from bench._common import raise_nofile as _raise_nofile  # noqa: E402  (bench/run.py imports it from here)
from kproxy_tools.common import free_ports, gunicorn_workers  # noqa: E402

HOST = "slow.bench"
DELAY = 0.2          # the upstream's answer time
EVENTS, EVERY = 10, 0.2
NGINX, SERVE, GUNICORN = "nginx", "kproxy-serve", "kproxy-gunicorn"
LABELS = {NGINX: "nginx reverse proxy", SERVE: "kproxy serve (defaults)", GUNICORN: "kproxy gunicorn (defaults)"}
TARGETS = {"rps_ratio": 0.9, "p99_ratio": 1.5, "sse_p99_ms": 100.0}


# -- the upstream ------------------------------------------------------------------------

class _Answer(asyncio.Protocol):
    """One upstream connection: requests (GET, no body) answered one after another."""

    def __init__(self, delay: float):
        self.delay = delay
        self.buffer = b""
        self.busy = False
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def _next(self) -> None:
        if self.busy or self.transport is None:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > 65536:
                self.transport.close()
            return
        target = self.buffer.split(b" ", 2)[1] if self.buffer.count(b" ") >= 2 else b"/"
        self.buffer = self.buffer[end + 4:]
        self.busy = True
        loop = asyncio.get_running_loop()
        path, _, query = target.partition(b"?")
        delay = self.delay
        m = re.search(rb"delay=([0-9.]+)", query)
        if m:
            delay = float(m.group(1))
        if path.startswith(b"/sse"):  # ?every=S: another interval
            every = float(m.group(1)) if (m := re.search(rb"every=([0-9.]+)", query)) else EVERY
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")
            start = loop.time()
            for i in range(EVENTS):
                loop.call_at(start + every * (i + 1), self._event, i)
        else:
            loop.call_later(delay, self._answer)

    def _answer(self) -> None:
        if self.transport is None:
            return
        body = b'{"status":"ok","slow":true}'
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
        self.busy = False
        self._next()

    def _event(self, i: int) -> None:
        if self.transport is None:
            return
        event = b"id: %d\ndata: %d\n\n" % (i, time.monotonic_ns())
        last = i == EVENTS - 1
        self.transport.write(b"%x\r\n%s\r\n%s" % (len(event), event, b"0\r\n\r\n" if last else b""))
        if last:
            self.busy = False
            self._next()


class SlowUpstream:
    """The upstream in a thread of this process (for tests): ``port`` once started."""

    def __init__(self, delay: float = DELAY):
        self.delay = delay
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-upstream", daemon=True)

    def start(self) -> SlowUpstream:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the slow upstream did not start")
        return self

    def _run(self) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            server = await self._loop.create_server(lambda: _Answer(self.delay), "127.0.0.1", 0, backlog=4096)
            self.port = server.sockets[0].getsockname()[1]
            self._stopped = asyncio.Event()
            self._ready.set()
            async with server:
                await self._stopped.wait()
        asyncio.run(serve())

    def stop(self) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(10)


async def _serve_forever(port: int, delay: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Answer(delay), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


# -- clients -----------------------------------------------------------------------------

async def _read_head(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head


async def _sse_client(port: int, host: str, path: str) -> dict[str, Any]:
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode())
        status, head = await _read_head(reader)
        head_ms = (time.monotonic() - started) * 1000
        if status != 200 or b"chunked" not in head.lower():
            return {"status": status, "head_ms": head_ms, "delays": [], "events": 0}
        text, delays, events, ids = b"", [], 0, []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            text += (await reader.readexactly(size + 2))[:-2]
            arrived = time.monotonic_ns()
            while (end := text.find(b"\n\n")) >= 0:
                event, text = text[:end], text[end + 2:]
                m = re.search(rb"^data: (\d+)$", event, re.M)
                if m:
                    events += 1
                    ids.append(int(re.search(rb"^id: (\d+)$", event, re.M).group(1)))
                    delays.append((arrived - int(m.group(1))) / 1e6)
        return {"status": status, "head_ms": head_ms, "delays": delays, "events": events, "ids": ids}
    finally:
        writer.close()


async def sse_clients(port: int, clients: int, host: str = HOST, path: str = "/sse",
                      timeout: float = 30.0) -> dict[str, Any]:
    """``clients`` event-stream clients at once: how many got every event (each once, in
    order), the delays from the upstream's write to the client's read, the heads' times."""
    async def one() -> dict[str, Any]:
        try:
            return await asyncio.wait_for(_sse_client(port, host, path), timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            return {"status": 0, "error": repr(e), "delays": [], "events": 0, "head_ms": None}
    results = await asyncio.gather(*(one() for _ in range(clients)))
    delays = [d for r in results for d in r["delays"]]
    heads = [r["head_ms"] for r in results if r["head_ms"] is not None]
    return {
        "clients": clients, "complete": sum(r.get("ids") == list(range(EVENTS)) for r in results),
        "events": sum(r["events"] for r in results), "statuses": _count(r["status"] for r in results),
        "errors": sorted({r["error"] for r in results if "error" in r})[:5],
        "delay_p50_ms": percentile(delays, 50), "delay_p99_ms": percentile(delays, 99),
        "delay_max_ms": max(delays, default=None),
        "head_p50_ms": percentile(heads, 50), "head_max_ms": max(heads, default=None),
    }


async def hold_clients(port: int, clients: int, path: str, host: str = HOST, timeout: float = 60.0,
                       started: Any = None) -> dict[str, Any]:
    """``clients`` connections, each one request at the same time: statuses, bodies of the
    non-200 answers, the slowest answer. ``started`` (a threading.Event) is set once every
    request was sent."""
    sent = 0

    async def one() -> tuple[int, bytes, float]:
        nonlocal sent
        t0 = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            await writer.drain()
            sent += 1
            if started is not None and sent == clients:
                started.set()
            status, head = await _read_head(reader)
            m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            body = await reader.readexactly(int(m.group(1))) if m else b""
            return status, body, time.monotonic() - t0
        finally:
            writer.close()

    async def guarded() -> tuple[int, bytes, float]:
        try:
            return await asyncio.wait_for(one(), timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            return 0, repr(e).encode(), timeout
    results = await asyncio.gather(*(guarded() for _ in range(clients)))
    return {"statuses": _count(s for s, _, _ in results),
            "other_bodies": sorted({b.decode(errors="replace") for s, b, _ in results if s != 200})[:5],
            "slowest_s": max(t for _, _, t in results)}


def _count(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[str(v)] = counts.get(str(v), 0) + 1
    return counts


# -- contestants -------------------------------------------------------------------------

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/nginx-tmp/body;
    proxy_temp_path {dir}/nginx-tmp/proxy;
    keepalive_requests 1000000;
    upstream slow {{
        server 127.0.0.1:{upstream};
        keepalive 512;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://slow;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
        location /sse {{
            proxy_pass http://slow;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""

# every [kproxy] setting at its default but where it listens and the access log's file
KPROXY_INI = """\
[kproxy]
listen = 127.0.0.1:{port}

[service:slow]
host = {host}
nodes = 127.0.0.1:{upstream}

[api:all]
service = slow
path = /
"""


def start(key: str, workdir: Path, upstream: int) -> tuple[Proc, int]:
    port, = free_ports(1)
    log = workdir / f"{key}.log"
    if key == NGINX:
        (workdir / "nginx-tmp").mkdir(exist_ok=True)
        conf = workdir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=workdir, upstream=upstream, port=port))
        proc = Proc(key, ["nginx", "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "nginx-error.log")], log)
    else:
        ini = workdir / f"{key}.ini"
        ini.write_text(KPROXY_INI.format(port=port, host=HOST, upstream=upstream))
        metrics = workdir / f"metrics-{key}"
        metrics.mkdir(exist_ok=True)
        env = dict(os.environ, KPROXY_CONFIG=str(ini), PROMETHEUS_MULTIPROC_DIR=str(metrics))
        cmd = ([PYTHON, "-m", "kproxy.cli", "serve", "-c", str(ini)] if key == SERVE else
               [PYTHON, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py", "kproxy.wsgi:application"])
        proc = Proc(key, cmd, log, env=env, stop_signal=signal.SIGINT)
    try:
        wait_http(port, "/slow?delay=0", host=HOST, timeout=30, proc=proc)
    except BaseException:
        proc.stop()
        raise
    return proc, port


def worker_pid(key: str, proc: Proc) -> int:
    """The process that serves: nginx's or gunicorn's (only) worker."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        kids = gunicorn_workers(proc.pid)
        if kids:
            return kids[0]
        time.sleep(0.1)
    return proc.pid


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


# -- load --------------------------------------------------------------------------------

def wrk(port: int, duration: float, connections: int) -> dict[str, Any]:
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{round(duration)}s", "--latency", "-H", f"Host: {HOST}",
                          f"http://127.0.0.1:{port}/slow"], capture_output=True, text=True, timeout=duration + 60,
                         preexec_fn=_raise_nofile).stdout
    units = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}

    def ms(text: str) -> float:
        m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
        return float(m.group(1)) * units[m.group(2)]
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(map(int, m.groups()))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),
            "p99_ms": ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)), "errors": errors}


def client_process(role: str, port: int, clients: int, path: str = "") -> dict[str, Any]:
    """Run the asyncio clients in a process of their own (off this one's GIL)."""
    out = subprocess.run([PYTHON, __file__, "--role", role, "--port", str(port), "--clients", str(clients),
                          "--path", path],
                         capture_output=True, text=True, timeout=120, preexec_fn=_raise_nofile)
    if out.returncode != 0:
        raise RuntimeError(f"{role} clients failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def hold_cost(key: str, pid: int, port: int, clients: int) -> dict[str, Any]:
    """RSS, threads and CPU of the worker while ``clients`` requests wait for their upstream."""
    rss_idle, threads_idle = rss_mb(pid), proc_threads(pid)
    proc = subprocess.Popen([PYTHON, __file__, "--role", "hold", "--port", str(port), "--clients",
                             str(clients), "--path", "/slow?delay=4"], stdout=subprocess.PIPE, text=True,
                            preexec_fn=_raise_nofile, start_new_session=True)
    try:
        time.sleep(1.5)  # every request sent and waiting upstream
        cpu0, t0 = proc_cpu(pid), time.monotonic()
        time.sleep(2.0)
        cpu = (proc_cpu(pid) - cpu0) / (time.monotonic() - t0)
        rss_wait, threads_wait = rss_mb(pid), proc_threads(pid)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    result = json.loads(out)
    return {"clients": clients, "rss_idle_mb": rss_idle, "rss_waiting_mb": rss_wait,
            "kib_per_request": (rss_wait - rss_idle) * 1024 / clients, "threads_idle": threads_idle,
            "threads_waiting": threads_wait, "cpu_share_waiting": cpu, "statuses": result["statuses"]}


# -- the run -----------------------------------------------------------------------------

def fmt(value: Any, spec: str = ",.0f") -> str:
    return "-" if value is None or value != value else format(value, spec)


def measure(workdir: Path, keys: list[str], rounds: int = 3, duration: float = 5.0, connections: int = 200,
            sse: int = 200, holds: list[int] | tuple[int, ...] = (200, 800)) -> dict[str, Any]:
    """The three measures over ``keys`` (contestants started in ``workdir``, stopped at the
    end): ``rounds`` wrk runs each on ``/slow`` (0: none), ``sse`` event-stream clients (0:
    none), the cost of each count of ``holds`` waiting requests. The report for ``summary``."""
    _raise_nofile()
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "rounds": [], "sse": {}, "hold": {}, "cpu": {},
                              "connections": connections, "duration": duration, "sse_clients": sse}
    procs: list[Proc] = []
    try:
        upstream_port, = free_ports(1)
        up = Proc("upstream", [PYTHON, __file__, "--role", "upstream", "--port", str(upstream_port)], workdir / "upstream.log")
        procs.append(up)
        wait_http(upstream_port, "/slow?delay=0", timeout=10, proc=up)
        servers: dict[str, tuple[Proc, int, int]] = {}
        for key in keys:
            proc, port = start(key, workdir, upstream_port)
            procs.append(proc)
            servers[key] = (proc, port, worker_pid(key, proc))
        cpu_per_request: dict[str, list[float]] = {k: [] for k in keys}
        for r in range(rounds):
            order = keys[r % len(keys):] + keys[:r % len(keys)]
            row: dict[str, Any] = {}
            for key in order:
                _, port, pid = servers[key]
                before, cpu0 = cpu_snapshot(), proc_cpu(pid)
                result = wrk(port, duration, connections)
                cpu_per_request[key].append((proc_cpu(pid) - cpu0) / max(result["requests"], 1))
                result["other_cpu"] = foreign_share(before, cpu_snapshot())
                row[key] = result
                say(f"  round {r + 1} {key:16} {result['rps']:7,.0f} req/s  p50 {result['p50_ms']:6.0f} ms  "
                    f"p99 {result['p99_ms']:6.0f} ms  errors {result['errors']}  (other CPU {result['other_cpu']:.0%})")
                time.sleep(1.0)  # the connections of the run close
            report["rounds"].append(row)
        for key in keys if rounds else ():
            report["cpu"][key] = median(cpu_per_request[key]) * 1e6  # µs per request
        for key in keys if sse else ():
            _, port, pid = servers[key]
            report["sse"][key] = client_process("sse", port, sse)
            s = report["sse"][key]
            say(f"  SSE {key:16} {s['complete']}/{s['clients']} complete, delay p50 {fmt(s['delay_p50_ms'], '.1f')} "
                f"p99 {fmt(s['delay_p99_ms'], '.1f')} max {fmt(s['delay_max_ms'], '.1f')} ms, head p50 "
                f"{fmt(s['head_p50_ms'], '.1f')} max {fmt(s['head_max_ms'], '.1f')} ms {s['statuses']} {s['errors']}")
        for key in keys if holds else ():
            _, port, pid = servers[key]
            report["hold"][key] = []
            for n in holds:
                time.sleep(1.0)
                h = hold_cost(key, pid, port, n)
                report["hold"][key].append(h)
                say(f"  hold {key:16} {n:4} waiting: RSS {h['rss_idle_mb']:.1f} -> {h['rss_waiting_mb']:.1f} MB "
                    f"({h['kib_per_request']:.0f} KiB each), threads {h['threads_idle']} -> {h['threads_waiting']}, "
                    f"CPU {h['cpu_share_waiting']:.1%} while waiting {h['statuses']}")
    finally:
        for proc in reversed(procs):
            proc.stop()
    return report


def summary(report: dict[str, Any], keys: list[str]) -> tuple[list[tuple[str, list[str], list[list[str]]]], list[tuple]]:
    """The tables ``(title, header, rows)`` of a report, and its target checks
    ``(name, measured, ok)``; ``report["summary"]`` gets the medians."""
    rounds, tables, checks = report["rounds"], [], []
    rows = []
    for key in keys if rounds else ():
        runs = [r[key] for r in rounds]
        stats = {"rps": median([x["rps"] for x in runs]), "p50": median([x["p50_ms"] for x in runs]),
                 "p99": median([x["p99_ms"] for x in runs]), "errors": sum(x["errors"] for x in runs)}
        if NGINX in keys and key != NGINX:
            stats["rps_ratio"] = median([r[key]["rps"] / r[NGINX]["rps"] for r in rounds])
            stats["p99_ratio"] = median([r[key]["p99_ms"] / r[NGINX]["p99_ms"] for r in rounds])
            checks.append((f"{key}, slow upstream: req/s >= {TARGETS['rps_ratio']} x nginx's", f"{stats['rps_ratio']:.2f}",
                           stats["rps_ratio"] >= TARGETS["rps_ratio"]))
            checks.append((f"{key}, slow upstream: p99 <= {TARGETS['p99_ratio']} x nginx's", f"{stats['p99_ratio']:.2f}",
                           stats["p99_ratio"] <= TARGETS["p99_ratio"]))
        if key != NGINX:
            checks.append((f"{key}, slow upstream: 0 errors", str(stats["errors"]), not stats["errors"]))
        report.setdefault("summary", {})[key] = stats
        rows.append([LABELS[key], fmt(stats["rps"]), fmt(stats["p50"]), fmt(stats["p99"]), str(stats["errors"]),
                     fmt(stats.get("rps_ratio"), ".2f"), fmt(stats.get("p99_ratio"), ".2f"),
                     fmt(report["cpu"][key], ",.0f")])
    if rows:
        tables.append((f"slow upstream ({DELAY * 1000:.0f} ms; wrk -t2 -c{report['connections']} "
                       f"-d{report['duration']:g}s), medians over {len(rounds)} rounds",
                       ["contestant", "req/s", "p50 ms", "p99 ms", "errors", "req/s vs nginx", "p99 vs nginx",
                        "CPU µs/req"], rows))
    rows = []
    for key in report["sse"]:
        s = report["sse"][key]
        rows.append([LABELS[key], f"{s['complete']}/{s['clients']}", f"{s['events']}", fmt(s["delay_p50_ms"], ".1f"),
                     fmt(s["delay_p99_ms"], ".1f"), fmt(s["delay_max_ms"], ".1f"), fmt(s["head_max_ms"], ".1f")])
        if key != NGINX:
            checks.append((f"{key}, SSE: every client gets every event", f"{s['complete']}/{s['clients']}",
                           s["complete"] == s["clients"]))
            checks.append((f"{key}, SSE: event delay p99 <= {TARGETS['sse_p99_ms']:.0f} ms",
                           fmt(s["delay_p99_ms"], ".1f") + " ms",
                           (s["delay_p99_ms"] or 1e9) <= TARGETS["sse_p99_ms"]))
    if rows:
        tables.append((f"event streams ({report['sse_clients']} clients at once, {EVENTS} events "
                       f"{EVERY * 1000:.0f} ms apart)",
                       ["contestant", "clients with every event", "events", "delay p50 ms", "delay p99 ms",
                        "delay max ms", "head max ms"], rows))
    rows = []
    for key in report["hold"]:
        for h in report["hold"][key]:
            rows.append([LABELS[key], str(h["clients"]), fmt(h["rss_idle_mb"], ".1f"), fmt(h["rss_waiting_mb"], ".1f"),
                         fmt(h["kib_per_request"], ".0f"), f"{h['threads_idle']} -> {h['threads_waiting']}",
                         fmt(h["cpu_share_waiting"] * 100, ".1f"), json.dumps(h["statuses"])])
    if rows:
        tables.append(("cost of waiting requests (one worker)",
                       ["contestant", "waiting", "RSS idle MB", "RSS waiting MB", "KiB each", "threads",
                        "CPU % waiting", "answers"], rows))
    return tables, checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--sse-clients", type=int, default=200)
    parser.add_argument("--hold", default="200,800", help="waiting requests to measure the cost of (comma list)")
    parser.add_argument("--only", default=f"{NGINX},{SERVE},{GUNICORN}")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    # the helper processes: the upstream, and the clients off this process's GIL
    parser.add_argument("--role", choices=["upstream", "sse", "hold"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=200, help=argparse.SUPPRESS)
    parser.add_argument("--path", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "upstream":
        asyncio.run(_serve_forever(args.port, DELAY))
        return 0
    if args.role == "sse":
        print(json.dumps(asyncio.run(sse_clients(args.port, args.clients))))
        return 0
    if args.role == "hold":
        print(json.dumps(asyncio.run(hold_clients(args.port, args.clients, args.path))))
        return 0
    keys = [k for k in args.only.split(",") if k]
    holds = [int(n) for n in args.hold.split(",") if n]
    workdir = Path(tempfile.mkdtemp(prefix="kproxy-slow-"))
    say(f"slow upstreams: {args.rounds} rounds x wrk -t2 -c{args.connections} -d{args.duration:g}s, "
        f"upstream answers after {DELAY * 1000:.0f} ms; {args.sse_clients} SSE clients; work dir {workdir}")
    say(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    try:
        report = measure(workdir, keys, args.rounds, args.duration, args.connections, args.sse_clients, holds)
    finally:
        if not args.keep:
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)
    tables, checks = summary(report, keys)
    for title, header, rows in tables:
        say(f"\n{title}:")
        say(table(rows, header))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    failures = [f"{name}: {value}" for name, value, ok in checks if not ok]
    say("\n" + ("targets: PASS" if not failures else "targets: FAIL\n  " + "\n  ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
