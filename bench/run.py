"""kproxy's benchmark suite: kproxy against the Python stack's ceiling, the werkzeug peer
and nginx, in one run (never part of the tests); then long-lived traffic against nginx.

    python bench/run.py [--only fast,slow,sse,ws] [--quick] [--rounds 5] [--duration 4]
                        [--rounds-2w 3] [--chart docs/performance.png]
                        [--chart-long-lived docs/performance-long-lived.png]

Parts (``--only``, default all): ``fast``, short answers (1-4 below); ``slow``, ``sse`` and
``ws``, long-lived traffic (5 below). ``--quick``: 2 rounds x 2 s of ``fast`` with 1 worker
and no discovery, 1 slow-upstream round of 3 s and no cost-of-waiting runs.

What it does (everything on 127.0.0.1; every process it starts is stopped at the end):

1. One fast upstream: nginx (``return 200`` with a ~100-byte JSON, keep-alive on), or a
   small Python upstream when nginx is not installed (said so in the output).
2. Contestants, every Python one on identical gunicorn settings (gthread, 8 threads,
   keep-alive 5 s), first with 1 worker (the headline), then with 2:

   - ceiling: a hello-world WSGI app answering the same body (and, as a reference
     outside the targets, the same app on kproxy's own worker class);
   - peer: werkzeug's ``ProxyMiddleware`` forwarding to the upstream;
   - kproxy under gunicorn (``conf/gunicorn.conf.py``) and under ``kproxy serve``, with a
     static node; kproxy under gunicorn with the node from Kubernetes discovery (a real
     kube-apiserver from ``kproxy_tools.testenv``, Service + EndpointSlice), when the API
     server is provisioned and discovery works (else skipped, with the reason);
   - nginx as a reverse proxy to the same upstream (native reference, 1 worker only).

   kproxy runs with metrics and its access log on (the log goes to a file).
3. Rounds alternate the contestants (the order rotates every round); each run is
   ``wrk -t1 -c16 -dNs --latency`` (or the Python load generator when wrk is missing).
   With 2 workers the connections each worker got are counted: gunicorn may hand all 16
   to one worker, which changes the result by up to 3x (see shared/BENCHMARKING.md).
   A round during which other processes took more than 15% of the machine's CPU
   (``--max-other-cpu``; from /proc, everything this run started excluded) is not
   counted and is run again, at most ``--rounds`` more times; with fewer than 3 quiet
   rounds every round is counted and the output says the machine was busy.
4. Report: medians of req/s, p50 and p99; the medians of per-round ratios to the ceiling
   and to the peer (the headline, as absolute figures drift on a shared machine); RSS
   per worker idle and after load, and of an idle worker on the seed config; route
   lookup (bench/route_lookup.py); discovery sync and convergence (bench/discovery.py);
   the targets of the performance issue with PASS/FAIL; a PNG chart.
5. Long-lived traffic (issue #14), every kproxy on its default config, nginx as a reverse
   proxy with upstream keep-alive and ``proxy_http_version 1.1`` in the same run:
   ``slow``, 200 clients (``wrk -t2 -c200 -d5s``) on an upstream answering after 200 ms,
   nginx, ``kproxy serve`` and gunicorn with ``conf/gunicorn.conf.py``, rounds alternating,
   and the memory, threads and CPU of waiting requests; ``sse``, 200 event-stream clients
   at once (bench/slow_upstreams.py); ``ws``, 1,000 WebSockets open through one ``kproxy
   serve`` worker to a ``websockets`` echo server, then 100 of them echoing 20 messages
   each, against nginx with the ``Upgrade`` headers set and the echo server asked
   straight (bench/tunnels.py). Their tables, their targets with PASS/FAIL, and
   ``docs/performance-long-lived.png``. The open-file limit is raised to the hard limit
   for this process and what it starts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's bench, kproxy, kproxy_tools

from bench import _kube, slow_upstreams, tunnels  # noqa: E402
from bench._common import (BENCH, BODY, HOST, KEEPALIVE, PYTHON, ROOT, THREADS, LoadResult, Proc,  # noqa: E402
                           Upstream, connections_per_worker, cpu_snapshot, foreign_share, median, rss_mb, rst_table,
                           run_load, say, start_upstream, table, wait_http, wrk_path)
from bench.slow_upstreams import _raise_nofile  # noqa: E402
from kproxy_tools.common import free_ports, gunicorn_workers  # noqa: E402

CEILING, PEER, CEILING_KW = "ceiling", "peer", "ceiling-kproxy-worker"
KP_GUNICORN, KP_SERVE, KP_DISCOVERY, NGINX = "kproxy-gunicorn", "kproxy-serve", "kproxy-discovery", "nginx-proxy"
LABELS = {
    CEILING: "ceiling: hello-world WSGI",
    CEILING_KW: "hello-world on kproxy's worker",
    PEER: "peer: werkzeug ProxyMiddleware",
    KP_GUNICORN: "kproxy, gunicorn, static node",
    KP_SERVE: "kproxy serve, static node",
    KP_DISCOVERY: "kproxy, gunicorn, discovery node",
    NGINX: "nginx reverse proxy (reference)",
}
PARTS = ("fast", "slow", "sse", "ws")
ORDER = [CEILING, CEILING_KW, PEER, KP_GUNICORN, KP_SERVE, KP_DISCOVERY, NGINX]
KPROXY = (KP_GUNICORN, KP_SERVE, KP_DISCOVERY)

TARGETS = {  # from the performance issue (and the discovery issue, for bench/discovery.py)
    "ratio_ceiling": 0.50, "ratio_peer": 1.5, "p99_vs_ceiling": 2.0, "route_5000": 1.10, "idle_rss_mb": 60.0,
}

STATIC_INI = """\
; kproxy for the benchmark: one static node (the upstream), metrics and access log on
[kproxy]
listen = 127.0.0.1:{port}
threads = {threads}
workers = {workers}
keepalive_timeout = {keepalive}
access_log = true

[service:bench]
host = {host}
path_prefix = /v1
{upstream}

[api:anything]
service = bench
path = /anything
match = prefix
strip_prefix = true
methods = *
"""


@dataclass
class Server:
    key: str
    port: int
    proc: Proc
    gunicorn: bool = True

    @property
    def workers(self) -> list[int]:
        return gunicorn_workers(self.proc.pid) if self.gunicorn else []


@dataclass
class Env:
    """What the contestants share: the work directory, the upstream, the API server."""
    workdir: Path
    upstream: Upstream
    kube: Any = None
    token: Path | None = None
    discovery_skip: str | None = None
    notes: list[str] = field(default_factory=list)


# -- starting contestants --

def _gunicorn_cmd(app: str, port: int, workers: int, worker_class: str = "gthread") -> list[str]:
    return [PYTHON, "-m", "gunicorn", "-k", worker_class, "-w", str(workers), "--threads", str(THREADS),
            "--keep-alive", str(KEEPALIVE), "-b", f"127.0.0.1:{port}", "--pythonpath", str(BENCH), app]


def _kproxy_env(env: Env, ini: Path, name: str) -> dict[str, str]:
    metrics = env.workdir / f"metrics-{name}"
    metrics.mkdir(exist_ok=True)
    return dict(os.environ, KPROXY_CONFIG=str(ini), PROMETHEUS_MULTIPROC_DIR=str(metrics))


def _write_ini(env: Env, name: str, text: str) -> Path:
    path = env.workdir / f"{name}.ini"
    path.write_text(text)
    return path


def start_contestant(key: str, workers: int, env: Env) -> Server:
    port, = free_ports(1)
    up = env.upstream
    log = env.workdir / f"{key}-w{workers}.log"
    static = STATIC_INI.format(port=port, threads=THREADS, workers=workers, keepalive=KEEPALIVE, host=HOST,
                               upstream=f"nodes = 127.0.0.1:{up.port}")
    if key == CEILING:
        proc = Proc(key, _gunicorn_cmd("_apps:hello", port, workers), log, stop_signal=signal.SIGINT)
    elif key == CEILING_KW:  # a reference: how much of kproxy's figure its worker class makes
        proc = Proc(key, _gunicorn_cmd("_apps:hello", port, workers, "kproxy.worker.DeadlineThreadWorker"), log,
                    stop_signal=signal.SIGINT)
    elif key == PEER:
        proc = Proc(key, _gunicorn_cmd("_apps:peer", port, workers), log, stop_signal=signal.SIGINT,
                    env=dict(os.environ, BENCH_UPSTREAM=f"http://127.0.0.1:{up.port}/"))
    elif key == KP_GUNICORN:
        ini = _write_ini(env, f"{key}-w{workers}", static)
        proc = Proc(key, [PYTHON, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py", "kproxy.wsgi:application"],
                    log, env=_kproxy_env(env, ini, f"{key}-w{workers}"), stop_signal=signal.SIGINT)
    elif key == KP_SERVE:
        ini = _write_ini(env, f"{key}-w{workers}", static)
        proc = Proc(key, [PYTHON, "-c", "import sys; from kproxy.cli import main; sys.exit(main())",
                          "serve", "-c", str(ini)],
                    log, env=_kproxy_env(env, ini, f"{key}-w{workers}"), stop_signal=signal.SIGINT)
    elif key == KP_DISCOVERY:
        text = static.replace(f"nodes = 127.0.0.1:{up.port}",
                              "registry = bench-k8s\nnamespace = bench\nservice_name = upstream\nport = 80")
        text += "\n" + _kube.registry_section("bench-k8s", env.kube, env.token, "bench")
        ini = _write_ini(env, f"{key}-w{workers}", text)
        proc = Proc(key, [PYTHON, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py", "kproxy.wsgi:application"],
                    log, env=_kproxy_env(env, ini, f"{key}-w{workers}"), stop_signal=signal.SIGINT)
    elif key == NGINX:
        return Server(key, up.proxy_port, up.procs[0], gunicorn=False)
    else:
        raise ValueError(key)
    server = Server(key, port, proc)
    try:
        wait_http(port, timeout=30, proc=proc, want=lambda s, b: s == 200 and b == BODY)
        deadline = time.monotonic() + 20
        while len(server.workers) < workers and time.monotonic() < deadline:
            time.sleep(0.1)
        if key in KPROXY:
            wait_http(port, "/-/readyz", timeout=20, proc=proc)
    except BaseException:
        proc.stop()
        raise
    return server


def setup_discovery(env: Env) -> None:
    """Start the API server and the objects the discovery contestant routes by; on any
    failure the contestant is skipped with the reason."""
    reason = _kube.unavailable() or _kube.discovery_unfinished()
    if reason:
        env.discovery_skip = reason
        return
    try:
        say("starting kube-apiserver + etcd (kproxy_tools.testenv) ...")
        env.kube = _kube.start()
        env.token = _kube.token_file(env.kube, env.workdir)
        env.kube.apply({"kind": "Namespace", "metadata": {"name": "bench"}})
        env.kube.apply(_kube.service_obj("bench", "upstream", env.upstream.port))
        env.kube.apply(_kube.slice_obj("bench", "upstream", env.upstream.port))
    except Exception as e:
        env.discovery_skip = f"the API server could not be started: {e}"[:500]


def start_all(keys: list[str], workers: int, env: Env, skipped: dict[str, str]) -> dict[str, Server]:
    servers: dict[str, Server] = {}
    for key in keys:
        if key in skipped:
            continue
        if key == KP_DISCOVERY and env.discovery_skip:
            skipped[key] = env.discovery_skip
            continue
        try:
            servers[key] = start_contestant(key, workers, env)
        except Exception as e:
            reason = str(e).strip().splitlines()
            skipped[key] = f"did not start or answer: {' | '.join(reason[:3])[:400]}"
            if key not in (KP_DISCOVERY, NGINX):
                say(f"  !! {key}: {skipped[key]}")
            if key == KP_DISCOVERY:
                skipped[key] = "discovery is not working yet: " + skipped[key]
    return servers


# -- the rounds --

@dataclass
class Series:
    runs: dict[str, list[LoadResult]] = field(default_factory=dict)
    idle_rss: dict[str, list[float]] = field(default_factory=dict)
    load_rss: dict[str, list[float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    other: list[float] = field(default_factory=list)     # per counted round: CPU share other processes took
    rejected: list[float] = field(default_factory=list)  # the same, of rounds not counted
    disturbed: bool = False                               # too few quiet rounds: all were counted


def worker_rss(server: Server) -> list[float]:
    pids = server.workers if server.gunicorn else []
    return [round(r, 1) for r in (rss_mb(p) for p in pids) if r is not None]


def measure(workers: int, keys: list[str], rounds: int, duration: float, connections: int, env: Env,
            skipped: dict[str, str], extra_rounds: int = 0, max_other: float = 1.0) -> Series:
    """Rounds over the contestants. A round during which other processes used more than
    ``max_other`` of the machine's CPU (in any of its runs) is not counted, and another is
    run instead, at most ``extra_rounds`` more in all."""
    series = Series(skipped=skipped)
    say(f"\n== {workers} worker{'s' if workers > 1 else ''} x {THREADS} threads: starting contestants ...")
    servers = start_all(keys, workers, env, skipped)
    try:
        time.sleep(1.0)
        for key, server in servers.items():
            series.idle_rss[key] = worker_rss(server)
        for key, server in servers.items():  # warm-up: connections, pools, code paths
            run_load(server.port, 1, connections)
        live = [k for k in keys if k in servers]
        attempts = rounds + max(0, extra_rounds)
        rejected: dict[str, list[LoadResult]] = {}
        for r in range(attempts):
            accepted = len(series.other)
            if accepted >= rounds:
                break
            order = live[r % len(live):] + live[:r % len(live)]
            results, worst = {}, 0.0
            for key in order:
                server = servers[key]
                sample = None
                if workers > 1 and server.gunicorn:
                    sample = (lambda s=server: connections_per_worker(s.port, s.workers))
                before = cpu_snapshot()
                result = run_load(server.port, duration, connections, sample=sample)
                other = foreign_share(before, cpu_snapshot())
                worst = max(worst, other)
                results[key] = result
                conns = f"  conns/worker {'/'.join(map(str, result.conns))}" if result.conns else ""
                errs = f"  ERRORS {result.errors}" if result.errors else ""
                say(f"  round {r + 1}  {key:<17} {result.rps:>9,.0f} req/s  p50 {result.p50_ms:6.2f} ms"
                    f"  p99 {result.p99_ms:6.2f} ms  other CPU {other:4.0%}{conns}{errs}")
                time.sleep(0.3)
            if worst <= max_other:
                series.other.append(round(worst, 3))
                for key, result in results.items():
                    series.runs.setdefault(key, []).append(result)
            else:
                series.rejected.append(round(worst, 3))
                for key, result in results.items():
                    rejected.setdefault(key, []).append(result)
                say(f"  round {r + 1} not counted: other processes used {worst:.0%} of the machine's CPU "
                    f"during one of its runs (limit {max_other:.0%})")
        if len(series.other) < min(3, rounds):  # too few quiet rounds: count every round, and say so
            for key, results in rejected.items():
                series.runs.setdefault(key, []).extend(results)
            series.other += series.rejected
            series.disturbed = True
        for key, server in servers.items():
            series.load_rss[key] = worker_rss(server)
            if not server.proc.alive():
                skipped[key] = f"exited during the run: {server.proc.tail(3)}"
    finally:
        for key, server in servers.items():
            if server.gunicorn:
                server.proc.stop()
    return series


def idle_seed_rss(env: Env) -> tuple[float | None, str]:
    """RSS of an idle kproxy worker under gunicorn with the seed config (conf/kproxy.ini),
    its registry pointed at the benchmark's API server when there is one."""
    port, = free_ports(1)
    text = (ROOT / "conf" / "kproxy.ini").read_text()
    text = re.sub(r"(?m)^listen\s*=.*$", f"listen = 127.0.0.1:{port}", text)
    if env.kube is not None and env.token is not None:
        text = re.sub(r"(?m)^api_server\s*=.*$", f"api_server = {env.kube.url}", text)
        text = re.sub(r"(?m)^token_file\s*=.*$", f"token_file = {env.token}", text)
        text = re.sub(r"(?m)^ca_file\s*=.*$", f"ca_file = {env.kube.ca_file}", text)
        how = "seed config, registry on the benchmark's kube-apiserver (listed, watching)"
    else:
        how = "seed config as shipped (no API server here: the registry keeps retrying)"
    ini = _write_ini(env, "seed", text)
    proc = Proc("seed", [PYTHON, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py", "kproxy.wsgi:application"],
                env.workdir / "seed.log", env=_kproxy_env(env, ini, "seed"), stop_signal=signal.SIGINT)
    try:
        wait_http(port, "/-/healthz", timeout=30, proc=proc)
        if env.kube is not None:
            wait_http(port, "/-/readyz", timeout=20, proc=proc)
        time.sleep(2.0)
        pids = gunicorn_workers(proc.pid)
        return (rss_mb(pids[0]) if pids else None), how
    except Exception as e:
        return None, f"failed: {e}"[:300]
    finally:
        proc.stop()


# -- statistics --

def summarize(series: Series) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    ceiling, peer = series.runs.get(CEILING, []), series.runs.get(PEER, [])
    for key, runs in series.runs.items():
        s: dict[str, Any] = {
            "rps": median([r.rps for r in runs]), "rps_min": min(r.rps for r in runs),
            "rps_max": max(r.rps for r in runs), "p50": median([r.p50_ms for r in runs]),
            "p99": median([r.p99_ms for r in runs]), "errors": sum(r.errors for r in runs),
            "rounds": len(runs), "conns": ["/".join(map(str, r.conns)) for r in runs if r.conns],
        }
        n = min(len(runs), len(ceiling))
        if ceiling:
            s["vs_ceiling"] = median([runs[i].rps / ceiling[i].rps for i in range(n)])
            s["p99_vs_ceiling"] = median([runs[i].p99_ms / ceiling[i].p99_ms for i in range(n)])
        if peer:
            m = min(len(runs), len(peer))
            s["vs_peer"] = median([runs[i].rps / peer[i].rps for i in range(m)])
        out[key] = s
    return out


def fmt(value: Any, spec: str = ",.0f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec) + suffix


def results_rows(stats: dict[str, dict[str, Any]], series: Series, workers: int) -> list[list[str]]:
    rows = []
    for key in ORDER:
        if key in stats:
            s = stats[key]
            row = [LABELS[key], fmt(s["rps"]), f"{s['rps_min']:,.0f}-{s['rps_max']:,.0f}",
                   fmt(s.get("vs_ceiling"), ".2f"), fmt(s.get("vs_peer"), ".2f"),
                   fmt(s["p50"], ".2f"), fmt(s["p99"], ".2f"), fmt(s.get("p99_vs_ceiling"), ".2f"),
                   str(s["errors"])]
            if workers > 1:
                row.append(" ".join(s["conns"]) or "-")
            rows.append(row)
        elif key in series.skipped and not (workers > 1 and key == NGINX):
            rows.append([LABELS[key], "skipped", "", "", "", "", "", "", ""] + ([""] if workers > 1 else []))
    return rows


def results_header(workers: int) -> list[str]:
    h = ["contestant", "req/s", "range", "x ceiling", "x peer", "p50 ms", "p99 ms", "p99 x ceil", "errors"]
    return h + (["conns per worker, by round"] if workers > 1 else [])


def code_version() -> str:
    """The commit the measured kproxy code is at, and whether kproxy/ has uncommitted edits."""
    try:
        head = subprocess.run(["git", "log", "-1", "--format=%h %cd", "--date=format:%Y-%m-%d %H:%M"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kproxy"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    edited = [p for p in dirty if p.startswith("kproxy/")]
    return (head or "unknown") + (f" + uncommitted edits in {', '.join(edited)}" if edited else "")


def route_lookup(runs: int = 3) -> tuple[str, float | None]:
    """Run bench/route_lookup.py ``runs`` times (it measures the 1-route table first,
    with no warm-up, so one run alone swings on a busy machine); the table of the run
    with the median 5,000-route ratio, and that ratio."""
    results = []
    for _ in range(runs):
        try:
            out = subprocess.run([PYTHON, str(BENCH / "route_lookup.py")], capture_output=True, text=True,
                                 timeout=300, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return "route_lookup.py timed out", None
        text = out.stdout.strip() or out.stderr.strip()[-1000:]
        m = re.search(r"^\s*5000\s+\S+\s+([\d.]+)x", text, re.M)
        if not m:
            return text, None
        results.append((float(m.group(1)), text))
    results.sort()
    ratio, text = results[len(results) // 2]
    return (text + f"\n(median of {runs} runs by the 5,000-route ratio; ratios "
            + ", ".join(f"{r:.2f}" for r, _ in results) + ")"), ratio


def discovery_bench(json_path: Path, timeout: float) -> tuple[str, dict | None]:
    try:
        out = subprocess.run([PYTHON, str(BENCH / "discovery.py"), "--parts", "sync,convergence", "--json",
                              str(json_path)],
                             capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return f"bench/discovery.py did not finish in {timeout:.0f} s", None
    text = out.stdout.strip() + ("\n" + out.stderr.strip()[-1500:] if out.returncode else "")
    try:
        return text, json.loads(json_path.read_text())
    except (OSError, ValueError):
        return text, None


def chart(path: Path, one: dict, two: dict, skipped: dict[str, str], note: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ORDER if k in one and k != NGINX]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [1.5, 1.1, 1]})
    ax = axes[0]
    y = list(range(len(keys)))[::-1]
    ax.barh([v + 0.2 for v in y], [one[k]["rps"] for k in keys], 0.4, label="1 worker (headline)", color="#3b6ea8",
            xerr=[[one[k]["rps"] - one[k]["rps_min"] for k in keys], [one[k]["rps_max"] - one[k]["rps"] for k in keys]],
            capsize=2, error_kw={"elinewidth": 0.8})
    two_keys = [k for k in keys if k in two]
    ax.barh([y[keys.index(k)] - 0.2 for k in two_keys], [two[k]["rps"] for k in two_keys], 0.4,
            label="2 workers (noisy)", color="#9cbfe3")
    ax.set_yticks(y, [LABELS[k] for k in keys], fontsize=8)
    ax.set_xlabel("requests/s, median of rounds (bars: 1 worker min-max)")
    title = "Throughput, wrk -c16"
    if NGINX in one:
        title += f"  (nginx reverse proxy: {one[NGINX]['rps']:,.0f})"
    ax.set_title(title, fontsize=10)
    top = max([one[k]["rps_max"] for k in keys] + [two[k]["rps"] for k in two_keys])
    ax.set_xlim(0, top * 1.18)
    for k in keys:
        ax.text(one[k]["rps_max"] + top * 0.01, y[keys.index(k)] + 0.2, f"{one[k]['rps']:,.0f}", va="center", fontsize=7)
    for k in two_keys:
        ax.text(two[k]["rps"] + top * 0.01, y[keys.index(k)] - 0.2, f"{two[k]['rps']:,.0f}", va="center",
                fontsize=7, color="#555555")
    ax.legend(fontsize=8, loc="lower right")

    ax = axes[1]
    lat_keys = keys
    x = range(len(lat_keys))
    ax.bar([i - 0.2 for i in x], [one[k]["p50"] for k in lat_keys], 0.4, label="p50", color="#6a9f58")
    ax.bar([i + 0.2 for i in x], [one[k]["p99"] for k in lat_keys], 0.4, label="p99", color="#c96f4a")
    if CEILING in one:
        ax.axhline(2 * one[CEILING]["p99"], color="#c96f4a", ls="--", lw=1, label="target: p99 <= 2 x ceiling")
    ax.set_xticks(list(x), [k.replace("kproxy-", "kproxy\n") for k in lat_keys], fontsize=8)
    ax.set_ylabel("ms")
    ax.set_ylim(0, max([one[k]["p99"] for k in lat_keys] + [2 * one.get(CEILING, {}).get("p99", 0)]) * 1.35)
    ax.set_title("Latency, 1 worker (median of rounds)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncol=3)

    ax = axes[2]
    kp = [k for k in KPROXY if k in one]
    x = range(len(kp))
    ax.bar([i - 0.2 for i in x], [one[k].get("vs_ceiling", 0) for k in kp], 0.4, label="x ceiling", color="#3b6ea8")
    ax.bar([i + 0.2 for i in x], [one[k].get("vs_peer", 0) for k in kp], 0.4, label="x peer", color="#d9a441")
    ax.axhline(TARGETS["ratio_ceiling"], color="#3b6ea8", ls="--", lw=1, label="target >= 0.5 x ceiling")
    ax.axhline(TARGETS["ratio_peer"], color="#d9a441", ls="--", lw=1, label="target >= 1.5 x peer")
    ax.set_xticks(list(x), [k.replace("kproxy-", "kproxy\n") for k in kp], fontsize=8)
    ax.set_title("kproxy, 1 worker: median per-round ratio", fontsize=10)
    ax.set_ylim(0, max([1.7] + [one[k].get("vs_peer", 0) * 1.15 for k in kp]))
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.suptitle(note, fontsize=8, y=0.01, va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- long-lived traffic (issue #14): bench/slow_upstreams.py and bench/tunnels.py --

def long_lived(args: argparse.Namespace, parts: list[str], workdir: Path,
               report: dict[str, Any]) -> tuple[list[list[str]], list[str]]:
    """The slow-upstream, event-stream and WebSocket runs, each with nginx in the same run,
    every kproxy on its default config: target rows and RST parts; figures into ``report``."""
    target_rows: list[list[str]] = []
    rst_parts: list[str] = []
    if "slow" in parts or "sse" in parts:
        keys = [slow_upstreams.NGINX, slow_upstreams.SERVE, slow_upstreams.GUNICORN]
        rounds = args.slow_rounds if "slow" in parts else 0
        duration = 3.0 if args.quick else 5.0
        holds = () if args.quick or "slow" not in parts else (200, 800)
        say(f"\n== long-lived: {rounds} rounds x wrk -t2 -c200 -d{duration:g}s on a "
            f"{slow_upstreams.DELAY * 1000:.0f} ms upstream; {200 if 'sse' in parts else 0} SSE clients; "
            f"nginx, kproxy serve and gunicorn on their defaults")
        slow_dir = workdir / "slow"
        slow_dir.mkdir()
        slow = slow_upstreams.measure(slow_dir, keys, rounds, duration, 200, 200 if "sse" in parts else 0, holds)
        tables, checks = slow_upstreams.summary(slow, keys)
        report["slow_upstreams"] = slow
        for title, header, rows in tables:
            say(f"\n{title}:\n" + table(rows, header))
            rst_parts += [f"\n{title[0].upper()}{title[1:]}\n", rst_table(rows, header)]
        target_rows += [[name, value, "PASS" if ok else "FAIL"] for name, value, ok in checks]
    if "ws" in parts:
        say(f"\n== WebSockets: {args.tunnels:,} open through one worker, 100 of them echo 20 messages each; "
            "nginx, kproxy serve (defaults), the echo server straight, and kproxy serve with every handshake at once")
        ws_dir = workdir / "ws"
        ws_dir.mkdir()
        ws = tunnels.measure(ws_dir, args.tunnels)
        rows, _, checks = tunnels.rows_and_failures(ws, args.tunnels)
        report["websockets"] = ws
        title = f"{args.tunnels:,} WebSockets, 100 x 20 echoes"
        say(f"\n{title}:\n" + table(rows, tunnels.HEADER))
        rst_parts += [f"\n{title}\n", rst_table(rows, tunnels.HEADER)]
        target_rows += [[name, value, "PASS" if ok else "FAIL"] for name, value, ok in checks]
    if not args.no_chart:
        note = (f"{report['command']} - {report['date']}, {os.cpu_count()} cores, shared machine, "
                f"load average {report['loadavg_before']:.1f} before, {os.getloadavg()[0]:.1f} after")
        try:
            chart_long_lived(args.chart_long_lived, report, note)
            say(f"\nchart: {args.chart_long_lived}")
        except Exception:
            say("chart failed (pip install matplotlib, or -e '.[bench]'):\n" + traceback.format_exc(limit=2))
    return target_rows, rst_parts


def chart_long_lived(path: Path, report: dict[str, Any], note: str) -> None:
    """One panel per part that ran: slow upstream (req/s, p99), streams (event delay),
    WebSockets (echo round trip, and kproxy's RSS growth and threads)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slow, ws = report.get("slow_upstreams", {}), report.get("websockets", {})
    panels = [p for p, ok in (("slow", slow.get("summary")), ("sse", slow.get("sse")), ("ws", ws)) if ok]
    if not panels:
        return
    colors = {"nginx": "#7f7f7f", "kproxy-serve": "#3b6ea8", "kproxy-gunicorn": "#6a9f58", "direct": "#d9a441"}
    short = {"nginx": "nginx", "kproxy-serve": "kproxy\nserve", "kproxy-gunicorn": "kproxy\ngunicorn",
             "direct": "no proxy", "kproxy-serve-burst": "kproxy serve,\nhandshakes\nat once"}
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "slow":
            stats = slow["summary"]
            keys = list(stats)
            x = range(len(keys))
            ax.bar(list(x), [stats[k]["rps"] for k in keys], 0.6, color=[colors[k] for k in keys])
            for i, k in enumerate(keys):
                ax.text(i, stats[k]["rps"] / 2, f"{stats[k]['rps']:,.0f} req/s\np50 {stats[k]['p50']:,.0f} ms\n"
                        f"p99 {stats[k]['p99']:,.0f} ms", ha="center", va="center", fontsize=8, color="white")
            ax.axhline(1000, color="#333333", ls=":", lw=1, label="ideal: 1,000 req/s")
            if "nginx" in stats:
                ax.axhline(0.9 * stats["nginx"]["rps"], color="#c96f4a", ls="--", lw=1, label="target >= 0.9 x nginx")
            ax.set_xticks(list(x), [short[k] for k in keys], fontsize=8)
            ax.set_ylim(0, 1250)
            ax.set_ylabel("requests/s (median of rounds)")
            ax.set_title("200 clients, upstream answers after 200 ms", fontsize=10)
            ax.legend(fontsize=7, loc="upper right")
        elif panel == "sse":
            sse = slow["sse"]
            keys = list(sse)
            x = range(len(keys))
            ax.bar([i - 0.2 for i in x], [sse[k]["delay_p50_ms"] or 0 for k in keys], 0.4, label="p50",
                   color="#6a9f58")
            ax.bar([i + 0.2 for i in x], [sse[k]["delay_p99_ms"] or 0 for k in keys], 0.4, label="p99",
                   color="#c96f4a")
            ax.axhline(100, color="#c96f4a", ls="--", lw=1, label="target: p99 <= 100 ms")
            for i, k in enumerate(keys):
                ax.text(i, (sse[k]["delay_p99_ms"] or 0) + 3, f"{sse[k]['complete']}/{sse[k]['clients']}\ncomplete",
                        ha="center", fontsize=7)
            ax.set_xticks(list(x), [short[k] for k in keys], fontsize=8)
            ax.set_ylim(0, 130)
            ax.set_ylabel("ms from the upstream's write to the client's read")
            ax.set_title("200 event streams, 10 events each", fontsize=10)
            ax.legend(fontsize=7, loc="upper left")
        else:
            keys = list(ws)
            x = range(len(keys))
            ax.bar([i - 0.2 for i in x], [ws[k]["p50_ms"] or 0 for k in keys], 0.4, label="p50", color="#6a9f58")
            ax.bar([i + 0.2 for i in x], [ws[k]["p99_ms"] or 0 for k in keys], 0.4, label="p99", color="#c96f4a")
            ax.axhline(50, color="#c96f4a", ls="--", lw=1, label="target: p99 <= 50 ms")
            for i, k in enumerate(keys):
                if k != "direct":
                    ax.text(i, (ws[k]["p99_ms"] or 0) + 2, f"+{ws[k]['rss_growth_mb']:.1f} MB\n"
                            f"{ws[k]['threads_open']} threads", ha="center", fontsize=7)
            ax.set_xticks(list(x), [short[k] for k in keys], fontsize=8)
            ax.set_ylabel("echo round trip, ms")
            ax.set_ylim(0, max([70] + [(ws[k]["p99_ms"] or 0) * 1.3 for k in keys]))
            ax.set_title(f"{max(r['opened'] for r in ws.values()):,} WebSockets open, 100 x 20 echoes", fontsize=10)
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(note, fontsize=8, y=0.01, va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main --

def fast_suite(args: argparse.Namespace, workdir: Path, report: dict[str, Any],
               started: float) -> tuple[list[list[str]], list[str]]:
    """The short-answer suite (contestants, memory, route lookup, discovery): its target
    rows and its RST parts; its figures go into ``report``."""
    notes: list[str] = []
    say(f"\n== short answers: {args.rounds} rounds x {args.duration:g} s, -c{args.connections}")
    load_before = os.getloadavg()
    if args.python_load:
        os.environ["KPROXY_BENCH_NO_WRK"] = "1"
    wrk = wrk_path()
    if wrk:
        say(f"load generator: {wrk} (-t1 -c{args.connections} --latency)")
    else:
        why = "--python-load" if args.python_load else "wrk is not installed (Debian package `wrk`)"
        notes.append(f"{why}: using the built-in Python load generator (bench/loadgen.py), "
                     "which tops out far below wrk")
        say("load generator: " + notes[-1])
    env: Env | None = None
    skipped: dict[str, str] = {}
    report.update({"rounds": args.rounds, "rounds_2w": args.rounds_2w, "duration": args.duration,
                   "connections": args.connections, "load_generator": "wrk" if wrk else "python"})
    try:
        upstream = start_upstream(workdir, force_python=args.python_upstream)
        if upstream.kind == "nginx":
            say(f"upstream: nginx on 127.0.0.1:{upstream.port} (return 200, {len(BODY)} bytes of JSON, keep-alive); "
                f"nginx reverse proxy on 127.0.0.1:{upstream.proxy_port}")
        else:
            why = "--python-upstream" if args.python_upstream else "nginx is not installed (Debian package `nginx-light`)"
            notes.append(f"{why}: the upstream is the small Python one (bench/upstream.py); "
                         "the nginx reference is skipped")
            say("upstream: " + notes[-1])
            skipped[NGINX] = why
        report["upstream"] = upstream.kind
        env = Env(workdir, upstream, notes=notes)
        if args.no_discovery:
            env.discovery_skip = "--no-discovery"
        else:
            setup_discovery(env)
        report["kproxy_code"] = code_version()
        say(f"kproxy code: {report['kproxy_code']}")
        report["discovery_commit"] = _kube.discovery_commit()
        say(f"discovery: last commit {report['discovery_commit']}")
        if env.discovery_skip:
            say(f"discovery contestant skipped: {env.discovery_skip}")

        extra = args.rounds if args.extra_rounds is None else args.extra_rounds
        one = measure(1, ORDER, args.rounds, args.duration, args.connections, env, skipped, extra,
                      args.max_other_cpu)
        two = Series(skipped=skipped)
        if args.rounds_2w > 0:
            two = measure(2, [k for k in ORDER if k != NGINX], args.rounds_2w, args.duration, args.connections,
                          env, skipped, args.rounds_2w if args.extra_rounds is None else args.extra_rounds,
                          args.max_other_cpu)
        say("\nmemory: idle worker on the seed config ...")
        seed_rss, seed_how = idle_seed_rss(env)
    finally:
        if env is not None and env.kube is not None:
            env.kube.stop()
        if env is not None:
            env.upstream.stop()
    say("route lookup (bench/route_lookup.py) ...")
    routes_text, routes_ratio = route_lookup()
    disc_text, disc = ("", None)
    if not args.no_discovery:
        say("discovery sync and convergence (bench/discovery.py) ...")
        disc_text, disc = discovery_bench(workdir / "discovery.json", timeout=420)

    # -- report --
    s1, s2 = summarize(one), summarize(two)
    say("\n" + "=" * 100)
    say(f"RESULTS  {report['command']}")
    say(f"kproxy code: {report.get('kproxy_code', 'unknown')}")
    load_after = os.getloadavg()
    report["loadavg_fast"] = [round(load_before[0], 2), round(load_after[0], 2)]
    say(f"machine: {os.cpu_count()} cores, 1-minute load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    say(f"upstream {upstream.kind}; load {'wrk -t1' if wrk else 'Python load generator'} -c{args.connections} "
        f"-d{args.duration:g}s; gunicorn gthread x {THREADS} threads, keep-alive {KEEPALIVE} s; "
        f"ratios are medians of per-round ratios")
    for n_workers, series in ((1, one), (2, two)):
        if series.rejected:
            notes.append(f"{n_workers} worker(s): {len(series.rejected)} round(s) not counted, other processes "
                         f"took up to {max(series.rejected):.0%} of the CPU during them")
        if series.disturbed:
            notes.append(f"{n_workers} worker(s): fewer than 3 quiet rounds, so every round was counted: the machine "
                         "was busy with other work, figures are low and scattered; run again on a quiet machine")
    say("CPU share other processes took, per counted round (max over its runs): "
        f"1 worker {[f'{x:.0%}' for x in one.other]}, 2 workers {[f'{x:.0%}' for x in two.other]}")
    for n in notes:
        say(f"NOTE: {n}")
    say(f"\n1 worker, {len(one.other)} rounds counted:")
    say(table(results_rows(s1, one, 1), results_header(1)))
    if s2:
        say(f"\n2 workers, {len(two.other)} rounds counted (noisy: gunicorn may give one worker all connections):")
        say(table(results_rows(s2, two, 2), results_header(2)))
    for key, why in skipped.items():
        say(f"skipped {key}: {why}")

    mem_rows = []
    for key in ORDER:
        if key in one.idle_rss and one.idle_rss[key]:
            mem_rows.append([LABELS[key], "/".join(fmt(v, ".1f") for v in one.idle_rss[key]),
                             "/".join(fmt(v, ".1f") for v in one.load_rss.get(key, [])),
                             "/".join(fmt(v, ".1f") for v in two.idle_rss.get(key, [])) or "-",
                             "/".join(fmt(v, ".1f") for v in two.load_rss.get(key, [])) or "-"])
    mem_rows.append(["kproxy, seed config (conf/kproxy.ini)", fmt(seed_rss, ".1f"), "-", "-", "-"])
    mem_header = ["RSS per worker, MB", "1w idle", "1w after load", "2w idle", "2w after load"]
    say("\n" + table(mem_rows, mem_header))
    say(f"  seed config: {seed_how}")
    say("\nroute lookup (python bench/route_lookup.py):\n" + routes_text)
    if disc_text:
        say("\ndiscovery (python bench/discovery.py):\n" + disc_text)

    kp = s1.get(KP_GUNICORN, {})
    checks = [
        ("kproxy gunicorn 1w >= 0.50 x ceiling (median per-round ratio)", kp.get("vs_ceiling"),
         lambda v: v >= TARGETS["ratio_ceiling"], ".2f"),
        ("kproxy gunicorn 1w >= 1.5 x werkzeug peer (median per-round ratio)", kp.get("vs_peer"),
         lambda v: v >= TARGETS["ratio_peer"], ".2f"),
        ("p99 at 16 connections <= 2 x the ceiling's p99 (median per-round ratio)", kp.get("p99_vs_ceiling"),
         lambda v: v <= TARGETS["p99_vs_ceiling"], ".2f"),
        ("route lookup, 5,000 routes within 10% of 1 route", routes_ratio, lambda v: v <= TARGETS["route_5000"], ".2f"),
        ("idle worker, seed config < 60 MB RSS", seed_rss, lambda v: v < TARGETS["idle_rss_mb"], ".1f"),
    ]
    target_rows = []
    for name, value, test, spec in checks:
        verdict = "n/a" if value is None else ("PASS" if test(value) else "FAIL")
        target_rows.append([name, fmt(value, spec), verdict])
    if disc:
        for name, value, ok in disc.get("targets", []):
            # bench/discovery.py names the issue of a target that is not the discovery issue's
            target_rows.append([name + ("" if "issue #" in name else " (discovery issue)"), value,
                                "PASS" if ok else "FAIL"])
        if disc.get("skipped"):
            target_rows.append(["discovery sync and convergence (discovery issue)", "skipped", "n/a"])

    report.update({"notes": notes, "other_cpu_rounds": [one.other, two.other],
                   "rejected_rounds": [one.rejected, two.rejected], "skipped": skipped, "one_worker": s1, "two_workers": s2,
                   "rss": {"idle_1w": one.idle_rss, "load_1w": one.load_rss, "idle_2w": two.idle_rss,
                           "load_2w": two.load_rss, "seed_idle": seed_rss, "seed_how": seed_how},
                   "route_lookup": routes_text, "route_5000_ratio": routes_ratio, "discovery": disc,
                   "targets": target_rows, "seconds_fast": round(time.monotonic() - started)})
    if not args.no_chart and s1:
        note = (f"{report['command']} - upstream {upstream.kind}, {'wrk' if wrk else 'Python load generator'} "
                f"-c{args.connections}, gunicorn gthread {THREADS} threads; 2 cores, shared machine")
        try:
            chart(args.chart, s1, s2, skipped, note)
            say(f"\nchart: {args.chart}")
        except Exception:
            say("chart failed (pip install matplotlib, or -e '.[bench]'):\n" + traceback.format_exc(limit=2))
    parts = [f"1 worker, {len(one.other)} rounds counted\n", rst_table(results_rows(s1, one, 1), results_header(1))]
    if s2:
        parts += [f"\n2 workers, {len(two.other)} rounds counted\n",
                  rst_table(results_rows(s2, two, 2), results_header(2))]
    parts += ["\nMemory\n", rst_table(mem_rows, mem_header)]
    return target_rows, parts



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds with 1 worker (default 5)")
    parser.add_argument("--rounds-2w", type=int, default=3, help="rounds with 2 workers (default 3; 0: skip)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per load run (default 4)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--max-other-cpu", type=float, default=0.15,
                        help="a round is not counted when other processes took more than this share of the "
                             "machine's CPU during one of its runs (default 0.15; 1 counts every round)")
    parser.add_argument("--extra-rounds", type=int, default=None,
                        help="rounds run at most in place of those not counted (default: as many as --rounds)")
    parser.add_argument("--chart", type=Path, default=ROOT / "docs" / "performance.png",
                        help="PNG chart to write (default docs/performance.png)")
    parser.add_argument("--no-chart", action="store_true")
    parser.add_argument("--no-discovery", action="store_true",
                        help="skip the discovery contestant and bench/discovery.py")
    parser.add_argument("--python-upstream", action="store_true", help="use the Python upstream even with nginx")
    parser.add_argument("--python-load", action="store_true", help="use the Python load generator even with wrk")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--rst", type=Path, help="write the tables as RST to this file (for docs/performance.rst)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    parser.add_argument("--only", default=",".join(PARTS),
                        help="parts to run, comma-separated (default all): fast (short answers: the suite above), "
                             "slow (200 clients on a 200 ms upstream), sse (200 event streams), ws (1,000 WebSockets)")
    parser.add_argument("--quick", action="store_true",
                        help="a quick pass: 2 rounds x 2 s with 1 worker only and no discovery; 1 slow-upstream "
                             "round of 3 s, no cost-of-waiting runs; the SSE and WebSocket runs as always")
    parser.add_argument("--slow-rounds", type=int, default=3, help="slow-upstream rounds (default 3)")
    parser.add_argument("--tunnels", type=int, default=1000, help="WebSockets open at once (default 1,000)")
    parser.add_argument("--chart-long-lived", type=Path, default=ROOT / "docs" / "performance-long-lived.png",
                        help="PNG chart of the slow, sse and ws parts (default docs/performance-long-lived.png)")
    args = parser.parse_args(argv)
    parts = [part for part in args.only.split(",") if part]
    if set(parts) - set(PARTS):
        parser.error(f"--only takes {','.join(PARTS)}")
    if args.quick:
        args.rounds, args.rounds_2w, args.duration, args.no_discovery = min(args.rounds, 2), 0, 2.0, True
        args.slow_rounds = 1
    if args.rounds < 1 or args.duration <= 0 or args.rounds > 50 or args.duration > 60:
        parser.error("--rounds 1..50 and --duration up to 60 s")

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="kproxy-bench-"))
    _raise_nofile()  # 1,000 tunnels are 2,000+ descriptors in a proxy; what this starts inherits the limit
    load_before = os.getloadavg()
    say(f"kproxy benchmark: {', '.join(parts)}{' (quick)' if args.quick else ''}; work dir {workdir}")
    say(f"machine: {os.cpu_count()} cores, load average {load_before[0]:.1f} before the run "
        "(other work on the machine lowers and scatters the absolute figures; the ratios hold better)")
    report: dict[str, Any] = {"command": "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
                              "parts": parts, "date": time.strftime("%Y-%m-%d %H:%M"),
                              "loadavg_before": round(load_before[0], 2)}
    report["kproxy_code"] = code_version()
    say(f"kproxy code: {report['kproxy_code']}")
    target_rows: list[list[str]] = []
    rst_parts: list[str] = []
    try:
        if "fast" in parts:
            rows, rst = fast_suite(args, workdir, report, started)
            target_rows += rows
            rst_parts += rst
        if set(parts) & {"slow", "sse", "ws"}:
            rows, rst = long_lived(args, parts, workdir, report)
            target_rows += rows
            rst_parts += rst
    finally:
        load_after = os.getloadavg()
        report["loadavg"] = [round(load_before[0], 2), round(load_after[0], 2)]
        if args.keep:
            say(f"logs and configs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    say(f"\nmachine: 1-minute load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    say("\n" + table(target_rows, ["target", "measured", ""]))
    report["targets"] = target_rows
    report["seconds"] = round(time.monotonic() - started)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    if args.rst:
        rst_parts += ["\nTargets\n", rst_table(target_rows, ["target", "measured", ""])]
        args.rst.write_text("\n".join(rst_parts) + "\n")
    say(f"\ndone in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
