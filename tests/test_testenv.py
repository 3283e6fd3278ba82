"""Tests of kproxy_tools.testenv against a real kube-apiserver + etcd on 127.0.0.1.

The first run builds kube-apiserver (about 5 minutes, then cached).  Under CI=true a
failure to provide the server fails the tests; elsewhere, a machine that cannot
provide it (not root with packages missing, not Debian) skips them with the reason.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any

import pytest
import requests

from kproxy_tools import testenv
from kproxy_tools.testenv import KubeAPIServer, TestEnvError, TestEnvUnavailable, provision



def _progress(msg: str) -> None:
    # Past pytest's capture: a 5-minute first build should not look like a hang.
    print(msg, file=sys.__stderr__, flush=True)


def ns(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def endpoints(namespace: str, name: str, ip: str, port: int = 8080) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": name, "namespace": namespace},
        "subsets": [{"addresses": [{"ip": ip}], "ports": [{"name": "http", "port": port}]}],
    }


def open_watch(kube: KubeAPIServer, path: str, resource_version: str) -> requests.Response:
    r = kube.request(
        "GET", path,
        params={"watch": "1", "resourceVersion": resource_version, "timeoutSeconds": "30"},
        stream=True, timeout=(5, 15),
    )
    assert r.status_code in (200, 410), r.text
    return r


def next_event(r: requests.Response) -> dict[str, Any]:
    for line in r.iter_lines():
        if line:
            return json.loads(line)
    raise AssertionError("watch ended without an event")


def test_missing_packages_without_root_is_unavailable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    # No server needed: an empty cache, packages "missing", not root.
    monkeypatch.setenv("KPROXY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(testenv, "_missing_packages", lambda pkgs: ["etcd-server"])
    monkeypatch.setattr(testenv.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(testenv.shutil, "which", lambda name: f"/usr/bin/{name}")
    with pytest.raises(TestEnvUnavailable, match="etcd-server.*root"):
        provision(log=lambda _msg: None)


def test_selectorless_service_loopback_endpoints_and_labelled_slice(kube: KubeAPIServer) -> None:
    kube.apply(ns("t-endpoints"))
    svc = kube.apply({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "t-endpoints"},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    })
    assert "selector" not in svc["spec"]
    cluster_ip = svc["spec"]["clusterIP"]
    assert cluster_ip.startswith("10.96.")

    # The test-only patch: 127.0.0.1 is accepted in v1 Endpoints ...
    ep = kube.apply(endpoints("t-endpoints", "web", "127.0.0.1"))
    assert ep["subsets"][0]["addresses"][0]["ip"] == "127.0.0.1"
    # ... but only loopback: other special addresses are still rejected.
    r = kube.request(
        "POST", "/api/v1/namespaces/t-endpoints/endpoints",
        json=endpoints("t-endpoints", "bad", "169.254.1.1"),
    )
    assert r.status_code == 422, r.text

    # Labels and annotations are maps: the unpatched reflect2 crashed the server here.
    kube.apply({
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {
            "name": "web-1", "namespace": "t-endpoints",
            "labels": {"kubernetes.io/service-name": "web",
                       "endpointslice.kubernetes.io/managed-by": "kproxy-tests"},
            "annotations": {"kproxy.test/note": "written by hand"},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
    r = kube.request(
        "GET", "/apis/discovery.k8s.io/v1beta1/namespaces/t-endpoints/endpointslices",
        params={"labelSelector": "kubernetes.io/service-name=web"},
    )
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert [i["metadata"]["name"] for i in items] == ["web-1"]
    assert items[0]["metadata"]["annotations"] == {"kproxy.test/note": "written by hand"}

    # apply() replaces an existing object and keeps the allocated clusterIP.
    svc2 = kube.apply({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "t-endpoints", "labels": {"app": "web"}},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8081}]},
    })
    assert svc2["spec"]["clusterIP"] == cluster_ip
    assert svc2["metadata"]["labels"] == {"app": "web"}
    assert svc2["spec"]["ports"][0]["targetPort"] == 8081

    assert kube.delete(endpoints("t-endpoints", "web", "127.0.0.1")) is True
    assert kube.delete(endpoints("t-endpoints", "web", "127.0.0.1")) is False
    assert kube.running


def test_serviceaccount_token_and_rbac(kube: KubeAPIServer) -> None:
    kube.apply(ns("t-rbac"))
    kube.apply({"kind": "ServiceAccount", "metadata": {"name": "reader", "namespace": "t-rbac"}})
    token = kube.create_token("t-rbac", "reader", expiration_seconds=600)
    path = "/api/v1/namespaces/t-rbac/endpoints"

    r = kube.request("GET", path, token=token)
    assert r.status_code == 403, r.text
    assert "system:serviceaccount:t-rbac:reader" in r.json()["message"]
    assert kube.request("GET", path, token="not-a-token").status_code == 401

    kube.apply({
        "kind": "ClusterRole", "metadata": {"name": "kproxy-test-endpoints-reader"},
        "rules": [{"apiGroups": [""], "resources": ["endpoints"],
                   "verbs": ["get", "list", "watch"]}],
    })
    kube.apply({
        "kind": "ClusterRoleBinding", "metadata": {"name": "kproxy-test-endpoints-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "kproxy-test-endpoints-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": "t-rbac"}],
    })
    # The RBAC authorizer reads bindings from an informer: allow it a moment.
    deadline = time.monotonic() + 10
    while (status := kube.request("GET", path, token=token).status_code) == 403:
        assert time.monotonic() < deadline, "binding not effective after 10 s"
        time.sleep(0.1)
    assert status == 200
    # The grant is exactly what the role says.
    assert kube.request("GET", "/api/v1/namespaces/t-rbac/services", token=token).status_code == 403


def test_watch_sees_event(kube: KubeAPIServer) -> None:
    kube.apply(ns("t-watch"))
    path = "/api/v1/namespaces/t-watch/endpoints"
    rv = kube.request("GET", path).json()["metadata"]["resourceVersion"]
    with open_watch(kube, path, rv) as w:
        assert w.status_code == 200
        kube.apply(endpoints("t-watch", "svc", "127.0.0.2"))
        event = next_event(w)
    assert event["type"] == "ADDED"
    assert event["object"]["metadata"]["name"] == "svc"
    assert event["object"]["subsets"][0]["addresses"][0]["ip"] == "127.0.0.2"


def expired_status(w: requests.Response) -> dict[str, Any]:
    """The 410 Status of a watch that was told to re-list: as the HTTP answer, or as
    the first (ERROR) event of the stream."""
    if w.status_code == 410:
        return w.json()
    event = next_event(w)
    assert event["type"] == "ERROR", event
    return event["object"]


def make_history(kube: KubeAPIServer, namespace: str) -> str:
    """Write an Endpoints object a few times; return a resourceVersion from before
    the last three writes."""
    kube.apply(ns(namespace))
    kube.apply(endpoints(namespace, "svc", "127.0.0.1", 8000))
    old_rv = kube.request("GET", f"/api/v1/namespaces/{namespace}/endpoints").json()[
        "metadata"]["resourceVersion"]
    for port in (8001, 8002, 8003):
        kube.apply(endpoints(namespace, "svc", "127.0.0.1", port))
    return old_rv


def test_compaction_expires_old_resource_version(kube: KubeAPIServer) -> None:
    path = "/api/v1/namespaces/t-compact/endpoints"
    old_rv = make_history(kube, "t-compact")
    revision = kube.etcd_revision()
    assert revision > int(old_rv)
    kube.compact(revision)

    # A read that must come from etcd at the compacted version: 410 Expired.
    r = kube.request("GET", path, params={"resourceVersion": old_rv,
                                          "resourceVersionMatch": "Exact"})
    assert r.status_code == 410 and r.json()["reason"] == "Expired", r.text

    # A watch is still served from the apiserver's watch cache, as in a real cluster ...
    with open_watch(kube, path, old_rv) as w:
        assert next_event(w)["type"] == "MODIFIED"
    # ... until the apiserver restarts (an upgrade): the new cache starts at the current
    # revision and etcd no longer has the old one, so the client must re-list.
    kube.restart_apiserver()
    with open_watch(kube, path, old_rv) as w:
        status = expired_status(w)
    assert status["code"] == 410 and status["reason"] == "Expired", status


def test_apiserver_restart_keeps_data_and_ends_watches(kube: KubeAPIServer) -> None:
    kube.apply(ns("t-restart"))
    before = kube.apply(endpoints("t-restart", "svc", "127.0.0.1", 9000))
    path = "/api/v1/namespaces/t-restart/endpoints"
    url, ca_file = kube.url, kube.ca_file

    with open_watch(kube, path, before["metadata"]["resourceVersion"]) as w:
        t0 = time.monotonic()
        kube.restart_apiserver()
        restart_s = time.monotonic() - t0
        # The old watch is cut off by the restart: it ends (cleanly or with an error).
        with _ends(w):
            for _ in w.iter_lines():
                pass

    assert kube.url == url and kube.ca_file == ca_file  # clients reconnect unchanged
    after = kube.request("GET", f"{path}/svc").json()
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert after["subsets"] == before["subsets"]
    assert restart_s < 60


class _ends:
    """Context manager accepting a watch stream that ends normally or with a
    connection error (both are what a client sees when the apiserver goes away)."""

    def __init__(self, response: requests.Response) -> None:
        self.response = response

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> bool:
        return exc_type is None or issubclass(
            exc_type, (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)
        )


def test_without_watch_cache_compaction_expires_watch_and_stop_cleans_up(
    kube: KubeAPIServer,
) -> None:
    # A second, short-lived server (the module's one keeps running).
    with KubeAPIServer(watch_cache=False) as other:
        workdir = other.workdir
        procs = [other._etcd, other._apiserver]
        assert other.url != kube.url

        # Every watch reads etcd here, so compaction alone expires an old version.
        path = "/api/v1/namespaces/t-nocache/endpoints"
        old_rv = make_history(other, "t-nocache")
        other.compact(other.etcd_revision())
        with open_watch(other, path, old_rv) as w:
            status = expired_status(w)
        assert status["code"] == 410 and status["reason"] == "Expired", status

    # stop() killed both processes and removed the temporary directory; it is idempotent.
    assert workdir is not None and not workdir.exists()
    assert all(p is not None and p.poll() is not None for p in procs)
    other.stop()
    with pytest.raises(TestEnvError):
        _ = other.url
