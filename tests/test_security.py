"""Security properties (docs/security.rst): paths cannot bypass routes, forwarded headers are
believed only from trusted proxies, the Host header cannot pick a destination, request ids
cannot forge log fields, and HTTPS upstreams are verified."""

from __future__ import annotations

import json
import subprocess
import threading

import pytest
from werkzeug.serving import make_server

from .conftest import EchoApp, GatewayProcess, free_port, raw_http, session, wait_until

CONFIG = """
[kproxy]
admin_allow = 10.0.0.0/8
{extra}

[service:echo]
host = echo.test
path_prefix = /v1
nodes = {echo}

[api:public]
service = echo
path = /public
strip_prefix = false
"""


@pytest.fixture(scope="module")
def echo(upstream):
    return upstream(EchoApp("echo"))


def start(tmp_path, echo, extra="", kind="serve", env=None):
    path = tmp_path / "kproxy.ini"
    path.write_text(CONFIG.format(echo=echo.address, extra=extra))
    return GatewayProcess(kind, path, free_port(), env).start()


def raw(gw, target: str, headers: str = "") -> tuple[int, bytes]:
    answer = raw_http(gw.port, f"GET {target} HTTP/1.1\r\nHost: echo.test\r\n{headers}Connection: close\r\n\r\n".encode())
    return int(answer.split(b" ", 2)[1]), answer.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("target", [
    "/v1/public/../private", "/v1/public/%2e%2e/private", "/v1/public/%2E%2e/private",
    "/v1/public/a%2F..%2F..%2Fprivate", "/v1/public/.", "/v1/public/%2e/x", "/v1/public/..%5cprivate",
    "/v1/public/a%00b", "/v1/public/a%0d%0aX-Injected:%201",
])
def test_paths_that_could_bypass_a_route_are_refused(tmp_path, echo, target):
    gw = start(tmp_path, echo)
    try:
        status, body = raw(gw, target)
        assert status == 400, body
        assert json.loads(body)["error"] == "bad_path"
    finally:
        gw.stop()


def test_the_routed_path_is_the_forwarded_path(tmp_path, echo):
    gw = start(tmp_path, echo)
    try:
        for target in ("/v1/public//x", "/v1/public/a%2Fb", "/v1/public/..x/y.", "/v1/public/%7E"):
            status, body = raw(gw, target)
            assert status == 200
            assert json.loads(body)["raw_uri"] == target
        status, _ = raw(gw, "/v1/publicity")
        assert status == 404
    finally:
        gw.stop()


def test_forwarded_headers_from_a_client_are_not_believed(tmp_path, echo):
    gw = start(tmp_path, echo)
    try:
        sent = {"X-Forwarded-For": "10.9.9.9", "X-Forwarded-Host": "evil.example",
                "X-Forwarded-Proto": "https", "X-Forwarded-Port": "443"}
        seen = session().get(gw.url + "/v1/public", headers={"Host": "echo.test", **sent}, timeout=5).json()["headers"]
        assert seen["X-Forwarded-For"] == "10.9.9.9, 127.0.0.1"  # appended: the right end is ours
        assert seen["X-Forwarded-Host"] == "echo.test"
        assert seen["X-Forwarded-Proto"] == "http"
        assert seen["X-Forwarded-Port"] == str(gw.port)
        # admin_allow is 10/8 and the peer is 127.0.0.1: a forged X-Forwarded-For does not help
        for name in ("metrics", "discovery"):
            assert session().get(gw.url + f"/-/{name}", headers=sent, timeout=5).status_code == 403
    finally:
        gw.stop()


def test_trusted_proxies_pass_the_real_client_and_scheme(tmp_path, echo):
    gw = start(tmp_path, echo, extra="trusted_proxies = 127.0.0.1/32")
    try:
        sent = {"X-Forwarded-For": "203.0.113.7, 10.1.2.3", "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "api.example.org", "X-Forwarded-Port": "443", "X-Request-Id": "trusted-1"}
        seen = session().get(gw.url + "/v1/public", headers={"Host": "echo.test", **sent}, timeout=5).json()["headers"]
        assert seen["X-Forwarded-Proto"] == "https" and seen["X-Forwarded-Host"] == "api.example.org"
        assert seen["X-Forwarded-Port"] == "443"
        assert seen["X-Forwarded-For"] == "203.0.113.7, 10.1.2.3, 127.0.0.1"
        # the client is the right-most untrusted address: 10.1.2.3, inside admin_allow
        assert session().get(gw.url + "/-/metrics", headers=sent, timeout=5).status_code == 200
        log = wait_until(lambda: [l for l in (gw.log_dir / "serve.stdout").read_text().splitlines()
                                  if "rid=trusted-1" in l])
        assert log[0].split()[1] == "10.1.2.3"
    finally:
        gw.stop()


def test_host_header_and_absolute_targets_cannot_pick_a_destination(tmp_path, echo):
    gw = start(tmp_path, echo)
    try:
        for target, host in (("http://127.0.0.1:9/v1/public", "echo.test"), ("/v1/public", "127.0.0.1:9"),
                             ("http://evil.example/v1/public", "evil.example")):
            answer = raw_http(gw.port, f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            status = int(answer.split(b" ", 2)[1])
            body = answer.partition(b"\r\n\r\n")[2]
            # either a route of echo.test answered (by its configured node), or no route: never port 9
            assert status in (200, 400, 404), answer[:200]
            if status == 200:
                assert json.loads(body)["node"] == "echo"
    finally:
        gw.stop()


def test_a_request_id_cannot_forge_log_fields(tmp_path, echo):
    gw = start(tmp_path, echo)
    try:
        forged = 'x" 200 0 rid=forged status=200'
        response = session().get(gw.url + "/v1/public", headers={"Host": "echo.test", "X-Request-Id": forged},
                                 timeout=5)
        rid = response.headers["X-Request-Id"]
        assert rid != forged and len(rid) == 32
        assert "forged" not in (gw.log_dir / "serve.stdout").read_text()
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def https_node(tmp_path_factory):
    """A real HTTPS upstream on 127.0.0.1 with its own self-signed certificate."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")], check=True, capture_output=True)
    server = make_server("127.0.0.1", 0, EchoApp("tls"), threaded=True,
                         ssl_context=(str(d / "cert.pem"), str(d / "key.pem")))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_port}", d / "cert.pem"
    server.shutdown()
    server.server_close()


HTTPS = """
[service:tls]
host = tls.test
nodes = {node}
scheme = https
{tls}

[api:tls]
service = tls
path = /
"""


@pytest.mark.parametrize("tls, expected", [
    ("ca_file = {ca}", 200),                      # verified against the given CA
    ("", 502),                                    # system CAs do not know a self-signed cert
    ("insecure_skip_tls_verify = true", 200),     # only when the config says so
])
def test_https_upstreams_are_verified(tmp_path, echo, https_node, tls, expected):
    node, ca = https_node
    extra = HTTPS.format(node=node, tls=tls.format(ca=ca))
    # the machine's CA bundle variables must not change what the config says
    gw = start(tmp_path, echo, extra=extra, env={"REQUESTS_CA_BUNDLE": str(ca), "CURL_CA_BUNDLE": str(ca)})
    try:
        response = session().get(gw.url + "/x", headers={"Host": "tls.test"}, timeout=10)
        assert response.status_code == expected, response.text
        if expected == 200:
            assert response.json()["node"] == "tls"
        else:
            assert response.json()["error"] == "upstream_unreachable"
            assert "TLS" in response.json()["message"] or "certificate" in response.json()["message"].lower()
    finally:
        gw.stop()


# -- one parse of the target and Host (kproxy/request.py), as a table --

def environ_for(target: str, host: str | None = "echo.test", protocol: str = "HTTP/1.1") -> dict:
    """What gunicorn hands over for a request line ``GET target`` (RAW_URI as sent)."""
    environ = {"REQUEST_METHOD": "GET", "RAW_URI": target, "PATH_INFO": "/ignored", "SERVER_PROTOCOL": protocol}
    if host is not None:
        environ["HTTP_HOST"] = host
    return environ


@pytest.mark.parametrize("target, host, expected", [
    ("/v1/public?a=1", "echo.test", ("echo.test", "/v1/public", "/v1/public", "?a=1")),
    ("/v1/a%20b", "echo.test:8080", ("echo.test:8080", "/v1/a b", "/v1/a%20b", "")),
    # absolute-form: any case of the scheme; its authority is the Host, whatever Host says
    ("http://internal.example/v1/public", "echo.test", ("internal.example", "/v1/public", "/v1/public", "")),
    ("HTTP://internal.example/v1/public", "echo.test", ("internal.example", "/v1/public", "/v1/public", "")),
    ("hTtPs://echo.test:443/v1/x?q", None, ("echo.test:443", "/v1/x", "/v1/x", "?q")),
    ("http://echo.test?q", "x", ("echo.test", "/", "/", "?q")),
    ("http://[fd00::1]:80/p", None, ("[fd00::1]:80", "/p", "/p", "")),
    ("/p", None, None),  # HTTP/1.0 without Host: routed as no host
])
def test_a_target_is_parsed_once_for_routing_and_forwarding(target, host, expected):
    from kproxy.request import parse_target
    protocol = "HTTP/1.0" if expected is None else "HTTP/1.1"
    parsed = parse_target(environ_for(target, host, protocol))
    assert (parsed.host, parsed.path, parsed.raw_path, parsed.query) == (expected or (None, "/p", "/p", ""))


@pytest.mark.parametrize("target, host, error", [
    ("/v1/public#/../../internal", "echo.test", "bad_target"),
    ("foo://internal.example/v1/public", "echo.test", "bad_target"),
    ("*", "echo.test", "bad_target"),
    ("v1/public", "echo.test", "bad_target"),
    ("http://user@internal.example/v1/public", "echo.test", "bad_host"),
    ("/v1/public", "echo.test:@evil.example", "bad_host"),
    ("/v1/public", "echo.test, evil.example", "bad_host"),  # two Host headers, as gunicorn joins them
    ("/v1/public", "echo.test/x", "bad_host"),
    ("/v1/public", "echo.test:80:80", "bad_host"),
    ("/v1/public", "[fd00::zz]:80", "bad_host"),
    ("/v1/public", "", "bad_host"),
    ("/v1/public", None, "bad_host"),  # HTTP/1.1 must say a Host
    ("/v1/public/..;/internal", "echo.test", "bad_path"),
    ("/v1/public/.;/x", "echo.test", "bad_path"),
    ("/v1/public/%2e%2e;x=1/internal", "echo.test", "bad_path"),
    ("/v1/public/..%3b/internal", "echo.test", "bad_path"),
    ("/v1/public\\..;\\internal", "echo.test", "bad_path"),
])
def test_targets_and_hosts_that_could_leave_the_route_are_refused(target, host, error):
    from kproxy.request import BadRequest, parse_target
    with pytest.raises(BadRequest) as refused:
        parse_target(environ_for(target, host))
    assert refused.value.error == error


def test_a_prefix_percent_encoded_across_its_boundary_is_refused_not_forwarded_unstripped():
    from kproxy.request import BadRequest, forward_target, parse_target
    assert forward_target(parse_target(environ_for("/v%31/x?y")), "/v1") == "/x?y"
    with pytest.raises(BadRequest):  # decoded, /v1/x was routed; /v1%2Fx has no boundary to cut at
        forward_target(parse_target(environ_for("/v1%2Fx")), "/v1")


# -- client identity: one policy for X-Forwarded-*, Forwarded and X-Real-IP --

@pytest.mark.parametrize("trusted", [False, True])
def test_identity_headers_are_rewritten_unless_a_trusted_proxy_sent_them(trusted):
    from kproxy.client import client_address, parse_networks
    from kproxy.headers import add_forwarded_headers, request_headers
    environ = {"REMOTE_ADDR": "127.0.0.1", "SERVER_PORT": "9080", "wsgi.url_scheme": "http",
               "HTTP_HOST": "echo.test", "HTTP_X_FORWARDED_FOR": "203.0.113.7", "HTTP_X_REAL_IP": "10.0.0.1",
               "HTTP_FORWARDED": 'for=10.0.0.1;host="internal"', "HTTP_X_FORWARDED_HOST": "evil.example"}
    networks = parse_networks("127.0.0.0/8" if trusted else "")
    headers = request_headers(environ)
    add_forwarded_headers(headers, environ, networks, "echo.test", client_address(environ, networks))
    assert headers["X-Forwarded-For"] == "203.0.113.7, 127.0.0.1"  # the right end is always ours
    ours = "for=127.0.0.1;proto=http;host=echo.test"
    if trusted:
        assert headers["Forwarded"] == f'for=10.0.0.1;host="internal", {ours}'
        assert headers["X-Real-Ip"] == "203.0.113.7"
        assert headers["X-Forwarded-Host"] == "evil.example"
    else:  # a stranger's Forwarded is dropped, and kproxy starts none of its own
        assert "Forwarded" not in headers
        assert headers["X-Real-Ip"] == "127.0.0.1"
        assert headers["X-Forwarded-Host"] == "echo.test"
    assert [name for name in headers if name.lower() == "x-real-ip"] == ["X-Real-Ip"]
