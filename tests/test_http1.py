"""The HTTP/1.1 exchange with an upstream (kproxy/http1.py) and the transport's connection
reuse (kproxy/transport.py, kproxy/pool.py): what kproxy reads and writes in place of ``http.client``.

Upstreams here are real sockets on 127.0.0.1 (a socket pair, or a raw-socket server)
playing answers that well-behaved servers rarely send."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from kproxy import http1
from kproxy.transport import ExchangeFailed, Transport
from kproxy.node import Node

from .conftest import RawUpstream


def exchange(answer: bytes, method: str = "GET", pieces: int = 1) -> tuple[http1.Response, list[bytes]]:
    """Read ``answer`` (sent in ``pieces`` writes, then the upstream closes) as kproxy does;
    the body as read1 gives it."""
    ours, theirs = socket.socketpair()
    step = max(1, -(-len(answer) // pieces))

    def upstream() -> None:
        for i in range(0, len(answer), step):
            theirs.sendall(answer[i:i + step])
            time.sleep(0.005)
        theirs.close()
    writer = threading.Thread(target=upstream)
    writer.start()
    try:
        response = http1.read_response(ours, method)
        body = []
        while piece := response.read1(65536):
            body.append(piece)
        return response, body
    finally:
        writer.join()
        ours.close()


def test_content_length_body_is_read_to_its_length_and_the_connection_kept():
    response, body = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-A: 1\r\n\r\n0123456789", pieces=4)
    assert (response.status, response.reason, response.headers) == (200, "OK", [("Content-Length", "10"), ("X-A", "1")])
    assert b"".join(body) == b"0123456789"
    assert response.reusable


def test_chunked_body_is_decoded_with_extensions_and_trailers_dropped():
    answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    for pieces in (1, 7, len(answer)):
        response, body = exchange(answer, pieces=pieces)
        assert b"".join(body) == b"hello world"
        assert response.reusable


def test_a_body_that_runs_to_the_close_ends_the_connection():
    response, body = exchange(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", pieces=3)
    assert b"".join(body) == b"until the end"
    assert not response.reusable


def test_head_204_304_and_interim_answers_have_no_body():
    for method, answer in (("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
                           ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"),
                           ("GET", b"HTTP/1.1 304 Not Modified\r\n\r\n")):
        response, body = exchange(answer, method)
        assert body == [] and response.reusable, answer
    response, body = exchange(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                              b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
    assert response.status == 201 and body == [b"ok"]


def test_http_1_0_and_connection_close_answers_are_not_reused():
    assert not exchange(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")[0].reusable
    assert exchange(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok")[0].reusable
    assert not exchange(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")[0].reusable


def test_folded_lines_are_unfolded_and_bare_newlines_accepted():
    response, _ = exchange(b"HTTP/1.1 200 OK\nX-Folded: one\n  two\n\tthree\nContent-Length: 0\n\n")
    assert response.headers == [("X-Folded", "one two three"), ("Content-Length", "0")]


def test_transfer_encoding_wins_over_content_length_and_the_connection_is_not_reused():
    response, body = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"2\r\nok\r\n0\r\n\r\n")
    assert body == [b"ok"] and not response.reusable


def test_an_answer_with_both_framings_reaches_the_client_without_the_stale_length():
    from kproxy.headers import response_headers
    response, body = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
                              b"2\r\nok\r\n0\r\n\r\n")
    assert body == [b"ok"] and not response.reusable
    assert response_headers(response) == [("X-A", "1")]  # the server frames it anew
    response, _ = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert response_headers(response) == [("Content-Length", "2")]
    response, _ = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", method="HEAD")
    assert response_headers(response) == [("Content-Length", "7")]  # HEAD: the length of a GET's body


def test_a_trickled_head_times_out_at_the_deadline_not_per_read():
    ours, theirs = socket.socketpair()
    stop = threading.Event()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, http1.timeval(0.6))  # as the transport sets it

    def trickle() -> None:
        for byte in b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"s" * 1000:
            if stop.wait(0.05):
                return
            theirs.send(bytes([byte]))
    writer = threading.Thread(target=trickle)
    writer.start()
    started = time.monotonic()
    try:
        with pytest.raises(OSError) as error:
            http1.read_response(ours, "GET", timeout=0.6)
        assert http1.timed_out(error.value)
        assert time.monotonic() - started < 0.6 + 0.5  # each byte came well within 0.6 s
        # and the body waits get the whole timeout again
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16) == http1.timeval(0.6)
    finally:
        stop.set()
        writer.join()
        ours.close()
        theirs.close()


def test_bytes_after_a_complete_answer_make_the_connection_unusable():
    response, body = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n")
    assert body == [b"ok"] and not response.reusable


@pytest.mark.parametrize("answer", [
    b"THIS IS NOT HTTP\r\n\r\n",
    b"HTTP/2 200\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",  # duplicates, even equal
    b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",  # a coding kproxy cannot undo
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Control: a\x01b\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Control: a\x7fb\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 O\x1bK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n folded first\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n",
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 70000 + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Cut: off",
])
def test_heads_that_cannot_be_relayed_are_refused(answer):
    with pytest.raises(http1.InvalidResponse):
        exchange(answer)


def test_a_connection_closed_before_any_byte_is_told_apart():
    with pytest.raises(http1.ClosedEarly):
        exchange(b"")


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_bodies_that_break_off_or_break_their_framing_raise_broken_body(answer):
    with pytest.raises(http1.BrokenBody):
        exchange(answer)


def test_request_head_adds_only_what_framing_and_host_need():
    head = http1.request_head("POST", "/a?b=%2f", {"X-A": "1"}, "10.0.0.7:80", "empty")
    assert head == b"POST /a?b=%2f HTTP/1.1\r\nHost: 10.0.0.7:80\r\nX-A: 1\r\nContent-Length: 0\r\n\r\n"
    head = http1.request_head("GET", "/", {"Host": "client.example"}, "10.0.0.7:80", None)
    assert head == b"GET / HTTP/1.1\r\nHost: client.example\r\n\r\n"


@pytest.mark.parametrize("target", ["/a b", "/a\r\nX: y", "/\x00", ""])
def test_a_request_target_that_could_split_the_request_line_is_refused(target):
    with pytest.raises(http1.InvalidRequest):
        http1.request_head("GET", target, {}, "node:80", None)


@pytest.mark.parametrize("method, headers", [("GET /evil", {}), ("GET", {"X Foo": "v"}), ("GET", {"": "v"}),
                                             ("GET", {"X-A": "1", "B:C": "2"})])
def test_a_method_or_header_name_that_is_not_a_token_is_refused(method, headers):
    with pytest.raises(http1.InvalidRequest):
        http1.request_head(method, "/", headers, "node:80", None)


def test_chunked_request_bodies_are_encoded_and_terminated():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        http1.write_request(ours, "PUT", "/", {"Host": "h"}, iter([b"abc", b"", b"defgh"]), chunked=True)
        ours.shutdown(socket.SHUT_WR)
        sent = b""
        while data := theirs.recv(65536):
            sent += data
    assert sent == (b"PUT / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n")


# -- the transport's connections --

def answer_ok(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def read_all(response) -> bytes:
    body = b""
    while piece := response.read1(65536):
        body += piece
    response.release_conn()
    return body


@contextlib.contextmanager
def transport_to(behaviour, read_timeout: float = 2.0):
    """A Transport, and a raw-socket node that plays ``behaviour`` on each connection."""
    server = RawUpstream(behaviour)
    transport = Transport(connect_timeout=1, read_timeout=read_timeout)
    try:
        yield transport, Node("127.0.0.1", server.port), server
    finally:
        transport.close()
        server.stop()


def test_a_pooled_connection_is_reused():
    def keep_answering(conn: socket.socket) -> None:
        while True:
            answer_ok(conn)
            if not conn.recv(65536):
                return
    with transport_to(keep_answering) as (transport, node, server):
        for _ in range(5):
            assert read_all(transport.send(node, "GET", "/", {"Host": "h"})) == b"ok"
        assert server.accepted == 1


def test_a_pooled_connection_the_node_closed_is_not_reused():
    def answer_then_close(conn: socket.socket) -> None:
        answer_ok(conn)
        conn.close()
    with transport_to(answer_then_close) as (transport, node, server):
        assert read_all(transport.send(node, "GET", "/", {"Host": "h"})) == b"ok"
        time.sleep(0.1)  # the node's FIN has arrived: the pooled connection is in CLOSE_WAIT
        assert read_all(transport.send(node, "POST", "/", {"Host": "h"}, b"x")) == b"ok"
        assert server.accepted == 2


def test_a_request_that_can_be_sent_again_is_when_the_node_drops_a_reused_connection():
    def answer_once_then_drop_the_next_request(conn: socket.socket) -> None:
        answer_ok(conn)
        conn.recv(65536)  # the next request arrives, and the node closes without answering
        conn.close()
    with transport_to(answer_once_then_drop_the_next_request) as (transport, node, server):
        assert read_all(transport.send(node, "GET", "/", {"Host": "h"})) == b"ok"
        assert read_all(transport.send(node, "GET", "/", {"Host": "h"}, replayable=True)) == b"ok"
        assert server.accepted == 2
        with pytest.raises(ExchangeFailed, match="closed before any answer"):  # a POST is never sent twice
            transport.send(node, "POST", "/", {"Host": "h"}, b"x", replayable=False)
        assert server.accepted == 2


def test_a_node_that_does_not_answer_in_time_is_a_read_timeout():
    with transport_to(lambda conn: conn.recv(1), read_timeout=0.3) as (transport, node, _):
        started = time.monotonic()
        with pytest.raises(ExchangeFailed) as failure:
            transport.send(node, "GET", "/", {"Host": "h"})
        assert failure.value.kind == "read_timeout"
        assert 0.25 < time.monotonic() - started < 2


def test_bytes_a_node_sends_after_a_complete_answer_are_never_read_as_the_next_answer():
    # late bytes: they arrive after kproxy read a whole answer and pooled the connection
    def answer_then_send_more(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        time.sleep(0.05)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
        conn.recv(65536)  # until kproxy closes it
    with transport_to(answer_then_send_more) as (transport, node, server):
        assert read_all(transport.send(node, "GET", "/", {"Host": "h"})) == b"first"
        time.sleep(0.2)
        assert read_all(transport.send(node, "GET", "/", {"Host": "h"})) == b"first"
        assert server.accepted == 2


def test_an_idle_connection_older_than_the_keepalive_timeout_is_not_reused():
    def keep_answering(conn: socket.socket) -> None:
        while True:
            answer_ok(conn)
            if not conn.recv(65536):
                return
    with transport_to(keep_answering) as (transport, node, server):
        transport.keepalive_timeout = 0.3
        assert read_all(transport.send(node, "GET", "/", {"Host": "h"})) == b"ok"
        assert read_all(transport.send(node, "GET", "/", {"Host": "h"})) == b"ok"
        assert server.accepted == 1
        time.sleep(0.5)  # idle past upstream_keepalive_timeout: the node might close it any moment
        assert read_all(transport.send(node, "GET", "/", {"Host": "h"})) == b"ok"
        assert server.accepted == 2


def test_a_body_sent_late_after_a_head_answer_is_never_read_as_the_next_answer():
    # a broken node answers HEAD with a body, a moment after the head: the next request
    # must not take those bytes for its answer
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            accepted.append(conn)
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    def answer(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # kproxy resets the connection it dropped
            while request := conn.recv(65536):
                if request.startswith(b"HEAD"):
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")
                    time.sleep(0.05)
                    conn.sendall(b"stray-body")
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    threading.Thread(target=serve, daemon=True).start()
    transport = Transport(connect_timeout=1, read_timeout=2)
    try:
        node = Node("127.0.0.1", listener.getsockname()[1])
        head = transport.send(node, "HEAD", "/", {"Host": "h"})
        assert read_all(head) == b""
        time.sleep(0.2)  # the stray body has arrived on the pooled connection
        assert read_all(transport.send(node, "GET", "/", {"Host": "h"})) == b"ok"
        assert len(accepted) == 2  # the connection with bytes waiting was not reused
    finally:
        transport.close()
        listener.close()
