"""gunicorn's ``gthread`` worker, with deadlines for slow clients.

A gthread worker parks idle keep-alive connections in a poller, but once a request's
first byte arrives, a thread reads the rest of its head with no time limit: a client
that trickles a header byte every second (slowloris) holds that thread for as long as
it likes, and ``threads`` such clients stop the worker. This worker bounds that:

- ``client_header_timeout``: the whole request head must arrive within this many
  seconds of the connection being queued for a thread (accepted, or readable again after
  keep-alive), or the client gets 408 and the connection is closed. Counting from the
  queueing, not from when a thread is free, means slow clients that waited in the queue
  are cut off at once rather than each getting a full timeout with a thread;
- ``client_body_timeout``: while a body is read, each read may wait this long.

so a slow client holds a thread for at most ``client_header_timeout`` (plus, for a body,
as long as it keeps sending), and ``threads`` bounds how many it can hold at once.
``kproxy serve`` and ``conf/gunicorn.conf.py`` both use it (``worker_class``).
"""

from __future__ import annotations

import socket
import time
from typing import Any

from gunicorn.http.errors import NoMoreData
from gunicorn.workers.gthread import ThreadWorker

REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class ClientSocket:
    """A client socket whose reads obey a deadline (head) or an idle timeout (body)."""

    __slots__ = ("_sock", "deadline", "idle_timeout")

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.deadline: float | None = None
        self.idle_timeout: float | None = None

    def recv(self, size: int, *flags: int) -> bytes:
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self._give_up()
            return self._timed(self._sock.recv, remaining, size, *flags)
        if self.idle_timeout is not None:
            return self._timed(self._sock.recv, self.idle_timeout, size, *flags)
        return self._sock.recv(size, *flags)

    def _timed(self, read: Any, timeout: float, *args: int) -> bytes:
        self._sock.settimeout(timeout)
        try:
            return read(*args)
        except TimeoutError:
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

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class DeadlineThreadWorker(ThreadWorker):
    header_timeout = 10.0
    body_timeout = 30.0

    def enqueue_req(self, conn: Any) -> None:
        # runs in the main thread, before the connection waits for a free thread
        if not isinstance(conn.sock, ClientSocket):  # before init(): the parser reads through it
            conn.sock = ClientSocket(conn.sock)
        conn.sock.deadline = time.monotonic() + self.header_timeout
        conn.sock.idle_timeout = None
        super().enqueue_req(conn)

    def handle_request(self, req: Any, conn: Any) -> Any:
        conn.sock.deadline = None  # the head is in; the body may take as long as it keeps coming
        conn.sock.idle_timeout = self.body_timeout
        return super().handle_request(req, conn)
