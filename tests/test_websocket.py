"""WebSocket and Upgrade tunnels (issue #14), through ``kproxy serve`` and gunicorn with
conf/gunicorn.conf.py, with a real WebSocket server and client (the ``websockets``
package), raw Upgrade servers for what a WebSocket server never does, and the 501 in
middleware mode."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import struct
import threading
import time
from typing import Callable, Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect as async_connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Response
from websockets.datastructures import Headers
from websockets.sync.client import connect

from .conftest import EchoApp, GatewayProcess, free_port, session, wait_until

BIG = 1 << 20
WS_OPTIONS = {"max_size": 2 * BIG, "open_timeout": 10, "close_timeout": 5}


# -- upstreams --

class WebSocketUpstream:
    """A real WebSocket server (websockets, asyncio) in a thread of its own. Paths:
    ``/ws/echo/ID`` echoes every message (``headers?`` answers the handshake's request
    headers, ``ping-me`` pings the client and says when the pong came, ``close:CODE:REASON``
    closes so); ``/ws/forbidden`` refuses the handshake with 403. ``ended[ID]`` is set when
    a connection ends, with its close code and reason in ``closes[ID]``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.ended: dict[str, threading.Event] = {}
        self.closes: dict[str, tuple[int | None, str | None]] = {}
        self.server = asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"

    async def _serve(self):
        return await serve(self._handle, "127.0.0.1", 0, process_request=self._check, max_size=2 * BIG,
                           ping_interval=None)

    def _check(self, connection, request):
        if request.path == "/ws/forbidden":
            body = b'{"why": "not you"}'
            return Response(403, "Forbidden", Headers([("Content-Type", "application/json"),
                                                       ("Content-Length", str(len(body)))]), body)
        return None

    def expect(self, ident: str) -> threading.Event:
        event = self.ended[ident] = threading.Event()
        return event

    async def _handle(self, ws) -> None:
        ident = ws.request.path.rsplit("/", 1)[-1]
        try:
            async for message in ws:
                if message == "headers?":
                    await ws.send(json.dumps(dict(ws.request.headers.raw_items())))
                elif message == "ping-me":
                    await (await ws.ping(b"from-upstream"))
                    await ws.send("pong-received")
                elif isinstance(message, str) and message.startswith("close:"):
                    _, code, reason = message.split(":", 2)
                    await ws.close(int(code), reason)
                else:
                    await ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            self.closes[ident] = (ws.close_code, ws.close_reason)
            if ident in self.ended:
                self.ended[ident].set()

    def stop(self) -> None:
        self.server.close()
        asyncio.run_coroutine_threadsafe(self.server.wait_closed(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class RawUpgradeUpstream:
    """A raw-socket server for Upgrades a WebSocket server does not show. ``behaviour``
    gets each connection and the bytes that came after its request head (nothing of
    what the client sent is lost here), after it was given the request head."""

    def __init__(self, behaviour: Callable[[socket.socket, bytes, bytes], None]):
        self.behaviour = behaviour
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.heads: list[bytes] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self._conns.append(conn)
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(20)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            self.heads.append(head)
            self.behaviour(conn, head, rest)
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()
        for conn in self._conns:
            try:
                conn.close()
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)


SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo-protocol\r\nConnection: Upgrade\r\n\r\n"
scripts: dict[str, list[bytes]] = {}   # token in the path -> what the upstream sends after its 101
received: dict[str, bytes] = {}        # token -> what the upstream received after the request head


def echo_protocol(conn: socket.socket, head: bytes, rest: bytes) -> None:
    """``Upgrade: echo-protocol``: 101 with ``hello`` right behind it, then every byte
    echoed; ``/script/TOKEN``: the 101 and the chunks ``scripts[TOKEN]`` (then a FIN),
    while all it receives is kept in ``received[TOKEN]``."""
    target = head.split(b" ", 2)[1].decode()
    if target.startswith("/raw/script/"):
        token = target.rsplit("/", 1)[-1]
        got = [rest]

        def read() -> None:
            while chunk := conn.recv(65536):
                got.append(chunk)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        conn.sendall(SWITCH)
        for chunk in scripts[token]:
            conn.sendall(chunk)
        conn.shutdown(socket.SHUT_WR)
        reader.join(20)
        received[token] = b"".join(got)
        return
    conn.sendall(SWITCH + b"hello")
    if rest:
        conn.sendall(rest)
    while chunk := conn.recv(65536):
        conn.sendall(chunk)


def switch_then_close(conn: socket.socket, head: bytes, rest: bytes) -> None:
    """A valid WebSocket 101 (its Sec-WebSocket-Accept computed), then the connection closed."""
    import base64
    import hashlib
    key = re.search(rb"(?im)^sec-websocket-key:\s*(\S+)", head)[1]
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")


def unasked_switch(conn: socket.socket, head: bytes, rest: bytes) -> None:
    conn.sendall(SWITCH)


# -- the gateway --

CONFIG = """
[kproxy]
listen = 127.0.0.1:1
connect_timeout = 2
read_timeout = 5
tunnel_idle_timeout = {idle}
; far fewer request threads than tunnels: an open tunnel must hold none
threads = 8

[service:ws]
path_prefix = /ws
nodes = {ws}

[api:ws]
service = ws
path = /

[service:raw]
path_prefix = /raw
nodes = {raw}

[api:raw]
service = raw
path = /

[service:once]
path_prefix = /once
nodes = {once}

[api:once]
service = once
path = /

[service:unasked]
path_prefix = /unasked
nodes = {unasked}

[api:unasked]
service = unasked
path = /

[service:plain]
path_prefix = /plain
nodes = {plain}

[api:plain]
service = plain
path = /
"""


@pytest.fixture(scope="module")
def upstreams(upstream) -> Iterable[dict]:
    ws = WebSocketUpstream()
    raws = {name: RawUpgradeUpstream(behaviour) for name, behaviour in
            (("raw", echo_protocol), ("once", switch_then_close), ("unasked", unasked_switch))}
    plain = upstream(EchoApp("plain"))
    yield {"ws": ws, "plain": plain, **raws}
    ws.stop()
    for server in raws.values():
        server.stop()


def config_text(upstreams: dict, idle: float = 300) -> str:
    return CONFIG.format(idle=idle, plain=upstreams["plain"].address,
                         **{name: upstreams[name].address for name in ("ws", "raw", "once", "unasked")})


@pytest.fixture(scope="module", params=["serve", "gunicorn"])
def gateway(request, upstreams, tmp_path_factory) -> Iterable[GatewayProcess]:
    directory = tmp_path_factory.mktemp(request.param)
    path = directory / "kproxy.ini"
    path.write_text(config_text(upstreams))
    process = GatewayProcess(request.param, path, free_port())
    process.start()
    yield process
    process.stop()


def ws_url(gateway: GatewayProcess, path: str) -> str:
    return f"ws://127.0.0.1:{gateway.port}{path}"


def tunnels_open(gateway: GatewayProcess, service: str = "ws") -> float:
    text = session().get(gateway.url + "/-/metrics", timeout=5).text
    match = re.search(rf'^kproxy_tunnels_open{{service="{service}"}} (\S+)$', text, re.M)
    return float(match[1]) if match else 0.0


def tunnels_settle(gateway: GatewayProcess) -> None:
    wait_until(lambda: all(tunnels_open(gateway, s) == 0 for s in ("ws", "raw", "once")), timeout=10)


_ids = iter(range(1_000_000))


def new_id(name: str) -> str:
    return f"{name}-{next(_ids)}"


def raw_upgrade(gateway: GatewayProcess, target: str, early: bytes = b"") -> tuple[socket.socket, bytes, bytes]:
    """Connect, send an ``Upgrade: echo-protocol`` request (and ``early`` in the same
    write), read the answer head: the socket, the head and what came after it."""
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: raw.test\r\nConnection: Upgrade\r\n"
                 f"Upgrade: echo-protocol\r\n\r\n".encode() + early)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return sock, head, rest


def read_exactly(sock: socket.socket, n: int, have: bytes = b"") -> bytes:
    data = have
    while len(data) < n:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {len(data)} of {n} bytes"
        data += chunk
    return data


def read_to_end(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


# -- WebSocket through the tunnel --

def test_handshake_reaches_the_upstream_with_forwarded_headers(gateway, upstreams):
    with connect(ws_url(gateway, "/ws/echo/" + new_id("h")), **WS_OPTIONS) as ws:
        # the client checked Sec-WebSocket-Accept: connect() fails on a wrong one
        assert ws.response.status_code == 101
        assert ws.response.headers["Upgrade"].lower() == "websocket"
        assert ws.response.headers["X-Request-Id"]
        ws.send("headers?")
        seen = {k.lower(): v for k, v in json.loads(ws.recv(timeout=5)).items()}
    assert seen["upgrade"].lower() == "websocket"
    assert "upgrade" in seen["connection"].lower()
    assert seen["sec-websocket-key"] and seen["sec-websocket-version"] == "13"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-request-id"] == ws.response.headers["X-Request-Id"]


def test_text_binary_and_1_mib_messages_pass_intact_both_ways(gateway):
    big_text = "é" * (BIG // 2)   # 1 MiB of UTF-8
    big_binary = os.urandom(BIG)
    with connect(ws_url(gateway, "/ws/echo/" + new_id("f")), **WS_OPTIONS) as ws:
        for message in ("hello", b"\x00\x01\xff binary", big_text, big_binary):
            ws.send(message)
            assert ws.recv(timeout=10) == message


def test_ping_and_pong_pass_both_ways(gateway):
    with connect(ws_url(gateway, "/ws/echo/" + new_id("p")), **WS_OPTIONS) as ws:
        assert ws.ping(b"from-client").wait(5), "the client's ping got no pong"
        ws.send("ping-me")  # the upstream pings, the client's library answers
        assert ws.recv(timeout=5) == "pong-received"


def test_close_code_and_reason_pass_from_the_client(gateway, upstreams):
    ident = new_id("cc")
    ended = upstreams["ws"].expect(ident)
    with connect(ws_url(gateway, "/ws/echo/" + ident), **WS_OPTIONS) as ws:
        ws.send("x")
        ws.recv(timeout=5)
        ws.close(4001, "bye")
    assert ended.wait(5)
    assert upstreams["ws"].closes[ident] == (4001, "bye")
    tunnels_settle(gateway)


def test_close_code_and_reason_pass_from_the_upstream(gateway):
    with connect(ws_url(gateway, "/ws/echo/" + new_id("uc")), **WS_OPTIONS) as ws:
        ws.send("close:4002:later")
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
        assert (ws.close_code, ws.close_reason) == (4002, "later")
    tunnels_settle(gateway)


def test_a_client_gone_mid_tunnel_closes_the_upstream_side_within_a_second(gateway, upstreams):
    ident = new_id("gone")
    ended = upstreams["ws"].expect(ident)
    with connect(ws_url(gateway, "/ws/echo/" + ident), **WS_OPTIONS) as ws:
        ws.send("x")
        assert ws.recv(timeout=5) == "x"
        wait_until(lambda: tunnels_open(gateway) >= 1)
        # no close frame: the TCP connection just goes, with a reset
        ws.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        ws.socket.shutdown(socket.SHUT_RDWR)
        ws.socket.close()
        started = time.monotonic()
        assert ended.wait(5), "the upstream never saw the client go"
        assert time.monotonic() - started <= 1.0
    tunnels_settle(gateway)


def test_an_upstream_refusing_the_upgrade_is_relayed_as_an_answer(gateway):
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(gateway, "/ws/forbidden"), **WS_OPTIONS)
    assert refused.value.response.status_code == 403
    assert json.loads(refused.value.response.body) == {"why": "not you"}


def test_an_upstream_that_closes_after_its_101_closes_the_client(gateway):
    with connect(ws_url(gateway, "/once/x"), **WS_OPTIONS) as ws:
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
    tunnels_settle(gateway)


def test_an_unasked_101_is_still_a_502(gateway):
    answer = session().get(gateway.url + "/unasked/x", timeout=10)
    assert answer.status_code == 502
    assert answer.json()["error"] == "upstream_error"


def test_the_tunnel_is_counted_and_logged_when_it_closes(gateway):
    with connect(ws_url(gateway, "/ws/echo/" + new_id("log")), **WS_OPTIONS) as ws:
        ws.send("0123456789")
        ws.recv(timeout=5)
        assert tunnels_open(gateway) >= 1
    tunnels_settle(gateway)
    metrics = session().get(gateway.url + "/-/metrics", timeout=5).text
    assert re.search(r'^kproxy_tunnels_total{service="ws"} [1-9]', metrics, re.M)
    assert re.search(r'^kproxy_tunnel_bytes_total{direction="to_client",service="ws"} [1-9]', metrics, re.M)

    def logged() -> bool:
        text = (gateway.log_dir / f"{gateway.kind}.stdout").read_text(errors="replace")
        # one line when it closes: its duration, and the bytes each way (a 10-byte text frame
        # from the client is 16 bytes masked, plus its close frame)
        return bool(re.search(r'"GET /ws/echo/log-\d+" 101 [1-9]\d* \S+ ws ws 127\.0\.0\.1:\d+ 101 .* '
                              r'received=(1[6-9]|[2-9]\d|\d{3,})\b', text))
    wait_until(logged, timeout=5)


# -- other Upgrades, and the bytes around the switch --

def test_a_non_websocket_upgrade_keeps_early_bytes_both_ways(gateway):
    sock, head, rest = raw_upgrade(gateway, "/raw/echo", early=b"early-bytes")
    with sock:
        assert head.startswith(b"HTTP/1.1 101 ")
        assert re.search(rb"(?im)^upgrade: echo-protocol\r?$", head)
        assert re.search(rb"(?im)^connection: upgrade\r?$", head)
        # the upstream's bytes right behind its 101, then the echo of what the client
        # pipelined behind its request head
        assert read_exactly(sock, len(b"helloearly-bytes"), rest) == b"helloearly-bytes"
        sock.sendall(b"more")
        assert read_exactly(sock, 4) == b"more"
        sock.shutdown(socket.SHUT_WR)  # passed on: the echo server ends, and so does the tunnel
        assert read_to_end(sock) == b""
    tunnels_settle(gateway)


def test_upgrade_headers_are_forwarded_only_for_an_upgrade_request(gateway):
    answer = session().get(gateway.url + "/plain/x", headers={"Upgrade": "websocket"}, timeout=5)
    seen = {k.lower() for k in answer.json()["headers"]}
    assert "upgrade" not in seen  # no "upgrade" among the Connection tokens: hop-by-hop, dropped


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(up=st.lists(st.binary(min_size=1, max_size=70_000), max_size=6),
       down=st.lists(st.binary(min_size=1, max_size=70_000), max_size=6))
def test_any_chunks_arrive_intact_and_in_order_both_ways(gateway, up, down):
    token = new_id("prop")
    scripts[token] = down
    sock, head, rest = raw_upgrade(gateway, f"/raw/script/{token}", early=up[0] if up else b"")
    with sock:
        assert head.startswith(b"HTTP/1.1 101 ")
        got = [rest]

        def read() -> None:
            while chunk := sock.recv(65536):
                got.append(chunk)
        reader = threading.Thread(target=read)
        reader.start()
        for chunk in up[1:]:
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        reader.join(20)
        assert not reader.is_alive()
    assert b"".join(got) == b"".join(down)
    wait_until(lambda: token in received, timeout=10)
    assert received.pop(token) == b"".join(up)


# -- scale: tunnels do not hold request threads --

def test_200_concurrent_websockets_while_plain_requests_are_answered(gateway):
    clients, messages = 200, 5
    echoed: list[int] = []
    plain_answers: list[int] = []

    def plain_requests() -> None:
        for _ in range(20):
            plain_answers.append(session().get(gateway.url + "/plain/x", timeout=5).status_code)

    async def main() -> None:
        all_open, plain_done = asyncio.Event(), asyncio.Event()
        opened = 0

        async def one(i: int) -> None:
            nonlocal opened
            async with async_connect(ws_url(gateway, f"/ws/echo/many-{i}"), **WS_OPTIONS) as ws:
                opened += 1
                if opened == clients:
                    all_open.set()
                await asyncio.wait_for(all_open.wait(), 60)
                for n in range(messages):
                    await ws.send(f"{i}:{n}")
                    assert await asyncio.wait_for(ws.recv(), 10) == f"{i}:{n}"
                echoed.append(i)
                await asyncio.wait_for(plain_done.wait(), 60)

        tasks = [asyncio.create_task(one(i)) for i in range(clients)]
        await asyncio.wait_for(all_open.wait(), 60)
        # every tunnel open at once: 25 times the worker's request threads
        assert await asyncio.to_thread(tunnels_open, gateway) == clients
        threads = max(len(os.listdir(f"/proc/{pid}/task")) for pid in gateway.pids())
        assert threads < 40, f"{threads} threads in a process for {clients} tunnels"
        await asyncio.to_thread(plain_requests)  # while the clients echo
        plain_done.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert sorted(echoed) == list(range(clients))
    assert plain_answers == [200] * 20
    tunnels_settle(gateway)


# -- idle tunnels, and middleware mode --

def test_an_idle_tunnel_is_closed_after_tunnel_idle_timeout(gateway_process, upstreams):
    process = gateway_process("serve", config_text(upstreams, idle=1))
    sock, head, rest = raw_upgrade(process, "/raw/echo")
    with sock:
        assert head.startswith(b"HTTP/1.1 101 ")
        read_exactly(sock, 5, rest)
        sock.settimeout(10)
        assert read_to_end(sock) == b""  # closed by kproxy, nothing said for a second
    wait_until(lambda: tunnels_open(process, "raw") == 0, timeout=5)


def test_middleware_mode_answers_501_at_once(gateway_process, upstreams):
    process = gateway_process("middleware", config_text(upstreams))
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(process, "/ws/echo/" + new_id("mw")), **WS_OPTIONS)
    assert refused.value.response.status_code == 501
    assert json.loads(refused.value.response.body)["error"] == "upgrade_not_supported"
    sock, head, _ = raw_upgrade(process, "/raw/echo")
    sock.close()
    assert head.startswith(b"HTTP/1.1 501 ")
    assert session().get(process.url + "/plain/x", timeout=5).status_code == 200
