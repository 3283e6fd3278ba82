"""Operations: metrics over gunicorn workers, the access log, and live reload."""

from __future__ import annotations

import json
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import EchoApp, session, wait_until

STATIC = """
[kproxy]
workers = {workers}
access_log_format = {log_format}

[service:echo]
host = echo.test
nodes = {node}

[api:echo]
service = echo
path = {path}
"""


@pytest.fixture(scope="module")
def nodes(upstream):
    return upstream(EchoApp("a")), upstream(EchoApp("b"))


def config(node, workers=1, log_format="text", path="/"):
    return STATIC.format(node=node.address, workers=workers, log_format=log_format, path=path)


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rpartition(" ")[2])
    return total


def echo_writers(metrics_dir) -> set[str]:
    """The worker files of the multiprocess directory that counted echo requests."""
    from prometheus_client.mmap_dict import MmapedDict
    writers = set()
    for path in metrics_dir.glob("counter_*.db"):
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            if key.startswith('["kproxy_requests"') and '"echo"' in key and value > 0:
                writers.add(path.name)
    return writers


def test_metrics_add_up_over_two_gunicorn_workers(gateway_process, nodes, tmp_path):
    metrics_dir = tmp_path / "metrics"
    gw = gateway_process("gunicorn", config(nodes[0], workers=2), env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    assert len(gw.pids()) == 3  # master and two workers
    def one(_: int) -> int:
        response = session().get(gw.url + "/x", headers={"Host": "echo.test", "Connection": "close"}, timeout=5)
        return response.status_code

    requests_sent = 0
    with ThreadPoolExecutor(16) as pool:  # concurrent new connections land on both workers
        for _ in range(50):
            assert set(pool.map(one, range(32))) == {200}
            requests_sent += 32
            if len(echo_writers(metrics_dir)) >= 2:
                break
    assert len(echo_writers(metrics_dir)) >= 2, "only one worker served"
    # an exchange is counted when its response is closed, just after the client has it
    text = wait_until(lambda: (t := session().get(gw.url + "/-/metrics", timeout=5).text) and metric(
        t, "kproxy_requests_total", service="echo", code="2xx") == requests_sent and t, timeout=5)
    assert metric(text, "kproxy_upstream_responses_total", service="echo", code="200") == requests_sent
    assert metric(text, "kproxy_request_duration_seconds_count", service="echo") == requests_sent
    # the same totals whichever worker answers the scrape
    for _ in range(5):
        again = session().get(gw.url + "/-/metrics", headers={"Connection": "close"}, timeout=5).text
        assert metric(again, "kproxy_requests_total", service="echo", code="2xx") == requests_sent


def test_metrics_and_discovery_are_refused_outside_admin_allow(gateway_process, nodes):
    ini = config(nodes[0]).replace("[kproxy]", "[kproxy]\nadmin_allow = 10.0.0.0/8")
    gw = gateway_process("serve", ini)
    for name in ("metrics", "discovery"):
        response = session().get(gw.url + f"/-/{name}", timeout=5,
                                 headers={"X-Forwarded-For": "10.1.2.3", "X-Real-Ip": "10.1.2.3"})
        assert response.status_code == 403, name
    assert session().get(gw.url + "/-/healthz", timeout=5).status_code == 200  # probes stay open


def access_lines(gw) -> list[str]:
    return [line for line in (gw.log_dir / f"{gw.kind}.stdout").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("kind", ["serve", "gunicorn"])
def test_access_log_line_has_every_field_and_the_request_id(gateway_process, nodes, kind):
    gw = gateway_process(kind, config(nodes[0]))
    response = session().get(gw.url + "/some/path?access_token=secret-in-query", timeout=5,
                             headers={"Host": "echo.test", "X-Request-Id": "req-123",
                                      "Authorization": "Bearer secret-in-header"})
    assert response.headers["X-Request-Id"] == "req-123"
    assert response.json()["headers"]["X-Request-Id"] == "req-123"  # forwarded upstream
    created = session().get(gw.url + "/other", headers={"Host": "echo.test"}, timeout=5)
    rid = created.headers["X-Request-Id"]
    assert len(rid) == 32 and created.json()["headers"]["X-Request-Id"] == rid
    line = wait_until(lambda: [l for l in access_lines(gw) if "rid=req-123" in l])[0]
    # time client "method path" status bytes seconds service api node upstream-status seconds rid
    pattern = (r'^\S+Z 127\.0\.0\.1 "GET /some/path" 200 \d+ \d+\.\d{4} echo echo '
               + nodes[0].address.replace(".", r"\.") + r' 200 \d+\.\d{4} rid=req-123$')
    import re
    assert re.match(pattern, line), line
    text = "\n".join(access_lines(gw)) + (gw.log_dir / f"{kind}.stderr").read_text()
    assert "secret-in-query" not in text and "secret-in-header" not in text


def test_access_log_json_variant(gateway_process, nodes):
    gw = gateway_process("serve", config(nodes[0], log_format="json"))
    session().get(gw.url + "/j", headers={"Host": "echo.test", "X-Request-Id": "json-1"}, timeout=5)
    line = wait_until(lambda: [l for l in access_lines(gw) if "json-1" in l])[0]
    record = json.loads(line)
    assert record["method"] == "GET" and record["path"] == "/j" and record["status"] == 200
    assert record["service"] == "echo" and record["upstream"] == nodes[0].address
    assert record["upstream_status"] == 200 and record["request_id"] == "json-1"
    assert set(record) >= {"time", "client", "bytes", "duration", "api", "upstream_duration"}


class Traffic:
    """Requests in a loop on keep-alive connections, recording every answer."""

    def __init__(self, url: str, threads: int = 4):
        self.url, self.stop_event = url, threading.Event()
        self.answers: list[tuple[int, str]] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        client = session()
        for _ in range(20_000):
            if self.stop_event.is_set():
                break
            try:
                response = client.get(self.url + "/x", headers={"Host": "echo.test"}, timeout=10)
                node = response.json().get("node", "") if response.status_code == 200 else response.text
                self.answers.append((response.status_code, node))
            except Exception as e:  # every failure is a finding
                self.errors.append(repr(e))

    def nodes_since(self, mark: int) -> set[str]:
        return {node for _, node in self.answers[mark:]}

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=30)


@pytest.mark.parametrize("kind", ["serve", "gunicorn"])
def test_reload_swaps_routes_refuses_bad_config_and_drops_nothing(gateway_process, nodes, kind):
    gw = gateway_process(kind, config(nodes[0], workers=2 if kind == "gunicorn" else 1))
    pids_before = sorted(gw.pids())
    traffic = Traffic(gw.url)
    try:
        wait_until(lambda: len(traffic.answers) > 20)
        gw.config_path.write_text(config(nodes[1], workers=2 if kind == "gunicorn" else 1))
        gw.signal(signal.SIGHUP)
        mark = len(traffic.answers)
        wait_until(lambda: traffic.nodes_since(len(traffic.answers) - 8) == {"b"}, timeout=15)
        assert "a" in traffic.nodes_since(0)

        gw.config_path.write_text("[service:broken]\nnodes = not-a-node\n")
        gw.signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in (gw.log_dir / f"{kind}.stderr").read_text(), timeout=15)
        mark = len(traffic.answers)
        wait_until(lambda: len(traffic.answers) > mark + 50)
        assert traffic.nodes_since(mark) == {"b"}  # the running config stayed
    finally:
        traffic.stop()
    assert traffic.errors == []
    assert {status for status, _ in traffic.answers} == {200}
    assert sorted(gw.pids()) == pids_before  # reloaded in place: no worker was replaced
    stderr = (gw.log_dir / f"{kind}.stderr").read_text()
    assert "[service:broken] nodes:" in stderr


def test_a_forked_worker_starts_no_thread_before_the_gunicorn_hooks_hold_sighup_back():
    # a thread started at fork would take a HUP sent to the new worker before its reload
    # handler is installed, and the HUP's default action would end the worker
    import io
    import os
    import threading

    from kproxy import accesslog, metrics  # noqa: F401 - both act after a fork
    handler = accesslog.AccessLogHandler(io.StringIO())
    pid = os.fork()
    if pid == 0:
        os._exit(0 if threading.active_count() == 1 else 1)
    _, status = os.waitpid(pid, 0)
    handler.close()
    assert os.waitstatus_to_exitcode(status) == 0
