"""``kproxy endpoints``: list each registry once and show what every service resolves to,
so RBAC and selectors can be checked before deploying."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT, discovery_ini


def run(config_path, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kproxy.cli", "endpoints", "-c", str(config_path),
                           "--timeout", str(timeout)], cwd=ROOT, capture_output=True, text=True, timeout=60)


MISSING = """
[service:missing]
host = missing.test
registry = k
namespace = {namespace}
service_name = nothing-here
port = 80

[api:missing]
service = missing
path = /
"""


def config(kube, namespace, token_file) -> str:
    """Service web, on any host, and a service whose Kubernetes Service does not exist."""
    return discovery_ini(kube, namespace, token_file, "web", host="") + MISSING.format(namespace=namespace)


def test_endpoints_prints_what_each_service_resolves_to(kube, namespace, token_file, tmp_path):
    kube.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": namespace},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
    kube.apply({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "web", "namespace": namespace},
                "subsets": [{"addresses": [{"ip": "10.1.0.7"}, {"ip": "10.1.0.8"}],
                             "ports": [{"name": "http", "port": 8080}]}]})
    kube.apply({"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
                "metadata": {"name": "web-1", "namespace": namespace,
                             "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": ["10.1.0.7"]}, {"addresses": ["10.1.0.8"]}]})
    path = tmp_path / "kproxy.ini"
    path.write_text(config(kube, namespace, token_file))
    result = run(path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("[registry:k] listed")
    assert f"[service:web] {namespace}/web port http -> 10.1.0.7:8080 10.1.0.8:8080" in lines
    assert f"[service:missing] {namespace}/nothing-here port 80 -> unknown service (503)" in lines


def test_endpoints_shows_an_rbac_failure_and_exits_1(kube, namespace, tmp_path):
    kube.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "nobody", "namespace": namespace}})
    token = tmp_path / "token"
    secret = kube.create_token(namespace, "nobody")
    token.write_text(secret)
    path = tmp_path / "kproxy.ini"
    path.write_text(config(kube, namespace, token))
    result = run(path, timeout=3)
    assert result.returncode == 1
    assert "NOT LISTED" in result.stdout
    assert "403" in result.stdout or "forbidden" in result.stdout.lower()
    assert secret not in result.stdout + result.stderr
