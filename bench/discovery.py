"""Discovery benchmarks on a real kube-apiserver (``kproxy_tools.testenv``; never part of the tests).

    python bench/discovery.py [--parts sync,boot,phases,convergence,workers] [--baseline REV]
                              [--services 5000] [--addresses 10] [--writes 50] [--repeats 3]
                              [--threads 8] [--json FILE]

Parts (``--parts``, default ``sync,convergence``: what bench/run.py runs); whatever is
asked runs in the order convergence, sync, boot, phases, workers, on one API server. The
``--services`` Endpoints x ``--addresses`` addresses (namespace bench-sync) are created
once, with ``--threads`` threads, by the first part that needs them; "empty namespace"
starts watch bench-empty.

sync         Initial sync, gunicorn -w 1, ``resource = endpoints``: seconds from spawning
             gunicorn to the first ``/-/readyz`` 200 with the full namespace, against the same
             start on an empty namespace (the difference is what the sync adds), and the
             worker's RSS and peak (VmHWM) against the idle worker's; median of
             ``--repeats`` starts each, after one unmeasured start per checkout (it compiles
             a fresh worktree's .pyc files and reads the files from disk). Targets: ready
             within 2 s and at most 80 MB extra (discovery issue); the sync adds at most
             1.0 s (issue #15, a goal).
boot         A pod's boot: seconds from spawning gunicorn until every worker answers
             ``/-/readyz`` 200 (one kept-alive connection per worker) on the empty
             namespace, ``-w 1`` and ``-w 4``; median of ``--repeats`` starts each, after the
             same unmeasured start per checkout as sync. With ``-w 4`` the discovery process
             boots beside the workers; this shows what that costs against ``-w 1``.
phases       Where the first sync's time goes, in-process (bench/_sync_phases.py, one cold
             process per measurement, ``--repeats`` each, medians): imports, the registry's
             first sync (start until ready), then replayed step by step: connect, the
             endpoints reflector's LIST over HTTP with the parameters it sent, json.loads,
             trim of every item, Store.replace, build_view of every Service. ms per phase.
convergence  kproxy under gunicorn -w 2 routes to a Service whose one endpoint flips between
             two upstream nodes; for each of ``--writes`` writes, the time from the API write
             (PUT) returning until every worker routes to the new node, polled on one
             kept-alive connection per worker. For EndpointSlices and for v1 Endpoints.
             Target: p99 at most 100 ms (discovery issue).
workers      Issue #15, three pods: ``-w 1`` (discovery in the worker), ``-w 4`` (one discovery
             process feeds the four workers) and ``-w 4 off`` (``KPROXY_SHARED_DISCOVERY=off``:
             every worker watches). Per pod: the connections its process group holds to the
             API server; convergence as above (EndpointSlices); first sync, the seconds from
             spawning gunicorn until EVERY worker answers ``/-/readyz`` 200 (one kept-alive
             connection per worker) with the full namespace, against the empty one; memory,
             RSS and PSS summed over the pod's processes (master, workers, discovery process)
             with the full namespace less the same on the empty one (after the first
             malloc_trim, 11 s after ready), and each worker's RSS and PSS; one start each.
             Targets: convergence -w 4 p99 at most 50 ms; API connections -w 4 == -w 1; extra
             RSS -w 4 at most 1.5 x -w 1; idle worker at most 30 MB (a goal); -w 4's sync adds
             at most 1.0 s (a goal).

``--baseline REV`` measures sync, boot and phases also for kproxy at git revision REV (a
commit, tag or branch): ``git worktree add --detach`` into a temporary directory, removed at
the end (also on failure or Ctrl-C). Its processes run with PYTHONPATH and the working
directory there, so gunicorn imports that kproxy: checked before measuring (the path
``import kproxy`` finds under that environment) and on every worker (its working directory).
Starts alternate, current, REV, current, REV ..., so the machine's noise hits both, and the
tables show both with their difference and ratio. The other parts measure this checkout only.

Skipped, with the reason, when the API server is not provisioned (``python -m
kproxy_tools.testenv provision``) or kproxy's discovery is not complete. Addresses are
loopback (127.x.y.z; the test build accepts them) and nothing but the two local upstream
nodes and the API server, all on 127.0.0.1, is ever sent a request. Every loop is bounded,
and every process started is stopped in a ``finally`` (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's bench, kproxy, kproxy_tools

from bench import _kube  # noqa: E402
from bench._common import (BENCH, HOST, PATH, PYTHON, ROOT, Proc, client_ports_by_worker, http_get,  # noqa: E402
                           node_body, percentile, proc_mb, rss_mb, say, start_upstream, table, wait_http)
from kproxy_tools.common import (free_ports, is_discovery_process, process_group, resource_path,  # noqa: E402
                                 session as loopback_session)

PARTS = ("convergence", "sync", "boot", "phases", "workers")  # the order they run in
SYNC_NS, EMPTY_NS, CONV_NS = "bench-sync", "bench-empty", "bench-conv"
PODS = (("-w 1", 1, True), ("-w 4", 4, True), ("-w 4 off", 4, False))  # label, workers, shared discovery
# the discovery issue
TARGET_READY_S, TARGET_EXTRA_MB, TARGET_CONVERGE_MS = 2.0, 80.0, 100.0
# issue #15
GOAL_SYNC_S, TARGET_SHARED_CONVERGE_MS, TARGET_MEMORY_RATIO, GOAL_IDLE_WORKER_MB = 1.0, 50.0, 1.5, 30.0

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


# -- what is measured: this checkout, or a baseline revision's worktree --

@dataclass(frozen=True)
class Checkout:
    label: str   # "current", or the baseline's short commit
    root: Path

    def env(self, **extra: str) -> dict[str, str]:
        """The environment its processes run with: its kproxy first on the import path."""
        path = os.pathsep.join(p for p in (str(self.root), os.environ.get("PYTHONPATH", "")) if p)
        return dict(os.environ, PYTHONPATH=path, **extra)

    def check_import(self) -> str:
        """The kproxy a process of this checkout imports (cwd and environment as gunicorn
        gets them); RuntimeError unless it lies in the checkout."""
        out = subprocess.run([PYTHON, "-c", "import kproxy; print(kproxy.__file__)"], cwd=self.root, env=self.env(),
                             capture_output=True, text=True, timeout=60)
        found = out.stdout.strip()
        if out.returncode or not Path(found).resolve().is_relative_to(self.root.resolve()):
            raise RuntimeError(f"{self.label}: kproxy is imported from {found or out.stderr.strip()[-300:]!r}, "
                               f"not from {self.root}")
        return found

    def check_worker(self, pid: int) -> None:
        """A worker of this checkout runs in it (gunicorn's chdir) with its PYTHONPATH."""
        try:
            cwd = Path(os.readlink(f"/proc/{pid}/cwd")).resolve()
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except OSError:
            return  # gone already: the caller's measurement says so
        path = environ.get(b"PYTHONPATH", b"").decode().split(os.pathsep)[0]
        if cwd != self.root.resolve() or Path(path).resolve() != self.root.resolve():
            raise RuntimeError(f"{self.label}: worker {pid} runs in {cwd} with PYTHONPATH {path!r}, not {self.root}")


CURRENT = Checkout("current", ROOT)


def git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if out.returncode:
        raise RuntimeError(f"git {' '.join(args)}: {out.stderr.strip()[-500:]}")
    return out.stdout.strip()


@contextlib.contextmanager
def baseline_checkout(commit: str, workdir: Path) -> Iterator[Checkout]:
    """``commit`` in a detached worktree under ``workdir``; removed (and pruned) on the way out."""
    path = workdir / f"baseline-{commit}"
    git("worktree", "add", "--detach", str(path), commit)
    try:
        yield Checkout(commit, path)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True,
                       timeout=120)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True, timeout=120)


# -- the run: API server, upstream nodes, the Endpoints --

@dataclass
class Run:
    workdir: Path
    kube: Any
    token: Path
    nodes: list[int]          # the two upstream nodes' ports
    args: argparse.Namespace
    checkouts: list[Checkout]  # current first, then the baseline
    create_seconds: float | None = None
    warm: bool = False

    def warm_up(self) -> None:
        """One unmeasured start of each checkout on the empty namespace: a fresh worktree
        compiles its .pyc files, and the first start of a run reads its files from disk."""
        if self.warm:
            return
        self.kube.apply({"kind": "Namespace", "metadata": {"name": EMPTY_NS}})
        for c in self.checkouts:
            say(f"warm-up start, {c.label} (not measured) ...")
            time_to_ready(self, f"warm-up-{c.label}", EMPTY_NS, c)
        self.warm = True

    def endpoints(self) -> None:
        """The ``--services`` Endpoints in SYNC_NS, created on first use."""
        if self.create_seconds is not None:
            return
        a = self.args
        say(f"    creating {a.services:,} Endpoints x {a.addresses} addresses with {a.threads} threads ...")
        self.create_seconds = create_endpoints(self.kube, a.services, a.addresses, a.threads)
        say(f"    created in {self.create_seconds:.1f} s ({a.services / self.create_seconds:,.0f}/s)")

    def ini(self, name: str, *, workers: int, namespace: str, service: str, resource: str,
            service_port: str = "80", access_log: bool = True) -> tuple[Path, int]:
        """A kproxy INI in the workdir, listening on a free port: its path and the port."""
        port, = free_ports(1)
        path = self.workdir / f"{name}.ini"
        path.write_text(INI.format(
            port=port, workers=workers, access_log=str(access_log).lower(), host=HOST, namespace=namespace,
            service=service, service_port=service_port,
            registry=_kube.registry_section("k8s", self.kube, self.token, namespace, resource=resource)))
        return path, port

    @contextlib.contextmanager
    def pod(self, name: str, *, workers: int, namespace: str, service: str = "svc-00000",
            resource: str = "endpoints", service_port: str = "8080", shared: bool = True,
            access_log: bool = True, checkout: Checkout = CURRENT) -> Iterator[tuple[Proc, int]]:
        """kproxy under gunicorn (conf/gunicorn.conf.py of ``checkout``), stopped on the way
        out: its master process and its port."""
        ini, port = self.ini(name, workers=workers, namespace=namespace, service=service, resource=resource,
                             service_port=service_port, access_log=access_log)
        metrics = self.workdir / f"metrics-{name}"
        metrics.mkdir(exist_ok=True)
        env = checkout.env(KPROXY_CONFIG=str(ini), PROMETHEUS_MULTIPROC_DIR=str(metrics))
        env.pop("KPROXY_SHARED_DISCOVERY", None)
        if not shared:  # every worker watches, as before shared discovery
            env["KPROXY_SHARED_DISCOVERY"] = "off"
        proc = Proc(name, [PYTHON, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py", "kproxy.wsgi:application"],
                    self.workdir / f"{name}.log", env=env, cwd=checkout.root, stop_signal=signal.SIGINT)
        try:
            yield proc, port
        finally:
            proc.stop()


def create_endpoints(kube: Any, services: int, addresses: int, threads: int) -> float:
    """Create the Endpoints in SYNC_NS with ``threads`` threads; the seconds it took."""
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


# -- a pod's processes --

def pss_mb(pid: int) -> float | None:
    return proc_mb(pid, "Pss", "smaps_rollup")


def api_connections(pgid: int, api_port: int) -> int:
    """Established connections from the pod's processes to the API server."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( dport = :{api_port} )"],
                         capture_output=True, text=True, timeout=5).stdout
    members = set(process_group(pgid))
    return sum(1 for line in out.splitlines() if {int(p) for p in re.findall(r"pid=(\d+)", line)} & members)


def workers_of(proc: Proc) -> list[int]:
    return [p for p in process_group(proc.pid) if p != proc.pid and not is_discovery_process(p)]


def wait_workers(proc: Proc, workers: int, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        found = workers_of(proc)
        if len(found) == workers:
            return found
        time.sleep(0.05)
    raise RuntimeError(f"{len(workers_of(proc))} of {workers} workers are up")


def wait_ready(proc: Proc, port: int, workers: int) -> list[int]:
    """The workers, once each has listed: many readyz 200 in a row on new connections,
    which reach any worker."""
    wait_http(port, "/-/readyz", timeout=120, proc=proc)
    pids = wait_workers(proc, workers)
    in_a_row, deadline = 0, time.monotonic() + 120
    while in_a_row < 8 * workers and time.monotonic() < deadline:
        status, _ = http_get(port, "/-/readyz")
        in_a_row = in_a_row + 1 if status == 200 else 0
    return pids


class Pinned:
    """One kept-alive connection per gunicorn worker, found by asking ss which worker
    holds the server side of each connection we open."""

    def __init__(self, port: int, workers: list[int], timeout: float = 30.0, rounds: int = 200):
        self.port = port
        self.conns: dict[int, http.client.HTTPConnection] = {}
        self.non_200 = 0  # answers other than 200 while waiting for a node (503: no endpoints)
        self.last_error = ""
        deadline = time.monotonic() + timeout
        for _ in range(rounds):  # a worker still booting takes no connection yet: try until the deadline
            batch = []  # a few connections, then one look at ss for all of them
            for _ in range(2 * (len(workers) - len(self.conns))):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                self._get(conn, "/-/healthz")
                batch.append(conn)
            holders = client_ports_by_worker(port)
            for conn in batch:
                pid = holders.get(conn.sock.getsockname()[1])
                if pid in workers and pid not in self.conns:
                    self.conns[pid] = conn
                else:
                    conn.close()
            if len(self.conns) == len(workers) or time.monotonic() > deadline:
                break
        if len(self.conns) < len(workers):
            self.close()
            raise RuntimeError(f"could not reach every worker ({len(self.conns)} of {len(workers)})")

    @staticmethod
    def _get(conn: http.client.HTTPConnection, path: str = PATH) -> tuple[int, bytes]:
        conn.request("GET", path, headers={"Host": HOST})
        response = conn.getresponse()
        return response.status, response.read()

    def wait_all(self, want: bytes | None, timeout: float = 10.0, path: str = PATH, count: bool = True,
                 pause: float = 0.0) -> float | None:
        """Poll every worker until each answers 200 (with ``want``, unless None), ``pause``
        seconds between rounds; the moment the last one did (perf_counter), or None on timeout."""
        pending = set(self.conns)
        deadline = time.perf_counter() + timeout
        while pending and time.perf_counter() < deadline:
            for pid in list(pending):
                status, body = self._get(self.conns[pid], path)
                if status == 200 and (want is None or body == want):
                    pending.discard(pid)
                    if not pending:
                        return time.perf_counter()
                elif status != 200:
                    self.non_200 += count
                    self.last_error = f"HTTP {status}: {body[:120]!r}"
            time.sleep(pause)
        return None

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()

    def __enter__(self) -> Pinned:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- sync --

def time_to_ready(run: Run, name: str, namespace: str, checkout: Checkout) -> dict[str, Any]:
    """Spawn kproxy (-w 1, resource = endpoints); seconds to readyz 200, then the worker's
    RSS and peak RSS once settled."""
    started = time.monotonic()
    with run.pod(name, workers=1, namespace=namespace, checkout=checkout) as (proc, port):
        wait_http(port, "/-/readyz", timeout=120, proc=proc)
        seconds = time.monotonic() - started
        time.sleep(1.5)
        pids = workers_of(proc)
        for pid in pids:
            checkout.check_worker(pid)
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
                "hwm": proc_mb(pids[0], "VmHWM") if pids else None, "objects": objects}


def bench_sync(run: Run) -> dict[str, dict[str, Any]]:
    """Per checkout label: the medians of ``--repeats`` starts, empty and full namespace."""
    a, names = run.args, " / ".join(c.label for c in run.checkouts)
    starts: dict[str, dict[str, list[dict[str, Any]]]] = {c.label: {"empty": [], "full": []} for c in run.checkouts}
    run.warm_up()
    for kind, namespace in (("empty", EMPTY_NS), ("full", SYNC_NS)):
        if kind == "full":
            run.endpoints()
        say(f"sync: -w 1 on the {kind} namespace, {names}, x{a.repeats} ...")
        for i in range(a.repeats):
            for c in run.checkouts:  # alternating
                starts[c.label][kind].append(time_to_ready(run, f"sync-{kind}-{c.label}-{i}", namespace, c))
    med = lambda runs, k: statistics.median([r[k] for r in runs if r[k] is not None])  # noqa: E731
    out = {}
    for c in run.checkouts:
        base, full = starts[c.label]["empty"], starts[c.label]["full"]
        result = {
            "checkout": c.label, "services": a.services, "addresses": a.addresses, "create_seconds": run.create_seconds,
            "ready_empty": med(base, "seconds"), "ready_full": med(full, "seconds"),
            "rss_empty": med(base, "rss"), "rss_full": med(full, "rss"),
            "hwm_empty": med(base, "hwm"), "hwm_full": med(full, "hwm"),
            "objects": full[0]["objects"], "runs_empty": base, "runs_full": full,
        }
        result["sync_seconds"] = result["ready_full"] - result["ready_empty"]
        result["extra_rss"] = result["rss_full"] - result["rss_empty"]
        result["extra_hwm"] = result["hwm_full"] - result["hwm_empty"]
        out[c.label] = result
    return out


# -- phases --

def bench_phases(run: Run) -> dict[str, dict[str, Any]]:
    """Per checkout label: bench/_sync_phases.py's phases (median ms of ``--repeats`` cold
    processes), the reasons of skipped phases, and what was listed."""
    run.warm_up()
    run.endpoints()
    ini, _ = run.ini("phases", workers=1, namespace=SYNC_NS, service="svc-00000", resource="endpoints",
                     service_port="8080")
    samples: dict[str, list[dict[str, Any]]] = {c.label: [] for c in run.checkouts}
    say(f"phases: a cold first sync in-process, {' / '.join(c.label for c in run.checkouts)}, x{run.args.repeats} ...")
    for _ in range(run.args.repeats):
        for c in run.checkouts:  # alternating
            out = subprocess.run([PYTHON, str(BENCH / "_sync_phases.py"), "--config", str(ini)], cwd=c.root,
                                 env=c.env(), capture_output=True, text=True, timeout=300)
            lines = out.stdout.strip().splitlines()
            if out.returncode or not lines or not lines[-1].startswith("RESULT "):
                raise RuntimeError(f"bench/_sync_phases.py ({c.label}) failed ({out.returncode}):\n"
                                   + "\n".join(lines[-10:]) + "\n" + out.stderr.strip()[-1500:])
            result = json.loads(lines[-1][len("RESULT "):])
            if not Path(result["kproxy"]).resolve().is_relative_to(c.root.resolve()):
                raise RuntimeError(f"bench/_sync_phases.py ({c.label}) imported {result['kproxy']}, not {c.root}")
            samples[c.label].append(result)
    out = {}
    for c in run.checkouts:
        results = samples[c.label]
        names = list(dict.fromkeys(name for r in results for name in r["phases"]))
        phases = {}
        for name in names:
            values = [r["phases"].get(name) for r in results if r["phases"].get(name) is not None]
            phases[name] = statistics.median(values) if values else None
        skipped = {name: why for r in results for name, why in r["skipped"].items()}
        first = results[0]
        out[c.label] = {"phases": phases, "skipped": skipped, "kproxy": first["kproxy"], "list": first.get("list"),
                        "items": first.get("items"), "pages": first.get("pages"), "bytes": first.get("bytes"),
                        "trim": first.get("trim"), "runs": results}
    return out


# -- convergence --

def bench_convergence(run: Run, resource: str, workers: int, shared: bool = True, label: str = "",
                      access_log: bool = True) -> dict[str, Any]:
    """``--writes`` flips of a Service's one endpoint between the two nodes; for each, the
    time from the PUT returning until every worker routes to the new node."""
    kube, nodes = run.kube, run.nodes
    kube.apply({"kind": "Namespace", "metadata": {"name": CONV_NS}})
    service = "up-slices" if resource == "endpointslices" else "up-endpoints"
    kube.apply(_kube.service_obj(CONV_NS, service, nodes[0]))
    stored = kube.apply(_kube.slice_obj(CONV_NS, service, nodes[0]) if resource == "endpointslices"
                        else _kube.endpoints_obj(CONV_NS, service, nodes[0]))
    with contextlib.ExitStack() as stack:
        proc, port = stack.enter_context(run.pod(
            f"converge-{resource}-{workers}-{shared}", workers=workers, namespace=CONV_NS, service=service,
            resource=resource, service_port="80", shared=shared, access_log=access_log))
        pids = wait_ready(proc, port, workers)
        pinned = stack.enter_context(Pinned(port, pids))
        # every worker has listed (its first list may outlast gunicorn's wait for it) and routes
        if pinned.wait_all(node_body(nodes[0]), timeout=60, count=False) is None:
            raise RuntimeError(f"not every worker routes to the first node ({pinned.last_error})")
        time.sleep(1.0)
        watches = api_connections(proc.pid, kube.port)
        times, missed, current = [], 0, 0
        for _ in range(run.args.writes):
            current = 1 - current
            body = json.loads(json.dumps(stored))
            ports = body["ports"] if resource == "endpointslices" else body["subsets"][0]["ports"]
            ports[0]["port"] = nodes[current]
            r = kube.request("PUT", resource_path(body), json=body)
            written = time.perf_counter()
            if not r.ok:
                raise RuntimeError(f"PUT failed: {r.status_code} {r.text[:200]}")
            stored = r.json()
            done = pinned.wait_all(node_body(nodes[current]))
            if done is None:
                missed += 1
            else:
                times.append((done - written) * 1e3)
            time.sleep(0.15)
        return {"resource": resource, "pod": label, "workers": len(pids), "writes": run.args.writes, "missed": missed,
                "non_200": pinned.non_200, "last_error": pinned.last_error, "watch_connections": watches,
                "p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99), "max_ms": max(times, default=None),
                "min_ms": min(times, default=None)}


# -- workers --

def all_ready(proc: Proc, port: int, workers: int) -> tuple[float, list[int]]:
    """When every worker of a pod just spawned first answered readyz 200 (perf_counter), and the workers."""
    wait_http(port, "/-/healthz", timeout=120, proc=proc)
    pids = wait_workers(proc, workers)
    with Pinned(port, pids, timeout=60) as pinned:
        done = pinned.wait_all(None, timeout=120, path="/-/readyz", count=False, pause=0.02)
        if done is None:
            raise RuntimeError(f"not every worker was ready in 120 s ({pinned.last_error})")
    return done, pids


def measure_pod(run: Run, name: str, workers: int, shared: bool, namespace: str) -> dict[str, Any]:
    """Seconds from spawning the pod until every worker answers readyz 200; then, past the
    first malloc_trim, the memory of its processes and its API connections."""
    started = time.perf_counter()
    with run.pod(name, workers=workers, namespace=namespace, shared=shared, access_log=False) as (proc, port):
        done, pids = all_ready(proc, port, workers)
        time.sleep(11.0)  # past the first malloc_trim (kproxy.memory, every 10 s)
        members = process_group(proc.pid)
        discovery = [p for p in members if is_discovery_process(p)]
        return {"ready_all": done - started,
                "rss": sum(rss_mb(p) or 0 for p in members), "pss": sum(pss_mb(p) or 0 for p in members),
                "workers_rss": [rss_mb(p) for p in pids], "workers_pss": [pss_mb(p) for p in pids],
                "discovery_rss": [rss_mb(p) for p in discovery],
                "master_rss": rss_mb(proc.pid), "processes": len(members),
                "watch_connections": api_connections(proc.pid, run.kube.port)}


def bench_workers(run: Run) -> dict[str, Any]:
    out: dict[str, Any] = {"convergence": [], "idle": {}, "full": {}, "extra": {}}
    for label, workers, shared in PODS:
        say(f"workers: convergence, {label}: {run.args.writes} writes ...")
        out["convergence"].append(bench_convergence(run, "endpointslices", workers, shared, label, access_log=False))
    run.kube.apply({"kind": "Namespace", "metadata": {"name": EMPTY_NS}})
    for kind, namespace in (("idle", EMPTY_NS), ("full", SYNC_NS)):
        if kind == "full":
            run.endpoints()
        for label, workers, shared in PODS:
            say(f"workers: first sync and memory, {label}, {'empty' if kind == 'idle' else 'full'} namespace ...")
            out[kind][label] = measure_pod(run, f"{kind}-{workers}-{shared}", workers, shared, namespace)
    for label, _, _ in PODS:
        out["extra"][label] = {key: out["full"][label][key] - out["idle"][label][key]
                               for key in ("rss", "pss", "ready_all")}
    return out


# -- boot --

def bench_boot(run: Run) -> dict[str, dict[str, Any]]:
    """Per checkout label and pod (-w 1, -w 4): seconds from spawning gunicorn until every
    worker answers readyz 200 on the empty namespace, median of ``--repeats`` starts."""
    run.warm_up()
    seconds: dict[str, dict[str, list[float]]] = {c.label: {"-w 1": [], "-w 4": []} for c in run.checkouts}
    say(f"boot: -w 1 and -w 4 on the empty namespace, {' / '.join(seconds)}, x{run.args.repeats} ...")
    for i in range(run.args.repeats):
        for c in run.checkouts:  # alternating
            for workers in (1, 4):
                started = time.perf_counter()
                with run.pod(f"boot-{c.label}-{workers}-{i}", workers=workers, namespace=EMPTY_NS,
                             access_log=False, checkout=c) as (proc, port):
                    done, pids = all_ready(proc, port, workers)
                    for pid in pids:
                        c.check_worker(pid)
                seconds[c.label][f"-w {workers}"].append(done - started)
    return {label: {pod: {"median": statistics.median(runs), "runs": runs} for pod, runs in pods.items()}
            for label, pods in seconds.items()}


# -- the report --

def fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def compare(rows: list[tuple[str, list[float | None], str, str]], labels: list[str], title: str) -> str:
    """A table of (name, value per checkout, format, unit) rows; with a baseline, also the
    difference and the ratio (current / baseline)."""
    header = [title, *labels] + (["difference", "ratio"] if len(labels) > 1 else [])
    lines = []
    for name, values, spec, unit in rows:
        line = [name, *(fmt(v, spec, unit) for v in values)]
        if len(values) > 1:
            now, before = values[0], values[1]
            both = now is not None and before is not None
            line += [fmt(now - before if both else None, "+" + spec, unit),  # a ratio only of positive figures
                     fmt(now / before if both and now >= 0 and before > 0 else None, ".2f", " x")]
        lines.append(line)
    return table(lines, header)


def report_sync(sync: dict[str, dict[str, Any]], labels: list[str], targets: list[list[Any]]) -> None:
    s = sync["current"]
    size = f"{s['services']:,} Endpoints x {s['addresses']}"
    if len(labels) == 1:
        say("\n" + table([
            ["readyz 200 after spawn, empty namespace", f"{s['ready_empty']:.2f} s", f"{s['rss_empty']:.1f} MB",
             f"{s['hwm_empty']:.1f} MB"],
            [f"readyz 200 after spawn, {size}", f"{s['ready_full']:.2f} s", f"{s['rss_full']:.1f} MB",
             f"{s['hwm_full']:.1f} MB"],
            ["added by the sync", f"{s['sync_seconds']:.2f} s", f"{s['extra_rss']:+.1f} MB", f"{s['extra_hwm']:+.1f} MB"],
        ], ["initial sync (gunicorn, 1 worker, resource = endpoints)", "time", "worker RSS", "peak RSS"]))
    else:
        rows = [(name, [sync[label][key] for label in labels], spec, unit) for name, key, spec, unit in (
            ("readyz 200 after spawn, empty namespace", "ready_empty", ".2f", " s"),
            (f"readyz 200 after spawn, {size}", "ready_full", ".2f", " s"),
            ("added by the sync", "sync_seconds", ".2f", " s"),
            ("worker RSS, empty namespace", "rss_empty", ".1f", " MB"),
            (f"worker RSS, {size}", "rss_full", ".1f", " MB"),
            ("extra RSS", "extra_rss", ".1f", " MB"),
            ("peak RSS (VmHWM), empty namespace", "hwm_empty", ".1f", " MB"),
            (f"peak RSS (VmHWM), {size}", "hwm_full", ".1f", " MB"),
            ("extra peak RSS", "extra_hwm", ".1f", " MB"))]
        say("\n" + compare(rows, labels, "initial sync (gunicorn -w 1, resource = endpoints)"))
    objects = ", ".join(f"{sync[label]['objects']} ({label})" for label in labels)
    say(f"objects in the worker's cache: {objects}; Endpoints created in {s['create_seconds']:.1f} s; "
        f"median of {len(s['runs_full'])} starts each" + (", alternating" if len(labels) > 1 else ""))
    targets += [
        [f"initial sync of {size}: readyz 200 within {TARGET_READY_S:g} s of spawning gunicorn",
         f"{s['ready_full']:.2f} s", s["ready_full"] <= TARGET_READY_S],
        [f"initial sync: extra RSS <= {TARGET_EXTRA_MB:g} MB", f"{s['extra_rss']:.1f} MB",
         s["extra_rss"] <= TARGET_EXTRA_MB],
        [f"initial sync -w 1: the sync adds <= {GOAL_SYNC_S:g} s (issue #15, goal)", f"{s['sync_seconds']:.2f} s",
         s["sync_seconds"] <= GOAL_SYNC_S],
    ]


def report_boot(boot: dict[str, dict[str, Any]], labels: list[str]) -> None:
    rows = [(f"{pod}: spawn -> every worker readyz 200", [boot[label][pod]["median"] for label in labels], ".2f", " s")
            for pod in ("-w 1", "-w 4")]
    rows.append(("-w 4 later than -w 1", [boot[label]["-w 4"]["median"] - boot[label]["-w 1"]["median"]
                                          for label in labels], ".2f", " s"))
    runs = len(boot[labels[0]]["-w 1"]["runs"])
    say("\n" + compare(rows, labels, f"boot on an empty namespace (median of {runs} starts"
                        + (", alternating)" if len(labels) > 1 else ")")))


def report_phases(phases: dict[str, dict[str, Any]], labels: list[str]) -> None:
    names = list(dict.fromkeys(name for label in labels for name in phases[label]["phases"]))
    rows = [(name, [phases[label]["phases"].get(name) for label in labels], ".1f", "") for name in names]
    say("\n" + compare(rows, labels, "first sync in-process, ms (median)"))
    for label in labels:
        p = phases[label]
        listed = (f"; LIST {p['list']['path']} {p['list']['params']}: {p['items']:,} items, {p['pages']} page(s), "
                  f"{p['bytes'] / 1e6:.1f} MB") if p["list"] else ""
        say(f"{label}: kproxy from {p['kproxy']}{listed}")
        for name, why in p["skipped"].items():
            say(f"{label}: {name} skipped: {why}")


def report_convergence(convergence: list[dict[str, Any]], targets: list[list[Any]]) -> None:
    rows = []
    for c in convergence:
        if "error" in c:
            rows.append([c["resource"], "failed", "", "", "", "", c["error"][:60]])
            continue
        rows.append([c["resource"], str(c["writes"]), fmt(c["p50_ms"], ".1f"), fmt(c["p99_ms"], ".1f"),
                     fmt(c["max_ms"], ".1f"), str(c["missed"]), str(c["non_200"])])
        if c["p99_ms"] is not None:
            targets.append([f"convergence ({c['resource']}, 2 workers): p99 <= {TARGET_CONVERGE_MS:g} ms",
                            f"{c['p99_ms']:.1f} ms",
                            c["p99_ms"] <= TARGET_CONVERGE_MS and not c["missed"] and not c["non_200"]])
    say("\n" + table(rows, ["convergence, write -> every worker routes", "writes", "p50 ms", "p99 ms", "max ms",
                            "missed (>10 s)", "non-200 answers"]))


def _median(values: list[float | None]) -> str:
    found = [v for v in values if v]
    return f"{statistics.median(found):.1f}" if found else "-"


def report_workers(w: dict[str, Any], args: argparse.Namespace, targets: list[list[Any]]) -> None:
    conv = {c["pod"]: c for c in w["convergence"]}
    say("\n" + table([[c["pod"], str(c["workers"]), str(c["watch_connections"]), fmt(c["p50_ms"], ".1f"),
                       fmt(c["p99_ms"], ".1f"), fmt(c["max_ms"], ".1f"), str(c["missed"]), str(c["non_200"])]
                      for c in w["convergence"]],
                     ["pod (EndpointSlices)", "workers", "API connections", "p50 ms", "p99 ms", "max ms", "missed",
                      "non-200"]))
    size = f"{args.services:,}x{args.addresses}"
    say("\n" + table([[label, f"{w['idle'][label]['ready_all']:.2f} s", f"{w['full'][label]['ready_all']:.2f} s",
                       f"{w['extra'][label]['ready_all']:+.2f} s"] for label, _, _ in PODS],
                     ["first sync: spawn -> every worker readyz 200", "empty namespace", size, "added by the sync"]))
    rows = []
    for label, _, _ in PODS:
        idle, full, extra = w["idle"][label], w["full"][label], w["extra"][label]
        rows.append([label, f"{idle['rss']:.1f}", f"{full['rss']:.1f}", f"{extra['rss']:+.1f}",
                     f"{extra['pss']:+.1f}", _median(idle["workers_rss"]), _median(full["workers_rss"]),
                     _median(idle["workers_pss"]), _median(full["workers_pss"]),
                     ", ".join(f"{i:.1f} / {f:.1f}" for i, f in zip(idle["discovery_rss"], full["discovery_rss"])
                               if i and f) or "-",
                     str(full["watch_connections"])])
    say("\n" + table(rows, ["pod", "RSS idle MB", f"RSS {size} MB", "extra RSS MB", "extra PSS MB",
                            "worker RSS idle", "worker RSS full", "worker PSS idle", "worker PSS full",
                            "discovery RSS idle / full", "API connections"]))
    one, four = conv["-w 1"], conv["-w 4"]
    ratio = w["extra"]["-w 4"]["rss"] / max(w["extra"]["-w 1"]["rss"], 1e-6)
    idle_worker = statistics.median(v for v in w["idle"]["-w 4"]["workers_rss"] if v)
    added = w["extra"]["-w 4"]["ready_all"]
    targets += [
        [f"convergence -w 4: p99 <= {TARGET_SHARED_CONVERGE_MS:g} ms (issue #15)", fmt(four["p99_ms"], ".1f", " ms"),
         four["p99_ms"] is not None and four["p99_ms"] <= TARGET_SHARED_CONVERGE_MS and not four["missed"]],
        ["API connections -w 4 == -w 1 (issue #15)", f"{four['watch_connections']} / {one['watch_connections']}",
         four["watch_connections"] == one["watch_connections"]],
        [f"extra RSS -w 4 <= {TARGET_MEMORY_RATIO:g} x -w 1 (issue #15)", f"{ratio:.2f} x",
         ratio <= TARGET_MEMORY_RATIO],
        [f"idle worker RSS -w 4 <= {GOAL_IDLE_WORKER_MB:g} MB (issue #15, goal)", f"{idle_worker:.1f} MB",
         idle_worker <= GOAL_IDLE_WORKER_MB],
        [f"first sync -w 4, every worker ready: the sync adds <= {GOAL_SYNC_S:g} s (issue #15, goal)",
         f"{added:.2f} s", added <= GOAL_SYNC_S],
    ]


def parse_parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"parts are {', '.join(PARTS)}; not {', '.join(unknown) or 'none'}")
    return [p for p in PARTS if p in parts]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", type=parse_parts, default="sync,convergence",
                        help=f"comma-separated, of {', '.join(PARTS)} (default: sync,convergence)")
    parser.add_argument("--baseline", metavar="REV", help="also measure sync, boot and phases at this git revision")
    parser.add_argument("--services", type=int, default=5000)
    parser.add_argument("--addresses", type=int, default=10)
    parser.add_argument("--threads", type=int, default=8, help="threads creating Endpoints")
    parser.add_argument("--repeats", type=int, default=3, help="starts (sync) and processes (phases) per checkout")
    parser.add_argument("--writes", type=int, default=50)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not (1 <= args.services <= 20000 and 1 <= args.addresses <= 100 and 1 <= args.writes <= 500
            and 1 <= args.repeats <= 10 and 1 <= args.threads <= 32):
        parser.error("out of range")
    if args.baseline:
        try:
            args.baseline = git("rev-parse", "--verify", "--short", f"{args.baseline}^{{commit}}")
        except RuntimeError as e:
            parser.error(f"--baseline: {e}")
    out: dict[str, Any] = {"command": "python bench/discovery.py " + " ".join(sys.argv[1:] if argv is None else argv),
                           "parts": args.parts, "discovery_commit": _kube.discovery_commit(),
                           "date": time.strftime("%Y-%m-%d %H:%M"), "load_average_before": os.getloadavg()}
    say(f"discovery: last commit {out['discovery_commit']}; parts: {', '.join(args.parts)}")
    reason = _kube.unavailable() or _kube.discovery_unfinished()
    if reason:
        say(f"SKIPPED: {reason}")
        out["skipped"] = reason
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="kproxy-bench-discovery-"))
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            checkouts = [CURRENT]
            if args.baseline:
                checkouts.append(stack.enter_context(baseline_checkout(args.baseline, workdir)))
                out["baseline"] = checkouts[1].label
                if {"convergence", "workers"} & set(args.parts):
                    say(f"--baseline {args.baseline}: sync, boot and phases only; convergence and workers measure "
                        "this checkout")
            for c in checkouts:
                say(f"{c.label}: kproxy is imported from {c.check_import()}")
            upstream = start_upstream(workdir, extra_nodes=2)
            stack.callback(upstream.stop)
            say(f"upstream nodes ({upstream.kind}): 127.0.0.1:{upstream.extra_ports[0]}, "
                f"127.0.0.1:{upstream.extra_ports[1]}")
            say("starting kube-apiserver + etcd (kproxy_tools.testenv) ...")
            kube = _kube.start()
            stack.callback(kube.stop)
            run = Run(workdir, kube, _kube.token_file(kube, workdir), upstream.extra_ports, args, checkouts)
            out["seconds"] = {}
            for part in args.parts:
                part_started = time.monotonic()
                try:
                    if part == "convergence":
                        out["convergence"] = []
                        for resource in ("endpointslices", "endpoints"):
                            say(f"convergence, {resource}: {args.writes} writes, gunicorn 2 workers ...")
                            try:
                                out["convergence"].append(bench_convergence(run, resource, 2))
                            except Exception as e:
                                out["convergence"].append({"resource": resource, "error": str(e)[:500]})
                                say(f"    failed: {str(e)[:500]}")
                    elif part == "sync":
                        sync = bench_sync(run)
                        out["sync"] = sync["current"]
                        if args.baseline:
                            out["sync_baseline"] = sync[checkouts[1].label]
                    elif part == "boot":
                        out["boot"] = bench_boot(run)
                    elif part == "phases":
                        out["phases"] = bench_phases(run)
                    elif part == "workers":
                        out["workers"] = bench_workers(run)
                except Exception as e:
                    out[part] = {"error": str(e)[:1500]}
                    say(f"    {part} failed: {str(e)[:1500]}")
                out["seconds"][part] = round(time.monotonic() - part_started)
                say(f"    ({part}: {out['seconds'][part]} s)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    targets: list[list[Any]] = []
    labels = [c.label for c in checkouts]
    if isinstance(out.get("convergence"), list):
        report_convergence(out["convergence"], targets)
    if "error" not in out.get("sync", {"error": "not run"}):
        report_sync({"current": out["sync"], **({labels[1]: out["sync_baseline"]} if args.baseline else {})},
                    labels, targets)
    if "error" not in out.get("boot", {"error": "not run"}):
        report_boot(out["boot"], labels)
    if "error" not in out.get("phases", {"error": "not run"}):
        report_phases(out["phases"], labels)
    if "error" not in out.get("workers", {"error": "not run"}):
        report_workers(out["workers"], args, targets)
    for part in args.parts:
        if isinstance(out.get(part), dict) and "error" in out[part]:
            say(f"\n{part} FAILED: {out[part]['error']}")
    if targets:
        say("\n" + table([[n, v, "PASS" if ok else "FAIL"] for n, v, ok in targets], ["target", "measured", ""]))
    load = os.getloadavg()
    if load[0] > 3 * (os.cpu_count() or 1):
        say(f"NOTE: the machine was busy (1-minute load average {load[0]:.1f} on {os.cpu_count()} cores): "
            "times are inflated, run again on a quiet machine")
    say(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; done in "
        f"{time.monotonic() - started:.0f} s")
    out["targets"], out["load_average"] = targets, load
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
