"""The contract's HTTP behaviour, under each of the three ways to run kproxy.

Each row of the contract's table, each forwarding rule, against real upstreams on
127.0.0.1 (the ``httpbin`` package and small echo apps) and a real gateway process.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time

import pytest

from .conftest import EchoApp, GatewayProcess, closed_port, free_port, raw_http, session, wait_until

CONFIG = """
[kproxy]
listen = 127.0.0.1:1
connect_timeout = 1
read_timeout = 1.5
node_cooldown = 30

[registry:off]
type = kubernetes
api_server = https://127.0.0.1:1
token = do-not-leak-this-token
enabled = false

[service:sd-app]
host = sd.httpbin.org
path_prefix = /v1
nodes = {httpbin}

[api:anything]
service = sd-app
path = /anything
match = prefix
strip_prefix = true
methods = *

[service:echo]
host = echo.test
path_prefix = /v1
nodes = {echo_a} {echo_b}

[api:echo]
service = echo
path = /
strip_prefix = true

[api:read-only]
service = echo
path = /read-only
strip_prefix = true
methods = GET

[service:keep-prefix]
host = keep.test
path_prefix = /v2
nodes = {echo_a}

[api:keep]
service = keep-prefix
path = /
strip_prefix = false

[service:dead]
host = dead.test
nodes = 127.0.0.1:{closed}

[api:dead]
service = dead
path = /

[service:half-dead]
host = retry.test
nodes = 127.0.0.1:{closed} {echo_a}

[api:half-dead]
service = half-dead
path = /

[service:disabled]
host = off.test
registry = off
namespace = default
service_name = x
port = 80

[api:disabled]
service = disabled
path = /

[service:get-only]
host = get-only.test
nodes = {echo_a}

[api:get-only]
service = get-only
path = /
methods = GET

[service:node-host]
host = node-host.test
nodes = {echo_a}
pass_host = node

[api:node-host]
service = node-host
path = /

[service:rewrite-host]
host = rewrite.test
nodes = {echo_a}
pass_host = rewrite
upstream_host = internal.example

[api:rewrite-host]
service = rewrite-host
path = /
"""


@pytest.fixture(scope="module")
def upstreams(upstream, httpbin_server):
    a, b = EchoApp("a"), EchoApp("b")
    return {"httpbin": httpbin_server, "a": upstream(a), "b": upstream(b), "app_a": a}


@pytest.fixture(scope="module", params=GatewayProcess.KINDS)
def gw(request, upstreams, tmp_path_factory):
    ini = CONFIG.format(httpbin=upstreams["httpbin"].address, echo_a=upstreams["a"].address,
                        echo_b=upstreams["b"].address, closed=closed_port())
    path = tmp_path_factory.mktemp(request.param) / "kproxy.ini"
    path.write_text(ini)
    process = GatewayProcess(request.param, path, free_port()).start()
    yield process
    process.stop()


def get(gw, path, host, **kwargs):
    method = kwargs.pop("method", "GET")
    return session().request(method, gw.url + path, headers={"Host": host, **kwargs.pop("headers", {})},
                             allow_redirects=False, timeout=10, **kwargs)


def echo(gw, path="/v1/x", host="echo.test", **kwargs):
    response = get(gw, path, host, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


# -- the seed walkthrough's request and answer --

def test_seed_request_is_forwarded_with_prefix_stripped_and_host_passed(gw):
    response = get(gw, "/v1/anything", "sd.httpbin.org", headers={"User-Agent": "curl/7.76.1", "Accept": "*/*"})
    assert response.status_code == 200
    assert response.headers["X-Kproxy-Upstream-Status"] == "200"
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["url"] == "http://sd.httpbin.org/anything"
    assert body["method"] == "GET"
    assert body["origin"] == "127.0.0.1"
    assert body["headers"]["Host"] == "sd.httpbin.org"
    assert body["headers"]["X-Forwarded-Host"] == "sd.httpbin.org"
    assert body["headers"]["User-Agent"] == "curl/7.76.1"


# -- the contract's table --

def test_no_route_is_404_json_or_falls_through_to_the_mounted_app(gw):
    response = get(gw, "/nowhere", "unknown.test")
    if gw.kind == "middleware":
        assert response.status_code == 200
        assert response.text == "existing app: /nowhere"
    else:
        assert response.status_code == 404
        assert response.json()["error"] == "route_not_found"


def test_segment_prefix_never_matches_a_longer_segment(gw):
    response = get(gw, "/v1/anythingelse", "sd.httpbin.org")
    assert response.status_code == (200 if gw.kind == "middleware" else 404)
    assert "X-Kproxy-Upstream-Status" not in response.headers


def test_method_not_allowed_is_405_with_allow(gw):
    response = get(gw, "/x", "get-only.test", method="POST", data=b"x")
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, HEAD"
    assert response.json()["error"] == "method_not_allowed"
    assert get(gw, "/x", "get-only.test", method="HEAD").status_code == 200  # GET allows HEAD


def test_method_mismatch_falls_to_a_shorter_api_that_allows_it(gw):
    assert echo(gw, "/v1/read-only", method="POST", data=b"x")["method"] == "POST"  # catch-all api
    response = get(gw, "/v1/anything", "sd.httpbin.org", method="PATCH")
    assert response.status_code == 200  # methods = * means any method


def test_disabled_registry_is_503_no_upstream(gw):
    response = get(gw, "/anything", "off.test")
    assert response.status_code == 503
    body = response.json()
    assert body["error"] == "no_upstream" and body["service"] == "disabled"
    assert "disabled" in body["message"]


def test_refused_connection_on_every_node_is_502(gw):
    response = get(gw, "/x", "dead.test")
    assert response.status_code == 502
    body = response.json()
    assert body["error"] == "upstream_unreachable" and body["service"] == "dead"


def test_upstream_timeout_is_504(gw):
    started = time.monotonic()
    response = get(gw, "/v1/sleep/5", "echo.test")
    assert response.status_code == 504
    assert response.json()["error"] == "upstream_timeout"
    assert time.monotonic() - started < 4.5  # read_timeout 1.5 s, one retry at most


def test_success_carries_upstream_status(gw):
    response = get(gw, "/v1/status/418", "echo.test")
    assert response.status_code == 418
    assert response.headers["X-Kproxy-Upstream-Status"] == "418"


# -- balancing and retries --

def test_round_robin_spreads_over_nodes(gw):
    nodes = [echo(gw)["node"] for _ in range(10)]
    assert sorted(set(nodes)) == ["a", "b"]
    assert abs(nodes.count("a") - nodes.count("b")) <= 2


def test_refused_node_is_retried_on_the_next_and_then_skipped(gw):
    for _ in range(6):
        response = get(gw, "/x", "retry.test", method="POST", data=b"body")
        assert response.status_code == 200  # a connect error never reached the node: safe for POST
        assert response.json()["node"] == "a"
        assert response.json()["body_length"] == 4


# -- forwarding rules --

def test_x_forwarded_headers(gw):
    seen = echo(gw, headers={"X-Forwarded-For": "203.0.113.9"})["headers"]
    assert seen["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
    assert seen["X-Forwarded-Host"] == "echo.test"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Port"] == str(gw.port)


def test_client_sent_forwarded_proto_does_not_change_the_scheme(gw):
    seen = echo(gw, headers={"X-Forwarded-Proto": "https"})["headers"]
    if gw.kind != "middleware":  # a foreign server's own trust settings decide there
        assert seen["X-Forwarded-Proto"] == "http"


def test_hop_by_hop_request_headers_are_removed(gw):
    seen = echo(gw, headers={"Connection": "keep-alive, X-Private", "X-Private": "1", "Keep-Alive": "300",
                             "TE": "trailers", "Proxy-Authorization": "Basic Zm9v", "X-End-To-End": "kept"})["headers"]
    for name in ("Connection", "X-Private", "Keep-Alive", "Te", "Proxy-Authorization"):
        assert name not in seen, name
    assert seen["X-End-To-End"] == "kept"


def test_query_and_percent_encoding_are_forwarded_byte_for_byte(gw):
    raw = "/v1/p%2Fq/%7euser/a%20b?x=%2f&y=1+2&z=%zz&empty="
    answer = raw_http(gw.port, f"GET {raw} HTTP/1.1\r\nHost: echo.test\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["raw_uri"] == raw[len("/v1"):]


def test_prefix_kept_without_strip_prefix(gw):
    assert echo(gw, "/v2/deep/path?q=1", host="keep.test")["raw_uri"] == "/v2/deep/path?q=1"


def test_pass_host_node_and_rewrite(gw, upstreams):
    assert echo(gw, "/", host="node-host.test")["headers"]["Host"] == upstreams["a"].address
    assert echo(gw, "/", host="rewrite.test")["headers"]["Host"] == "internal.example"
    assert echo(gw, "/v1/x")["headers"]["Host"] == "echo.test"


def test_redirects_are_returned_not_followed(gw):
    response = get(gw, "/v1/redirect", "echo.test")
    assert response.status_code == 302
    assert response.headers["Location"] == "/elsewhere"


def test_content_encoding_passes_through_undecoded(gw):
    response = get(gw, "/v1/gzip", "echo.test", stream=True, headers={"Accept-Encoding": "gzip"})
    raw = response.raw.read(decode_content=False)
    assert response.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(raw) == b"compressed " * 100


def test_every_set_cookie_is_kept(gw):
    response = get(gw, "/v1/cookies", "echo.test")
    assert response.raw.headers.getlist("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]


def test_head_204_and_304_have_no_body(gw):
    for method, path, status in (("HEAD", "/v1/x", 200), ("GET", "/v1/status/204", 204),
                                 ("GET", "/v1/status/304", 304)):
        data = raw_http(gw.port, f"{method} {path} HTTP/1.1\r\nHost: echo.test\r\n\r\n"
                        f"GET /v1/status/201 HTTP/1.1\r\nHost: echo.test\r\nConnection: close\r\n\r\n".encode())
        first, _, rest = data.partition(b"\r\n\r\n")
        assert first.startswith(f"HTTP/1.1 {status}".encode()), first
        # the next bytes on the connection are the next response: no body came in between
        assert rest.startswith(b"HTTP/1.1 201"), rest[:80]


def test_request_body_with_content_length_arrives_whole(gw):
    body = bytes(range(256)) * 4096  # 1 MiB
    seen = echo(gw, method="PUT", data=body)
    assert seen["body_length"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert seen["content_length"] == str(len(body))


def test_chunked_upload_of_several_mb_streams_through(gw):
    chunk = b"0123456789abcdef" * 4096  # 64 KiB

    def chunks():
        for _ in range(96):  # 6 MiB, no Content-Length: requests sends it chunked
            yield chunk
    seen = echo(gw, method="POST", data=chunks())
    assert seen["body_length"] == 96 * len(chunk)
    assert seen["body_sha256"] == hashlib.sha256(chunk * 96).hexdigest()


def test_20_mb_download_streams_with_bounded_memory(gw):
    pids = gw.pids()
    before = {pid: _rss(pid) for pid in pids}
    peak = dict(before)
    total = 0
    with get(gw, "/v1/stream/20", "echo.test", stream=True) as response:
        assert response.headers["Content-Length"] == str(20 << 20)
        for i, chunk in enumerate(response.iter_content(65536)):
            total += len(chunk)
            if i % 16 == 0:
                for pid in pids:
                    peak[pid] = max(peak[pid], _rss(pid))
    assert total == 20 << 20
    growth = max(peak[pid] - before[pid] for pid in pids)
    assert growth < 8 << 20, f"a gateway process grew by {growth >> 20} MiB while streaming 20 MiB"


def test_client_that_goes_away_mid_stream_releases_the_upstream(gw, upstreams):
    app = upstreams["app_a"]
    app.abandoned.clear()
    response = get(gw, "/v2/slowstream", "keep.test", stream=True)
    assert response.status_code == 200
    next(response.iter_content(1024))
    response.close()  # drops the connection: the body was not read to the end
    wait_until(app.abandoned.is_set, timeout=10)


def test_admin_health_and_metrics(gw):
    assert session().get(gw.url + "/-/healthz", timeout=5).status_code == 200
    assert session().get(gw.url + "/-/readyz", timeout=5).status_code == 200  # no enabled registry
    metrics = session().get(gw.url + "/-/metrics", timeout=5)
    assert metrics.status_code == 200
    assert "kproxy_requests_total" in metrics.text
    dump = session().get(gw.url + "/-/discovery", timeout=5)
    assert dump.json()["registries"]["off"]["state"] == "disabled"
    assert "do-not-leak-this-token" not in dump.text + metrics.text


def _rss(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def test_streamed_answers_are_relayed_as_they_arrive(gw):
    # the upstream sends 1 KiB every 50 ms: nothing may wait for a buffer to fill
    started = time.monotonic()
    with get(gw, "/v2/slowstream", "keep.test", stream=True) as response:
        first = next(response.iter_content(None))
        assert time.monotonic() - started < 1.0
        assert first.startswith(b"y")
