"""Shared discovery benchmarks (issue #15) on a real kube-apiserver (``kproxy_tools.testenv``;
never part of the tests).

    python bench/shared_discovery.py [--services 5000] [--addresses 10] [--writes 50]
                                     [--only convergence|memory] [--json FILE]

Three pods are compared, each kproxy under gunicorn with ``conf/gunicorn.conf.py``:
``-w 1`` (discovery in the worker), ``-w 4`` (shared: one discovery process feeds the four
workers) and ``-w 4 off`` (``KPROXY_SHARED_DISCOVERY=off``: every worker watches, as before).

(a) Convergence: a Service's one EndpointSlice flips between two upstream nodes; for each of
    ``--writes`` writes, the time from the PUT returning until every worker routes to the new
    node, polled on one kept-alive connection per worker (bench/discovery.py's ``Pinned``).
(b) Watches: established connections from the pod's process group to the API server.
(c) Memory: the pod's RSS and PSS (every process of its group: master, workers, discovery
    process) with ``--services`` Endpoints x ``--addresses`` addresses, less the same pod
    on an empty namespace: the extra memory the endpoints cost. Target: -w 4's extra RSS at
    most 1.5 x -w 1's.
(d) Idle workers: each worker's RSS on the empty namespace, -w 4 against -w 4 off (goal 30 MB).

Addresses are loopback (the test build accepts them); only the two local nodes get requests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's bench, kproxy, kproxy_tools

from bench import _kube  # noqa: E402
from bench._common import HOST, http_get, node_body, rss_mb, say, start_upstream, table, wait_http  # noqa: E402
from bench.discovery import INI, Pinned, _kube_path, _pct, create_endpoints, start_kproxy, SYNC_NS  # noqa: E402
from kproxy_tools.common import free_ports  # noqa: E402

CONV_NS = "bench-shared-conv"
EMPTY_NS = "bench-shared-empty"
PODS = (("-w 1", 1, True), ("-w 4", 4, True), ("-w 4 off", 4, False))
TARGET_CONVERGE_MS, TARGET_MEMORY_RATIO, GOAL_IDLE_WORKER_MB = 50.0, 1.5, 30.0


def group(pgid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                out.append(int(entry))
    return sorted(out)


def is_discovery(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"kproxy.discovery.process" in f.read()
    except OSError:
        return False


def pss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def api_connections(pgid: int, api_port: int) -> int:
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( dport = :{api_port} )"],
                         capture_output=True, text=True, timeout=5).stdout
    members = set(group(pgid))
    return sum(1 for line in out.splitlines() if {int(p) for p in re.findall(r"pid=(\d+)", line)} & members)


def start_pod(workdir: Path, name: str, kube: Any, token: Path, workers: int, shared: bool, namespace: str,
              service: str, resource: str, service_port: str = "80") -> tuple[Any, int]:
    port, = free_ports(1)
    text = INI.format(port=port, workers=workers, access_log="false", host=HOST, namespace=namespace,
                      service=service, service_port=service_port,
                      registry=_kube.registry_section("k8s", kube, token, namespace, resource=resource))
    proc = start_kproxy(workdir, name, text) if shared else _start_off(workdir, name, text)
    return proc, port


def _start_off(workdir: Path, name: str, text: str) -> Any:
    os.environ["KPROXY_SHARED_DISCOVERY"] = "off"
    try:
        return start_kproxy(workdir, name, text)
    finally:
        del os.environ["KPROXY_SHARED_DISCOVERY"]


def workers_of(proc: Any) -> list[int]:
    return [p for p in group(proc.pid) if p != proc.pid and not is_discovery(p)]


def wait_workers(proc: Any, workers: int, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = workers_of(proc)
        if len(found) == workers:
            return found
        time.sleep(0.1)
    raise RuntimeError(f"{len(workers_of(proc))} of {workers} workers are up")


def wait_ready(proc: Any, port: int, workers: int) -> list[int]:
    """The workers, once each has listed: many readyz 200 in a row on new connections,
    which reach any worker."""
    wait_http(port, "/-/readyz", timeout=120, proc=proc)
    pids = wait_workers(proc, workers)
    in_a_row, deadline = 0, time.monotonic() + 120
    while in_a_row < 8 * workers and time.monotonic() < deadline:
        status, _ = http_get(port, "/-/readyz")
        in_a_row = in_a_row + 1 if status == 200 else 0
    return pids


# -- (a) convergence and (b) watches --

def bench_convergence(workdir: Path, kube: Any, token: Path, nodes: list[int], label: str, workers: int,
                      shared: bool, writes: int) -> dict[str, Any]:
    service = "flip"
    stored = kube.get(_kube.slice_obj(CONV_NS, service, nodes[0]))
    proc, port = start_pod(workdir, f"conv-{workers}-{shared}", kube, token, workers, shared, CONV_NS, service,
                           "endpointslices")
    pinned = None
    try:
        pids = wait_ready(proc, port, workers)
        pinned = Pinned(port, pids)
        if pinned.wait_all(node_body(nodes[0]), timeout=60, count=False) is None:
            raise RuntimeError(f"not every worker routes to the first node ({pinned.last_error})")
        time.sleep(1.0)
        watches = api_connections(proc.pid, kube.port)
        times, missed, current = [], 0, 0
        for _ in range(writes):
            current = 1 - current
            body = json.loads(json.dumps(stored))
            body["ports"][0]["port"] = nodes[current]
            r = kube.request("PUT", _kube_path(body), json=body)
            written = time.perf_counter()
            if not r.ok:
                raise RuntimeError(f"PUT failed: {r.status_code} {r.text[:200]}")
            stored = r.json()
            done = pinned.wait_all(node_body(nodes[current]))
            if done is None:
                missed += 1
            else:
                times.append((done - written) * 1e3)
            time.sleep(0.1)
        times.sort()
        return {"pod": label, "workers": len(pids), "writes": writes, "missed": missed, "non_200": pinned.non_200,
                "watch_connections": watches, "p50_ms": _pct(times, 0.5), "p99_ms": _pct(times, 0.99),
                "max_ms": times[-1] if times else None}
    finally:
        if pinned is not None:
            pinned.close()
        proc.stop()


# -- (c) memory and (d) idle workers --

def measure_pod(workdir: Path, kube: Any, token: Path, name: str, workers: int, shared: bool,
                namespace: str) -> dict[str, Any]:
    proc, port = start_pod(workdir, name, kube, token, workers, shared, namespace, "svc-00000", "endpoints",
                           service_port="8080")
    try:
        pids = wait_ready(proc, port, workers)
        time.sleep(11.0)  # past the first malloc_trim (kproxy.memory, every 10 s)
        members = group(proc.pid)
        discovery = [p for p in members if is_discovery(p)]
        return {"rss": sum(rss_mb(p) or 0 for p in members), "pss": sum(pss_mb(p) or 0 for p in members),
                "workers_rss": [rss_mb(p) for p in pids], "workers_pss": [pss_mb(p) for p in pids],
                "discovery_rss": [rss_mb(p) for p in discovery],
                "master_rss": rss_mb(proc.pid), "processes": len(members),
                "watch_connections": api_connections(proc.pid, kube.port)}
    finally:
        proc.stop()


def bench_memory(workdir: Path, kube: Any, token: Path, args: argparse.Namespace) -> dict[str, Any]:
    kube.apply({"kind": "Namespace", "metadata": {"name": EMPTY_NS}})
    out: dict[str, Any] = {"idle": {}, "full": {}}
    for label, workers, shared in PODS:
        say(f"(c/d) {label}: empty namespace ...")
        out["idle"][label] = measure_pod(workdir, kube, token, f"idle-{workers}-{shared}", workers, shared, EMPTY_NS)
    say(f"    creating {args.services:,} Endpoints x {args.addresses} addresses ...")
    out["create_seconds"] = create_endpoints(kube, args.services, args.addresses, 8)
    for label, workers, shared in PODS:
        say(f"(c) {label}: {args.services:,} Endpoints x {args.addresses} ...")
        out["full"][label] = measure_pod(workdir, kube, token, f"full-{workers}-{shared}", workers, shared, SYNC_NS)
    for label, _, _ in PODS:
        out.setdefault("extra", {})[label] = {
            key: out["full"][label][key] - out["idle"][label][key] for key in ("rss", "pss")}
    return out


def _median(values: list[float | None]) -> str:
    found = [v for v in values if v]
    return f"{statistics.median(found):.1f}" if found else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=5000)
    parser.add_argument("--addresses", type=int, default=10)
    parser.add_argument("--writes", type=int, default=50)
    parser.add_argument("--only", choices=("convergence", "memory"),
                        help="run (a/b) or (c/d) alone (memory alone takes about 4 minutes)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not (1 <= args.services <= 20000 and 1 <= args.addresses <= 100 and 1 <= args.writes <= 500):
        parser.error("out of range")
    out: dict[str, Any] = {"command": "python bench/shared_discovery.py " + " ".join(sys.argv[1:] if argv is None
                                                                                    else argv),
                           "discovery_commit": _kube.discovery_commit(), "date": time.strftime("%Y-%m-%d %H:%M"),
                           "load_average_before": os.getloadavg()}
    reason = _kube.unavailable() or _kube.discovery_unfinished()
    if reason:
        say(f"SKIPPED: {reason}")
        out["skipped"] = reason
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="kproxy-bench-shared-"))
    kube = upstream = None
    try:
        upstream = start_upstream(workdir, extra_nodes=2)
        say("starting kube-apiserver + etcd (kproxy_tools.testenv) ...")
        kube = _kube.start()
        token = _kube.token_file(kube, workdir)
        if args.only != "memory":
            kube.apply({"kind": "Namespace", "metadata": {"name": CONV_NS}})
            kube.apply(_kube.service_obj(CONV_NS, "flip", upstream.extra_ports[0]))
            kube.apply(_kube.slice_obj(CONV_NS, "flip", upstream.extra_ports[0]))
            out["convergence"] = []
            for label, workers, shared in PODS:
                say(f"(a/b) convergence, {label}: {args.writes} writes ...")
                out["convergence"].append(bench_convergence(workdir, kube, token, upstream.extra_ports, label,
                                                            workers, shared, args.writes))
        if args.only != "convergence":
            out["memory"] = bench_memory(workdir, kube, token, args)
    finally:
        if kube is not None:
            kube.stop()
        if upstream is not None:
            upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    targets = []
    if "convergence" in out:
        say("\n" + table([[c["pod"], str(c["workers"]), str(c["watch_connections"]), f"{c['p50_ms']:.1f}",
                           f"{c['p99_ms']:.1f}", f"{c['max_ms']:.1f}", str(c["missed"]), str(c["non_200"])]
                          for c in out["convergence"]],
                         ["pod", "workers", "API connections", "p50 ms", "p99 ms", "max ms", "missed", "non-200"]))
        best = {c["pod"]: c for c in out["convergence"]}
        targets += [
            ["convergence -w 4: p99 <= 50 ms", f"{best['-w 4']['p99_ms']:.1f} ms",
             best["-w 4"]["p99_ms"] <= TARGET_CONVERGE_MS and not best["-w 4"]["missed"]],
            ["API connections -w 4 == -w 1",
             f"{best['-w 4']['watch_connections']} / {best['-w 1']['watch_connections']}",
             best["-w 4"]["watch_connections"] == best["-w 1"]["watch_connections"]],
        ]
    if "memory" in out:
        memory = out["memory"]
        rows = []
        for label, _, _ in PODS:
            idle, full, extra = memory["idle"][label], memory["full"][label], memory["extra"][label]
            rows.append([label, f"{idle['rss']:.1f}", f"{full['rss']:.1f}", f"{extra['rss']:+.1f}",
                         f"{extra['pss']:+.1f}", _median(idle["workers_rss"]), _median(full["workers_rss"]),
                         _median(idle["workers_pss"]), _median(full["workers_pss"]),
                         ", ".join(f"{i:.1f} / {f:.1f}" for i, f in zip(idle["discovery_rss"], full["discovery_rss"])
                                   if i and f) or "-",
                         str(full["watch_connections"])])
        say("\n" + table(rows, ["pod", "RSS idle MB", f"RSS {args.services:,}x{args.addresses} MB", "extra RSS MB",
                                "extra PSS MB", "worker RSS idle", "worker RSS full", "worker PSS idle",
                                "worker PSS full", "discovery RSS idle / full", "API connections"]))
        ratio = memory["extra"]["-w 4"]["rss"] / max(memory["extra"]["-w 1"]["rss"], 1e-6)
        idle_worker = statistics.median(w for w in memory["idle"]["-w 4"]["workers_rss"] if w)
        targets += [
            ["extra RSS -w 4 <= 1.5 x -w 1", f"{ratio:.2f} x", ratio <= TARGET_MEMORY_RATIO],
            ["idle worker RSS -w 4 <= 30 MB (goal)", f"{idle_worker:.1f} MB", idle_worker <= GOAL_IDLE_WORKER_MB],
        ]
    out["targets"] = [{"target": t, "measured": m, "met": ok} for t, m, ok in targets]
    out["load_average"] = os.getloadavg()
    say("\n" + table([[t, m, "yes" if ok else "NO"] for t, m, ok in targets], ["target", "measured", "met"]))
    say(f"load average at the end: {out['load_average'][0]:.2f} {out['load_average'][1]:.2f} "
        f"{out['load_average'][2]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
