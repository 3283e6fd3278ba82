"""The operator dashboard (issue #17): ``GET /-/`` in a real headless Chromium, the
``/-/status`` JSON it polls, and the Grafana dashboard in deploy/grafana/.

The browser is Debian's ``chromium`` and ``chromium-driver`` (.ci/run installs them),
driven by selenium; outside CI the browser tests skip when they are missing, under
CI=true that is a failure. The API server that the live test stops is a loopback TCP relay
in front of the session's shared kube-apiserver, which keeps serving the other tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable

import pytest

from kproxy import status as statusmod

from .conftest import (ROOT, EchoApp, TcpRelay, closed_port, discovery_ini, kube_registry, raw_http, session,
                       wait_until)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/lib/chromium/chromedriver"
GRAFANA = ROOT / "deploy" / "grafana" / "kproxy.json"
SCREENSHOT = os.environ.get("KPROXY_DASHBOARD_SCREENSHOT")  # e.g. docs/dashboard.png: save one on the way


# -- a browser --

def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"the dashboard's browser tests must run under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[test]')")
    if not CHROMIUM or not os.path.exists(CHROMEDRIVER):
        _unavailable("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--disable-default-apps", "--proxy-server=direct://"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: selenium then never tries to download one
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def requested_urls(driver) -> list[str]:
    return driver.execute_script(
        "return performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))"
        ".map(e => e.name)")


def text_of(driver, selector: str) -> str:
    """The text of the first element matching ``selector`` ("" when there is none); read in
    one script call, so a redraw between finding and reading it cannot interfere."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : ''", selector)


def node_addresses(driver, service: str) -> set[str]:
    return set(driver.execute_script(
        "return [...document.querySelectorAll(`[data-service='${arguments[0]}'] [data-node]`)]"
        ".map(e => e.dataset.node)", service))


def open_dashboard(driver, url: str) -> None:
    driver.get_log("browser")  # drop what an earlier page logged
    driver.get(url + "/-/")
    wait_until(lambda: text_of(driver, "#live").startswith("live"), timeout=10)


def assert_clean(driver, origin: str) -> None:
    """No console error (a CSP violation is one), nothing fetched from another origin."""
    assert console_errors(driver) == []
    urls = requested_urls(driver)
    assert urls and all(u.startswith(origin + "/") for u in urls), urls


# -- configs --

def static_ini(node: str, extra: str = "", workers: int = 1, dead: str | None = None) -> str:
    """Service web: ``node`` and a second node, ``dead`` (by default a closed port)."""
    dead = dead or f"127.0.0.1:{closed_port()}"
    return f"""
[kproxy]
workers = {workers}
{extra}

[service:web]
host = web.test
nodes = {node} {dead} weight=2

[api:web]
service = web
path = /
methods = GET POST
"""


def kube_ini(api_server: str, kube, token_file: Path, namespace: str, web_node: str) -> str:
    """Service echo found through ``api_server`` (a relay in front of the test API server),
    and a static service web with a dead node."""
    return discovery_ini(kube, namespace, token_file, api_server=api_server, kproxy={"workers": 2}) + f"""
[service:web]
host = web.test
path_prefix = /v1
nodes = {web_node} 127.0.0.1:{closed_port()} weight=2

[api:web-anything]
service = web
path = /anything
methods = GET POST
strip_prefix = true
"""


def endpoint_slice(namespace: str, port: int, addresses: Iterable[str], terminating: bool = False) -> dict:
    """Service echo's slice: each address a pod in zone-a; ``terminating``: all draining."""
    conditions = {"ready": False, "serving": True, "terminating": True} if terminating else {"ready": True}
    return {"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
            "metadata": {"name": "echo-1", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": port}],
            "endpoints": [{"addresses": [a], "conditions": conditions,
                           "topology": {"topology.kubernetes.io/zone": "zone-a"}} for a in addresses]}


def get_status(url: str, client=None) -> dict:
    response = (client or session()).get(url + "/-/status", timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


# -- the page under each way of running kproxy --

@pytest.mark.parametrize("kind", ["serve", "gunicorn", "middleware"])
def test_the_page_shows_routes_services_and_nodes_with_nothing_from_another_origin(
        browser, gateway_process, upstream, kind):
    node = upstream(EchoApp("a"))
    dead = f"127.0.0.1:{closed_port()}"
    gw = gateway_process(kind, static_ini(node.address, dead=dead))
    page = session().get(gw.url + "/-/", timeout=5)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
    assert not re.search(r"https?://", page.text)  # no absolute URL: nothing to fetch elsewhere

    open_dashboard(browser, gw.url)
    assert text_of(browser, "#sum-routes") == "1"
    assert text_of(browser, "[data-route='web'] td:nth-child(1)") == "web.test"
    assert text_of(browser, "[data-route='web'] td:nth-child(4)") == "GET HEAD POST"
    assert node_addresses(browser, "web") == {node.address, dead}
    assert text_of(browser, f"[data-node='{dead}'] .meta") == "weight 2"
    assert text_of(browser, "#sum-nodes").endswith("/ 2")
    assert_clean(browser, gw.url)


# -- live: endpoints, traffic, the API server going away --

def test_the_open_page_follows_endpoints_traffic_and_an_api_server_outage(
        browser, gateway_process, upstream, kube, namespace, token_file):
    echo, web = upstream(EchoApp("echo")), upstream(EchoApp("web"))
    kube.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": namespace},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": echo.port}]}})
    kube.apply(endpoint_slice(namespace, echo.port, ["127.0.0.1"]))
    relay = TcpRelay(kube.port)
    try:
        gw = gateway_process("gunicorn", kube_ini(relay.url, kube, token_file,
                                                  namespace, web.address))
        client = session()
        gw.wait_ready()
        open_dashboard(browser, gw.url)
        assert node_addresses(browser, "echo") == {f"127.0.0.1:{echo.port}"}
        assert text_of(browser, "[data-registry='k'] [data-state]") == "ok"
        assert text_of(browser, "#sum-registries") == "1 / 1"

        # a pod joins: its address appears without a reload ...
        kube.apply(endpoint_slice(namespace, echo.port, ["127.0.0.1", "127.0.0.2"]))
        wait_until(lambda: node_addresses(browser, "echo") == {f"127.0.0.1:{echo.port}", f"127.0.0.2:{echo.port}"},
                   timeout=5)
        # ... and leaves it again
        kube.apply(endpoint_slice(namespace, echo.port, ["127.0.0.1"]))
        wait_until(lambda: node_addresses(browser, "echo") == {f"127.0.0.1:{echo.port}"}, timeout=5)
        pod = f"[data-service='echo'] [data-node='127.0.0.1:{echo.port}']"
        assert text_of(browser, pod + " .meta") == "zone zone-a · weight 1"
        # a node's state changes: the pod drains, then is ready again
        kube.apply(endpoint_slice(namespace, echo.port, ["127.0.0.1"], terminating=True))
        wait_until(lambda: text_of(browser, pod + " .badge") == "serving-terminating", timeout=5)
        kube.apply(endpoint_slice(namespace, echo.port, ["127.0.0.1"]))
        wait_until(lambda: text_of(browser, pod + " .badge") == "ready", timeout=5)

        # traffic: the counts on the open page rise as requests flow (from both workers)
        before = int(text_of(browser, "[data-service='echo'] .requests"))
        for i in range(30):
            assert client.get(gw.url + f"/r{i}", headers={"Host": "echo.test"}, timeout=5).status_code == 200
            assert client.get(gw.url + "/v1/anything", headers={"Host": "web.test"}, timeout=5).status_code in (200, 502)
        wait_until(lambda: int(text_of(browser, "[data-service='echo'] .requests")) >= before + 30, timeout=10)
        wait_until(lambda: text_of(browser, "[data-service='echo'] .rps") not in ("–", "0.00"), timeout=10)
        if SCREENSHOT:
            browser.save_screenshot(SCREENSHOT)

        # no token anywhere the dashboard shows or fetches
        for text in (browser.page_source, client.get(gw.url + "/-/status", timeout=5).text,
                     client.get(gw.url + "/-/dashboard.js", timeout=5).text):
            assert kube.admin_token not in text and "Bearer" not in text

        # the API server goes away: the registry shows unhealthy within 20 s, still no reload
        relay.close()
        wait_until(lambda: text_of(browser, "[data-registry='k'] [data-state]") not in ("ok", ""), timeout=20)
        assert text_of(browser, "#sum-registries") == "0 / 1"
        wait_until(lambda: text_of(browser, "[data-registry='k'] td.error") != "", timeout=20)
        assert kube.admin_token not in browser.page_source
        # the last known endpoints stay in service and on the page
        assert node_addresses(browser, "echo") == {f"127.0.0.1:{echo.port}"}
        assert_clean(browser, gw.url)
    finally:
        relay.close()


# -- the JSON --

def test_traffic_is_summed_over_gunicorn_workers(gateway_process, upstream):
    node = upstream(EchoApp("a"))
    # threads below gunicorn's worker_connections (1000): gthread keeps no connection alive
    # past worker_connections - threads
    gw = gateway_process("gunicorn", static_ini(node.address, "threads = 16", workers=2))
    # one keep-alive connection to each worker: its status answer says which worker it is
    clients: dict[int, object] = {}
    for _ in range(200):
        client = session()
        pid = get_status(gw.url, client)["process"]["pid"]
        clients.setdefault(pid, client)
        if len(clients) == 2:
            break
    assert len(clients) == 2, "new connections reached one worker only"
    (pid_a, a), (pid_b, b) = clients.items()
    for client, n in ((a, 7), (b, 11)):
        for i in range(n):
            assert client.get(gw.url + f"/{i}", headers={"Host": "web.test"}, timeout=5).status_code == 200
    assert get_status(gw.url, a)["process"]["pid"] == pid_a and get_status(gw.url, b)["process"]["pid"] == pid_b, \
        "a kept-alive connection moved to another worker"

    def summed() -> bool:
        answers = [get_status(gw.url, c) for c in (a, b)]
        return all(d["services"][0]["traffic"]["requests"] == 18 and d["summary"]["requests"] == 18
                   for d in answers)
    wait_until(summed, timeout=10)  # each worker writes its counts within a second
    document = get_status(gw.url, a)
    assert document["process"]["metrics_from_all_workers"] is True and document["process"]["workers"] == 2
    traffic = document["services"][0]["traffic"]
    assert traffic["requests_per_second"] is not None and traffic["p50_seconds"] is not None


def test_status_and_page_are_refused_outside_admin_allow_also_behind_trusted_proxies(gateway_process, upstream):
    node = upstream(EchoApp("a"))
    gw = gateway_process("serve", static_ini(node.address, "admin_allow = 10.0.0.0/8\ntrusted_proxies = 127.0.0.1/32"))
    client = session()
    for path in ("/-/", "/-/status", "/-/dashboard.js", "/-/dashboard.css", "/-/favicon.svg"):
        refused = client.get(gw.url + path, timeout=5)
        assert refused.status_code == 403 and refused.json()["error"] == "forbidden", path
        # a client the trusted proxy names: inside admin_allow, or not
        assert client.get(gw.url + path, headers={"X-Forwarded-For": "10.1.2.3"}, timeout=5).status_code == 200
        assert client.get(gw.url + path, headers={"X-Forwarded-For": "192.0.2.7"}, timeout=5).status_code == 403
    # the probes stay open to anyone
    assert client.get(gw.url + "/-/healthz", timeout=5).status_code == 200


def test_status_document_shape(gateway_process, upstream):
    """The fields README.rst's "Dashboard" section documents."""
    node = upstream(EchoApp("a"))
    gw = gateway_process("serve", static_ini(node.address))
    document = get_status(gw.url)
    assert document["schema"] == 1
    assert set(document) >= {"schema", "time", "window_seconds", "summary", "routes", "services", "registries",
                             "process"}
    assert set(document["summary"]) >= {"routes", "services", "nodes_ready", "nodes_total", "registries_ok",
                                        "registries_total", "requests", "requests_per_second", "error_ratio"}
    assert document["routes"] == [{"api": "web", "host": "web.test", "path": "/", "match": "prefix",
                                   "methods": ["GET", "HEAD", "POST"], "strip_prefix": False, "service": "web"}]
    service = document["services"][0]
    assert service["upstream"] == {"type": "static"} and service["state"] == "ok"
    assert [n["address"] for n in service["nodes"]][0] == node.address
    assert all(set(n) == {"address", "state", "zone", "weight", "effective_weight"} for n in service["nodes"])
    assert [n["weight"] for n in service["nodes"]] == [1, 2]
    assert set(service["traffic"]) == {"requests", "errors", "requests_per_second", "errors_per_second",
                                       "error_ratio", "p50_seconds", "p99_seconds"}
    assert set(document["process"]) >= {"version", "pid", "server", "workers", "started", "uptime_seconds",
                                        "config_file", "config_loaded", "last_reload"}
    assert document["process"]["config_file"] == str(gw.config_path)


def test_quantiles_and_rates_come_from_bucket_and_counter_differences():
    inf = float("inf")
    # 100 observations: 50 up to 10 ms, 40 more up to 100 ms, 10 more up to 1 s
    buckets = [(0.01, 50.0), (0.1, 90.0), (1.0, 100.0), (inf, 100.0)]
    assert statusmod.quantile(0.5, buckets) == 0.01
    assert statusmod.quantile(0.99, buckets) == pytest.approx(0.1 + 0.9 * 9 / 10)
    assert statusmod.quantile(0.5, [(0.01, 0.0), (inf, 0.0)]) is None
    assert statusmod.quantile(0.99, [(0.01, 1.0), (inf, 100.0)]) == 0.01  # beyond the last bound

    clock = [1000.0]
    readings = iter([
        {"s": statusmod.Totals(10, 0, {0.01: 10, inf: 10})},
        {"s": statusmod.Totals(70, 6, {0.01: 40, inf: 70})},
    ])
    window = statusmod.Window(read=lambda: next(readings), clock=lambda: clock[0])
    totals, traffic, span = window.traffic()
    assert span is None and traffic["s"]["requests_per_second"] is None and traffic["s"]["requests"] == 10
    clock[0] += 30
    totals, traffic, span = window.traffic()
    assert span == 30
    assert traffic["s"]["requests_per_second"] == 2.0 and traffic["s"]["error_ratio"] == 0.1
    assert traffic["s"]["p50_seconds"] == 0.01  # 30 of the 60 new ones within 10 ms


# -- Grafana --

def test_grafana_dashboard_queries_only_metrics_kproxy_exports(gateway_process, upstream, raw_upstream, kube,
                                                              namespace, token_file):
    dashboard = json.loads(GRAFANA.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["panels"]
    expressions = [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", ())]
    assert expressions
    used = {name for e in expressions for name in re.findall(r"\bkproxy_[a-z0-9_]+", e)}

    # a gateway that has done everything the metrics count: answered, retried, ejected, discovered
    node = upstream(EchoApp("a"))
    def switch_then_close(conn) -> None:  # the tunnel ends at once: its client sees the end too
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo-protocol\r\nConnection: Upgrade\r\n\r\n")
        conn.close()
    switching = raw_upstream(switch_then_close)
    ini = static_ini(node.address) + f"""
[service:checked]
host = checked.test
nodes = {node.address}
health_check_path = /healthz
health_check_interval = 0.2
health_check_timeout = 0.1

[api:checked]
service = checked
path = /

[service:tunnel]
host = tunnel.test
nodes = {switching.address}

[api:tunnel]
service = tunnel
path = /
""" + kube_registry(kube, namespace, token_file)
    gw = gateway_process("serve", ini)
    client = session()
    gw.wait_ready()
    for i in range(6):  # weight 2 on the dead node: it is picked, refuses, is ejected and retried
        client.get(gw.url + f"/{i}", headers={"Host": "web.test"}, timeout=5)
    client.get(gw.url + "/none", headers={"Host": "nowhere.test"}, timeout=5)
    # a tunnel opened and closed
    answer = raw_http(gw.port, b"GET /t HTTP/1.1\r\nHost: tunnel.test\r\nConnection: Upgrade\r\n"
                               b"Upgrade: echo-protocol\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 101 "), answer[:100]
    wait_until(lambda: "kproxy_health_checks_total" in client.get(gw.url + "/-/metrics", timeout=5).text)
    text = client.get(gw.url + "/-/metrics", timeout=5).text
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert used - exported == set(), f"queried but not exported: {sorted(used - exported)}"


def _panels(panels: list[dict]) -> Iterable[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", ()))
