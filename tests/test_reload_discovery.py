"""Live reload with discovery: an unchanged registry keeps its cache and watches (no
relist, no 503 window); a changed one is listed before the switch."""

from __future__ import annotations

import signal

from .conftest import EchoApp, GatewayProcess, discovery_ini, free_port, session, wait_until
from .test_operations import Traffic


EXTRA_API = "\n[service:extra]\nhost = extra.test\nnodes = 127.0.0.1:9\n\n[api:extra]\nservice = extra\npath = /\n"


def ini(kube, namespace, token_file, extra_api: bool = False, label_selector: str = "") -> str:
    text = discovery_ini(kube, namespace, token_file, kproxy={"workers": 2}, registry={"label_selector": label_selector})
    return text + EXTRA_API if extra_api else text


def endpoints_reflector(gw) -> dict:
    return session().get(gw.url + "/-/discovery", timeout=5).json()["registries"]["k"]["informers"]["endpoints"]


def test_reload_keeps_unchanged_registries_and_lists_changed_ones_first(kube, namespace, upstream, token_file,
                                                                         tmp_path):
    node = upstream(EchoApp("a"))
    kube.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": namespace},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": node.port}]}})
    kube.apply({"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
                "metadata": {"name": "echo-1", "namespace": namespace,
                             "labels": {"kubernetes.io/service-name": "echo", "tier": "web"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": node.port}],
                "endpoints": [{"addresses": ["127.0.0.1"]}]})
    config = tmp_path / "kproxy.ini"
    config.write_text(ini(kube, namespace, token_file))
    gw = GatewayProcess("gunicorn", config, free_port()).start()
    traffic = None
    try:
        gw.wait_ready()
        traffic = Traffic(gw.url)
        wait_until(lambda: len(traffic.answers) > 20)
        listed = [endpoints_reflector(gw) for _ in range(6)]  # new connections: both workers answer
        assert {i["lists"] for i in listed} == {1}

        # same registry settings, new routes: cache and watch stay
        config.write_text(ini(kube, namespace, token_file, extra_api=True))
        gw.signal(signal.SIGHUP)
        wait_until(lambda: session().get(gw.url + "/", headers={"Host": "extra.test"}, timeout=5).status_code == 502)
        for _ in range(6):
            reflector = endpoints_reflector(gw)
            assert reflector["lists"] == 1 and reflector["watch_restarts"] == 0, reflector

        # a changed registry (label selector) is started and listed before it serves
        mark = len(traffic.answers)
        config.write_text(ini(kube, namespace, token_file, extra_api=True, label_selector="tier=web"))
        gw.signal(signal.SIGHUP)
        wait_until(lambda: "tier=web" in session().get(gw.url + "/-/discovery", timeout=5).text, timeout=15)
        wait_until(lambda: len(traffic.answers) > mark + 50)
    finally:
        if traffic:
            traffic.stop()
        gw.stop()
    assert traffic.errors == []
    assert {status for status, _ in traffic.answers} == {200}, "a request failed during a reload"
