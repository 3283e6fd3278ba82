"""CPU per request of kproxy's request path, in-process, without a server in front
(a benchmark for working on the hot path: far less noisy than req/s on a shared machine).

    python bench/request_cost.py [--requests 2000] [--rounds 5] [--cprofile]

One thread calls the WSGI app with a gunicorn-like environ (``GET /v1/anything``,
``Host: sd.httpbin.org``) and reads the body, against the benchmark upstream (nginx,
or the Python one). Metrics are in multiprocess mode and the access log is written to
a file, as under gunicorn. Variants, interleaved round by round:

- urllib3 pool, minimal: ``pool.urlopen(..., preload_content=False)`` through the pool
  manager of requests' ``HTTPAdapter`` and a streamed body (what requests' stack costs
  below its Session);
- kproxy's transport alone: ``kproxy.transport.Transport.send`` (kproxy.http1 on the same
  pools) and a streamed body, no gateway around it (the floor for kproxy);
- kproxy Gateway with metrics and access log (as deployed), with metrics only, with the
  access log only, and with neither.

Prints microseconds of CPU (process time) per request, medians of rounds. ``--cprofile``
adds the top functions by cumulative time for the deployed variant.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
import shutil
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's bench, kproxy, kproxy_tools

from bench._common import HOST, PATH, say, start_upstream, table  # noqa: E402

INI = """\
[kproxy]
threads = 8
access_log = true

[service:bench]
host = {host}
path_prefix = /v1
nodes = 127.0.0.1:{port}

[api:anything]
service = bench
path = /anything
strip_prefix = true
methods = *
"""


def environ() -> dict[str, Any]:
    """What gunicorn hands the app for wrk's request."""
    return {"REQUEST_METHOD": "GET", "PATH_INFO": PATH, "RAW_URI": PATH, "QUERY_STRING": "", "SCRIPT_NAME": "",
            "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": HOST, "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "40000",
            "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "9080", "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr, "wsgi.version": (1, 0),
            "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False}


def _start_response(status: str, headers: list, exc_info: Any = None) -> None:
    if not status.startswith("200"):
        raise RuntimeError(f"unexpected answer {status}")


def one(app: Callable) -> None:
    body = app(environ(), _start_response)
    try:
        for _ in body:
            pass
    finally:
        close = getattr(body, "close", None)
        if close:
            close()


def pool_app(port: int) -> Callable:
    import urllib3
    from requests.adapters import HTTPAdapter
    from urllib3.util import SKIP_HEADER
    manager = HTTPAdapter(pool_connections=10, pool_maxsize=8, max_retries=0).poolmanager
    timeout = urllib3.Timeout(connect=3, read=60)

    def app(environ: dict, start_response: Callable) -> Any:
        pool = manager.connection_from_host("127.0.0.1", port, "http")
        headers = {"Host": environ["HTTP_HOST"], "User-Agent": SKIP_HEADER, "Accept-Encoding": SKIP_HEADER}
        response = pool.urlopen("GET", "/anything", headers=headers, preload_content=False, decode_content=False,
                                retries=False, redirect=False, timeout=timeout)
        start_response(f"{response.status} {response.reason}", list(response.headers.items()))

        def body() -> Any:
            try:
                yield from response.stream(65536, decode_content=False)
            finally:
                response.release_conn()
        return body()
    return app


def transport_app(port: int) -> Callable:
    from kproxy.transport import Transport
    from kproxy.node import Node
    transport, node = Transport(8, 3, 60), Node("127.0.0.1", port)

    def app(environ: dict, start_response: Callable) -> Any:
        response = transport.send(node, "GET", "/anything", {"Host": environ["HTTP_HOST"]})
        start_response(f"{response.status} {response.reason}", response.headers)

        def body() -> Any:
            try:
                while piece := response.read1(65536):
                    yield piece
            finally:
                response.release_conn()
        return body()
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per round and variant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cprofile", action="store_true")
    args = parser.parse_args(argv)
    if not (100 <= args.requests <= 100_000 and 1 <= args.rounds <= 50):
        parser.error("out of range")
    workdir = Path(tempfile.mkdtemp(prefix="kproxy-request-cost-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(workdir)  # as under gunicorn; before prometheus_client loads
    upstream = None
    try:
        upstream = start_upstream(workdir)
        ini = workdir / "kproxy.ini"
        ini.write_text(INI.format(host=HOST, port=upstream.port))
        import logging

        from kproxy import server
        from kproxy.app import Gateway
        from kproxy.config import load
        server.configure_logging()
        access_log = open(workdir / "access.log", "w")  # noqa: SIM115 - closed below
        for handler in logging.getLogger("kproxy.access").handlers:
            handler.stream = access_log  # kproxy's AccessLogHandler, as serve and gunicorn set it up
        gateway = Gateway(load(str(ini)))
        observers = list(gateway.observers)  # [metrics, access log]

        variants = {
            "urllib3 pool, minimal forward": (pool_app(upstream.port), None),
            "kproxy transport alone": (transport_app(upstream.port), None),
            "kproxy: metrics + access log": (gateway, observers),
            "kproxy: metrics only": (gateway, observers[:1]),
            "kproxy: access log only": (gateway, observers[1:]),
            "kproxy: no observers": (gateway, []),
        }
        results: dict[str, list[float]] = {name: [] for name in variants}
        for app, chosen in variants.values():  # warm-up: connections, caches
            if chosen is not None:
                gateway.observers = chosen
            for _ in range(300):
                one(app)
        names = list(variants)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                app, chosen = variants[name]
                if chosen is not None:
                    gateway.observers = chosen
                start = time.process_time()
                for _ in range(args.requests):
                    one(app)
                results[name].append((time.process_time() - start) / args.requests * 1e6)
        gateway.observers = observers
        base = statistics.median(results["urllib3 pool, minimal forward"])
        rows = []
        for name in names:
            us = statistics.median(results[name])
            rows.append([name, f"{us:.0f}", f"{min(results[name]):.0f}-{max(results[name]):.0f}", f"{us / base:.2f}"])
        say(f"upstream {upstream.kind}; {args.rounds} rounds x {args.requests} requests, one thread; "
            "CPU time of this process (the upstream's is not counted)")
        say(table(rows, ["variant", "us CPU/request", "range", "x minimal"]))
        if args.cprofile:
            import cProfile
            import pstats
            profiler = cProfile.Profile(time.process_time)  # CPU time: waits for the upstream do not count
            profiler.enable()
            for _ in range(args.requests):
                one(gateway)
            profiler.disable()
            say("\ncProfile (CPU time), kproxy with metrics + access log, by cumulative time:")
            pstats.Stats(profiler, stream=sys.stdout).strip_dirs().sort_stats("cumulative").print_stats(45)
        gateway.stop()
        access_log.close()
    finally:
        if upstream is not None:
            upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
