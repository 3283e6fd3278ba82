"""Forwarding: send one request to one node and stream the answer back.

The transport is the urllib3 pool manager behind a ``requests`` ``HTTPAdapter``: one
pool per node, shared by every thread, sized to the thread count; its connections are
opened by urllib3 (TCP_NODELAY, TLS and its verification). The exchange on a connection
is ``kproxy.http1``'s: what requests' Session machinery and ``http.client`` do per
request for interactive use (environment merging, cookies, hooks, redirects, header
parsing through the ``email`` package, headers validated twice) cost more than the rest
of the gateway together (docs/performance.rst)::

    transport = Transport(pool_size=8, connect_timeout=3, read_timeout=60)
    response = transport.send(node, "GET", "/anything?x=1", headers, body=None)
    body = RelayedBody(response, exchange, on_close, client_socket)   # the WSGI answer

Header rules (RFC 9110 §7.6.1): hop-by-hop headers and every header named in
``Connection`` are dropped in both directions (``request_headers``, ``response_headers``).
Content encodings pass through untouched, redirects are returned, not followed.

A pooled connection is checked before reuse without a system call that gives up the GIL
(on Linux, the TCP state from ``TCP_INFO``: a node that closed it is seen), and after an
answer without a body (HEAD, 204, 304) with urllib3's ``poll()``, which also sees a body a
broken node sent anyway; one the node closes at the same moment as it is reused fails
before any answer, and a request that can be sent again (no body, idempotent method) is
then sent once more on a new connection, as browsers and Go's HTTP client do.
"""

from __future__ import annotations

import collections
import logging
import queue
import socket
import ssl
import sys
import time
from typing import IO, Any, Callable, Iterable, Iterator

import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ClosedPoolError, ConnectTimeoutError, NewConnectionError, SSLError
from urllib3.util.ssl_match_hostname import CertificateError

from . import http1
from .exchange import Exchange
from .http1 import BrokenBody, ClosedEarly, InvalidRequest, InvalidResponse, timed_out
from .node import Node

log = logging.getLogger("kproxy")

HOP_BY_HOP = frozenset({"connection", "proxy-connection", "keep-alive", "te", "trailer",
                        "transfer-encoding", "upgrade", "proxy-authenticate", "proxy-authorization"})
NO_BODY_STATUSES = frozenset({204, 304})
CHUNK_SIZE = 64 * 1024
# Request bodies go upstream in larger pieces: gunicorn, which reads ahead up to 1 MiB,
# copies what is left over on every read.
BODY_CHUNK_SIZE = 256 * 1024


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


class TLSPolicy:
    """How https nodes are verified: a CA bundle, the system CAs, or not at all."""

    def __init__(self, ca_file: str | None = None, verify: bool = True):
        if not verify:
            self.pool_kwargs = {"cert_reqs": "CERT_NONE", "assert_hostname": False}
        elif ca_file:
            self.pool_kwargs = {"cert_reqs": "CERT_REQUIRED", "ca_certs": ca_file}
        else:
            self.pool_kwargs = {"cert_reqs": "CERT_REQUIRED"}


_SO_MEMINFO = 55  # Linux: the socket's memory use; its first field is what waits to be read


def _idle(sock: socket.socket) -> bool:
    """The connection is open and nothing waits on it unread. tcpi_state, the first byte of
    struct tcp_info, is 1 for ESTABLISHED (a node that closed the connection left it in
    CLOSE_WAIT, or CLOSED after a reset); bytes a node sent after a complete answer wait in
    the receive queue, and would be read as the answer to the next request. getsockopt
    keeps the GIL, where urllib3's poll() would give it up."""
    return (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1) == b"\x01"
            and sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, 4) == b"\0\0\0\0")


_CHECK_BY_SOCKOPT = sys.platform == "linux" and hasattr(socket, "TCP_INFO")


class _ReuseCheck:
    """How a pooled connection is checked before reuse (mixed into urllib3's connections):
    reused only while it is younger than ``upstream_keepalive_timeout`` (so the node, whose
    keep-alive is longer, never closes it just as kproxy sends on it), open, and with
    nothing unread on it."""

    kproxy_read_timeout: float | None = None  # what the socket's SO_RCVTIMEO/SO_SNDTIMEO say
    kproxy_reuse_until = 0.0  # time.monotonic() past which the idle connection is not reused

    @property
    def is_connected(self) -> bool:
        sock = self.sock
        if sock is None or time.monotonic() > self.kproxy_reuse_until:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return False
        if _CHECK_BY_SOCKOPT:
            return _idle(sock)
        return HTTPConnection.is_connected.fget(self)  # poll(): readable means dropped or dirty


class _NodeConnection(_ReuseCheck, HTTPConnection):
    pass


class _TLSNodeConnection(_ReuseCheck, HTTPSConnection):
    pass


class IdleConnections:
    """A pool's idle connections, last in first out, for a pool that never blocks
    (``pool_block=False``): the ``queue.LifoQueue`` urllib3 uses by default takes a
    ``Condition`` for every get and put."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._items: collections.deque[Any] = collections.deque()

    def get(self, block: bool = False, timeout: float | None = None) -> Any:
        try:
            return self._items.pop()
        except IndexError:
            raise queue.Empty from None

    def put(self, item: Any, block: bool = False, timeout: float | None = None) -> None:
        if len(self._items) >= self.maxsize:
            raise queue.Full
        self._items.append(item)

    def qsize(self) -> int:
        return len(self._items)


class _NodePool(HTTPConnectionPool):
    ConnectionCls = _NodeConnection
    QueueCls = IdleConnections


class _TLSNodePool(HTTPSConnectionPool):
    ConnectionCls = _TLSNodeConnection
    QueueCls = IdleConnections


class UpstreamResponse(http1.Response):
    """A response whose connection goes back to its pool when the body is done."""

    __slots__ = ("_pool", "_conn", "_keepalive")

    def release_conn(self) -> None:
        """Give the connection back: for reuse if the body was read to its end, else closed."""
        conn, self._conn = self._conn, None
        if conn is not None:
            if self.reusable:
                conn.kproxy_reuse_until = time.monotonic() + self._keepalive
            else:
                conn.close()
            self._pool._put_conn(conn)


class Transport:
    """One pooled connection manager for every node; thread-safe."""

    def __init__(self, pool_size: int = 8, connect_timeout: float = 3.0, read_timeout: float = 60.0,
                 max_nodes: int = 1024, keepalive_timeout: float = 1.5):
        # pool_block=False: a burst beyond pool_size opens extra connections rather than
        # queueing requests behind a lock; only pool_size are kept for reuse.
        self._adapter = HTTPAdapter(pool_connections=max_nodes, pool_maxsize=pool_size,
                                    max_retries=0, pool_block=False)
        self._pools = self._adapter.poolmanager
        self._pools.pool_classes_by_scheme = {"http": _NodePool, "https": _TLSNodePool}
        self._max_nodes = max_nodes
        self._by_node: dict[tuple[str, int, str, TLSPolicy | None], HTTPConnectionPool] = {}
        self.timeout = self.timeouts(connect_timeout, read_timeout)
        self.keepalive_timeout = keepalive_timeout  # upstream_keepalive_timeout

    @staticmethod
    def timeouts(connect: float, read: float) -> urllib3.Timeout:
        return urllib3.Timeout(connect=connect, read=read)

    def send(self, node: Node, method: str, target: str, headers: dict[str, str],
             body: IO[bytes] | Iterable[bytes] | None = None, chunked: bool = False,
             scheme: str = "http", tls: TLSPolicy | None = None,
             replayable: bool = False) -> UpstreamResponse:
        """Send a request; the response's body is left unread for ``RelayedBody``.
        ``replayable``: the request may be sent twice (no body, idempotent method).

        Raises ConnectFailed when nothing was sent, ExchangeFailed afterwards,
        InvalidRequest for a request that cannot be written as it is."""
        pool = self._pool(node, scheme, tls)
        try:
            conn = pool._get_conn()
        except ClosedPoolError:  # the manager dropped the pool (more than max_nodes nodes)
            pool = self._pool(node, scheme, tls, renew=True)
            conn = pool._get_conn()
        if isinstance(body, BodyReader):
            body = iter(body)  # in BODY_CHUNK_SIZE pieces
        while True:
            reused = conn.sock is not None
            try:
                return self._exchange(pool, conn, node, method, target, headers, body, chunked)
            except ClosedEarly as e:
                conn.close()
                if not (reused and replayable):
                    pool._put_conn(conn)
                    raise ExchangeFailed(node, "bad_response", str(e)) from None
            except InvalidRequest:  # nothing was sent: the connection is as good as it was
                pool._put_conn(conn)
                raise
            except BaseException:
                conn.close()
                pool._put_conn(conn)
                raise
            # the node closed the pooled connection as it was reused: once more, on a new one
            replayable = False

    def _exchange(self, pool: HTTPConnectionPool, conn: HTTPConnection, node: Node, method: str, target: str,
                  headers: dict[str, str], body: Any, chunked: bool) -> UpstreamResponse:
        sock = self._connected(conn, node)
        try:
            try:
                http1.write_request(sock, method, target, headers, body, chunked, node.address)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the node may have answered already (a 413) and closed: read that
            response = http1.read_response(sock, method, UpstreamResponse, self.timeout.read_timeout)
        except InvalidResponse as e:
            raise ExchangeFailed(node, "bad_response", str(e)) from None
        except OSError as e:
            if timed_out(e):
                raise ExchangeFailed(node, "read_timeout", "read timed out") from None
            raise ExchangeFailed(node, "bad_response", e.strerror or type(e).__name__) from None
        response._pool, response._conn, response._keepalive = pool, conn, self.keepalive_timeout
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

    def _pool(self, node: Node, scheme: str, tls: TLSPolicy | None, renew: bool = False) -> HTTPConnectionPool:
        # the manager's own lookup builds a key from every pool setting on each call
        key = (node.host, node.port, scheme, tls)
        pool = None if renew else self._by_node.get(key)
        if pool is None:
            if len(self._by_node) >= self._max_nodes:
                self._by_node.clear()
            pool = self._by_node[key] = self._pools.connection_from_host(
                node.host, node.port, scheme, pool_kwargs=tls.pool_kwargs if tls else None)
        return pool

    def close(self) -> None:
        self._by_node.clear()
        self._adapter.close()


def _reason(error: BaseException) -> str:
    # urllib3 nests the OS error; its text ends with the useful part ("Connection refused")
    text = str(error.args[-1] if error.args else error)
    return text.rpartition(": ")[2] or type(error).__name__


# environ keys that never go upstream: hop-by-hop, Expect (the server answered
# 100 Continue itself), and what kproxy writes itself: the framing (from the body it
# read) and the Host (what pass_host says)
_NOT_FORWARDED = frozenset("HTTP_" + name.upper().replace("-", "_")
                           for name in HOP_BY_HOP | {"expect", "host", "content-length"})
# Connection may name any header as hop-by-hop, but not these: dropping the framing would
# send the body unframed (the upstream parses it as requests of its own), and the Host
# is not the client's to take away (RFC 9110 §7.6.1 lets a proxy refuse or ignore them)
_NEVER_HOP_BY_HOP = frozenset({"content-length", "transfer-encoding", "host"})
_header_names: dict[str, str] = {}  # environ key -> header name, as computed once


def connection_tokens(value: str | None) -> frozenset[str]:
    """The header names a ``Connection`` value makes hop-by-hop, lower-case."""
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",")) - _NEVER_HOP_BY_HOP


def request_headers(environ: dict) -> dict[str, str]:
    """Upstream request headers from a WSGI environ: end-to-end headers only, without
    Host and the framing, which the caller sets."""
    named = connection_tokens(environ.get("HTTP_CONNECTION"))
    headers: dict[str, str] = {}
    for key, value in environ.items():
        if key.startswith("HTTP_") and key not in _NOT_FORWARDED:
            name = _header_names.get(key)
            if name is None:
                name = key[5:].replace("_", "-").title()
                if len(_header_names) < 1024:  # client-chosen names: bounded
                    _header_names[key] = name
            if not named or name.lower() not in named:
                headers[name] = value
    if environ.get("CONTENT_TYPE") and "content-type" not in named:
        headers["Content-Type"] = environ["CONTENT_TYPE"]
    return headers


def response_headers(response: http1.Response) -> list[tuple[str, str]]:
    """End-to-end response headers in the order received, repeated ones (Set-Cookie)
    kept one per line. ``Content-Length`` goes to the client only as kproxy framed the
    body itself: a length the body was not framed by (one next to Transfer-Encoding) would
    make the client hang or misframe."""
    fields = response.headers
    dropped = HOP_BY_HOP
    for name, value in fields:
        if name.lower() == "connection":
            dropped = dropped | connection_tokens(value)
    if not response.framed_by_length:
        dropped = dropped | {"content-length"}
    return [(name, value) for name, value in fields if name.lower() not in dropped]


class RelayedBody:
    """The upstream body as a WSGI iterable: whatever one socket read gives, up to 64 KiB
    (event streams are not held back), still encoded. ``close`` (called by every WSGI
    server, also when the client went away) returns the connection to the pool if the
    body was read to the end, and drops it otherwise, so an abandoned stream never pins a
    pooled connection. An upstream that breaks off mid-body makes the client's connection
    end too, rather than a truncated body end as if it were complete."""

    __slots__ = ("_response", "_exchange", "_finish", "_client", "_done")

    def __init__(self, response: Any, exchange: Exchange, finish: Callable[[Exchange], None],
                 client: socket.socket | None):
        self._response, self._exchange, self._finish = response, exchange, finish
        self._client = client
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        exchange = self._exchange
        read1 = self._response.read1
        try:
            while chunk := read1(CHUNK_SIZE):
                exchange.bytes_sent += len(chunk)
                yield chunk
        except BrokenBody as e:
            exchange.error = f"upstream broke off mid-body: {e}"
            exchange.failures.append("broken_body")
            log.warning("upstream %s node %s: %s (request %s)", exchange.service,
                        exchange.node.address if exchange.node else "-", exchange.error, exchange.request_id)
            # The client must see a truncated answer, never a complete-looking one. Where the
            # server hands us its socket (gunicorn), end the connection here, quietly; elsewhere
            # raising is the only way to make the server abort it.
            if self._client is None:
                raise
            try:
                self._client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        self._response.release_conn()  # closed if not read to the end
        self._finish(self._exchange)


class BodyReader:
    """A request body as a file-like object that never reads past its length, fails loudly
    if the client goes away early (so the upstream is not left waiting), and stops a chunked
    body that grows past ``limit`` bytes."""

    def __init__(self, stream: IO[bytes], length: int | None, limit: int = 0):
        self._stream = stream
        self._remaining = length  # None: chunked, read to EOF
        self._limit = limit
        self._read = 0

    def read(self, size: int = -1) -> bytes:
        if self._remaining is not None and self._remaining <= 0:
            return b""
        want = CHUNK_SIZE if size < 0 else size
        if self._remaining is not None:
            want = min(want, self._remaining)
        try:
            data = self._stream.read(want)
        except Exception as e:  # each server has its own error for a client gone mid-body
            raise ClientDisconnected(f"client went away mid-body: {e}") from None
        if self._remaining is None:
            self._read += len(data)
            if self._limit and self._read > self._limit:
                raise BodyTooLarge(self._limit)
            return data
        if not data:
            raise ClientDisconnected(f"client sent {self._remaining} bytes less than its Content-Length")
        self._remaining -= len(data)
        return data

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(BODY_CHUNK_SIZE):
            yield chunk


class ClientDisconnected(Exception):
    pass


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(f"request body is larger than max_body_size ({limit} bytes)")
