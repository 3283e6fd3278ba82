"""The short soak (the long one is ``python bench/soak.py``, figures in docs/reliability.rst):
kproxy under gunicorn, nodes from the test kube-apiserver, 50 concurrent keep-alive clients
for 8 s with mixed GET/POST and bodies up to 512 KiB. Every answer must be right, the
workers must not keep a descriptor per request, and their threads stay bounded. No
throughput or latency is asserted: this machine is shared."""

from __future__ import annotations

from bench import soak

from .conftest import GatewayProcess, free_port, session, wait_until

CLIENTS = 50
WARMUP = 2.0      # seconds: every worker has pooled upstream connections and metric files open
DURATION = 6.0    # seconds of the measured run
MAX_BODY = 512 * 1024
THREADS = 16      # fewer threads than clients: connections queue for a thread, as in production
NODES = 2


def test_short_soak_loses_nothing_and_leaks_nothing(kube, namespace, tmp_path):
    upstreams = []
    gw = None
    try:
        for i in range(NODES):
            upstreams.append(soak.start_upstream(f"node-{i}", tmp_path / f"upstream-{i}.log", threads=32))
        node_ports = {u.port for u in upstreams}
        soak.register(kube, namespace, "soak", sorted(node_ports))
        token = tmp_path / "token"
        token.write_text(kube.admin_token)
        config = tmp_path / "kproxy.ini"
        config.write_text(soak.ini(kube, namespace, str(token), workers=2, threads=THREADS))
        gw = GatewayProcess("gunicorn", config, free_port()).start()
        wait_until(lambda: session().get(gw.url + "/-/readyz", timeout=5).status_code == 200, timeout=30)
        wait_until(lambda: session().get(gw.url + "/small", headers={"Host": soak.HOST}, timeout=5).status_code
                   == 200, timeout=15)
        workers = [pid for pid in gw.pids() if pid != gw.process.pid]
        assert len(workers) == 2
        api_port = int(kube.url.rsplit(":", 1)[1])

        warm = soak.ClientStats()
        for seed in range(1, 5):
            warm.merge(soak.run_clients(gw.url, CLIENTS, WARMUP, seed=seed, max_body=MAX_BODY))
            soak.settle(workers, gw.port, timeout=10, interval=0.5)
            before = soak.snapshot(workers, gw.port, node_ports, api_port)
            # one worker may accept every kept-alive connection of a round; one that served
            # none has not opened its metric files yet, and would open them in the run
            if len({before[pid].get("file", 0) for pid in workers}) == 1:
                break
        with soak.Sampler(workers, gw.port, node_ports, api_port, interval=0.5) as sampler:
            run = soak.run_clients(gw.url, CLIENTS, DURATION, seed=2, max_body=MAX_BODY)
        soak.settle(workers, gw.port, timeout=10, interval=0.5)
        after = soak.snapshot(workers, gw.port, node_ports, api_port)
        workers_after = [pid for pid in gw.pids() if pid != gw.process.pid]
    finally:
        if gw is not None:
            gw.stop()
        for upstream in upstreams:
            upstream.stop(grace=5)

    errors = run.errors + warm.errors
    assert not errors, f"{dict(errors)}: {run.error_samples or warm.error_samples}"
    assert run.requests > CLIENTS
    assert set(run.nodes) == {f"node-{i}" for i in range(NODES)}, run.nodes  # both discovered nodes served
    assert run.latency_ms.get("large"), "no body of 512 KiB or more was sent or received"
    assert sampler.peak_clients >= CLIENTS, "the clients never held all their connections at once"
    assert run.connections_opened <= CLIENTS + 5, "the clients' connections were not kept alive"
    assert workers_after == workers, "a worker restarted"
    for pid in workers:
        b, a, peak = before[pid], after[pid], sampler.peak[pid]
        assert a.get("client", 0) == 0, f"worker {pid} kept client sockets: {a}"
        fixed_before = b["total"] - b.get("upstream", 0)
        fixed_after = a["total"] - a.get("upstream", 0)
        assert fixed_after <= fixed_before + soak.FD_MARGIN, f"worker {pid} descriptors grew: {b} -> {a}"
        assert a.get("upstream", 0) <= THREADS * NODES, f"worker {pid} pooled more than its pools hold: {a}"
        assert peak["threads"] <= THREADS + soak.THREAD_SLACK, f"worker {pid} threads: {peak}"
    assert "Traceback" not in gw.logs()
