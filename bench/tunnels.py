"""Upgrade tunnels at scale (issue #14): 1,000 WebSockets open through one ``kproxy serve``
worker on its default config, side by side with nginx as a reverse proxy and with the
echo server asked straight, in one run (never part of the tests; bench/run.py imports it).

    python bench/tunnels.py [--tunnels 1000] [--echoers 100] [--messages 20] [--json FILE]

What it does (everything on 127.0.0.1; every process it starts is stopped in ``finally``):

1. An echo server: the ``websockets`` package's asyncio server, one process, answering
   every message with itself (no compression, no keep-alive pings: the relay is measured,
   not the codec).
2. Contestants: ``kproxy serve`` on an INI that sets only where it listens, the service and
   its api (every ``[kproxy]`` setting at its default: one worker); nginx (one worker,
   upstream keep-alive, ``proxy_http_version 1.1``, ``proxy_set_header Upgrade
   $http_upgrade``, ``proxy_set_header Connection "upgrade"``, ``proxy_read_timeout``
   above the run); and "direct", the echo server asked with no proxy (what the client and
   the server cost on this machine); and ``kproxy serve`` once more with every handshake
   sent at once (outside the targets: each handshake holds a request thread until its
   101, and the worker keeps the threads it made).
3. Per contestant, one client process (the ``websockets`` client, asyncio) opens
   ``--tunnels`` WebSockets (50 handshakes at a time, ``--batch``), keeps them open, then
   ``--echoers`` of them send ``--messages`` messages of 100 bytes each concurrently, each
   waiting for its echo before the next (three such rounds, ``--echo-rounds``: one burst of
   other work on a shared machine sets a p99 alone); then every client closes.
4. Measured on the proxy's process tree (the process started and its descendants):
   RSS and threads before the tunnels (after a warm-up of 10 tunnels) and with all open;
   file descriptors before, with all open, and how long after the clients closed they
   were back to the starting count (polled for 5 s); the echo round trips' p50/p99 (the
   medians over the rounds).

Targets (exit 1 if one is missed; for kproxy): every tunnel opened, echo p99 <= 50 ms,
RSS growth <= 60 MB, <= 200 threads, descriptors back within 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's bench, kproxy, kproxy_tools

from bench._common import PYTHON, Proc, median, percentile, raise_nofile, rss_mb, say, table, wait_http  # noqa: E402
from kproxy_tools.common import free_ports  # noqa: E402

NGINX, SERVE, DIRECT, BURST = "nginx", "kproxy-serve", "direct", "kproxy-serve-burst"
LABELS = {NGINX: "nginx reverse proxy", SERVE: "kproxy serve (defaults)", DIRECT: "echo server, no proxy",
          BURST: "kproxy serve, every handshake at once"}
TARGETS = {"p99_ms": 50.0, "rss_mb": 60.0, "threads": 200, "fds_back_s": 5.0}
MESSAGE = b"x" * 100
BATCH = 50   # handshakes at a time (--batch): each holds a request thread until its 101 is relayed
WARMUP = 10

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx-ws.pid;
error_log {dir}/nginx-ws-error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/nginx-ws-tmp/body;
    proxy_temp_path {dir}/nginx-ws-tmp/proxy;
    upstream echo {{
        server 127.0.0.1:{upstream};
        keepalive 512;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://echo;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
    }}
}}
"""

# every [kproxy] setting at its default but where it listens
KPROXY_INI = """\
[kproxy]
listen = 127.0.0.1:{port}

[service:echo]
nodes = 127.0.0.1:{upstream}

[api:all]
service = echo
path = /
"""


# -- the echo server and the clients (processes of their own) ----------------------------

async def _echo_server(port: int) -> None:
    from websockets.asyncio.server import serve

    async def echo(ws: Any) -> None:
        async for message in ws:
            await ws.send(message)
    async with serve(echo, "127.0.0.1", port, compression=None, ping_interval=None, backlog=4096,
                     max_queue=None) as server:
        await server.serve_forever()


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _clients(url: str, tunnels: int, echoers: int, messages: int, batch: int = BATCH) -> None:
    """Phases driven by the parent on stdin: open (at once), then one echo round per
    ``echo`` line, then any other line closes every WebSocket."""
    from websockets.asyncio.client import connect
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async def open_one() -> Any:
        try:
            return await connect(url, compression=None, ping_interval=None, open_timeout=30, close_timeout=5)
        except (OSError, asyncio.TimeoutError, Exception) as e:  # a failed handshake is counted, not fatal
            return repr(e)
    t0 = time.monotonic()
    opened: list[Any] = []
    for i in range(0, tunnels, batch):
        opened += await asyncio.gather(*(open_one() for _ in range(min(batch, tunnels - i))))
    live = [ws for ws in opened if not isinstance(ws, str)]
    errors = sorted({e for e in opened if isinstance(e, str)})[:3]
    _emit({"phase": "open", "opened": len(live), "failed": len(opened) - len(live), "errors": errors,
           "seconds": time.monotonic() - t0})

    while (await stdin.readline()).strip() == b"echo":
        await _echo_round(live[:echoers], messages)
    await asyncio.gather(*(ws.close() for ws in live), return_exceptions=True)
    _emit({"phase": "closed"})


async def _echo_round(echoers: list[Any], messages: int) -> None:
    """Every one of ``echoers`` at once sends ``messages`` messages, each after the echo of
    the one before: the round trips' p50/p99."""
    rtts: list[float] = []
    failures = 0

    async def echo(ws: Any) -> None:
        nonlocal failures
        for _ in range(messages):
            t = time.perf_counter()
            await ws.send(MESSAGE)
            if await ws.recv() != MESSAGE:
                failures += 1
            rtts.append((time.perf_counter() - t) * 1000)
    t0 = time.monotonic()
    results = await asyncio.gather(*(echo(ws) for ws in echoers), return_exceptions=True)
    failures += sum(isinstance(r, BaseException) for r in results)
    _emit({"phase": "echo", "echoes": len(rtts), "failures": failures, "seconds": time.monotonic() - t0,
           "p50_ms": percentile(rtts, 50), "p99_ms": percentile(rtts, 99), "max_ms": max(rtts, default=None)})


# -- the proxy's process tree -------------------------------------------------------------

def tree(root: int) -> list[int]:
    """``root`` and its live descendants."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parent[int(name)] = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parent.items() if ppid in frontier]
        found += frontier
    return found


def _threads(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(next(line for line in f if line.startswith("Threads:")).split()[1])
    except (OSError, StopIteration):
        return 0


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def snapshot(root: int | None) -> dict[str, float]:
    if root is None:
        return {"rss_mb": 0.0, "threads": 0, "fds": 0}
    pids = tree(root)
    return {"rss_mb": sum(rss_mb(p) or 0.0 for p in pids), "threads": sum(map(_threads, pids)),
            "fds": sum(map(_fds, pids))}


# -- contestants -------------------------------------------------------------------------

def start(key: str, workdir: Path, upstream: int) -> tuple[Proc | None, int]:
    if key == DIRECT:
        return None, upstream
    port, = free_ports(1)
    log = workdir / f"ws-{key}.log"
    if key == NGINX:
        (workdir / "nginx-ws-tmp").mkdir(exist_ok=True)
        conf = workdir / "nginx-ws.conf"
        conf.write_text(NGINX_CONF.format(dir=workdir, upstream=upstream, port=port))
        proc = Proc(key, ["nginx", "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "nginx-ws-error.log")], log)
    else:  # SERVE, BURST
        ini = workdir / f"ws-{key}.ini"
        ini.write_text(KPROXY_INI.format(port=port, upstream=upstream))
        metrics = workdir / f"metrics-ws-{key}"
        metrics.mkdir(exist_ok=True)
        env = dict(os.environ, KPROXY_CONFIG=str(ini), PROMETHEUS_MULTIPROC_DIR=str(metrics))
        proc = Proc(key, [PYTHON, "-m", "kproxy.cli", "serve", "-c", str(ini)], log, env=env, stop_signal=2)
    try:
        # the echo server answers a plain GET 426; any answer says the proxy is up
        wait_http(port, "/", host="127.0.0.1", timeout=30, proc=proc, want=lambda s, b: s in (426, 400, 200))
    except BaseException:
        proc.stop()
        raise
    return proc, port


class Clients:
    """The client process, phase by phase."""

    def __init__(self, port: int, tunnels: int, echoers: int, messages: int, batch: int = BATCH):
        self.popen = subprocess.Popen(
            [PYTHON, __file__, "--role", "clients", "--port", str(port), "--tunnels", str(tunnels),
             "--echoers", str(echoers), "--messages", str(messages), "--batch", str(batch)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=raise_nofile, start_new_session=True)

    def read(self, timeout: float = 120.0) -> dict[str, Any]:
        import select
        ready, _, _ = select.select([self.popen.stdout], [], [], timeout)
        line = self.popen.stdout.readline() if ready else ""
        if not line:
            self.stop()
            raise RuntimeError(f"the WebSocket clients stopped: {self.popen.stderr.read()[-2000:]}")
        return json.loads(line)

    def send(self, word: str) -> None:
        self.popen.stdin.write(word + "\n")
        self.popen.stdin.flush()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)


def run_one(key: str, proc: Proc | None, port: int, tunnels: int, echoers: int, messages: int,
            rounds: int = 3, batch: int = BATCH) -> dict[str, Any]:
    root = proc.pid if proc is not None else None
    if key == BURST:
        batch = tunnels
    warm = Clients(port, WARMUP, WARMUP, 5)  # code paths, pools and buffers the first tunnels make
    try:
        warm.read()
        warm.send("echo")
        warm.read()
        warm.send("close")
        warm.read()
    finally:
        warm.stop()
    time.sleep(1.0)
    before = snapshot(root)
    clients = Clients(port, tunnels, echoers, messages, batch)
    try:
        opened = clients.read(180)
        time.sleep(1.0)  # the last handshakes' threads back in the pool
        open_ = snapshot(root)
        echoes = []
        for _ in range(rounds):  # rounds, as one burst of other work on the machine sets a p99 alone
            clients.send("echo")
            echoes.append(clients.read(180))
        clients.send("close")
        clients.read(60)
        closed_at = time.monotonic()
    finally:
        clients.stop()
    back_s = None
    if root is not None:
        while time.monotonic() - closed_at < TARGETS["fds_back_s"] + 5:
            if snapshot(root)["fds"] <= before["fds"]:
                back_s = time.monotonic() - closed_at
                break
            time.sleep(0.05)
    after = snapshot(root)
    return {"contestant": key, "opened": opened["opened"], "failed": opened["failed"], "open_errors": opened["errors"],
            "open_s": opened["seconds"], "echoes": sum(e["echoes"] for e in echoes),
            "echo_failures": sum(e["failures"] for e in echoes),
            "p50_ms": median([e["p50_ms"] for e in echoes]), "p99_ms": median([e["p99_ms"] for e in echoes]),
            "p99_rounds_ms": [round(e["p99_ms"], 1) for e in echoes], "max_ms": max(e["max_ms"] for e in echoes),
            "rss_before_mb": before["rss_mb"], "rss_open_mb": open_["rss_mb"],
            "rss_growth_mb": open_["rss_mb"] - before["rss_mb"], "threads_before": before["threads"],
            "threads_open": open_["threads"], "fds_before": before["fds"], "fds_open": open_["fds"],
            "fds_after": after["fds"], "fds_back_s": back_s}


def measure(workdir: Path, tunnels: int = 1000, echoers: int = 100, messages: int = 20,
            keys: tuple[str, ...] = (NGINX, SERVE, DIRECT, BURST), rounds: int = 3,
            batch: int = BATCH) -> dict[str, Any]:
    """Every contestant in turn on one echo server: ``{key: figures}``. ``BURST`` is
    ``kproxy serve`` again, with every handshake sent at once (not a target: a handshake
    holds a request thread until its 101, and the worker keeps the threads it made)."""
    raise_nofile()
    results: dict[str, Any] = {}
    upstream_port, = free_ports(1)
    echo = Proc("ws-echo", [PYTHON, __file__, "--role", "echo", "--port", str(upstream_port)], workdir / "ws-echo.log")
    try:
        wait_http(upstream_port, "/", host="127.0.0.1", timeout=15, proc=echo, want=lambda s, b: s in (426, 400))
        for key in keys:
            proc, port = start(key, workdir, upstream_port)
            try:
                r = results[key] = run_one(key, proc, port, tunnels, echoers, messages, rounds, batch)
                say(f"  WebSockets {key:14} {r['opened']}/{tunnels} open in {r['open_s']:.1f} s, echo p50 "
                    f"{fmt(r['p50_ms'], '.1f')} p99 {fmt(r['p99_ms'], '.1f')} ms (rounds {r['p99_rounds_ms']}; {r['echoes']} echoes, "
                    f"{r['echo_failures']} failed); RSS {r['rss_before_mb']:.1f} -> {r['rss_open_mb']:.1f} MB, threads "
                    f"{r['threads_before']} -> {r['threads_open']}, fds {r['fds_before']} -> {r['fds_open']} -> "
                    f"{r['fds_after']} (back after {fmt(r['fds_back_s'], '.2f')} s)")
            finally:
                if proc is not None:
                    proc.stop()
            time.sleep(1.0)
    finally:
        echo.stop()
    return results


def fmt(value: Any, spec: str = ",.0f") -> str:
    return "-" if value is None or value != value else format(value, spec)


def rows_and_failures(results: dict[str, Any], tunnels: int) -> tuple[list[list[str]], list[str], list[tuple]]:
    """The table's rows, the missed targets, and the target checks ``(name, measured, ok)``."""
    rows = []
    for key, r in results.items():
        proxied = key != DIRECT
        rows.append([LABELS[key], f"{r['opened']}/{tunnels}", fmt(r["p50_ms"], ".1f"), fmt(r["p99_ms"], ".1f"),
                     " ".join(fmt(v, ".0f") for v in r["p99_rounds_ms"]),
                     fmt(r["rss_growth_mb"], ".1f") if proxied else "-",
                     f"{r['threads_before']} -> {r['threads_open']}" if proxied else "-",
                     f"{r['fds_before']} -> {r['fds_open']} -> {r['fds_after']}" if proxied else "-",
                     fmt(r["fds_back_s"], ".2f") if proxied else "-"])
    checks: list[tuple] = []
    r = results.get(SERVE)
    if r:
        back = r["fds_back_s"]
        checks = [
            (f"{tunnels:,} WebSockets open through one kproxy serve worker", f"{r['opened']}/{tunnels}",
             r["opened"] == tunnels and not r["echo_failures"]),
            ("WebSocket echo round trip p99 <= 50 ms (median of rounds)", fmt(r["p99_ms"], ".1f") + " ms",
             r["p99_ms"] is not None and r["p99_ms"] <= TARGETS["p99_ms"]),
            (f"RSS growth of the process tree <= 60 MB for {tunnels:,} tunnels", fmt(r["rss_growth_mb"], ".1f") + " MB",
             r["rss_growth_mb"] <= TARGETS["rss_mb"]),
            ("threads of the process tree <= 200 with the tunnels open", str(r["threads_open"]),
             r["threads_open"] <= TARGETS["threads"]),
            ("file descriptors back to the start within 5 s after close", fmt(back, ".2f") + " s",
             back is not None and back <= TARGETS["fds_back_s"]),
        ]
    failures = [f"{name}: {value}" for name, value, ok in checks if not ok]
    return rows, failures, checks


HEADER = ["contestant", "open", "echo p50 ms", "echo p99 ms", "p99 by round", "RSS growth MB", "threads", "fds start -> open -> after",
          "fds back after s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tunnels", type=int, default=1000)
    parser.add_argument("--echoers", type=int, default=100)
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--echo-rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=BATCH, help=f"handshakes at a time (default {BATCH})")
    parser.add_argument("--only", default=f"{NGINX},{SERVE},{DIRECT},{BURST}")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--role", choices=["echo", "clients"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "echo":
        asyncio.run(_echo_server(args.port))
        return 0
    if args.role == "clients":
        asyncio.run(_clients(f"ws://127.0.0.1:{args.port}/echo", args.tunnels, args.echoers, args.messages, args.batch))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="kproxy-ws-"))
    say(f"WebSockets: {args.tunnels} open, {args.echoers} x {args.messages} echoes; work dir {workdir}; "
        f"load average {os.getloadavg()[0]:.1f}")
    try:
        results = measure(workdir, args.tunnels, args.echoers, args.messages, tuple(args.only.split(",")),
                          args.echo_rounds, args.batch)
    finally:
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)
    rows, failures, checks = rows_and_failures(results, args.tunnels)
    say("\n" + table(rows, HEADER))
    say("\n" + table([[name, value, "PASS" if ok else "FAIL"] for name, value, ok in checks], ["target", "measured", ""]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
