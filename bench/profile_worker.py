"""Where a loaded kproxy worker spends its time: py-spy on kproxy under gunicorn (1 worker
x 8 threads, static node, metrics and access log on) while wrk drives it.

    pip install py-spy        # not a dependency of kproxy; this script only checks for it
    python bench/profile_worker.py [--duration 15] [--rate 250] [--svg /tmp/kproxy-profile.svg]

Prints the share of samples (threads holding the GIL, ``py-spy --gil``: in a gthread
worker the GIL is what requests queue for) by function, self and inclusive, and by
area of the request path. ``--all-threads`` samples every non-idle thread instead.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's bench, kproxy, kproxy_tools

from bench._common import HOST, KEEPALIVE, PYTHON, THREADS, Proc, run_load, say, start_upstream, table, wait_http  # noqa: E402,E501
from kproxy_tools.common import free_ports, gunicorn_workers  # noqa: E402
from bench.run import STATIC_INI, _kproxy_env, Env  # noqa: E402

# Areas of the request path: the first pattern found in a stack (innermost frame first)
# names the area the sample belongs to.
AREAS = [
    ("metrics (prometheus_client, kproxy.metrics)", r"prometheus_client/|kproxy/metrics\.py"),
    ("access log (kproxy.accesslog + logging)", r"accesslog\.py|/logging/"),
    ("upstream: send the request (kproxy.http1)", r"write_request|request_head"),
    ("upstream: read the response head (kproxy.http1)", r"read_response|_parse_head|_head_end|http1\.py.*__init__"),
    ("upstream: pool get/put, connection check", r"_get_conn|_put_conn|is_connected|_established|IdleConnections|"
                                                 r"connection_from_host|_new_pool|_connected \(|release_conn"),
    ("relay of the body (kproxy.body, http1 read1)", r"RelayedBody|read1|_read_length|_read_chunked"),
    ("request headers (kproxy.headers.request_headers)", r"request_headers"),
    ("response headers (kproxy.headers.response_headers)", r"response_headers"),
    ("routing (kproxy.routing, werkzeug map)", r"routing\.py|werkzeug/routing"),
    ("balancer (kproxy.upstream)", r"kproxy/upstream\.py"),
    ("kproxy.app, other", r"kproxy/app\.py|kproxy/request\.py|kproxy/client\.py|kproxy/headers\.py|kproxy/body\.py|kproxy/transport\.py|kproxy/pool\.py"),
    ("kproxy worker: client socket reads and writes", r"ClientSocket\."),
    ("gunicorn: parse the request", r"gunicorn/http/(message|parser|unreader|body)"),
    ("gunicorn: WSGI environ, response write", r"gunicorn/http/wsgi|gunicorn/util"),
    ("gunicorn: gthread loop (accept, poll, keep-alive)", r"gunicorn/workers/|kproxy/worker\.py"),
    ("thread pool (concurrent.futures, threading)", r"concurrent/futures|threading\.py"),
]


def parse_collapsed(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        frames, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        stacks.append(([f for f in frames.split(";") if f], int(count)))
    return stacks


def short(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (pkg/file.py:12)``."""
    m = re.match(r"(.*) \((.*):(\d+)\)$", frame)
    if not m:
        return frame
    func, file, line = m.groups()
    for marker in ("site-packages/", "lib/python3.11/", "/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{func} ({file}:{line})"


def analyse(stacks: list[tuple[list[str], int]], top: int) -> str:
    total = sum(c for _, c in stacks) or 1
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        own[short(frames[-1])] += count
        for f in set(map(short, frames)):
            incl[f] += count
        # the innermost frame decides: the area whose pattern matches deepest in the stack
        best, depth = "other", -1
        for name, pattern in AREAS:
            for i in range(len(frames) - 1, -1, -1):
                if re.search(pattern, frames[i]):
                    if i > depth:
                        best, depth = name, i
                    break
        areas[best] += count
    out = [f"{total:,} samples\n"]
    out.append(table([[n, f"{c / total * 100:.1f}%"] for n, c in areas.most_common()],
                     ["area (innermost matching frame)", "samples"]))
    out.append("\n" + table([[f, f"{c / total * 100:.1f}%"] for f, c in own.most_common(top)],
                            ["function, self", "samples"]))
    kproxy_incl = [(f, c) for f, c in incl.most_common() if "kproxy/" in f][:top]
    out.append("\n" + table([[f, f"{c / total * 100:.1f}%"] for f, c in kproxy_incl],
                            ["kproxy function, inclusive", "samples"]))
    lib_incl = [(f, c) for f, c in incl.most_common() if "kproxy/" not in f and c / total > 0.02][:top]
    out.append("\n" + table([[f, f"{c / total * 100:.1f}%"] for f, c in lib_incl],
                            ["any function, inclusive (> 2%)", "samples"]))
    return "\n".join(out)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--all-threads", action="store_true", help="not only the thread holding the GIL")
    parser.add_argument("--svg", type=Path, help="also write a flame graph here")
    parser.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    args = parser.parse_args(argv)
    if not 2 <= args.duration <= 120:
        parser.error("--duration 2..120")
    pyspy = shutil.which("py-spy")
    if not pyspy:
        say("py-spy is not installed: pip install py-spy")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="kproxy-profile-"))
    upstream = proc = None
    try:
        upstream = start_upstream(workdir)
        port, = free_ports(1)
        ini = workdir / "kproxy.ini"
        ini.write_text(STATIC_INI.format(port=port, threads=THREADS, workers=1, keepalive=KEEPALIVE, host=HOST,
                                         upstream=f"nodes = 127.0.0.1:{upstream.port}"))
        env = Env(workdir, upstream)
        proc = Proc("kproxy", [PYTHON, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py", "kproxy.wsgi:application"],
                    workdir / "kproxy.log", env=_kproxy_env(env, ini, "profile"), stop_signal=signal.SIGINT)
        wait_http(port, timeout=30, proc=proc)
        worker = gunicorn_workers(proc.pid)[0]
        run_load(port, 2)  # warm-up
        raw = workdir / "profile.txt"
        spy_cmd = [pyspy, "record", "--pid", str(worker), "--rate", str(args.rate), "--duration",
                   str(args.duration), "--format", "raw", "--output", str(raw), "--nonblocking", "--function"]
        if not args.all_threads:
            spy_cmd.append("--gil")
        spy = subprocess.Popen(spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
        try:
            time.sleep(0.5)
            cpu0, t0 = cpu_seconds(worker), time.monotonic()
            result = run_load(port, args.duration + 1)
            cpu1, t1 = cpu_seconds(worker), time.monotonic()
            _, err = spy.communicate(timeout=60)
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait()
        if not raw.exists():
            say(f"py-spy wrote nothing: {err[-500:]}")
            return 1
        say(f"kproxy under gunicorn, 1 worker x {THREADS} threads, static node, upstream {upstream.kind}; "
            f"{result.rps:,.0f} req/s (slowed by sampling), p99 {result.p99_ms:.1f} ms")
        user, system = ((b - a) / (t1 - t0) * 100 for a, b in zip(cpu0, cpu1))
        say(f"worker CPU under load: {user:.0f}% user + {system:.0f}% system of one core "
            f"(the GIL is released in system calls: send/recv/epoll on loopback)")
        say(f"py-spy record --rate {args.rate} {'(every non-idle thread)' if args.all_threads else '--gil'} "
            f"for {args.duration} s")
        if not args.all_threads:
            taken = sum(c for _, c in parse_collapsed(raw))
            say(f"a thread held the GIL in {taken / (args.rate * args.duration):.0%} of the sampling times "
                f"({taken:,} of about {args.rate * args.duration:,}): the rest of the time every thread "
                f"waited (for the upstream, a client, or to be woken)")
        say("")
        say(analyse(parse_collapsed(raw), args.top))
        if args.raw:
            shutil.copy(raw, args.raw)
        if args.svg:
            # py-spy writes a flame graph only while recording: record again, briefly, for it
            spy2 = subprocess.Popen([pyspy, "record", "--pid", str(worker), "--rate", str(args.rate), "--duration",
                                     str(min(args.duration, 10)), "--output", str(args.svg), "--nonblocking"]
                                    + ([] if args.all_threads else ["--gil"]),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                time.sleep(0.5)
                run_load(port, min(args.duration, 10) + 1)
                spy2.wait(timeout=60)
            finally:
                if spy2.poll() is None:
                    spy2.kill()
                    spy2.wait()
            say(f"\nflame graph: {args.svg}")
    finally:
        if proc is not None:
            proc.stop()
        if upstream is not None:
            upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
