"""The seed walkthrough (API7 Cloud's Kubernetes service discovery guide), step by step,
on a real kube-apiserver, with the shipped ``conf/kproxy.ini`` under gunicorn.

The seed deploys httpbin as a pod (container port 80) exposed by ``kubectl expose --port
80``; here the "pod" is a real httpbin on its own loopback address, port 80, like a pod IP.
The seed's RBAC grants list/watch on endpoints only: kproxy cannot read Services with it
and resolves ``port = 80`` against the endpoint ports.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from .conftest import ROOT, GatewayProcess, free_port, raw_http, session, wait_until

SEED_RBAC = [
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
     "metadata": {"name": "apisix-k8s-sd-watcher"},
     "rules": [{"apiGroups": [""], "resources": ["endpoints"], "verbs": ["list", "watch"]}]},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
     "metadata": {"name": "apisix-k8s-sd-watcher-binding"},
     "subjects": [{"kind": "ServiceAccount", "name": "apisix-k8s-sd-sa", "namespace": "apisix"}],
     "roleRef": {"kind": "ClusterRole", "name": "apisix-k8s-sd-watcher", "apiGroup": "rbac.authorization.k8s.io"}},
    {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "apisix-k8s-sd-sa", "namespace": "apisix"}},
]


@pytest.fixture
def httpbin_pod():
    """A real httpbin on a pod-like address: its own loopback IP, port 80."""
    import httpbin
    ip = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
    try:
        server = make_server(ip, 80, httpbin.app, threaded=True)
    except PermissionError:
        if os.environ.get("CI", "").lower() == "true":
            raise
        pytest.skip("binding port 80 (the seed's container port) needs root")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield ip
    server.shutdown()
    server.server_close()


def seed_config(kube, token_file: Path, enabled: bool = True) -> str:
    """conf/kproxy.ini as shipped, pointed at the test API server."""
    text = (ROOT / "conf" / "kproxy.ini").read_text()
    text = re.sub(r"(?m)^api_server = .*$", f"api_server = {kube.url}", text)
    text = re.sub(r"(?m)^token_file = .*$", f"token_file = {token_file}", text)
    text = re.sub(r"(?m)^ca_file = .*$", f"ca_file = {kube.ca_file}", text)
    if not enabled:
        text = re.sub(r"(?m)^enabled = true", "enabled = false", text)
    return text


def test_seed_walkthrough_under_gunicorn(kube, httpbin_pod, tmp_path):
    # Deploy Backend Service: namespace apisix, httpbin exposed on Service port 80
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apisix"}})
    kube.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "httpbin", "namespace": "apisix"},
                "spec": {"ports": [{"port": 80, "targetPort": 80, "protocol": "TCP"}]}})
    kube.apply({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "httpbin", "namespace": "apisix"},
                "subsets": [{"addresses": [{"ip": httpbin_pod}], "ports": [{"port": 80, "protocol": "TCP"}]}]})
    # Create Service Account: the seed's rbac.yaml as written, and its token
    for obj in SEED_RBAC:
        kube.apply(obj)
    token_file = tmp_path / "token"
    token_file.write_text(kube.create_token("apisix", "apisix-k8s-sd-sa"))

    # Create the registry, service and api: conf/kproxy.ini; run it under gunicorn
    config = tmp_path / "kproxy.ini"
    config.write_text(seed_config(kube, token_file))
    gateway = GatewayProcess("gunicorn", config, free_port()).start()
    try:
        wait_until(lambda: session().get(gateway.url + "/-/readyz", timeout=5).status_code == 200, timeout=30)

        # Send Request: curl http://127.0.0.1:9080/v1/anything -H 'Host: sd.httpbin.org' -i
        # (curl's request as it goes on the wire; Connection: close only ends the exchange)
        answer = raw_http(gateway.port, b"GET /v1/anything HTTP/1.1\r\nHost: sd.httpbin.org\r\n"
                          b"User-Agent: curl/7.76.1\r\nAccept: */*\r\nConnection: close\r\n\r\n")
        head, _, payload = answer.partition(b"\r\n\r\n")
        status, *header_lines = head.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in header_lines)
        assert status == "HTTP/1.1 200 OK", (answer[:300], session().get(gateway.url + "/-/discovery").text)
        assert headers["Content-Type"] == "application/json"
        assert headers["X-Kproxy-Upstream-Status"] == "200"
        assert headers["Access-Control-Allow-Origin"] == "*"
        assert int(headers["Content-Length"]) == len(payload)
        body = json.loads(payload)
        assert body["url"] == "http://sd.httpbin.org/anything"
        assert body["method"] == "GET"
        assert body["headers"] == {"Accept": "*/*", "Host": "sd.httpbin.org", "User-Agent": "curl/7.76.1",
                                   "X-Forwarded-Host": "sd.httpbin.org"}
        assert body["args"] == {} and body["data"] == "" and body["json"] is None

        dump = session().get(gateway.url + "/-/discovery", timeout=5)
        assert httpbin_pod in dump.text
        assert token_file.read_text() not in dump.text
    finally:
        gateway.stop()

    # "If you disable the Kubernetes service discovery ... Apache APISIX will return 503."
    config.write_text(seed_config(kube, token_file, enabled=False))
    gateway = GatewayProcess("gunicorn", config, free_port()).start()
    try:
        response = session().get(gateway.url + "/v1/anything", headers={"Host": "sd.httpbin.org"}, timeout=10)
        assert response.status_code == 503
        assert response.json()["error"] == "no_upstream"
        assert response.json()["service"] == "sd-app"
    finally:
        gateway.stop()
