"""gunicorn's ``gthread`` worker, with deadlines for slow clients.

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

REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class ClientSocket:
    """A client socket whose reads obey a deadline (head) or an idle timeout (body), and
    whose writes obey a send timeout."""

    __slots__ = ("_sock", "deadline", "idle_timeout", "send_timeout")

    def __init__(self, sock: socket.socket, send_timeout: float):
        self._sock = sock
        self.deadline: float | None = None
        self.idle_timeout: float | None = None
        self.send_timeout = send_timeout

    def recv(self, size: int, *flags: int) -> bytes:
        if self.deadline is not None:
            # past the deadline, only what already arrived is read (a zero timeout)
            return self._timed_recv(max(self.deadline - time.monotonic(), 0.0), size, *flags)
        if self.idle_timeout is not None:
            return self._timed_recv(self.idle_timeout, size, *flags)
        return self._sock.recv(size, *flags)

    def _timed_recv(self, timeout: float, *args: int) -> bytes:
        self._sock.settimeout(timeout)
        try:
            return self._sock.recv(*args)
        except (TimeoutError, BlockingIOError):
            self._give_up()
        finally:
            self._sock.settimeout(None)

    def _give_up(self) -> None:
        if self.deadline is not None:  # still in the head: say why before closing
            try:
                self._sock.settimeout(0.5)
                self._sock.sendall(REQUEST_TIMEOUT)
            except OSError:
                pass
        # gunicorn treats this as a client that went away: closed quietly, no traceback
        raise NoMoreData(b"client too slow")

    def sendall(self, data: bytes, *flags: int) -> None:
        self._sock.settimeout(self.send_timeout)
        try:
            self._sock.sendall(data, *flags)
        except TimeoutError:
            # as a client that went away: gunicorn closes it quietly
            raise BrokenPipeError(errno.EPIPE, "client stopped reading") from None
        finally:
            self._sock.settimeout(None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class DeadlineThreadWorker(ThreadWorker):
    header_timeout = 10.0
    body_timeout = 30.0
    send_timeout = 30.0

    def enqueue_req(self, conn: Any) -> None:
        # runs in the main thread, before the connection waits for a free thread
        if not isinstance(conn.sock, ClientSocket):  # before init(): the parser reads through it
            conn.sock = ClientSocket(conn.sock, self.send_timeout)
        if not conn.initialized and not conn.data_ready and not conn.wait_for_data(0):
            self._await_first_byte(conn)
            return
        conn.sock.deadline = time.monotonic() + self.header_timeout
        conn.sock.idle_timeout = None
        super().enqueue_req(conn)

    def _await_first_byte(self, conn: Any) -> None:
        # what gthread does with a connection whose first byte did not come in 5 s, done at
        # once, so that a thread never waits for a client that has said nothing
        conn.sock.setblocking(False)
        conn.timeout = time.monotonic() + self.cfg.keepalive
        self.pending_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn))

    def handle_request(self, req: Any, conn: Any) -> Any:
        conn.sock.deadline = None  # the head is in; the body may take as long as it keeps coming
        conn.sock.idle_timeout = self.body_timeout
        return super().handle_request(req, conn)
