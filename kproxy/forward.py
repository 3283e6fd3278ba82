"""Forwarding: send one request to one node and stream the answer back.

The transport is the urllib3 pool manager behind a ``requests`` ``HTTPAdapter``: one
pool per node, shared by every thread, sized to the thread count. Requests' Session
machinery (environment merging, cookies, hooks, redirects) is for interactive use and
would cost a third of the throughput here, so it is not on the path::

    transport = Transport(pool_size=8, connect_timeout=3, read_timeout=60)
    response = transport.send(node, "GET", "/anything?x=1", headers, body=None)
    body = RelayedBody(response, exchange, on_close, client_socket)   # the WSGI answer

Header rules (RFC 9110 §7.6.1): hop-by-hop headers and every header named in
``Connection`` are dropped in both directions (``request_headers``, ``response_headers``).
Content encodings pass through untouched, redirects are returned, not followed.
"""

from __future__ import annotations

import logging
import socket
from http.client import HTTPException
from typing import IO, Any, Callable, Iterable, Iterator

import urllib3
from requests.adapters import HTTPAdapter
from urllib3.exceptions import (ConnectTimeoutError, HTTPError, NewConnectionError, ProtocolError,
                                ReadTimeoutError, SSLError)
from urllib3.util import SKIP_HEADER

from .exchange import Exchange
from .node import Node

log = logging.getLogger("kproxy")

HOP_BY_HOP = frozenset({"connection", "proxy-connection", "keep-alive", "te", "trailer",
                        "transfer-encoding", "upgrade", "proxy-authenticate", "proxy-authorization"})
NO_BODY_STATUSES = frozenset({204, 304})
CHUNK_SIZE = 64 * 1024
# Request bodies go upstream in larger pieces: urllib3 would read a file 16 KiB at a time,
# and gunicorn, which reads ahead up to 1 MiB, copies what is left over on every read.
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


class Transport:
    """One pooled connection manager for every node; thread-safe."""

    def __init__(self, pool_size: int = 8, connect_timeout: float = 3.0, read_timeout: float = 60.0,
                 max_nodes: int = 1024):
        # pool_block=False: a burst beyond pool_size opens extra connections rather than
        # queueing requests behind a lock; only pool_size are kept for reuse.
        self._adapter = HTTPAdapter(pool_connections=max_nodes, pool_maxsize=pool_size,
                                    max_retries=0, pool_block=False)
        self._pools = self._adapter.poolmanager
        self.timeout = self.timeouts(connect_timeout, read_timeout)

    @staticmethod
    def timeouts(connect: float, read: float) -> urllib3.Timeout:
        return urllib3.Timeout(connect=connect, read=read)

    def send(self, node: Node, method: str, target: str, headers: dict[str, str],
             body: IO[bytes] | Iterable[bytes] | None = None, chunked: bool = False,
             scheme: str = "http", tls: TLSPolicy | None = None) -> urllib3.BaseHTTPResponse:
        """Send a request; the response's body is left unread for ``stream``.

        Raises ConnectFailed when nothing was sent, ExchangeFailed afterwards."""
        pool = self._pools.connection_from_host(node.host, node.port, scheme,
                                                pool_kwargs=tls.pool_kwargs if tls else None)
        # Below urlopen: it re-encodes the request-target (upper-cases %2f, encodes every
        # '%' once one is invalid), and a gateway must send the client's bytes as they came.
        # _get_conn/_make_request/_put_conn are the steps urlopen itself takes.
        conn = pool._get_conn()
        if isinstance(body, BodyReader):
            body = iter(body)  # in BODY_CHUNK_SIZE pieces, not urllib3's 16 KiB reads
        try:
            return pool._make_request(conn, method, target, body=body, headers=headers, retries=None,
                                      timeout=self.timeout, chunked=chunked, response_conn=conn,
                                      preload_content=False, decode_content=False)
        except BaseException as e:
            conn.close()
            pool._put_conn(conn)
            if isinstance(e, NewConnectionError):
                raise ConnectFailed(node, "connect_refused", _reason(e)) from None
            if isinstance(e, ConnectTimeoutError):
                raise ConnectFailed(node, "connect_timeout", "connect timed out") from None
            if isinstance(e, ReadTimeoutError):
                raise ExchangeFailed(node, "read_timeout", "read timed out") from None
            if isinstance(e, SSLError):
                raise ConnectFailed(node, "tls", f"TLS: {_reason(e)}") from None
            if isinstance(e, (HTTPException, HTTPError, OSError)):
                raise ExchangeFailed(node, "bad_response", _reason(e) or type(e).__name__) from None
            raise

    def close(self) -> None:
        self._adapter.close()


def _reason(error: BaseException) -> str:
    # urllib3 nests the OS error; its text ends with the useful part ("Connection refused")
    text = str(error.args[-1] if error.args else error)
    return text.rpartition(": ")[2] or type(error).__name__


def request_headers(environ: dict, host: str | None) -> dict[str, str]:
    """Upstream request headers from a WSGI environ: end-to-end headers only, ``Host`` as
    given (None: the client's). X-Forwarded-* are added by the caller."""
    headers: dict[str, str] = {}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers[key[5:].replace("_", "-").title()] = value
    if environ.get("CONTENT_TYPE"):
        headers["Content-Type"] = environ["CONTENT_TYPE"]
    if environ.get("CONTENT_LENGTH"):
        headers["Content-Length"] = environ["CONTENT_LENGTH"]
    # hop-by-hop, named in Connection, or Expect (the server answered 100 Continue itself)
    dropped = HOP_BY_HOP | {"expect"} | {t.strip().lower() for t in headers.get("Connection", "").split(",")}
    headers = {name: value for name, value in headers.items() if name.lower() not in dropped}
    if host is not None:
        headers["Host"] = host
    # urllib3 would add its own User-Agent and Accept-Encoding: send only what the client sent
    headers.setdefault("User-Agent", SKIP_HEADER)
    headers.setdefault("Accept-Encoding", SKIP_HEADER)
    return headers


def response_headers(response: urllib3.BaseHTTPResponse) -> list[tuple[str, str]]:
    """End-to-end response headers, repeated ones (Set-Cookie) kept one per line."""
    raw = response.headers
    dropped = set(HOP_BY_HOP)
    for value in raw.getlist("Connection"):
        dropped.update(t.strip().lower() for t in value.split(","))
    return [(name, value) for name, value in raw.iteritems() if name.lower() not in dropped]


def _body_chunks(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """The response body as it arrives (whatever one socket read gives, up to 64 KiB, so
    event streams are not held back), still encoded. Raises BrokenBody if the upstream
    breaks off mid-body, so that the client's connection is aborted rather than a truncated
    body ended as if it were complete."""
    try:
        while chunk := response.read1(CHUNK_SIZE, decode_content=False):
            yield chunk
    except (ProtocolError, HTTPError, HTTPException, OSError) as e:
        raise BrokenBody(_reason(e)) from None


class BrokenBody(Exception):
    """The upstream broke off mid-body."""


class RelayedBody:
    """The upstream body as a WSGI iterable. ``close`` (called by every WSGI server, also
    when the client went away) returns the connection to the pool if the body was read to
    the end, and drops it otherwise, so an abandoned stream never pins a pooled
    connection."""

    __slots__ = ("_response", "_exchange", "_finish", "_client", "_done")

    def __init__(self, response: Any, exchange: Exchange, finish: Callable[[Exchange], None],
                 client: socket.socket | None):
        self._response, self._exchange, self._finish = response, exchange, finish
        self._client = client
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        exchange = self._exchange
        try:
            for chunk in _body_chunks(self._response):
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
        if not self._response.isclosed():  # not read to the end: the connection cannot be reused
            self._response.close()
        self._response.release_conn()
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
