"""The client socket of kproxy's gunicorn worker (kproxy/worker.py): timeouts the kernel
enforces on a socket that stays blocking, a response head that leaves with the first
piece of its body, and a request head gathered by the main thread and read first; and
when a gathered head is ready for gunicorn's parser. The whole worker runs under serve
and gunicorn in test_hostile_clients.py; these pin the parts' own promises on a real
socket pair and gunicorn's own config."""

from __future__ import annotations

import socket
import time

import pytest
from gunicorn.config import Config
from gunicorn.http.errors import NoMoreData

from kproxy.worker import ClientSocket, HeadCheck


class CountingSocket(socket.socket):
    """A socket that counts the writes it was asked for."""
    writes = 0

    def sendall(self, data, flags=0):
        self.writes += 1
        return super().sendall(data, flags)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    ours = CountingSocket(fileno=a.detach())
    yield ours, b
    ours.close()
    b.close()


def received(peer: socket.socket) -> bytes:
    peer.settimeout(1)
    return peer.recv(65536)


def test_the_head_leaves_with_the_first_body_piece(pair):
    ours, peer = pair
    client = ClientSocket(ours, send_timeout=1)
    client.hold_next_write()
    client.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    assert ours.writes == 0
    client.sendall(b"body")
    assert ours.writes == 1
    assert received(peer) == b"HTTP/1.1 200 OK\r\n\r\nbody"


def test_a_held_head_goes_out_on_flush_before_a_read_and_on_close(pair):
    ours, peer = pair
    client = ClientSocket(ours, send_timeout=1)
    client.hold_next_write()
    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    peer.sendall(b"x")
    assert client.recv(10) == b"x"  # the client may be waiting for what was held
    assert received(peer) == b"HTTP/1.1 100 Continue\r\n\r\n"
    client.hold_next_write()
    client.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    client.close()
    assert received(peer) == b"HTTP/1.1 204 No Content\r\n\r\n"


def test_a_timeout_gunicorn_sets_is_honoured_and_blocking_mode_is_kept(pair):
    ours, _ = pair
    client = ClientSocket(ours, send_timeout=1)
    client.settimeout(0.2)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        client.recv(10)
    assert 0.15 < time.monotonic() - started < 1.5
    client.setblocking(False)
    with pytest.raises(BlockingIOError):
        client.recv(10)
    assert ours.getblocking() and ours.gettimeout() is None  # no mode switch reached the socket


def test_past_the_head_deadline_the_client_gets_408(pair):
    ours, peer = pair
    client = ClientSocket(ours, send_timeout=1)
    client.deadline = time.monotonic() + 0.2
    with pytest.raises(NoMoreData):
        client.recv(10)
    assert received(peer).startswith(b"HTTP/1.1 408 ")


def test_an_idle_body_read_gives_up_after_the_body_timeout(pair):
    ours, peer = pair
    client = ClientSocket(ours, send_timeout=1)
    client.idle_timeout = 0.2
    peer.sendall(b"part")
    assert client.recv(10) == b"part"
    started = time.monotonic()
    with pytest.raises(NoMoreData):
        client.recv(10)
    assert 0.15 < time.monotonic() - started < 1.5


def test_a_client_that_stops_reading_is_cut_off_after_the_send_timeout(pair):
    ours, _ = pair
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client = ClientSocket(ours, send_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(BrokenPipeError):
        for _ in range(1000):
            client.sendall(b"x" * 65536)
    assert time.monotonic() - started < 3


def test_bytes_read_ahead_are_received_first_then_the_socket(pair):
    ours, peer = pair
    client = ClientSocket(ours, send_timeout=1)
    assert client.read_ahead() is None  # nothing there: no waiting
    peer.sendall(b"GET / HT")
    time.sleep(0.05)
    assert client.read_ahead() is True
    peer.sendall(b"TP/1.1\r\n\r\nnext")
    time.sleep(0.05)
    assert client.read_ahead() is True
    assert client.ahead == b"GET / HTTP/1.1\r\n\r\nnext"
    assert client.recv(5) == b"GET /" and client.recv(100) == b" HTTP/1.1\r\n\r\nnext"
    client.unread(b"given back")
    assert client.recv(100) == b"given back"
    peer.sendall(b"from the socket")
    assert client.recv(100) == b"from the socket"
    peer.shutdown(socket.SHUT_WR)
    assert client.read_ahead() is False  # the end of the stream


def test_a_timed_out_head_gets_408_and_a_fin_without_waiting(pair):
    ours, peer = pair
    client = ClientSocket(ours, send_timeout=1)
    peer.sendall(b"GET / HTTP/1.1\r\nX-Slow: a")
    time.sleep(0.05)
    client.time_out()
    assert received(peer).startswith(b"HTTP/1.1 408 ")
    assert received(peer) == b""  # the write side was shut: the client sees the end


def test_a_head_is_ready_when_whole_or_when_the_parser_refuses_it_as_it_stands():
    ready = HeadCheck(Config())  # gunicorn's defaults, which kproxy keeps
    head = b"GET /x HTTP/1.1\r\nHost: echo.test\r\n\r\n"
    assert ready(head, 0)
    for cut in range(len(head)):  # the empty line found across any two pieces
        assert not ready(head[:cut], 0)
        assert ready(head, cut)
    assert ready(b"GET / HTTP/1.1\nHost: x", 0)  # a bare LF: gunicorn's 400 at once
    assert ready(b"GET / HTTP/1.1\r\nHost: x\n", 20)
    assert not ready(b"GET / HTTP/1.1\r\nHost: x\r", 0)
    assert not ready(b"GET /" + b"a" * 4000, 0)
    assert ready(b"GET /" + b"a" * 5000, 0)  # a request line over 4094: gunicorn's 414
    assert ready(b"\r\nGET /" + b"a" * 5000, 0)
    headers = b"GET / HTTP/1.1\r\n" + b"X-H: v\r\n" * 120
    assert not ready(headers, 0)  # too many headers: only the parser, once whole, says 431
    assert ready(headers + b"X" * ready.size_limit, 0)  # past what the parser ever buffers


def test_a_tls_listener_serves_kept_alive_requests(tmp_path, upstream):
    # gunicorn --certfile wraps each client socket in TLS; the worker then serves it on
    # gunicorn's own socket, without kproxy's client deadlines (kernel timeouts surface
    # differently through TLS)
    import subprocess

    from .conftest import EchoApp, GatewayProcess, free_port, session
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem")], check=True, capture_output=True)
    node = upstream(EchoApp("tls-listener"))
    config = tmp_path / "kproxy.ini"
    config.write_text(f"[service:echo]\nnodes = {node.address}\n\n[api:echo]\nservice = echo\npath = /\n")

    class TLSGateway(GatewayProcess):
        def command(self) -> list[str]:
            return super().command() + ["--certfile", str(tmp_path / "cert.pem"), "--keyfile", str(tmp_path / "key.pem")]

        def _wait_ready(self, timeout: float) -> None:
            self.url = f"https://127.0.0.1:{self.port}"
            deadline = time.monotonic() + timeout
            while self.process.poll() is None and time.monotonic() < deadline:
                try:
                    session().get(self.url + "/-/healthz", timeout=2, verify=str(tmp_path / "cert.pem"))
                    return
                except Exception:  # not listening yet
                    time.sleep(0.1)
            raise AssertionError(f"did not start:\n{self.logs()}")

    gw = TLSGateway("gunicorn", config, free_port()).start()
    try:
        client = session()
        client.verify = str(tmp_path / "cert.pem")
        for _ in range(3):  # one connection, kept alive between the requests
            response = client.get(gw.url + "/x", timeout=10)
            assert response.status_code == 200 and response.json()["node"] == "tls-listener"
        assert "Traceback" not in (gw.log_dir / "gunicorn.stderr").read_text()
    finally:
        gw.stop()
