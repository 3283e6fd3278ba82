"""Shared parts of the benchmarks: the upstream, the load generator, memory; processes
and ports come from ``kproxy_tools.common``.

Everything listens on 127.0.0.1 only. Every process is started in its own session
(process group) and stopped with ``Proc.stop`` (signal to the group, then SIGKILL), and
the callers stop them in ``finally`` blocks. Nothing here installs anything: ``wrk`` and
``nginx`` are used when they are on PATH, else the Python fallbacks in this folder.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kproxy_tools import common
from kproxy_tools.common import free_ports, proc_stats

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYTHON = sys.executable

# The upstream's answer: ~100 bytes of JSON, the same from nginx, the Python fallback and
# the hello-world ceiling.
BODY = b'{"status":"ok","service":"bench-upstream","message":"hello from the upstream","n":"0123456789ab"}'
HOST = "sd.httpbin.org"     # every contestant is asked the same request
PATH = "/v1/anything"

# gunicorn settings shared by every Python contestant (kproxy takes them from its INI:
# threads = 8, workers = N, keepalive_timeout = 5 -> the same values)
THREADS = 8
KEEPALIVE = 5


def say(*args: Any) -> None:
    print(*args, flush=True)


# -- processes --

class Proc(common.Proc):
    """A process started in the checkout, whose relative paths (conf/gunicorn.conf.py)
    the commands use."""

    def __init__(self, name: str, cmd: list[str], log: Path, **kwargs: Any):
        kwargs.setdefault("cwd", ROOT)
        super().__init__(name, cmd, log, **kwargs)


def _descendants_cpu(root: int) -> float:
    """CPU seconds (user + system) of the live descendants of ``root``."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for pid, fields in proc_stats():
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
    children_of: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children_of.setdefault(ppid, []).append(pid)
    total, stack = 0.0, list(children_of.get(root, []))
    while stack:
        pid = stack.pop()
        total += cpu.get(pid, 0.0)
        stack += children_of.get(pid, [])
    return total


def cpu_snapshot() -> tuple[float, float, float]:
    """(monotonic time, CPU seconds used by the whole machine, CPU seconds used by this
    process and everything it started): their differences over a round tell how much
    CPU other work on the machine took meanwhile."""
    import resource
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    machine = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    me = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk and other finished children
    own = me.ru_utime + me.ru_stime + reaped.ru_utime + reaped.ru_stime + _descendants_cpu(os.getpid())
    return time.monotonic(), machine, own


def foreign_share(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Share of the machine's CPU (0..1) that processes not started by this run used
    between two snapshots."""
    wall = max(after[0] - before[0], 1e-6)
    other = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, other / (wall * (os.cpu_count() or 1)))


def proc_mb(pid: int, field: str, file: str = "status") -> float | None:
    """A kB figure of /proc/PID/``file`` (``VmRSS`` of status, ``Pss`` of smaps_rollup) in
    MB; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/{file}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_mb(pid: int) -> float | None:
    return proc_mb(pid, "VmRSS")


def raise_nofile() -> None:
    """The soft open-file limit up to the hard one (inherited by the processes started
    after): 1,000 tunnels are 2,000 descriptors in a proxy and 1,000 in the client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q``th percentile; None for no values."""
    if not values:
        return None
    values = sorted(values)
    # the smallest value with at least q% of the values at or below it: with 50 values, p50 is
    # the 25th and p99 the slowest (round() would take the 26th: it rounds 25.5 to even)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values) / 100) - 1))]


def connections_per_worker(port: int, workers: list[int]) -> list[int]:
    """Established connections to ``port`` held by each worker (wrk's, during a run)."""
    try:
        out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    counts = dict.fromkeys(workers, 0)
    for line in out.splitlines():
        for pid in {int(p) for p in re.findall(r"pid=(\d+)", line)}:
            if pid in counts:
                counts[pid] += 1
    return [counts[w] for w in workers]


def client_ports_by_worker(port: int) -> dict[int, int]:
    """For connections to ``port``: the client's local port -> the pid holding the server side."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, timeout=5).stdout
    found = {}
    for line in out.splitlines():
        peer = re.search(r"127\.0\.0\.1:\d+\s+127\.0\.0\.1:(\d+)", line)
        pid = re.search(r"pid=(\d+)", line)
        if peer and pid:
            found[int(peer.group(1))] = int(pid.group(1))
    return found


# -- HTTP probes (http.client: no proxies or CA bundles from the environment) --

def http_get(port: int, path: str = PATH, host: str = HOST, timeout: float = 3.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_http(port: int, path: str = PATH, host: str = HOST, timeout: float = 30.0,
              proc: Proc | None = None, want: Callable[[int, bytes], bool] = lambda s, b: s == 200) -> float:
    """Poll until ``want(status, body)``; the seconds it took. Raises RuntimeError."""
    start = time.monotonic()
    last = "no answer"
    while time.monotonic() - start < timeout:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            status, body = http_get(port, path, host, timeout=2.0)
            if want(status, body):
                return time.monotonic() - start
            last = f"HTTP {status}: {body[:200]!r}"
        except OSError as e:
            last = repr(e)
        time.sleep(0.02)
    raise RuntimeError(f"127.0.0.1:{port}{path} not ready in {timeout:.0f} s (last: {last})"
                       + (f"\n{proc.tail()}" if proc else ""))


# -- the upstream --

NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/nginx-tmp/body;
    proxy_temp_path {dir}/nginx-tmp/proxy;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream bench_upstream {{
        server 127.0.0.1:{upstream};
        keepalive 32;
        keepalive_requests 1000000;
    }}
{servers}
    # the native reference: nginx as a reverse proxy, with upstream keep-alive
    server {{
        listen 127.0.0.1:{proxy};
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""

NGINX_SERVER = """\
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
"""


def node_body(port: int) -> bytes:
    """The body of an extra upstream node (discovery benchmarks tell nodes apart by it)."""
    return b'{"status":"ok","node":%d}' % port


@dataclass
class Upstream:
    kind: str                   # "nginx" or "python"
    port: int                   # the ~100-byte JSON
    proxy_port: int | None      # nginx as reverse proxy to it (None without nginx)
    procs: list[Proc] = field(default_factory=list)
    extra_ports: list[int] = field(default_factory=list)  # answer node_body(port)

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


def start_upstream(workdir: Path, extra_nodes: int = 0, force_python: bool = False) -> Upstream:
    """nginx (``return 200``, keep-alive on) if installed, else the Python upstream."""
    ports = free_ports(2 + extra_nodes)
    port, proxy_port, extra = ports[0], ports[1], ports[2:]
    nginx = None if force_python else shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if nginx:
        (workdir / "nginx-tmp").mkdir(exist_ok=True)
        servers = NGINX_SERVER.format(port=port, body=BODY.decode())
        for p in extra:
            servers += NGINX_SERVER.format(port=p, body=node_body(p).decode())
        conf = workdir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=workdir, upstream=port, proxy=proxy_port, servers=servers))
        proc = Proc("nginx", [nginx, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "nginx-error.log")],
                    workdir / "nginx.log", stop_signal=signal.SIGTERM)
        up = Upstream("nginx", port, proxy_port, [proc], extra)
        try:
            for p in [port, proxy_port, *extra]:
                wait_http(p, "/", timeout=10, proc=proc)
        except BaseException:
            up.stop()
            raise
        return up
    procs = []
    try:
        for p, body in [(port, None), *((p, node_body(p)) for p in extra)]:
            cmd = [PYTHON, str(BENCH / "upstream.py"), "--port", str(p)]
            if body is not None:
                cmd += ["--body", body.decode()]
            procs.append(Proc(f"python-upstream:{p}", cmd, workdir / f"upstream-{p}.log"))
        for p, proc in zip([port, *extra], procs):
            wait_http(p, "/", timeout=10, proc=proc)
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return Upstream("python", port, None, procs, extra)


# -- load --

@dataclass
class LoadResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int         # socket errors and non-2xx answers
    conns: list[int] | None = None  # connections per worker, sampled mid-run


def wrk_path() -> str | None:
    if os.environ.get("KPROXY_BENCH_NO_WRK"):  # run.py --python-load
        return None
    return shutil.which("wrk")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"cannot read latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> LoadResult:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    return LoadResult(rps, p50, p99, requests, errors)


def run_load(port: int, duration: float, connections: int = 16, path: str = PATH, host: str = HOST,
             sample: Callable[[], Any] | None = None) -> LoadResult:
    """``wrk -t1 -c16 --latency`` (or the Python load generator) against 127.0.0.1:port.
    ``sample()`` runs once, halfway through (to count connections per worker)."""
    url = f"http://127.0.0.1:{port}{path}"
    wrk = wrk_path()
    if wrk:
        cmd = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
               "-H", f"Host: {host}", url]
    else:
        cmd = [PYTHON, str(BENCH / "loadgen.py"), "--port", str(port), "--path", path, "--host", host,
               "-c", str(connections), "-d", str(duration)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    sampled = None
    try:
        if sample is not None:
            time.sleep(duration / 2)
            sampled = sample()
        out, err = proc.communicate(timeout=duration + 30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}): {err.strip()[-500:]}")
    result = parse_wrk(out) if wrk else LoadResult(**json.loads(out))
    result.conns = sampled
    return result


def median(values: list[float]) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain text table, first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    def line(r: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def rst_table(rows: list[list[str]], header: list[str]) -> str:
    """The same table as an RST simple table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)
    def line(r: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([rule, line(header), rule, *(line(r) for r in rows), rule])
