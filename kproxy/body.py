"""Bodies: the request body read from the client, and the upstream's answer relayed as the
WSGI response iterable.

::

    body = BodyReader(environ["wsgi.input"], length=1024)      # never reads past its length
    answer = RelayedBody(response, record, on_close, client_socket)
"""

from __future__ import annotations

import logging
import socket
from typing import IO, Any, Callable, Iterator

from .record import RequestRecord
from .http1 import BrokenBody

log = logging.getLogger("kproxy")

CHUNK_SIZE = 64 * 1024
# Request bodies go upstream in larger pieces: gunicorn, which reads ahead up to 1 MiB,
# copies what is left over on every read.
BODY_CHUNK_SIZE = 256 * 1024


class RelayedBody:
    """The upstream body as a WSGI iterable: whatever one socket read gives, up to 64 KiB
    (event streams are not held back), still encoded; under gunicorn, the head of a
    stream whose body is not there yet is sent at once. ``close`` (called by every WSGI
    server, also when the client went away) returns the connection to the pool if the
    body was read to the end, and drops it otherwise, so an abandoned stream never pins a
    pooled connection. An upstream that breaks off mid-body makes the client's connection
    end too, rather than a truncated body end as if it were complete."""

    __slots__ = ("_response", "_record", "_finish", "_client", "_done")

    def __init__(self, response: Any, record: RequestRecord, finish: Callable[[RequestRecord], None],
                 client: socket.socket | None):
        self._response, self._record, self._finish = response, record, finish
        self._client = client
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        record = self._record
        response = self._response
        read1 = response.read1
        if self._client is not None and not response.framed_by_length and response.would_wait:
            # A stream (chunked, or up to the close) whose body did not come with its head:
            # the head goes to the client now, as nginx and Envoy send it, not with the first
            # event, however late that is. (An answer with a Content-Length keeps its head for
            # its first piece: many nodes write head and body apart, and one send is cheaper.)
            # The empty piece makes gunicorn write the head, which kproxy's worker holds back
            # for the next write: flush() sends it.
            yield b""
            flush = getattr(self._client, "flush", None)
            if flush is not None:
                flush()
        try:
            while chunk := read1(CHUNK_SIZE):
                record.bytes_sent += len(chunk)
                yield chunk
        except BrokenBody as e:
            record.error = f"upstream broke off mid-body: {e}"
            record.failures.append("broken_body")
            log.warning("upstream %s node %s: %s (request %s)", record.service,
                        record.node.address if record.node else "-", record.error, record.request_id)
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
        self._finish(self._record)


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
