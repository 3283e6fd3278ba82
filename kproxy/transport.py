"""The transport: send one request to one node, on a pooled connection, and read the head
of its answer; the body is left on the connection for ``body.RelayedBody``.

The exchange is ``kproxy.http1``'s: what requests' Session machinery and ``http.client`` do
per request for interactive use (environment merging, cookies, hooks, redirects, header
parsing through the ``email`` package, headers validated twice) cost more than the rest of
the gateway together (docs/performance.rst)::

    transport = Transport(pool_size=8, connect_timeout=3, read_timeout=60)
    response = transport.send(node, "GET", "/anything?x=1", headers, body=None)

Content encodings pass through untouched, redirects are returned, not followed. A pooled
connection that the node closes at the same moment as it is reused fails before any
answer; a request that can be sent again (no body, idempotent method) is then sent once
more on a new connection, as browsers and Go's HTTP client do.

A request that asks to switch protocols (``Upgrade``) is sent through ``transport.upgrades``:
its connection comes from the pool like any other's, but never goes back: after a 101
it is the tunnel's (``kproxy.tunnel``), after any other answer it is closed.
"""

from __future__ import annotations

import socket
import ssl
from typing import IO, Any, Iterable

import urllib3
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, SSLError
from urllib3.util.ssl_match_hostname import CertificateError

from . import http1, pool
from .body import BodyReader
from .http1 import ClosedEarly, InvalidRequest, InvalidResponse, timed_out
from .node import Node
from .pool import NodePools, TLSPolicy

NO_BODY_STATUSES = frozenset({204, 304})


class UpstreamFailure(Exception):
    """A failed exchange with a node. ``kind`` names it for metrics and logs:
    connect_refused, connect_timeout, tls, read_timeout, bad_response."""

    def __init__(self, node: Node, kind: str, reason: str):
        self.node, self.kind, self.reason = node, kind, reason
        super().__init__(f"{node.address}: {reason}")

    @property
    def timed_out(self) -> bool:
        return self.kind.endswith("timeout")


class ConnectFailed(UpstreamFailure):
    """The request never reached the node: safe to retry elsewhere, whatever the method."""


class ExchangeFailed(UpstreamFailure):
    """The request may have reached the node."""


class UpstreamResponse(http1.Response):
    """A response whose connection goes back to its pool when the body is done."""

    __slots__ = ("_pool", "_conn", "_keepalive")

    def release_conn(self) -> None:
        """Give the connection back: for reuse if the body was read to its end, else closed."""
        conn, self._conn = self._conn, None
        if conn is not None:
            if self.reusable:
                pool.reuse(self._pool, conn, self._keepalive)
            else:
                pool.discard(self._pool, conn)

    def take_socket(self) -> tuple[socket.socket, bytes]:
        """The connection of a 101 answer, for a tunnel: its socket, and what the node sent
        after the head. It never goes back to the pool; its place there is freed."""
        conn, self._conn = self._conn, None
        sock, conn.sock = conn.sock, None
        pool.discard(self._pool, conn)  # closes nothing: the socket is the tunnel's now
        return sock, self.take_buffered()


class Upgrades:
    """The transport as ``Upstream.send`` uses it for a request that asks to switch
    protocols: a 101 is an answer, and the connection is never reused afterwards."""

    __slots__ = ("_transport",)

    def __init__(self, transport: Transport):
        self._transport = transport

    def send(self, *args: Any, **kwargs: Any) -> UpstreamResponse:
        return self._transport.send(*args, upgrade=True, **kwargs)


class Transport:
    """One pooled connection manager for every node; thread-safe."""

    def __init__(self, pool_size: int = 8, connect_timeout: float = 3.0, read_timeout: float = 60.0,
                 max_nodes: int = 1024, keepalive_timeout: float = 1.5):
        self._pools = NodePools(pool_size, max_nodes)
        self.timeout = self.timeouts(connect_timeout, read_timeout)
        self.keepalive_timeout = keepalive_timeout  # upstream_keepalive_timeout
        self.upgrades = Upgrades(self)

    @staticmethod
    def timeouts(connect: float, read: float) -> urllib3.Timeout:
        return urllib3.Timeout(connect=connect, read=read)

    def send(self, node: Node, method: str, target: str, headers: dict[str, str],
             body: IO[bytes] | Iterable[bytes] | None = None, chunked: bool = False,
             scheme: str = "http", tls: TLSPolicy | None = None,
             replayable: bool = False, upgrade: bool = False) -> UpstreamResponse:
        """Send a request; the response's body is left unread for ``RelayedBody``.
        ``replayable``: the request may be sent twice (no body, idempotent method).
        ``upgrade``: the request asks to switch protocols (``Transport.upgrades``).

        Raises ConnectFailed when nothing was sent, ExchangeFailed afterwards,
        InvalidRequest for a request that cannot be written as it is."""
        node_pool, conn = self._pools.get(node, scheme, tls)
        if isinstance(body, BodyReader):
            body = iter(body)  # in BODY_CHUNK_SIZE pieces
        while True:
            reused = conn.sock is not None
            try:
                return self._exchange(node_pool, conn, node, method, target, headers, body, chunked, upgrade)
            except ClosedEarly as e:
                conn.close()
                if not (reused and replayable):
                    pool.discard(node_pool, conn)
                    raise ExchangeFailed(node, "bad_response", str(e)) from None
            except InvalidRequest:  # nothing was sent: the connection is as good as it was
                pool.keep(node_pool, conn)
                raise
            except BaseException:
                pool.discard(node_pool, conn)
                raise
            # the node closed the pooled connection as it was reused: once more, on a new one
            replayable = False

    def _exchange(self, node_pool: HTTPConnectionPool, conn: HTTPConnection, node: Node, method: str, target: str,
                  headers: dict[str, str], body: Any, chunked: bool, upgrade: bool = False) -> UpstreamResponse:
        sock = self._connected(conn, node)
        try:
            try:
                http1.write_request(sock, method, target, headers, body, chunked, node.address)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the node may have answered already (a 413) and closed: read that
            response = http1.read_response(sock, method, UpstreamResponse, self.timeout.read_timeout, upgrade)
        except InvalidResponse as e:
            raise ExchangeFailed(node, "bad_response", str(e)) from None
        except OSError as e:
            if timed_out(e):
                raise ExchangeFailed(node, "read_timeout", "read timed out") from None
            raise ExchangeFailed(node, "bad_response", e.strerror or type(e).__name__) from None
        response._pool, response._conn, response._keepalive = node_pool, conn, self.keepalive_timeout
        return response

    def _connected(self, conn: HTTPConnection, node: Node) -> socket.socket:
        """The connection's socket, connected, with the read timeout set for the kernel to
        enforce (one system call per read, where Python's timeouts add a poll to each)."""
        read_timeout = self.timeout.read_timeout
        if conn.sock is None:
            conn.timeout = self.timeout.connect_timeout
            try:
                conn.connect()
            except NewConnectionError as e:
                raise ConnectFailed(node, "connect_refused", _reason(e)) from None
            except (ConnectTimeoutError, TimeoutError):
                raise ConnectFailed(node, "connect_timeout", "connect timed out") from None
            except (ssl.SSLError, SSLError, CertificateError) as e:
                raise ConnectFailed(node, "tls", f"TLS: {_reason(e)}") from None
            except OSError as e:
                raise ConnectFailed(node, "connect_refused", _reason(e)) from None
            conn.sock.settimeout(None)
            conn.kproxy_read_timeout = None
        sock = conn.sock
        if conn.kproxy_read_timeout != read_timeout:
            limit = http1.timeval(read_timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
            conn.kproxy_read_timeout = read_timeout
        return sock

    def close(self) -> None:
        self._pools.close()


def _reason(error: BaseException) -> str:
    # urllib3 nests the OS error; its text ends with the useful part ("Connection refused")
    text = str(error.args[-1] if error.args else error)
    return text.rpartition(": ")[2] or type(error).__name__


