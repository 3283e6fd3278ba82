"""gunicorn's ``gthread`` worker, with deadlines for slow clients and fewer system calls.

A gthread worker parks idle keep-alive connections in a poller, but it hands a new
connection to a thread at once (which then waits up to 5 s for its first byte), and once
a request has started, a thread reads and writes with no time limit: clients that connect
and say nothing, trickle a header byte a second (slowloris) or stop reading their answer
each hold a thread, and ``threads`` of them stop the worker. This worker bounds that:

- a request head is read by the worker's main thread, in its poller: a new connection
  waits there for its first byte (at most ``keepalive_timeout`` seconds, then it is
  closed), and whatever part of a head has arrived is kept in the connection's buffer
  (``ClientSocket.read_ahead``) until the head is whole (its empty line came), until
  gunicorn's parser can refuse it as it stands (a bare LF, a head over gunicorn's limits:
  its 4xx), or until the client closes. Only then does a thread take the connection, and
  the parser reads the buffered bytes first: a client that trickles its head never holds
  a thread;
- ``client_header_timeout``: the whole request head must arrive within this many seconds
  of its first byte, or the main thread answers 408 and closes the connection. A head
  that arrived whole waits for a request thread at most ``queue_timeout`` seconds, then
  is answered 503 ``overloaded`` (``kproxy.threads``: threads are made as requests come,
  up to ``threads``);
- ``client_body_timeout``: while a body is read, each read may wait this long;
- ``client_send_timeout``: each write of an answer may wait this long for a client that
  does not read.

so a slow client holds a thread only for a body or an answer, and only as long as it keeps
the bytes moving, and ``threads`` bounds how many it can hold at once. ``kproxy serve``
and ``conf/gunicorn.conf.py`` both use it (``worker_class``). A TLS listener (gunicorn's
``--certfile``) is served as gthread does, on gunicorn's own sockets, without these
deadlines (docs/security.rst).

A kept-alive connection is parked in the poller by the thread that served it, where
gthread asks the main thread to do it (a pipe write and a wake-up of the main thread for
every request); closing a connection, and everything at shutdown, stays with the main
thread.

Every system call a request thread makes gives up the GIL, and with eight threads a
given-up GIL often goes to another thread, so the caller waits to get it back: system
calls, not Python, were most of what a proxied request cost (docs/performance.rst). So
a client socket stays in blocking mode for its whole life and the kernel enforces the
timeouts (``SO_RCVTIMEO``, ``SO_SNDTIMEO``): a read is one ``recv``, where Python's own
timeouts cost a ``poll`` before every read and write and an ``ioctl`` for every change
of mode; and the response head goes out in the same ``send`` as the first piece of the
body. The head's read moved to the main thread, not added to it: the one non-blocking
``recv`` there replaces the thread's first ``recv`` (and, for a new connection, the
throw-away selector gthread used to ask whether a byte had come).

A request that switches protocols (a WebSocket, any ``Upgrade`` the node accepts) takes
its connection from the worker (``ClientSocket.take_over``, through the environ's
``gunicorn.socket``) with the bytes read past its head; the worker then finishes the
request without keeping the connection alive or closing it, and no longer counts it
among its connections: ``kproxy.tunnel`` relays it from a poller thread of its own.

This module is kproxy's one adapter to gunicorn's internals: the gthread worker above, and
the few parts of the arbiter (the master) that ``kproxy.server``'s hooks reach, at the
end. tests/test_contracts.py pins every name it uses.
"""

from __future__ import annotations

import errno
import json
import selectors
import socket
import time
from functools import partial
from typing import Any, Callable

from gunicorn.http.errors import NoMoreData
from gunicorn.http.message import DEFAULT_MAX_HEADERFIELD_SIZE, MAX_HEADERS, MAX_REQUEST_LINE
from gunicorn.workers.gthread import ThreadWorker

from .http1 import timeval
from .record import RequestRecord
from .request import new_request_id
from .threads import RequestThreads

REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_NO_LIMIT = timeval(None)
COALESCE_LIMIT = 64 * 1024  # a held head is joined to a body piece up to this size (a copy)
HEAD_READ = 8192  # one read of a request head by the main thread (gunicorn's own read size)


class ClientSocket:
    """A client socket whose reads obey a deadline (head) or an idle timeout (body), and
    whose writes obey a send timeout; the kernel enforces them on a socket that stays
    blocking. gunicorn's own ``setblocking``/``settimeout`` calls (its poller, its body
    drain) are recorded, not applied: a read honours the timeout they set.

    ``hold_next_write()`` keeps the next write back until the one after it (or a read, or
    ``flush()``), so that a response head and its first body piece leave in one ``send``.

    ``read_ahead()`` (the worker's main thread, gathering a request head) keeps what it
    reads in a buffer that ``recv`` hands out before it reads the socket again.

    ``take_over()`` hands the connection to an Upgrade tunnel (``kproxy.tunnel``)."""

    __slots__ = ("_sock", "deadline", "idle_timeout", "send_timeout", "_timeout", "_rcvtimeo",
                 "_holding", "_held", "_ahead", "unreader", "taken")

    def __init__(self, sock: socket.socket, send_timeout: float):
        self._sock = sock
        sock.setblocking(True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(send_timeout))
        self.send_timeout = send_timeout
        self.deadline: float | None = None
        self.idle_timeout: float | None = None
        self._timeout: float | None = None  # what gunicorn asked for
        self._rcvtimeo: bytes = _NO_LIMIT   # what the kernel has
        self._holding = False
        self._held: bytes | None = None
        self._ahead: bytes | bytearray = b""  # read, not yet handed out by recv()
        self.unreader: Any = None  # gunicorn's parser buffer of the request being served
        self.taken = False

    # -- what gunicorn sets --

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def settimeout(self, value: float | None) -> None:
        self._timeout = value

    def gettimeout(self) -> float | None:
        return self._timeout

    # -- reads --

    def recv(self, size: int, flags: int = 0) -> bytes:
        if self._held is not None:
            self.flush()
        ahead = self._ahead
        if ahead:
            if len(ahead) <= size:
                self._ahead = b""
                return ahead if type(ahead) is bytes else bytes(ahead)
            self._ahead = ahead[size:]
            return bytes(ahead[:size])
        limit, ours = self._timeout, False
        if self.deadline is not None:
            # past the deadline, only what already arrived is read (a zero timeout)
            remaining = max(self.deadline - time.monotonic(), 0.0)
            if limit is None or remaining <= limit:
                limit, ours = remaining, True
        elif self.idle_timeout is not None and (limit is None or self.idle_timeout <= limit):
            limit, ours = self.idle_timeout, True
        if limit == 0.0:
            flags |= socket.MSG_DONTWAIT
        else:
            wanted = timeval(limit)
            if wanted != self._rcvtimeo:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, wanted)
                self._rcvtimeo = wanted
        try:
            return self._sock.recv(size, flags)
        except BlockingIOError:  # the kernel's timeout ran out, or nothing was there
            if ours:
                self._give_up()
            if limit == 0.0:
                raise
            raise TimeoutError("timed out") from None

    def _give_up(self) -> None:
        if self.deadline is not None:  # still in the head: say why before closing
            self._send_quietly(REQUEST_TIMEOUT)
        # gunicorn treats this as a client that went away: closed quietly, no traceback
        raise NoMoreData(b"client too slow")

    def _send_quietly(self, answer: bytes) -> None:
        try:
            self._sock.send(answer, socket.MSG_DONTWAIT)
        except OSError:
            pass

    # -- the request head, gathered by the worker's main thread --

    @property
    def ahead(self) -> bytes | bytearray:
        """What was read and not yet handed out by ``recv``."""
        return self._ahead

    def unread(self, data: bytes) -> None:
        """Give back bytes read from this connection: ``recv`` hands them out first."""
        if data:
            self._ahead = data + self._ahead

    def read_ahead(self) -> bool | None:
        """One read of what has arrived, without waiting, kept for ``recv``: True if bytes
        came, False at the end of the stream (or a reset), None if none were there."""
        try:
            data = self._sock.recv(HEAD_READ, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError:  # reset by the client: as closed
            return False
        if not data:
            return False
        if not self._ahead:
            self._ahead = data
        else:  # a head in pieces: appended in place, not copied whole for each piece
            if type(self._ahead) is bytes:
                self._ahead = bytearray(self._ahead)
            self._ahead += data
        return True

    def send_refusal(self, answer: bytes) -> None:
        """Send an answer that ends the connection (the caller closes it), the request unread."""
        self._ahead = b""
        self._send_quietly(answer)
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def time_out(self) -> None:
        """Answer 408 without waiting: the head's deadline passed. The caller closes."""
        try:  # what came meanwhile is read away, so that closing sends a FIN, not a reset
            self._sock.recv(65536, socket.MSG_DONTWAIT)
        except OSError:
            pass
        self._send_quietly(REQUEST_TIMEOUT)
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # -- an Upgrade tunnel --

    def take_over(self) -> tuple[socket.socket, bytes]:
        """The connection, for a tunnel: its socket, and the bytes the client sent after the
        request (read by gunicorn's parser or by the main thread, not yet used). From now
        on this object writes, reads and closes nothing, so the worker can finish the
        request as it does any other (and must not keep it alive: ``handle_request``)."""
        early = (self.unreader.take_buffered() if self.unreader is not None else b"") + bytes(self._ahead)
        sock, self._sock = self._sock, _HANDED_OVER
        self._ahead, self._held, self._holding, self.taken = b"", None, False, True
        return sock, early

    # -- writes --

    def hold_next_write(self) -> None:
        self._holding = True

    def sendall(self, data: bytes, flags: int = 0) -> None:
        if self._holding:
            self._holding = False
            self._held = bytes(data)
            return
        held = self._held
        if held is not None:
            self._held = None
            if len(data) <= COALESCE_LIMIT:
                data = held + data
            else:
                self._send(held, flags)
        self._send(data, flags)

    def send(self, data: bytes, flags: int = 0) -> int:
        self.flush()
        self._send(data, flags)
        return len(data)

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        self.flush()
        # socket.sendfile waits for a socket that cannot take more without a limit; give
        # it Python's own timeout for the while
        self._sock.settimeout(self.send_timeout)
        try:
            return self._sock.sendfile(file, offset, count)
        except TimeoutError:
            raise BrokenPipeError(errno.EPIPE, "client stopped reading") from None
        finally:
            self._sock.setblocking(True)

    def flush(self) -> None:
        self._holding = False
        held, self._held = self._held, None
        if held is not None:
            self._send(held, 0)

    def _send(self, data: bytes, flags: int) -> None:
        try:
            self._sock.sendall(data, flags)
        except BlockingIOError:  # SO_SNDTIMEO ran out with nothing sent
            # as a client that went away: gunicorn closes it quietly
            raise BrokenPipeError(errno.EPIPE, "client stopped reading") from None

    def shutdown(self, how: int) -> None:
        self._flush_quietly()
        self._sock.shutdown(how)

    def close(self) -> None:
        self._flush_quietly()
        self._sock.close()

    def _flush_quietly(self) -> None:  # the connection ends anyway: a client gone is no error
        try:
            self.flush()
        except OSError:
            pass

    def fileno(self) -> int:  # asked by the poller on every park and wake-up
        return self._sock.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _HandedOver:
    """Where a ``ClientSocket`` points once its connection is a tunnel's: gunicorn's
    writes (its own head for the 101), its drain and its close reach nothing."""

    def sendall(self, data: bytes, flags: int = 0) -> None:
        pass

    def send(self, data: bytes, flags: int = 0) -> int:
        return len(data)

    def recv(self, size: int, flags: int = 0) -> bytes:
        return b""

    def __getattr__(self, name: str) -> Any:  # setsockopt, shutdown, close, ...
        return lambda *args, **kwargs: None

    def fileno(self) -> int:
        return -1


_HANDED_OVER = _HandedOver()


# epoll and kqueue watch a descriptor registered while another thread waits in select();
# poll() and select() only look at the ones registered before the call. gthread's poller
# is a selectors.DefaultSelector.
_PARK_FROM_ANY_THREAD = selectors.DefaultSelector.__name__ in {"EpollSelector", "KqueueSelector", "DevpollSelector"}


class _Finished:
    """A request thread's result, as ``finish_request`` reads it from a future."""

    __slots__ = ("_result",)

    def __init__(self, result: Any):
        self._result = result

    def cancelled(self) -> bool:
        return False

    def result(self) -> Any:
        return self._result


def _head_record(head: bytes, client: Any) -> RequestRecord:
    """A request record from a raw request head, for an answer made without parsing it."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    method, _, rest = line.partition(" ")
    path = rest.rpartition(" ")[0].partition("?")[0]
    address = client[0] if isinstance(client, tuple) else str(client or "-")
    return RequestRecord(method[:20] or "-", path[:200] or "-", address, new_request_id(), time.perf_counter())


class HeadCheck:
    """Whether gunicorn's parser can take a request head without waiting for more of it:
    the head is whole (its empty line came), or the parser refuses it as it stands (a bare
    LF; a request line, or a head, over gunicorn's limits: its 400, 414 or 431).

    The limits are gunicorn's own, computed as ``gunicorn/http/message.py`` does; a head
    ``size_limit`` long is refused by the parser while it still reads from the buffer."""

    __slots__ = ("line_limit", "size_limit")

    def __init__(self, cfg: Any):
        line = cfg.limit_request_line
        self.line_limit = MAX_REQUEST_LINE if line < 0 or line >= MAX_REQUEST_LINE else line  # 0: none
        fields = cfg.limit_request_fields
        if not 0 < fields <= MAX_HEADERS:
            fields = MAX_HEADERS
        field_size = cfg.limit_request_field_size if cfg.limit_request_field_size > 0 else DEFAULT_MAX_HEADERFIELD_SIZE
        max_buffer_headers = fields * (field_size + 2) + 4
        self.size_limit = (self.line_limit or 1024 * 1024) + 2 + max_buffer_headers + 1

    def __call__(self, head: bytes | bytearray, seen: int) -> bool:
        """``seen``: how much of ``head`` was looked at before (only the rest is searched)."""
        if head.find(b"\r\n\r\n", max(seen - 3, 0)) >= 0:
            return True
        if head.count(b"\n", seen) != head.count(b"\r\n", max(seen - 1, 0)):
            return True  # a bare LF: the parser refuses it rather than wait
        if len(head) >= self.size_limit:
            return True
        if self.line_limit and len(head) > self.line_limit + 2:
            start = 2 if head.startswith(b"\r\n") else 0  # one empty line may come first
            end = head.find(b"\r\n", start)
            return end - start > self.line_limit or (end < 0 and len(head) - start - 2 > self.line_limit)
        return False


class DeadlineThreadWorker(ThreadWorker):
    header_timeout = 10.0
    body_timeout = 30.0
    send_timeout = 30.0
    queue_timeout = 10.0  # [kproxy] queue_timeout, read from the app's config in run()

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        pass  # gthread's warning that threads >= worker_connections leave no keep-alive: not so here

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # gthread keeps ``threads`` of its ``worker_connections`` from keep-alive, as if each
        # thread held a connection all the time; request threads are made as requests come
        # (up to ``threads``, which may exceed worker_connections), so keep-alive is bounded
        # by the connection limit alone
        self.max_keepalived = self.worker_connections
        self.head_ready = HeadCheck(self.cfg)
        self.observers: list[Any] = []  # the gateway's (access log, metrics), for the answers made here
        # connections whose head is coming, in the poller: oldest first, which is also the
        # order of their deadlines (each is its first byte's time plus one timeout)
        self.heads: dict[Any, None] = {}

    def get_thread_pool(self) -> RequestThreads:
        # threads made as requests come, up to ``threads``; a request that waited longer than
        # queue_timeout for one is answered 503 (kproxy/threads.py)
        return RequestThreads(self.cfg.threads, self.queue_timeout, self._refuse)

    def run(self) -> None:
        from .server import _gateway  # the app is loaded, post_worker_init has run
        gateway = _gateway(self.wsgi)
        if gateway is not None:
            self.queue_timeout = gateway.config.gateway.queue_timeout
            self.observers = gateway.observers
        self.tpool.queue_timeout = self.queue_timeout
        super().run()

    def _refuse(self, conn: Any) -> None:
        # in a request thread, for a request that waited longer than queue_timeout for one:
        # 503 overloaded, and the connection closed (the client's body, if any, is not read)
        sock = conn.sock
        if not isinstance(sock, ClientSocket):  # TLS: gunicorn's own socket; served, however late
            self._serve(conn)
            return
        record = _head_record(bytes(sock.ahead), conn.client)
        record.status, record.error = 503, (f"overloaded: every one of the {self.cfg.threads} request threads "
                                            f"was busy for queue_timeout ({self.queue_timeout:g} s)")
        body = json.dumps({"error": "overloaded", "message": f"the gateway is overloaded: {record.error}",
                           "request_id": record.request_id}).encode() + b"\n"
        record.bytes_sent = len(body)
        sock.send_refusal(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\nRetry-After: 1\r\nX-Request-Id: %s\r\nConnection: close\r\n\r\n%s"
                          % (len(body), record.request_id.encode(), body))
        for observer in self.observers:
            try:
                observer(record)
            except Exception:
                self.log.exception("observer %r failed", observer)
        self.method_queue.defer(self.finish_request, conn, _Finished(False))

    def enqueue_req(self, conn: Any) -> None:
        # main thread: a connection accepted, readable after keep-alive, or with bytes of
        # its next request read ahead
        if self.cfg.is_ssl:  # gunicorn's own socket, handed to a thread at its first byte
            if not conn.initialized and not conn.data_ready and not conn.wait_for_data(0):
                self._await_first_byte(conn)
            else:
                self.tpool.submit(self._serve, conn)
            return
        sock = conn.sock
        if not isinstance(sock, ClientSocket):
            sock = conn.sock = ClientSocket(sock, self.send_timeout)  # before init(): the parser reads through it
        elif conn.parser is not None and conn.parser.unreader.buf.getvalue():
            sock.unread(conn.parser.unreader.take_buffered())  # a body drain read into the next request
        if sock.ahead and self.head_ready(sock.ahead, 0):  # pipelined: no read needed
            self._start_deadline(sock)
            self._hand_over(conn)
        else:
            self._read_head(conn)

    def _read_head(self, conn: Any, _fileobj: Any = None) -> None:
        # main thread, and the poller's callback while a head is coming: one read of what
        # arrived; a thread takes the connection only once the parser need not wait
        sock = conn.sock
        seen = len(sock.ahead)
        got = sock.read_ahead()
        if got is False:  # closed (or reset) before its head was whole: nothing to answer
            self._drop(conn)
            return
        if got is None and not seen:  # nothing yet: a new connection, or a wake-up for nothing
            self._await_first_byte(conn)
            return
        self._start_deadline(sock)
        if got and self.head_ready(sock.ahead, seen):
            self._hand_over(conn)
        elif time.monotonic() >= sock.deadline:
            self._time_out(conn)
        elif conn not in self.heads:
            self.heads[conn] = None
            self.poller.register(sock, selectors.EVENT_READ, partial(self._read_head, conn))

    def _start_deadline(self, sock: ClientSocket) -> None:
        if sock.deadline is None:  # the head's first byte
            sock.deadline = time.monotonic() + self.header_timeout
            sock.idle_timeout = None

    def _hand_over(self, conn: Any) -> None:
        if conn in self.heads:
            del self.heads[conn]
            self.poller.unregister(conn.sock)
        conn.data_ready = True  # gthread's handle() must not wait for a byte again
        self.tpool.submit(self._serve, conn)

    def _time_out(self, conn: Any) -> None:
        conn.sock.time_out()
        self._drop(conn)

    def _drop(self, conn: Any) -> None:
        if conn in self.heads:
            del self.heads[conn]
            self.poller.unregister(conn.sock)
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        # after every wait of the main loop: heads past their deadline get their 408 here
        super().murder_pending()
        now = time.monotonic()
        while self.heads:
            conn = next(iter(self.heads))
            if conn.sock.deadline > now:
                break
            self._time_out(conn)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        if self.heads:  # wake up for the first head deadline, not only once a second
            first = next(iter(self.heads)).sock.deadline
            timeout = min(timeout, max(first - time.monotonic(), 0.0))
        super().wait_for_and_dispatch_events(timeout)

    def _serve(self, conn: Any) -> None:
        # in a request thread: gthread's handle(), then its finish_request() for a kept-alive
        # connection done here (the main thread need not wake up for it)
        try:
            result = self.handle(conn)
        except BaseException:
            result = False
        if result is True and self._read_beyond(conn):
            # pipelined: the main thread sees whether the next head is whole already
            self.method_queue.defer(self.enqueue_req, conn)
        elif result is True and _PARK_FROM_ANY_THREAD and self.alive:
            conn.sock.setblocking(False)
            conn.set_timeout()
            self.keepalived_conns.append(conn)  # before the poller can see it readable
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn))
        else:
            self.method_queue.defer(self.finish_request, conn, _Finished(result))

    @staticmethod
    def _read_beyond(conn: Any) -> bool:
        # bytes already read past the request just served: the poller would not see them
        return bool(conn.parser.unreader.buf.getvalue()) or (isinstance(conn.sock, ClientSocket)
                                                              and bool(conn.sock.ahead))

    def _cap_keepalive(self, deadline: float) -> None:
        # request threads may still park connections while the main thread walks them
        for conn in list(self.keepalived_conns):
            conn.timeout = min(conn.timeout, deadline)

    def _await_first_byte(self, conn: Any) -> None:
        # what gthread does with a connection whose first byte did not come in 5 s, done at
        # once, so that a thread never waits for a client that has said nothing
        conn.sock.setblocking(False)
        conn.timeout = time.monotonic() + self.cfg.keepalive
        self.pending_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn))

    def handle_request(self, req: Any, conn: Any) -> Any:
        sock = conn.sock
        if not isinstance(sock, ClientSocket):  # TLS: gunicorn's own socket, without deadlines
            return super().handle_request(req, conn)
        sock.deadline = None  # the head is in; the body may take as long as it keeps coming
        sock.idle_timeout = self.body_timeout
        sock.unreader = conn.parser.unreader  # for take_over()
        sock.hold_next_write()  # the response head: sent with the first body piece
        try:
            keepalive = super().handle_request(req, conn)
        finally:
            sock.flush()  # a head with no body after it
        # a connection taken over by a tunnel is not the worker's any more: not kept alive,
        # and what finish_request closes is the empty ClientSocket, not the tunnel
        return keepalive and not sock.taken


# -- gunicorn's arbiter: the master's parts that kproxy.server's hooks use --

# gunicorn's control socket (gunicornc) is no part of kproxy: the master opens none
ARBITER_SETTINGS = {"control_socket_disable": True}


def reload_in_place(arbiter: Any, reload: Callable[[], None]) -> None:
    """Make the master's SIGHUP call ``reload`` instead of ``Arbiter.reload``, which would
    start new workers (each listing every registry again)."""
    arbiter.reload = reload


def worker_pids(arbiter: Any) -> list[int]:
    """The master's workers, as it counts them now."""
    return list(arbiter.WORKERS)
