"""The client socket of kproxy's gunicorn worker (kproxy/worker.py): timeouts the kernel
enforces on a socket that stays blocking, and a response head that leaves with the first
piece of its body. The whole worker runs under serve and gunicorn in
test_hostile_clients.py; these pin the socket's own promises on a real socket pair."""

from __future__ import annotations

import socket
import time

import pytest
from gunicorn.http.errors import NoMoreData

from kproxy.worker import ClientSocket


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
