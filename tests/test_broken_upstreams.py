"""Broken upstreams: nodes that never answer, break off mid-body, speak invalid HTTP, send
huge headers or are slow to connect. Raw-socket servers on 127.0.0.1 play them, because no
well-behaved server does these things; the gateway is a real process (serve and gunicorn)."""

from __future__ import annotations

import socket
import struct
import time

import pytest
import requests

from .conftest import EchoApp, GatewayProcess, RawUpstream, free_port, session, wait_until


def silent(conn: socket.socket) -> None:
    conn.recv(1)  # never answers; returns when the gateway gives up and closes


def reset_mid_body(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
    time.sleep(0.2)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
    conn.close()


def reset_mid_chunked_body(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"x" * 1000 + b"\r\n")
    time.sleep(0.2)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def invalid_http(conn: socket.socket) -> None:
    conn.sendall(b"THIS IS NOT HTTP\r\n\r\n")
    conn.close()


def huge_headers(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Many-%d: v\r\n" % i for i in range(500))
                 + b"Content-Length: 0\r\n\r\n")
    conn.close()


def control_byte_in_a_header(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Length: 2\r\n\r\nok")
    conn.recv(1)


def both_framings(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\nhello\r\n0\r\n\r\n")
    conn.recv(1)


def trickled_head(conn: socket.socket) -> None:
    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"s" * 100:  # a byte every 0.2 s: 23 s in all
        conn.send(bytes([byte]))
        time.sleep(0.2)


def closes_at_once(conn: socket.socket) -> None:
    conn.close()


class Unaccepting:
    """A node whose accept queue is full: connection attempts hang until they time out."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.filler = socket.create_connection(("127.0.0.1", self.port))  # fills the queue

    def stop(self) -> None:
        self.filler.close()
        self.sock.close()


CONFIG = """
[kproxy]
connect_timeout = 0.5
read_timeout = 1
node_cooldown = 60

[service:silent-only]
host = silent.test
nodes = {silent}
[api:silent-only]
service = silent-only
path = /

[service:silent-then-good]
host = failover.test
nodes = {silent2} {good}
[api:silent-then-good]
service = silent-then-good
path = /

[service:reset]
host = reset.test
nodes = {reset}
[api:reset]
service = reset
path = /

[service:reset-chunked]
host = reset-chunked.test
nodes = {reset_chunked}
[api:reset-chunked]
service = reset-chunked
path = /

[service:invalid]
host = invalid.test
nodes = {invalid}
[api:invalid]
service = invalid
path = /

[service:huge-headers]
host = huge.test
nodes = {huge}
[api:huge-headers]
service = huge-headers
path = /

[service:closes-then-good]
host = closes.test
nodes = {closes} {good}
[api:closes-then-good]
service = closes-then-good
path = /

[service:control-byte]
host = control.test
nodes = {control}
[api:control-byte]
service = control-byte
path = /

[service:both-framings]
host = framings.test
nodes = {framings}
[api:both-framings]
service = both-framings
path = /

[service:trickle]
host = trickle.test
nodes = {trickle}
[api:trickle]
service = trickle
path = /

[service:slow-connect]
host = slow.test
nodes = {unaccepting} {good}
[api:slow-connect]
service = slow-connect
path = /
"""


@pytest.fixture(scope="module")
def nodes(upstream):
    raw = {name: RawUpstream(behaviour) for name, behaviour in (
        ("silent", silent), ("silent2", silent), ("reset", reset_mid_body),
        ("reset_chunked", reset_mid_chunked_body), ("invalid", invalid_http), ("huge", huge_headers),
        ("closes", closes_at_once), ("control", control_byte_in_a_header), ("framings", both_framings),
        ("trickle", trickled_head))}
    yield {**raw, "good": upstream(EchoApp("good"))}
    for server in raw.values():
        server.stop()


@pytest.fixture(params=["serve", "gunicorn"])
def gw(request, nodes, tmp_path):
    unaccepting = Unaccepting()  # one per gateway: a timed-out attempt may change its queue
    path = tmp_path / "kproxy.ini"
    path.write_text(CONFIG.format(unaccepting=unaccepting.address,
                                  **{name: node.address for name, node in nodes.items()}))
    process = GatewayProcess(request.param, path, free_port()).start()
    yield process
    process.stop()
    unaccepting.stop()


def get(gw, host, method="GET", **kwargs):
    return session().request(method, gw.url + "/x", headers={"Host": host}, timeout=15, **kwargs)


def metrics(gw) -> str:
    return session().get(gw.url + "/-/metrics", timeout=5).text


def test_node_that_never_answers_is_504(gw):
    started = time.monotonic()
    response = get(gw, "silent.test")
    assert response.status_code == 504
    assert response.json()["error"] == "upstream_timeout"
    assert time.monotonic() - started < 5


def test_silent_node_is_retried_for_idempotent_requests_then_ejected(gw, nodes):
    accepted = nodes["silent2"].accepted
    first = get(gw, "failover.test")
    assert first.status_code == 200 and first.json()["node"] == "good"  # the retry hid the failure
    for _ in range(6):
        started = time.monotonic()
        assert get(gw, "failover.test").json()["node"] == "good"
        assert time.monotonic() - started < 0.9  # ejected: nobody waits for its timeout
    assert nodes["silent2"].accepted - accepted <= 1 * (2 if gw.kind == "gunicorn" else 1)
    assert 'kind="read_timeout"' in metrics(gw)


def test_post_with_body_is_not_replayed_after_it_may_have_reached_a_node(gw):
    response = get(gw, "invalid.test", method="POST", data=b"payload")
    assert response.status_code == 502
    assert response.json()["error"] == "upstream_error"


def test_reset_mid_body_truncates_the_answer_and_is_logged_and_counted(gw):
    for host in ("reset.test", "reset-chunked.test"):
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            response = get(gw, host, stream=True)
            assert response.status_code == 200
            b"".join(response.iter_content(4096))
    wait_until(lambda: 'kind="broken_body"' in metrics(gw))
    stderr = (gw.log_dir / f"{gw.kind}.stderr").read_text()
    assert stderr.count("broke off mid-body") >= 2
    assert "Traceback" not in stderr


def test_invalid_http_and_huge_headers_are_502(gw):
    for host in ("invalid.test", "huge.test"):
        response = get(gw, host)
        assert response.status_code == 502, host
        assert response.json()["error"] == "upstream_error"
    assert 'kind="bad_response"' in metrics(gw)


def test_connection_closed_before_any_answer_is_retried_on_the_next_node(gw):
    for _ in range(4):
        response = get(gw, "closes.test")
        assert response.status_code == 200
        assert response.json()["node"] == "good"


def test_slow_connect_times_out_and_the_next_node_answers(gw):
    started = time.monotonic()
    response = get(gw, "slow.test", method="POST", data=b"not idempotent, but never sent")
    assert response.status_code == 200
    assert response.json()["node"] == "good" and response.json()["body_length"] == 30
    assert time.monotonic() - started < 3
    assert 'kind="connect_timeout"' in metrics(gw)


def test_a_control_byte_in_an_upstream_header_is_a_502_logged_in_one_line(gw):
    response = get(gw, "control.test")
    assert response.status_code == 502
    assert response.json()["error"] == "upstream_error"
    assert "control character" in response.json()["message"]
    wait_until(lambda: 'service="control-byte"' in metrics(gw))
    stderr = (gw.log_dir / f"{gw.kind}.stderr").read_text()
    assert [line for line in stderr.splitlines() if "control character" in line], stderr[-2000:]
    assert "Traceback" not in stderr
    access = wait_until(lambda: [line for line in (gw.log_dir / f"{gw.kind}.stdout").read_text().splitlines()
                                 if " 502 " in line and "control-byte" in line])
    assert access


def test_an_answer_with_both_framings_reaches_the_client_framed_by_kproxy(gw):
    # raw: a client library would mend a stale Content-Length; the bytes on the wire must not need it
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as client:
        client.sendall(b"GET /x HTTP/1.1\r\nHost: framings.test\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"content-length: 1000" not in head.lower()
    assert body in (b"hello", b"5\r\nhello\r\n0\r\n\r\n")  # to its close, or chunked anew


def test_a_trickled_answer_head_is_a_504_within_read_timeout(gw):
    started = time.monotonic()
    response = get(gw, "trickle.test")
    assert response.status_code == 504
    assert time.monotonic() - started < 1 + 1  # read_timeout = 1, plus the 1 s
