"""Discovery benchmarks on a real kube-apiserver (``kproxy_tools.testenv``; never part of the tests).

    python bench/discovery.py [--services 5000] [--addresses 10] [--writes 50] [--json FILE]

(a) Initial sync: ``--services`` Endpoints x ``--addresses`` addresses are created (several
    threads), then kproxy starts under gunicorn (1 worker, ``resource = endpoints``) and the
    time from spawning it to ``/-/readyz`` 200 is measured, against the same start on an
    empty namespace (the difference is what the sync adds); and the worker's RSS (and
    peak, VmHWM) against that idle worker. Target (discovery issue): ready within 2 s,
    at most 80 MB extra.
(b) Convergence: kproxy under gunicorn with 2 workers routes to a Service whose one
    endpoint flips between two upstream nodes; for each of ``--writes`` writes, the time
    from the API write (PUT) returning until every worker routes to the new node, checked
    on one kept-alive connection per worker. Done for EndpointSlices and for v1 Endpoints.
    Target: p99 at most 100 ms.

Skipped, with the reason, when the API server is not provisioned (``python -m
kproxy_tools.testenv provision``) or kproxy's discovery is not complete. Addresses are
loopback (127.x.y.z; the test build accepts them) and nothing but the two local
upstream nodes is ever sent a request.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import shutil
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's bench, kproxy, kproxy_tools

from bench import _kube  # noqa: E402
from bench._common import (HOST, PATH, PYTHON, Proc, client_ports_by_worker, node_body, proc_mb,  # noqa: E402
                           rss_mb, say, start_upstream, table, wait_http)
from kproxy_tools.common import children, free_ports, session as loopback_session  # noqa: E402

SYNC_NS, CONV_NS = "bench-sync", "bench-conv"
TARGET_READY_S, TARGET_EXTRA_MB, TARGET_CONVERGE_MS = 2.0, 80.0, 100.0

INI = """\
[kproxy]
listen = 127.0.0.1:{port}
threads = 8
workers = {workers}
access_log = {access_log}

{registry}
[service:bench]
host = {host}
path_prefix = /v1
registry = k8s
namespace = {namespace}
service_name = {service}
port = {service_port}

[api:anything]
service = bench
path = /anything
strip_prefix = true
methods = *
"""


def hwm_mb(pid: int) -> float | None:
    return proc_mb(pid, "VmHWM")


def start_kproxy(workdir: Path, name: str, text: str) -> Proc:
    ini = workdir / f"{name}.ini"
    ini.write_text(text)
    metrics = workdir / f"metrics-{name}"
    metrics.mkdir(exist_ok=True)
    env = dict(os.environ, KPROXY_CONFIG=str(ini), PROMETHEUS_MULTIPROC_DIR=str(metrics))
    return Proc(name, [PYTHON, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py", "kproxy.wsgi:application"],
                workdir / f"{name}.log", env=env, stop_signal=signal.SIGINT)


# -- (a) initial sync --

def create_endpoints(kube: Any, services: int, addresses: int, threads: int) -> float:
    """Create the Endpoints with ``threads`` threads; the seconds it took."""
    kube.apply({"kind": "Namespace", "metadata": {"name": SYNC_NS}})
    errors: list[str] = []
    next_index = iter(range(services))
    lock = threading.Lock()

    def work() -> None:
        session = loopback_session()
        url = f"{kube.url}/api/v1/namespaces/{SYNC_NS}/endpoints"
        headers = {"Authorization": f"Bearer {kube.admin_token}"}
        while True:
            with lock:
                i = next(next_index, None)
            if i is None or len(errors) > 5:
                return
            ips = [f"127.{(i >> 8) & 255}.{i & 255}.{a + 1}" for a in range(addresses)]
            body = _kube.endpoints_obj(SYNC_NS, f"svc-{i:05d}", 8080, ips)
            body["apiVersion"] = "v1"
            for attempt in range(5):
                r = session.post(url, json=body, headers=headers, verify=kube.ca_file, timeout=30)
                if r.status_code in (201, 409):
                    break
                if r.status_code != 429 and r.status_code < 500:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    return
                time.sleep(0.2 * (attempt + 1))
            else:
                errors.append(f"{r.status_code} {r.text[:200]}")
                return

    start = time.monotonic()
    pool = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=600)
    if errors:
        raise RuntimeError(f"creating Endpoints failed: {errors[0]}")
    return time.monotonic() - start


def time_to_ready(workdir: Path, name: str, kube: Any, token: Path) -> dict[str, Any]:
    """Spawn kproxy (1 worker, resource = endpoints, namespace bench-sync); seconds to
    readyz 200, then the worker's RSS and peak RSS once settled."""
    port, = free_ports(1)
    text = INI.format(port=port, workers=1, access_log="true", host=HOST, namespace=SYNC_NS, service="svc-00000",
                      service_port="8080",
                      registry=_kube.registry_section("k8s", kube, token, SYNC_NS, resource="endpoints"))
    proc = start_kproxy(workdir, name, text)
    try:
        seconds = wait_http(port, "/-/readyz", timeout=120, proc=proc)
        time.sleep(1.5)
        pids = children(proc.pid)
        objects = None
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/-/discovery")
            dump = json.loads(conn.getresponse().read())
            conn.close()
            objects = dump["registries"]["k8s"]["informers"]["endpoints"]["objects"]
        except (OSError, ValueError, KeyError):
            pass
        return {"seconds": seconds, "rss": rss_mb(pids[0]) if pids else None,
                "hwm": hwm_mb(pids[0]) if pids else None, "objects": objects}
    finally:
        proc.stop()


def bench_sync(workdir: Path, kube: Any, token: Path, args: argparse.Namespace) -> dict[str, Any]:
    kube.apply({"kind": "Namespace", "metadata": {"name": SYNC_NS}})
    say(f"(a) initial sync: baseline start on an empty namespace x{args.repeats} ...")
    base = [time_to_ready(workdir, f"sync-empty-{i}", kube, token) for i in range(args.repeats)]
    say(f"    creating {args.services:,} Endpoints x {args.addresses} addresses with {args.threads} threads ...")
    created = create_endpoints(kube, args.services, args.addresses, args.threads)
    say(f"    created in {created:.1f} s ({args.services / created:,.0f}/s); start with them x{args.repeats} ...")
    full = [time_to_ready(workdir, f"sync-full-{i}", kube, token) for i in range(args.repeats)]
    med = lambda runs, k: statistics.median([r[k] for r in runs if r[k] is not None])  # noqa: E731
    result = {
        "services": args.services, "addresses": args.addresses, "create_seconds": created,
        "ready_empty": med(base, "seconds"), "ready_full": med(full, "seconds"),
        "rss_empty": med(base, "rss"), "rss_full": med(full, "rss"),
        "hwm_empty": med(base, "hwm"), "hwm_full": med(full, "hwm"),
        "objects": full[0]["objects"], "runs_empty": base, "runs_full": full,
    }
    result["sync_seconds"] = result["ready_full"] - result["ready_empty"]
    result["extra_rss"] = result["rss_full"] - result["rss_empty"]
    result["extra_hwm"] = result["hwm_full"] - result["hwm_empty"]
    return result


# -- (b) convergence --

class Pinned:
    """One kept-alive connection per gunicorn worker, found by asking ss which worker
    holds the server side of each connection we open."""

    def __init__(self, port: int, workers: list[int], attempts: int = 64):
        self.port = port
        self.conns: dict[int, http.client.HTTPConnection] = {}
        self.non_200 = 0  # answers other than 200 while waiting for a node (503: no endpoints)
        self.last_error = ""
        spare = []
        for _ in range(attempts):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            self._get(conn, "/-/healthz")
            local = conn.sock.getsockname()[1]
            pid = client_ports_by_worker(port).get(local)
            if pid in workers and pid not in self.conns:
                self.conns[pid] = conn
            else:
                spare.append(conn)
            if len(self.conns) == len(workers):
                break
        for conn in spare:
            conn.close()
        if len(self.conns) < len(workers):
            self.close()
            raise RuntimeError(f"could not reach every worker ({len(self.conns)} of {len(workers)})")

    @staticmethod
    def _get(conn: http.client.HTTPConnection, path: str = PATH) -> tuple[int, bytes]:
        conn.request("GET", path, headers={"Host": HOST})
        response = conn.getresponse()
        return response.status, response.read()

    def wait_all(self, want: bytes, timeout: float = 10.0, path: str = PATH, count: bool = True) -> float | None:
        """Poll every worker until each answers 200 with ``want``; the moment the last
        one did (perf_counter), or None on timeout."""
        pending = set(self.conns)
        deadline = time.perf_counter() + timeout
        while pending and time.perf_counter() < deadline:
            for pid in list(pending):
                status, body = self._get(self.conns[pid], path)
                if status == 200 and body == want:
                    pending.discard(pid)
                    if not pending:
                        return time.perf_counter()
                elif status != 200:
                    self.non_200 += count
                    self.last_error = f"HTTP {status}: {body[:120]!r}"
        return None

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()


def bench_convergence(workdir: Path, kube: Any, token: Path, nodes: list[int], resource: str,
                      writes: int) -> dict[str, Any]:
    kube.apply({"kind": "Namespace", "metadata": {"name": CONV_NS}})
    service = "up-slices" if resource == "endpointslices" else "up-endpoints"
    kube.apply(_kube.service_obj(CONV_NS, service, nodes[0]))
    obj = (_kube.slice_obj(CONV_NS, service, nodes[0]) if resource == "endpointslices"
           else _kube.endpoints_obj(CONV_NS, service, nodes[0]))
    stored = kube.apply(obj)
    port, = free_ports(1)
    text = INI.format(port=port, workers=2, access_log="true", host=HOST, namespace=CONV_NS, service=service,
                      service_port="80",
                      registry=_kube.registry_section("k8s", kube, token, CONV_NS, resource=resource))
    proc = start_kproxy(workdir, f"converge-{resource}", text)
    pinned = None
    try:
        wait_http(port, "/-/healthz", timeout=60, proc=proc)
        deadline = time.monotonic() + 20
        while len(children(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = children(proc.pid)
        pinned = Pinned(port, workers)
        # every worker has listed (its first list may outlast gunicorn's wait for it) and routes
        if pinned.wait_all(node_body(nodes[0]), timeout=60, count=False) is None:
            raise RuntimeError(f"not every worker routes to the first node ({pinned.last_error})")
        times, missed = [], 0
        current = 0
        for _ in range(writes):
            current = 1 - current
            target = nodes[current]
            body = json.loads(json.dumps(obj))
            if resource == "endpointslices":
                body["ports"][0]["port"] = target
            else:
                body["subsets"][0]["ports"][0]["port"] = target
            body["apiVersion"] = "discovery.k8s.io/v1beta1" if resource == "endpointslices" else "v1"
            body["metadata"]["resourceVersion"] = stored["metadata"]["resourceVersion"]
            r = kube.request("PUT", _kube_path(body), json=body)
            written = time.perf_counter()
            if not r.ok:
                raise RuntimeError(f"PUT failed: {r.status_code} {r.text[:200]}")
            stored = r.json()
            done = pinned.wait_all(node_body(target))
            if done is None:
                missed += 1
            else:
                times.append((done - written) * 1e3)
            time.sleep(0.15)
        times.sort()
        return {"resource": resource, "writes": writes, "missed": missed, "workers": len(workers),
                "non_200": pinned.non_200, "last_error": pinned.last_error,
                "p50_ms": _pct(times, 0.50), "p99_ms": _pct(times, 0.99), "max_ms": times[-1] if times else None,
                "min_ms": times[0] if times else None}
    finally:
        if pinned is not None:
            pinned.close()
        proc.stop()


def _kube_path(obj: dict) -> str:
    from kproxy_tools.common import resource_path
    return resource_path(obj)


def _pct(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    # nearest rank (with 50 writes, p99 is the slowest write)
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=5000)
    parser.add_argument("--addresses", type=int, default=10)
    parser.add_argument("--threads", type=int, default=8, help="threads creating Endpoints")
    parser.add_argument("--repeats", type=int, default=3, help="starts measured for the sync (median)")
    parser.add_argument("--writes", type=int, default=50)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not (1 <= args.services <= 20000 and 1 <= args.addresses <= 100 and 1 <= args.writes <= 500
            and 1 <= args.repeats <= 10 and 1 <= args.threads <= 32):
        parser.error("out of range")
    reason = _kube.unavailable() or _kube.discovery_unfinished()
    out: dict[str, Any] = {"command": "python bench/discovery.py " + " ".join(sys.argv[1:] if argv is None else argv),
                           "discovery_commit": _kube.discovery_commit()}
    say(f"discovery: last commit {out['discovery_commit']}")
    if reason:
        say(f"SKIPPED: {reason}")
        out["skipped"] = reason
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="kproxy-bench-discovery-"))
    kube = upstream = None
    started = time.monotonic()
    try:
        upstream = start_upstream(workdir, extra_nodes=2)
        say(f"upstream nodes ({upstream.kind}): 127.0.0.1:{upstream.extra_ports[0]}, 127.0.0.1:{upstream.extra_ports[1]}")
        say("starting kube-apiserver + etcd (kproxy_tools.testenv) ...")
        kube = _kube.start()
        token = _kube.token_file(kube, workdir)
        convergence = []
        for resource in ("endpointslices", "endpoints"):
            say(f"(b) convergence, {resource}: {args.writes} writes, gunicorn 2 workers ...")
            try:
                convergence.append(bench_convergence(workdir, kube, token, upstream.extra_ports, resource,
                                                     args.writes))
            except Exception as e:
                convergence.append({"resource": resource, "error": str(e)[:500]})
                say(f"    failed: {str(e)[:500]}")
        out["convergence"] = convergence
        try:
            out["sync"] = bench_sync(workdir, kube, token, args)
        except Exception as e:
            out["sync"] = {"error": str(e)[:500]}
            say(f"    failed: {str(e)[:500]}")
    finally:
        if kube is not None:
            kube.stop()
        if upstream is not None:
            upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    targets = []
    sync = out["sync"]
    if "error" not in sync:
        say("\n" + table([
            ["readyz 200 after spawn, empty namespace", f"{sync['ready_empty']:.2f} s", f"{sync['rss_empty']:.1f} MB",
             f"{sync['hwm_empty']:.1f} MB"],
            [f"readyz 200 after spawn, {sync['services']:,} Endpoints x {sync['addresses']}",
             f"{sync['ready_full']:.2f} s", f"{sync['rss_full']:.1f} MB", f"{sync['hwm_full']:.1f} MB"],
            ["added by the sync", f"{sync['sync_seconds']:.2f} s", f"{sync['extra_rss']:+.1f} MB",
             f"{sync['extra_hwm']:+.1f} MB"],
        ], ["initial sync (gunicorn, 1 worker, resource = endpoints)", "time", "worker RSS", "peak RSS"]))
        say(f"objects in the worker's cache: {sync['objects']}; Endpoints created in {sync['create_seconds']:.1f} s")
        targets.append([f"initial sync of {sync['services']:,} Endpoints x {sync['addresses']}: readyz 200 within "
                        f"{TARGET_READY_S:g} s of spawning gunicorn", f"{sync['ready_full']:.2f} s",
                        sync["ready_full"] <= TARGET_READY_S])
        targets.append([f"initial sync: extra RSS <= {TARGET_EXTRA_MB:g} MB", f"{sync['extra_rss']:.1f} MB",
                        sync["extra_rss"] <= TARGET_EXTRA_MB])
    rows = []
    for c in out["convergence"]:
        if "error" in c:
            rows.append([c["resource"], "failed", "", "", "", "", c["error"][:60]])
            continue
        rows.append([c["resource"], str(c["writes"]), f"{c['p50_ms']:.1f}" if c["p50_ms"] is not None else "-",
                     f"{c['p99_ms']:.1f}" if c["p99_ms"] is not None else "-",
                     f"{c['max_ms']:.1f}" if c["max_ms"] is not None else "-", str(c["missed"]), str(c["non_200"])])
        if c["p99_ms"] is not None:
            targets.append([f"convergence ({c['resource']}, 2 workers): p99 <= {TARGET_CONVERGE_MS:g} ms",
                            f"{c['p99_ms']:.1f} ms",
                            c["p99_ms"] <= TARGET_CONVERGE_MS and not c["missed"] and not c["non_200"]])
    say("\n" + table(rows, ["convergence, write -> every worker routes", "writes", "p50 ms", "p99 ms", "max ms",
                            "missed (>10 s)",
                            "non-200 answers"]))
    say("\n" + table([[n, v, "PASS" if ok else "FAIL"] for n, v, ok in targets],
                     ["target (discovery issue)", "measured", ""]))
    load = os.getloadavg()[0]
    if load > 3 * (os.cpu_count() or 1):
        say(f"NOTE: the machine was busy (1-minute load average {load:.1f} on {os.cpu_count()} cores): "
            "times are inflated, run again on a quiet machine")
    say(f"done in {time.monotonic() - started:.0f} s")
    out["targets"] = targets
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
