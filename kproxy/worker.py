"""gunicorn's ``gthread`` worker, with deadlines for slow clients and fewer system calls.

A gthread worker parks idle keep-alive connections in a poller, but it hands a new
connection to a thread at once (which then waits up to 5 s for its first byte), and once
a request has started, a thread reads and writes with no time limit: clients that connect
and say nothing, trickle a header byte a second (slowloris) or stop reading their answer
each hold a thread, and ``threads`` of them stop the worker. This worker bounds that:

- a new connection waits in the poller, not in a thread, until its first byte arrives
  (at most ``keepalive_timeout`` seconds, then it is closed);
- ``client_header_timeout``: the whole request head must arrive within this many seconds
  of the connection being queued for a thread, or the client gets 408 and the
  connection is closed. Counting from the queueing means slow clients that waited in the
  queue are cut off at once rather than each getting a full timeout with a thread; what a
  client sent in time is still read, however long it waited for a thread;
- ``client_body_timeout``: while a body is read, each read may wait this long;
- ``client_send_timeout``: each write of an answer may wait this long for a client that
  does not read.

so a slow client holds a thread for at most ``client_header_timeout`` (plus, for a body or
an answer, as long as it keeps the bytes moving), and ``threads`` bounds how many it can
hold at once. ``kproxy serve`` and ``conf/gunicorn.conf.py`` both use it (``worker_class``).

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
body.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from functools import partial
from typing import Any

from gunicorn.http.errors import NoMoreData
from gunicorn.workers.gthread import ThreadWorker

from .http1 import timeval

REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_NO_LIMIT = timeval(None)
COALESCE_LIMIT = 64 * 1024  # a held head is joined to a body piece up to this size (a copy)


class ClientSocket:
    """A client socket whose reads obey a deadline (head) or an idle timeout (body), and
    whose writes obey a send timeout; the kernel enforces them on a socket that stays
    blocking. gunicorn's own ``setblocking``/``settimeout`` calls (its poller, its body
    drain) are recorded, not applied: a read honours the timeout they set.

    ``hold_next_write()`` keeps the next write back until the one after it (or a read, or
    ``flush()``), so that a response head and its first body piece leave in one ``send``."""

    __slots__ = ("_sock", "deadline", "idle_timeout", "send_timeout", "_timeout", "_rcvtimeo",
                 "_holding", "_held")

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
            try:
                self._sock.send(REQUEST_TIMEOUT, socket.MSG_DONTWAIT)
            except OSError:
                pass
        # gunicorn treats this as a client that went away: closed quietly, no traceback
        raise NoMoreData(b"client too slow")

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


class DeadlineThreadWorker(ThreadWorker):
    header_timeout = 10.0
    body_timeout = 30.0
    send_timeout = 30.0

    def enqueue_req(self, conn: Any) -> None:
        # runs in the main thread, before the connection waits for a free thread
        if not isinstance(conn.sock, ClientSocket) and not self.cfg.is_ssl:  # TLS: gunicorn's own socket
            conn.sock = ClientSocket(conn.sock, self.send_timeout)  # before init(): the parser reads through it
        if not conn.initialized and not conn.data_ready and not conn.wait_for_data(0):
            self._await_first_byte(conn)
            return
        if isinstance(conn.sock, ClientSocket):
            conn.sock.deadline = time.monotonic() + self.header_timeout
            conn.sock.idle_timeout = None
        self.tpool.submit(self._serve, conn)

    def _serve(self, conn: Any) -> None:
        # in a request thread: gthread's handle(), then its finish_request() for a kept-alive
        # connection done here (the main thread need not wake up for it)
        try:
            result = self.handle(conn)
        except BaseException:
            result = False
        if result is True and _PARK_FROM_ANY_THREAD and self.alive and not conn.parser.unreader.buf.getvalue():
            conn.sock.setblocking(False)
            conn.set_timeout()
            self.keepalived_conns.append(conn)  # before the poller can see it readable
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn))
        else:
            self.method_queue.defer(self.finish_request, conn, _Finished(result))

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
        sock.hold_next_write()  # the response head: sent with the first body piece
        try:
            return super().handle_request(req, conn)
        finally:
            sock.flush()  # a head with no body after it
