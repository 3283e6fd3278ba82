"""Upgrade tunnels: a WebSocket, or any other protocol a node accepts with 101, relayed
byte for byte between the client and the node, from one poller thread per process.

A request that asks to switch protocols (``headers.upgrade_protocol``) is forwarded with
``Upgrade`` and ``Connection: upgrade`` (``Transport.upgrades``). When the node answers
101, ``start`` takes the client's connection from the server (``hand_over``), writes the
node's 101 to the client and gives both connections to the ``Relay``; any other answer
is relayed as usual. The server must hand its connection over: kproxy's gunicorn worker
does (``ClientSocket.take_over``); any other (``KProxyMiddleware`` under another server,
a TLS listener) gets a 501 ``upgrade_not_supported`` before the node is asked.

The relay reads each side only while what it read from there before has been written
to the other side (at most ``CHUNK`` bytes wait per direction: a side that does not read
slows the other down instead of filling memory). An end of stream one way is passed on
with ``shutdown(SHUT_WR)``, and the tunnel closes when both ways have ended, when either
side resets or fails, or after ``tunnel_idle_timeout`` seconds without a byte either way.
Its request is then recorded (access log, metrics) with the tunnel's duration.
"""

from __future__ import annotations

import collections
import logging
import os
import selectors
import socket
import ssl
import threading
import time
from typing import Any, Callable, Iterable

from . import metrics
from .headers import response_headers
from .record import RequestRecord

log = logging.getLogger("kproxy")

CHUNK = 64 * 1024
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError, InterruptedError)
_NOT_RELAYED = frozenset({"content-length", "transfer-encoding"})  # a 101 has no body

TakeOver = Callable[[], "tuple[socket.socket, bytes]"]


def hand_over(environ: dict) -> TakeOver | None:
    """How to take the client's connection from the server, if it can give it."""
    return getattr(environ.get("gunicorn.socket"), "take_over", None)


def start(start_response: Callable, response: Any, record: RequestRecord, take_over: TakeOver,
          finish: Callable[[RequestRecord], None], idle_timeout: float) -> Iterable[bytes]:
    """Answer a 101 and tunnel from then on. ``response``: the node's 101
    (``UpstreamResponse``); ``finish`` records the request when the tunnel closes."""
    upgrade = next(value for name, value in response.headers if name.lower() == "upgrade")
    headers = [(name, value) for name, value in response_headers(response) if name.lower() not in _NOT_RELAYED]
    headers += [("Upgrade", upgrade), ("Connection", "upgrade"), ("X-Request-Id", record.request_id)]
    reason = response.reason or "Switching Protocols"
    head = "".join([f"HTTP/1.1 101 {reason}\r\n", *(f"{n}: {v}\r\n" for n, v in headers), "\r\n"])
    upstream_sock, upstream_early = response.take_socket()
    client_sock, client_early = take_over()
    record.status = 101
    # the server's own bookkeeping (its access log); what it writes reaches nothing
    start_response(f"101 {reason}", [(n, v) for n, v in headers if n.lower() not in ("upgrade", "connection")])
    tunnel = Tunnel(client_sock, upstream_sock, head.encode("latin-1"), upstream_early, client_early,
                    record, finish, idle_timeout)
    relay().add(tunnel)
    return []


class _Side:
    """One connection of a tunnel: what waits to be written to it, and whether it still
    reads and may still be written to."""

    __slots__ = ("sock", "name", "tunnel", "out", "reading", "writing", "events", "peer", "received")

    def __init__(self, sock: socket.socket, name: str, tunnel: Tunnel, out: bytes):
        self.sock, self.name, self.tunnel = sock, name, tunnel
        self.out: bytes | memoryview = out
        self.reading = self.writing = True
        self.events = 0
        self.peer: _Side = self
        self.received = 0  # bytes read from this side (and so relayed to the other)


class Tunnel:
    """Two connections relayed both ways; used by the relay thread only."""

    __slots__ = ("client", "upstream", "record", "finish", "idle_timeout", "last", "closed", "why")

    def __init__(self, client: socket.socket, upstream: socket.socket, head: bytes, upstream_early: bytes,
                 client_early: bytes, record: RequestRecord, finish: Callable[[RequestRecord], None],
                 idle_timeout: float):
        for sock in (client, upstream):
            sock.setblocking(False)
        self.client = _Side(client, "client", self, head + upstream_early)
        self.upstream = _Side(upstream, "upstream", self, client_early)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.upstream.received, self.client.received = len(upstream_early), len(client_early)
        self.record, self.finish, self.idle_timeout = record, finish, idle_timeout
        self.last = time.monotonic()
        self.closed = False
        self.why: str | None = None

    def ended(self) -> bool:
        return not (self.client.reading or self.upstream.reading or self.client.out or self.upstream.out)

    def pull(self, side: _Side) -> None:
        """Read what ``side`` sent and pass it on (as much of it as the other takes now)."""
        peer = side.peer
        for _ in range(4):  # TLS may hold more than the kernel shows: a few reads, bounded
            try:
                data = side.sock.recv(CHUNK)
            except _WOULD_BLOCK:
                return
            if not data:
                side.reading = False
                if not peer.out:
                    _shut(peer)
                return
            side.received += len(data)
            self.last = time.monotonic()
            peer.out = data
            self.push(peer)
            if peer.out or not (isinstance(side.sock, ssl.SSLSocket) and side.sock.pending()):
                return

    def push(self, side: _Side) -> None:
        """Write what waits for ``side``; once the other side's stream ended and all of it
        was written, pass the end on."""
        while side.out:
            try:
                sent = side.sock.send(side.out)
            except _WOULD_BLOCK:
                return
            side.out = memoryview(side.out)[sent:] if sent < len(side.out) else b""
        if not side.peer.reading and side.writing:
            _shut(side)


def _shut(side: _Side) -> None:
    side.writing = False
    try:
        side.sock.shutdown(socket.SHUT_WR)
    except OSError:  # the other end is gone already: the reads will say so
        pass


class Relay:
    """Every tunnel of this process, relayed by one thread from one selector. ``add`` may
    be called from any thread."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, _READ, None)
        self._incoming: collections.deque[Tunnel] = collections.deque()
        self.tunnels: set[Tunnel] = set()
        self._thread = threading.Thread(target=self._run, name="kproxy-tunnels", daemon=True)
        self._thread.start()

    def add(self, tunnel: Tunnel) -> None:
        metrics.tunnel_opened(tunnel.record.service)
        self._incoming.append(tunnel)
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:  # a wake-up is pending already
            pass

    def _run(self) -> None:
        next_check = time.monotonic() + 1.0
        while True:
            for key, mask in self._selector.select(max(next_check - time.monotonic(), 0.0)):
                side = key.data
                if side is None:
                    self._adopt()
                elif not side.tunnel.closed:
                    self._guarded(side.tunnel, side, mask)
            now = time.monotonic()
            if now >= next_check:  # idle tunnels: looked for once a second
                next_check = now + 1.0
                for tunnel in [t for t in self.tunnels if now - t.last > t.idle_timeout]:
                    tunnel.why = "idle timeout"
                    self._close(tunnel)

    def _adopt(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while self._incoming:
            tunnel = self._incoming.popleft()
            self.tunnels.add(tunnel)
            self._guarded(tunnel, None, 0)

    def _guarded(self, tunnel: Tunnel, side: _Side | None, mask: int) -> None:
        try:
            self._step(tunnel, side, mask)
        except Exception:  # one tunnel's surprise must not stop the thread every tunnel needs
            log.exception("tunnel %s failed", tunnel.record.request_id)
            tunnel.why = "relay error"
            if not tunnel.closed:
                self._close(tunnel)

    def _step(self, tunnel: Tunnel, side: _Side | None, mask: int) -> None:
        try:
            if side is None:  # new: the 101 and whatever came early, each way
                tunnel.push(tunnel.client)
                tunnel.push(tunnel.upstream)
            else:
                if mask & _WRITE:
                    tunnel.push(side)
                if mask & _READ and side.reading:
                    tunnel.pull(side)
        except OSError as e:  # a reset or a failed write: the tunnel ends both ways
            tunnel.why = f"{side.name if side else 'relay'}: {e.strerror or type(e).__name__}"
            self._close(tunnel)
            return
        if tunnel.ended():
            self._close(tunnel)
            return
        for each in (tunnel.client, tunnel.upstream):
            wanted = (_READ if each.reading and not each.peer.out else 0) | (_WRITE if each.out else 0)
            if wanted != each.events:
                if not each.events:
                    self._selector.register(each.sock, wanted, each)
                elif wanted:
                    self._selector.modify(each.sock, wanted, each)
                else:
                    self._selector.unregister(each.sock)
                each.events = wanted

    def _close(self, tunnel: Tunnel) -> None:
        tunnel.closed = True
        self.tunnels.discard(tunnel)
        for each in (tunnel.client, tunnel.upstream):
            if each.events:
                each.events = 0
                try:
                    self._selector.unregister(each.sock)
                except (KeyError, ValueError):
                    pass
            try:
                each.sock.close()
            except OSError:
                pass
        record = tunnel.record
        record.bytes_sent, record.bytes_received = tunnel.upstream.received, tunnel.client.received
        if tunnel.why:
            record.error = f"tunnel closed: {tunnel.why}"
        try:
            metrics.tunnel_closed(record.service, tunnel.client.received, tunnel.upstream.received)
            tunnel.finish(record)
        except Exception:  # the relay thread must outlive any one tunnel's bookkeeping
            log.exception("recording tunnel %s failed", record.request_id)


_relay: Relay | None = None
_relay_lock = threading.Lock()


def relay() -> Relay:
    """This process's relay, started by its first tunnel (after any fork)."""
    global _relay
    with _relay_lock:
        if _relay is None:
            _relay = Relay()
        return _relay


def _forked() -> None:
    global _relay
    _relay = None  # its thread did not survive the fork


os.register_at_fork(after_in_child=_forked)
