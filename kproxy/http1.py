"""HTTP/1.1 on one upstream connection: a request out, a response in (RFC 9112).

The connection comes from the urllib3 pool of requests' ``HTTPAdapter`` (which opens it,
with TLS verification for https nodes); this module writes the message and reads the
answer on its socket::

    write_request(sock, "GET", "/anything", {"Host": "sd.httpbin.org"}, default_host="10.0.0.7:80")
    response = read_response(sock, "GET")   # the head; the body is left on the socket
    response.status, response.reason, response.headers       # 200, "OK", [("Content-Type", ...)]
    while piece := response.read1(65536):                     # the body, de-chunked, as it arrives
        ...
    response.reusable                                          # True: the body was read to its end
                                                               # and the node keeps the connection

What ``http.client`` does per exchange for interactive use is not done here: its
response head is parsed through the ``email`` package and every header is validated
twice on the way out (docs/performance.rst). What a gateway must still do is:

- a request head is written only if the method and header names are tokens, no value can
  end a line early (``\\r``, ``\\n``, NUL) and the request-target has no space or
  control character (``InvalidRequest``);
- a response head must be well-formed HTTP/1.x within 64 KiB and 100 fields; folded
  lines are unfolded (RFC 9112 §5.2), 1xx interim answers skipped, and a body length
  that cannot be trusted (an invalid or disagreeing ``Content-Length``) is refused; a
  101 is final only for a request that asked for an upgrade (else refused);
- the body is framed as RFC 9112 §6.3 says: none (HEAD, 1xx, 204, 304), chunked, by
  ``Content-Length``, or up to the close of the connection (which then is not reused).

Timeouts are the socket's: the transport sets ``SO_RCVTIMEO``/``SO_SNDTIMEO`` on a blocking
socket, so a read that waits too long fails with ``BlockingIOError`` (``TimeoutError`` on
a socket with Python's own timeout; ``SSLWantReadError`` through TLS): ``timed_out()``
tells them apart from other errors.
"""

from __future__ import annotations

import math
import re
import socket
import ssl
import struct
import time
from typing import IO, Iterable, Mapping

MAX_HEAD = 64 * 1024
MAX_FIELDS = 100
MAX_INTERIM = 16      # 1xx answers skipped before the final one
MAX_LINE = 8 * 1024   # a chunk-size or trailer line
RECV_SIZE = 64 * 1024

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_TOKEN_TEXT = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TOKEN = re.compile(_TOKEN_TEXT)
# names joined with LF: a name with an LF in it passes here, and the line count check
# of request_head refuses it
_TOKENS = re.compile(f"{_TOKEN_TEXT}(?:\n{_TOKEN_TEXT})*")
_STATUS_LINE = re.compile(r"HTTP/1\.([01]) ([0-9]{3})(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?")
_CONTROL_IN_HEAD = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]").search  # LF ends lines
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
_NO_BODY_STATUSES = frozenset({204, 304})


class InvalidRequest(ValueError):
    """A request kproxy will not write as it is; says why."""


class InvalidResponse(ValueError):
    """A response head kproxy will not relay; says why."""


class ClosedEarly(Exception):
    """The node closed (or reset) the connection before a byte of an answer."""


class BrokenBody(Exception):
    """The node broke off, or broke the framing, mid-body."""


def timed_out(error: BaseException) -> bool:
    return isinstance(error, (BlockingIOError, TimeoutError, ssl.SSLWantReadError, ssl.SSLWantWriteError))


def timeval(seconds: float | None) -> bytes:
    """``SO_RCVTIMEO``/``SO_SNDTIMEO`` for a wait of at most ``seconds`` (None: no limit).
    Rounded up to a microsecond: a zero timeval means no limit to the kernel."""
    if seconds is None:
        return struct.pack("@ll", 0, 0)
    micros = max(1, math.ceil(seconds * 1_000_000))
    return struct.pack("@ll", micros // 1_000_000, micros % 1_000_000)


# -- the request --

def request_head(method: str, target: str, headers: Mapping[str, str], default_host: str,
                 framing: str | None) -> bytes:
    """The request line and header block. ``framing``: ``"chunked"`` to add
    ``Transfer-Encoding: chunked``, ``"empty"`` for a ``Content-Length: 0``, None to add
    nothing (the headers frame the body, or there is none)."""
    if _BAD_TARGET.search(target) or not target:
        raise InvalidRequest("the request-target has a space or a control character")
    if not _TOKEN.fullmatch(method) or (headers and not _TOKENS.fullmatch("\n".join(headers))):
        raise InvalidRequest("the method or a header name is not a token")
    lines = [f"{method} {target} HTTP/1.1"]
    if "Host" not in headers:
        lines.append(f"Host: {default_host}")
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    if framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
    elif framing == "empty":
        lines.append("Content-Length: 0")
    lines.append("\r\n")
    head = "\r\n".join(lines)
    # one CR and one LF per line, no NUL: nothing a client sent can start a line of its own
    if head.count("\n") != len(lines) or head.count("\r") != len(lines) or "\0" in head:
        raise InvalidRequest("a request header has a line break or NUL in it")
    try:
        return head.encode("latin-1")
    except UnicodeEncodeError:
        raise InvalidRequest("a request header is not ISO-8859-1 text") from None


def write_request(sock: socket.socket, method: str, target: str, headers: Mapping[str, str],
                  body: bytes | Iterable[bytes] | IO[bytes] | None = None, chunked: bool = False,
                  default_host: str = "") -> None:
    """Send a request: the head (with a small bytes body in the same ``send``), then the
    body, chunk-encoded when ``chunked``."""
    framing = "chunked" if chunked else None
    if body is None and not chunked and method in _METHODS_WITH_BODY and "Content-Length" not in headers:
        framing = "empty"  # some servers answer 411 to a POST that does not say it is empty
    head = request_head(method, target, headers, default_host, framing)
    if body is None:
        sock.sendall(head)
        return
    if isinstance(body, bytes):
        if chunked:
            body = _chunk(body) + b"0\r\n\r\n" if body else b"0\r\n\r\n"
        sock.sendall(head + body)
        return
    sock.sendall(head)
    for piece in body:
        if piece:
            sock.sendall(_chunk(piece) if chunked else piece)
    if chunked:
        sock.sendall(b"0\r\n\r\n")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


# -- the response --

def read_response(sock: socket.socket, method: str, response_class: type[Response] | None = None,
                  timeout: float | None = None, upgrade: bool = False) -> Response:
    """Read the final response head (skipping 1xx) and frame its body. ``timeout`` bounds
    the whole head, however slowly it trickles in; the socket's own timeout (which the
    caller set to the same value) then bounds each wait for body bytes. ``upgrade``: the
    request asked to switch protocols, so a 101 (with its ``Upgrade``) is a final answer,
    and whatever the answer, the connection is not reused (the node may have switched). Raises
    ``ClosedEarly`` if the connection closes before any byte, ``InvalidResponse`` for a head
    kproxy will not relay, ``TimeoutError`` past the deadline, and the socket's errors."""
    buffer = b""
    received = False
    deadline = None if timeout is None else time.monotonic() + timeout
    shortened = False  # SO_RCVTIMEO lowered to what is left of the deadline
    try:
        for _ in range(MAX_INTERIM + 1):
            while not (end := _head_end(buffer)):
                if len(buffer) > MAX_HEAD:
                    raise InvalidResponse(f"response head larger than {MAX_HEAD} bytes")
                if received and deadline is not None:  # a head in pieces: what is left of it
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("response head timed out")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(left))
                    shortened = True
                try:
                    data = sock.recv(RECV_SIZE)
                except ConnectionResetError:
                    if received:
                        raise
                    raise ClosedEarly("connection reset before any answer") from None
                if not data:
                    if received:
                        raise InvalidResponse("connection closed in the middle of the response head")
                    raise ClosedEarly("connection closed before any answer")
                received = True
                buffer += data
            if end[0] > MAX_HEAD:
                raise InvalidResponse(f"response head larger than {MAX_HEAD} bytes")
            head, buffer = buffer[:end[0]], buffer[end[1]:]
            response = (response_class or Response)(sock, method, *_parse_head(head), buffer)
            if upgrade:
                response._keep_alive = False
            if not 100 <= response.status < 200:
                return response
            if response.status == 101:
                if not upgrade:
                    raise InvalidResponse("101 Switching Protocols to a request that asked for no upgrade")
                if not any(name.lower() == "upgrade" and value for name, value in response.headers):
                    raise InvalidResponse("101 Switching Protocols without an Upgrade header")
                return response
        raise InvalidResponse(f"more than {MAX_INTERIM} interim (1xx) answers")
    finally:
        if shortened:  # each wait for body bytes gets the whole timeout again
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(timeout))


def _head_end(buffer: bytes) -> tuple[int, int] | None:
    """Where the head ends and the body starts, once the empty line has arrived."""
    line_end = buffer.find(b"\n")
    if line_end > 0 and buffer[line_end - 1] == 13:  # CRLF lines, as nearly every server sends
        end = buffer.find(b"\r\n\r\n")
        return (end, end + 4) if end >= 0 else None
    match = _HEAD_END.search(buffer) if line_end >= 0 else None  # bare LF lines (RFC 9112 §2.2)
    return (match.start(), match.end()) if match else None


_FRAMING = frozenset({"connection", "content-length", "transfer-encoding"})


def _parse_head(head: bytes) -> tuple[int, int, str, list[tuple[str, str]], list[tuple[str, str]]]:
    """Version, status, reason, the fields, and the fields that frame the body (lower-case
    names). Works on the head as text: latin-1 maps each byte to one character."""
    text = head.decode("latin-1").replace("\r\n", "\n")
    if _CONTROL_IN_HEAD(text):  # RFC 9110 §5.5: a field value has no control but HTAB
        raise InvalidResponse("a response header has a control character in it")
    lines = text.split("\n")
    status_line = _STATUS_LINE.fullmatch(lines[0])
    if status_line is None:
        raise InvalidResponse(f"invalid status line {lines[0][:80]!r}")
    version = 10 + int(status_line[1])
    status = int(status_line[2])
    if status < 100:
        raise InvalidResponse(f"invalid status code {status}")
    if len(lines) - 1 > MAX_FIELDS:
        raise InvalidResponse(f"more than {MAX_FIELDS} response header fields")
    fields: list[tuple[str, str]] = []
    framing: list[int] = []  # where the fields that frame the body are
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            if not fields:
                raise InvalidResponse("response head starts with a folded line")
            name, value = fields[-1]  # obs-fold: joined with a space (RFC 9112 §5.2)
            more = line.strip(" \t")
            fields[-1] = (name, f"{value} {more}" if value and more else value or more)
            continue
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise InvalidResponse(f"invalid response header line {line[:80]!r}")
        if name.lower() in _FRAMING:
            framing.append(len(fields))
        fields.append((name, value.strip(" \t")))
    return version, status, (status_line[3] or "").strip(), fields, [
        (fields[i][0].lower(), fields[i][1]) for i in framing]


class Response:
    """A response head, and its body still on the socket (``read1``)."""

    __slots__ = ("status", "reason", "version", "headers", "framed_by_length", "_sock", "_buffer", "_pos", "_mode", "_left",
                 "_chunk_ended", "_done", "_keep_alive")

    def __init__(self, sock: socket.socket, method: str, version: int, status: int, reason: str,
                 headers: list[tuple[str, str]], framing: list[tuple[str, str]], buffer: bytes):
        self.status, self.reason, self.version, self.headers = status, reason, version, headers
        self._sock = sock
        self._buffer, self._pos = buffer, 0  # bytes read past the head; _pos: how many were used
        self._done = False
        connection, lengths, codings = set(), [], []
        for lowered, value in framing:
            if lowered == "connection":
                connection.update(t.strip().lower() for t in value.split(","))
            elif lowered == "content-length":
                lengths.extend(v.strip() for v in value.split(","))
            elif lowered == "transfer-encoding":
                codings.extend(t.strip().lower() for t in value.split(","))
        self._keep_alive = "close" not in connection and (version == 11 or "keep-alive" in connection)
        self._left, self._chunk_ended = 0, False
        if len(lengths) > 1:  # nginx and Envoy refuse them too, even when they agree
            raise InvalidResponse("more than one Content-Length")
        if lengths and not (lengths[0].isdigit() and lengths[0].isascii()):
            raise InvalidResponse(f"invalid Content-Length {lengths[0][:40]!r}")
        if codings and codings != ["chunked"]:
            # a transfer coding kproxy would have to undo (gzip, ...) or a repeated chunked
            raise InvalidResponse(f"Transfer-Encoding {', '.join(codings)[:40]!r} is not chunked")
        self.framed_by_length = not codings
        if method == "HEAD" or status < 200 or status in _NO_BODY_STATUSES:
            self._mode = "none"
        elif codings:
            # Transfer-Encoding overrides Content-Length (RFC 9112 §6.3); a message with
            # both is relayed without the length, and its connection is not reused
            self._mode = "chunked"
            if lengths:
                self._keep_alive = False
        elif lengths:
            self._mode, self._left = "length", int(lengths[0])
        else:
            self._mode = "close"
            self._keep_alive = False
            self.framed_by_length = False
        if self._mode == "none" or (self._mode == "length" and self._left == 0):
            self._end()

    @property
    def reusable(self) -> bool:
        """The body was read to its end and the connection can carry another request."""
        return self._done and self._keep_alive

    @property
    def would_wait(self) -> bool:
        """No body byte is at hand: the next ``read1`` waits for the node (a stream, a long poll)."""
        return not self._done and self._pos >= len(self._buffer)

    def take_buffered(self) -> bytes:
        """What was read past the head and not handed out: after a 101, the first bytes of
        the new protocol."""
        data, self._buffer, self._pos = self._buffer[self._pos:], b"", 0
        return data

    def read1(self, size: int = RECV_SIZE) -> bytes:
        """Up to ``size`` body bytes: what is buffered, or what one read gives; ``b""`` at
        the end. Raises ``BrokenBody`` when the node breaks off or breaks the framing."""
        if self._done:
            return b""
        try:
            if self._mode == "length":
                return self._read_length(size)
            if self._mode == "chunked":
                return self._read_chunked(size)
            data = self._read(size)
            if not data:
                self._done = True
            return data
        except BrokenBody:
            self._done, self._keep_alive = True, False
            raise
        except OSError as e:
            self._done, self._keep_alive = True, False
            raise BrokenBody("read timed out" if timed_out(e) else (e.strerror or type(e).__name__)) from None

    def _end(self) -> None:
        self._done = True
        if self._pos < len(self._buffer):  # bytes after a complete answer: out of step
            self._keep_alive = False

    def _read(self, size: int) -> bytes:
        """What is buffered, up to ``size`` bytes, else one read from the socket."""
        if self._pos < len(self._buffer):
            data = self._buffer[self._pos:self._pos + size]
            self._pos += len(data)
            return data
        return self._sock.recv(size)

    def _read_length(self, size: int) -> bytes:
        data = self._read(min(size, self._left))
        if not data:
            raise BrokenBody(f"connection closed with {self._left} bytes of the body still to come")
        self._left -= len(data)
        if self._left == 0:
            self._end()
        return data

    def _read_chunked(self, size: int) -> bytes:
        while self._left == 0:
            if self._chunk_ended:  # the CRLF after a chunk's data, read when more is wanted
                self._chunk_ended = False
                if self._line():
                    raise BrokenBody("chunk data longer than its size")
            line = self._line()
            size_text = line.partition(b";")[0].strip(b" \t")
            if not _HEX.fullmatch(size_text):
                raise BrokenBody(f"invalid chunk size line {line[:40]!r}")
            self._left = int(size_text, 16)
            if self._left == 0:
                while self._line():  # trailer fields: not relayed (WSGI has no trailers)
                    pass
                self._end()
                return b""
        data = self._read(min(size, self._left))
        if not data:
            raise BrokenBody("connection closed in the middle of a chunk")
        self._left -= len(data)
        self._chunk_ended = self._left == 0
        return data

    def _line(self) -> bytes:
        while (end := self._buffer.find(b"\n", self._pos)) < 0:
            if len(self._buffer) - self._pos > MAX_LINE:
                raise BrokenBody("chunk framing line too long")
            data = self._sock.recv(RECV_SIZE)
            if not data:
                raise BrokenBody("connection closed in the chunk framing")
            self._buffer, self._pos = self._buffer[self._pos:] + data, 0
        line = self._buffer[self._pos:end]
        self._pos = end + 1
        return line[:-1] if line.endswith(b"\r") else line
