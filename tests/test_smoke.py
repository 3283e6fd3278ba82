"""A smoke run of the three commands, against a real kube-apiserver and a real upstream:
``kproxy check``, ``kproxy serve`` forwarding a request to a node it discovered, and
``kproxy endpoints``. Part of the normal suite; ``.ci/run`` runs it again, with the tests of
the code that uses gunicorn's, urllib3's and prometheus_client's internals, with every
dependency at the lowest version setup.cfg allows (.ci/floors.py), so a false floor fails
CI instead of a user's install."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT, EchoApp, GatewayProcess, discovery_ini, free_port, session, wait_until
from .test_discovery_kubernetes import endpoint_slice, ready, service


def kproxy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kproxy.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def echo_service(kube, namespace: str, port: int) -> None:
    """Service ``echo`` whose one endpoint is the upstream on 127.0.0.1:``port``."""
    kube.apply(service(namespace, "echo"))
    kube.apply(endpoint_slice(namespace, "echo-1", "echo", [ready("127.0.0.1")], ports=(("http", port),)))


def config_file(kube, namespace: str, token_file, tmp_path):
    path = tmp_path / "kproxy.ini"
    path.write_text(discovery_ini(kube, namespace, token_file, kproxy={"workers": 2}))
    return path


def test_check_accepts_a_config_with_a_kubernetes_registry(kube, namespace, token_file, tmp_path):
    result = kproxy("check", "-c", str(config_file(kube, namespace, token_file, tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert ": ok (1 services, 1 apis" in result.stdout


def test_serve_forwards_a_request_to_a_discovered_node_and_counts_it(kube, namespace, upstream, token_file, tmp_path):
    node = upstream(EchoApp("smoke"))
    echo_service(kube, namespace, node.port)
    gw = GatewayProcess("serve", config_file(kube, namespace, token_file, tmp_path), free_port()).start()
    try:
        gw.wait_ready()
        response = session().get(gw.url + "/hello", headers={"Host": "echo.test"}, timeout=10)
        assert response.status_code == 200, response.text
        assert response.json()["node"] == "smoke"
        assert response.json()["raw_uri"] == "/hello"
        # the request's duration lands in the histogram (metrics.py writes its buckets directly)
        counted = 'kproxy_request_duration_seconds_count{service="echo"} 1.0'
        wait_until(lambda: counted in session().get(gw.url + "/-/metrics", timeout=5).text)
    except BaseException:
        print(gw.logs())
        raise
    finally:
        gw.stop()


def test_endpoints_lists_the_registry(kube, namespace, upstream, token_file, tmp_path):
    node = upstream(EchoApp("smoke"))
    echo_service(kube, namespace, node.port)
    result = kproxy("endpoints", "-c", str(config_file(kube, namespace, token_file, tmp_path)), "--timeout", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("[registry:k] listed"), result.stdout
    assert f"[service:echo] {namespace}/echo port http -> 127.0.0.1:{node.port}" in lines
