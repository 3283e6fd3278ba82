"""A recording upstream for the differential harness (tests/test_differential.py).

It parses every request kproxy sends on each kept-alive connection, strictly as RFC 9112
frames it (request line, CRLF header lines, a body by ``Content-Length`` or chunked), and
logs each one it parsed (``Recorded``); bytes it cannot parse are logged as such and end
the connection. Each answer names the request it answers (``X-Serial`` and a
``serial=N`` body), so a test can tell whether a client got the answer to its own request.

A request header ``X-Recording-Mode`` picks a hostile answer instead (``MODES``)::

    upstream = RecordingUpstream()
    ...  # requests through kproxy, one with "X-Recording-Mode: late:0.05"
    upstream.records           # [Recorded(serial=0, connection=0, method="GET", ...), ...]
    upstream.late_sent.wait()  # the late bytes are on kproxy's side of the socket

The client side of the harness reads kproxy's answers with the same parser
(``read_response``), so the framing kproxy gives its clients is held to the same rules.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass, field

from .conftest import RawUpstream

MODE_HEADER = "x-recording-mode"
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([^\x00-\x20\x7f]+) HTTP/1\.([01])")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [^\r\n]*)?")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
MAX_HEAD = 64 * 1024


class Unparsable(ValueError):
    """Bytes that are not a well-framed HTTP/1.1 message."""


class Closed(Exception):
    """The peer closed the connection between messages (or before any byte)."""


class Reader:
    """Buffered reads from one socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""

    def _more(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def head(self) -> bytes:
        """The next head, up to its empty line; Closed if the peer closed before a byte."""
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > MAX_HEAD:
                raise Unparsable("head larger than 64 KiB")
            if not self._more():
                if self.buffer:
                    raise Unparsable("closed in the middle of a head")
                raise Closed()
        head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
        return head

    def exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not self._more():
                raise Unparsable(f"closed with {n - len(self.buffer)} body bytes to come")
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > 8192 or not self._more():
                raise Unparsable("no CRLF-terminated line")
        line, self.buffer = self.buffer[:end], self.buffer[end + 2:]
        return line

    def to_close(self) -> bytes:
        while self._more():
            pass
        data, self.buffer = self.buffer, b""
        return data

    def chunked(self) -> bytes:
        body = b""
        for _ in range(100_000):
            line = self.line()
            size = line.partition(b";")[0]
            if not _HEX.fullmatch(size):
                raise Unparsable(f"invalid chunk size line {line[:40]!r}")
            n = int(size, 16)
            if n == 0:
                while self.line():  # trailer fields
                    pass
                return body
            body += self.exactly(n)
            if self.exactly(2) != b"\r\n":
                raise Unparsable("chunk data longer than its size")
        raise Unparsable("too many chunks")


def parse_fields(lines: list[bytes]) -> list[tuple[str, str]]:
    """Header lines as (name, value) in order; Unparsable for anything but ``token: value``
    without controls (no folding, no bare CR or LF)."""
    fields = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise Unparsable(f"invalid header line {line[:80]!r}")
        value = value.strip(b" \t")
        if re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", value):
            raise Unparsable(f"control character in header {name!r}")
        fields.append((name.decode("latin-1"), value.decode("latin-1")))
    return fields


def values(fields: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in fields if n.lower() == name]


def body_framing(fields: list[tuple[str, str]]) -> str:
    """How a message with these fields is framed: "length", "chunked" or "none"; Unparsable
    for both, more than one of either, or a coding other than chunked."""
    lengths, codings = values(fields, "content-length"), values(fields, "transfer-encoding")
    if lengths and codings:
        raise Unparsable("both Content-Length and Transfer-Encoding")
    if len(lengths) > 1 or len(codings) > 1:
        raise Unparsable("a framing header more than once")
    if lengths:
        if not lengths[0].isdigit():
            raise Unparsable(f"invalid Content-Length {lengths[0]!r}")
        return "length"
    if codings:
        if codings[0] != "chunked":
            raise Unparsable(f"Transfer-Encoding {codings[0]!r}")
        return "chunked"
    return "none"


@dataclass
class Recorded:
    """One request as the upstream parsed it; ``unparsed`` holds what it could not parse
    (then ``method`` is None) and ``error`` says why."""
    serial: int
    connection: int
    method: str | None = None
    target: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    framing: str = ""
    unparsed: bytes | None = None
    error: str = ""

    def header(self, name: str) -> str | None:
        found = values(self.headers, name.lower())
        return ",".join(found) if found else None


def read_request(reader: Reader) -> tuple[str, str, list[tuple[str, str]], bytes, str]:
    head = reader.head()
    lines = head.split(b"\r\n")
    request_line = _REQUEST_LINE.fullmatch(lines[0])
    if request_line is None:
        raise Unparsable(f"invalid request line {lines[0][:80]!r}")
    if re.search(rb"(?<!\r)\n|\r(?!\n)", head):
        raise Unparsable("a bare CR or LF in the head")
    fields = parse_fields(lines[1:])
    framing = body_framing(fields)
    if framing == "length":
        body = reader.exactly(int(values(fields, "content-length")[0]))
    elif framing == "chunked":
        body = reader.chunked()
    else:
        body = b""
    return request_line[1].decode(), request_line[2].decode("latin-1"), fields, body, framing


@dataclass
class Answer:
    """A response as a client read it."""
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    framing: str  # "length", "chunked", "none" or "close"
    keep_alive: bool
    interim: int = 0

    def header(self, name: str) -> str | None:
        found = values(self.headers, name.lower())
        return ",".join(found) if found else None

    @property
    def serial(self) -> int | None:
        value = self.header("x-serial")
        return int(value) if value is not None and value.lstrip("-").isdigit() else None


def read_response(reader: Reader, method: str = "GET") -> Answer:
    """The final answer (1xx skipped), framed strictly: a message with two framings, or a
    framing header twice, is Unparsable."""
    for interim in range(1000):
        head = reader.head()
        lines = head.split(b"\r\n")
        status_line = _STATUS_LINE.fullmatch(lines[0])
        if status_line is None:
            raise Unparsable(f"invalid status line {lines[0][:80]!r}")
        status = int(status_line[2])
        fields = parse_fields(lines[1:])
        if 100 <= status < 200:
            continue
        framing = body_framing(fields)
        connection = {t.strip().lower() for v in values(fields, "connection") for t in v.split(",")}
        keep_alive = "close" not in connection and (status_line[1] == b"1" or "keep-alive" in connection)
        if method == "HEAD" or status in (204, 304):
            body, framing = b"", "none"
        elif framing == "length":
            body = reader.exactly(int(values(fields, "content-length")[0]))
        elif framing == "chunked":
            body = reader.chunked()
        else:
            body, framing, keep_alive = reader.to_close(), "close", False
        return Answer(status, fields, body, framing, keep_alive, interim)
    raise Unparsable("endless interim answers")


# -- answers: the well-behaved one and the hostile modes --

def _answer(serial: int, method: str, extra: bytes = b"") -> bytes:
    body = b"serial=%d" % serial
    head = b"HTTP/1.1 200 OK\r\nX-Serial: %d\r\nContent-Length: %d\r\n%b\r\n" % (serial, len(body), extra)
    return head if method == "HEAD" else head + body


def _stale(serial: int) -> bytes:
    # what a confused node would send: a whole answer that names no request of the client's
    return b"HTTP/1.1 200 OK\r\nX-Serial: -%d\r\nContent-Length: 10\r\n\r\nstale-%04d" % (serial, serial % 10000)


def _chunked(serial: int, method: str, length: bytes = b"") -> bytes:
    body = b"serial=%d" % serial
    head = b"HTTP/1.1 200 OK\r\nX-Serial: %d\r\n%bTransfer-Encoding: chunked\r\n\r\n" % (serial, length)
    if method == "HEAD":
        return head
    return head + b"%x\r\n%b\r\n%x\r\n%b\r\n0\r\n\r\n" % (3, body[:3], len(body) - 3, body[3:])


class RecordingUpstream(RawUpstream):
    """``MODES`` (the ``X-Recording-Mode`` value, ``name`` or ``name:argument``):

    - ``ok`` (default): a ``Content-Length`` answer; ``chunked``: a chunked one;
    - ``late:SECONDS``: ``ok``, then after SECONDS a whole stale answer (``late_sent`` is set
      once it is written);
    - ``trailing``: ``ok`` with a stale answer in the same write;
    - ``te_cl``: chunked with a stale ``Content-Length: 1000`` as well;
    - ``control``: a ``\\x01`` in a header value;
    - ``trickle:SECONDS``: the head a byte at a time, SECONDS apart, never finished;
    - ``flood:N``: N interim answers (``100 Continue`` and ``103 Early Hints`` in turn)
      before ``ok``.
    """

    MODES = ("ok", "chunked", "late", "trailing", "te_cl", "control", "trickle", "flood")

    def __init__(self) -> None:
        self.records: list[Recorded] = []
        self.late_sent = threading.Event()
        self._lock = threading.Lock()
        self._serials = iter(range(1 << 62))
        self._connection_ids = iter(range(1 << 62))
        super().__init__(behaviour=lambda conn: None)

    def _handle(self, conn: socket.socket) -> None:
        with self._lock:
            connection = next(self._connection_ids)
        reader = Reader(conn)
        try:
            conn.settimeout(30)
            # each write on the wire at once: with Nagle, late bytes would wait for kproxy's
            # delayed ACK and arrive after the next request went out, where no proxy can
            # tell them from its answer
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(100_000):  # requests on one kept-alive connection
                try:
                    method, target, fields, body, framing = read_request(reader)
                except Closed:
                    return
                except Unparsable as e:
                    self._record(connection, unparsed=reader.buffer, error=str(e))
                    return
                record = self._record(connection, method=method, target=target, headers=fields, body=body,
                                      framing=framing)
                if not self._answer(conn, record):
                    return
        except OSError:
            pass
        finally:
            conn.close()

    def _record(self, connection: int, **fields: object) -> Recorded:
        with self._lock:
            record = Recorded(next(self._serials), connection, **fields)
            self.records.append(record)
        return record

    def _answer(self, conn: socket.socket, record: Recorded) -> bool:
        """Answer one request; False when the connection is done with."""
        mode, _, argument = (record.header(MODE_HEADER) or "ok").partition(":")
        serial, method = record.serial, record.method
        if mode == "chunked":
            conn.sendall(_chunked(serial, method))
        elif mode == "late":
            conn.sendall(_answer(serial, method))
            time.sleep(float(argument or 0.05))
            conn.sendall(_stale(serial))
            self.late_sent.set()
        elif mode == "trailing":
            conn.sendall(_answer(serial, method) + _stale(serial))
        elif mode == "te_cl":
            conn.sendall(_chunked(serial, method, length=b"Content-Length: 1000\r\n"))
        elif mode == "control":
            conn.sendall(_answer(serial, method, extra=b"X-Bad: a\x01b\r\n"))
        elif mode == "trickle":
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"s" * 200:
                conn.send(bytes([byte]))  # raises once kproxy has given up and closed
                time.sleep(float(argument or 0.2))
            return False
        elif mode == "flood":
            interim = [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"]
            conn.sendall(b"".join(interim[i % 2] for i in range(int(argument or 20))) + _answer(serial, method))
        else:
            conn.sendall(_answer(serial, method))
        return True

    def since(self, mark: int) -> list[Recorded]:
        with self._lock:
            return self.records[mark:]

    def mark(self) -> int:
        with self._lock:
            return len(self.records)
