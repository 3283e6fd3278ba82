"""Connection pools to nodes: the only module that reaches into urllib3's internals.

One pool per (node, scheme, TLS policy), shared by every thread and sized to the thread
count; urllib3 opens the connections (TCP_NODELAY, TLS and its verification), kproxy's own
HTTP/1.1 exchange (``kproxy.http1``) runs on them::

    pools = NodePools(pool_size=8)
    pool, conn = pools.get(Node("10.0.0.7", 8080), "http", None)
    ...                                   # conn.connect() if conn.sock is None, then talk
    reuse(pool, conn, keepalive=1.5)      # or discard(pool, conn)

A pooled connection is checked before reuse without a system call that gives up the GIL
(on Linux, the TCP state and the receive queue, read with ``getsockopt``): a node that
closed it, or sent bytes after its answer, is seen, and one idle for longer than the
keep-alive given to ``reuse`` is not reused at all.

urllib3 internals used here (and pinned by ``urllib3<3``): ``HTTPConnectionPool._get_conn``
and ``_put_conn`` (its ``urlopen`` would re-encode the request-target), the pool's
``QueueCls`` and ``ConnectionCls`` hooks, and ``HTTPConnection.is_connected``, which
``_get_conn`` asks. ``tests/test_pool.py`` fails loudly when a release changes them.
"""

from __future__ import annotations

import collections
import queue
import socket
import ssl
import sys
import time
from typing import Any

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ClosedPoolError
from urllib3.poolmanager import PoolManager

from .node import Node


class TLSPolicy:
    """How https nodes are verified: a CA bundle, the system CAs, or not at all."""

    def __init__(self, ca_file: str | None = None, verify: bool = True):
        self.ca_file, self.verify = ca_file, verify
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


class NodePools:
    """Every node's pool; thread-safe."""

    def __init__(self, pool_size: int = 8, max_nodes: int = 1024):
        # block=False: a burst beyond pool_size opens extra connections rather than
        # queueing requests behind a lock; only pool_size are kept for reuse. urllib3's own
        # manager, not requests' HTTPAdapter: a worker then never imports requests (and the
        # charset detector it brings, which imports every codec: about 4 MB a worker)
        self._manager = PoolManager(num_pools=max_nodes, maxsize=pool_size, block=False)
        self._manager.pool_classes_by_scheme = {"http": _NodePool, "https": _TLSNodePool}
        self._max_nodes = max_nodes
        self._by_node: dict[tuple[str, int, str, TLSPolicy | None], HTTPConnectionPool] = {}

    def get(self, node: Node, scheme: str, tls: TLSPolicy | None) -> tuple[HTTPConnectionPool, HTTPConnection]:
        """A connection to ``node``: a pooled one that passed the reuse check, or a new,
        not yet connected one (``conn.sock is None``)."""
        pool = self._pool(node, scheme, tls)
        try:
            return pool, pool._get_conn()
        except ClosedPoolError:  # the manager dropped the pool (more than max_nodes nodes)
            pool = self._pool(node, scheme, tls, renew=True)
            return pool, pool._get_conn()

    def _pool(self, node: Node, scheme: str, tls: TLSPolicy | None, renew: bool = False) -> HTTPConnectionPool:
        # the manager's own lookup builds a key from every pool setting on each call
        key = (node.host, node.port, scheme, tls)
        pool = None if renew else self._by_node.get(key)
        if pool is None:
            if len(self._by_node) >= self._max_nodes:
                self._by_node.clear()
            pool = self._by_node[key] = self._manager.connection_from_host(
                node.host, node.port, scheme, pool_kwargs=tls.pool_kwargs if tls else None)
        return pool

    def close(self) -> None:
        self._by_node.clear()
        self._manager.clear()


def reuse(pool: HTTPConnectionPool, conn: HTTPConnection, keepalive: float) -> None:
    """Back to the pool, for reuse within ``keepalive`` seconds."""
    conn.kproxy_reuse_until = time.monotonic() + keepalive
    pool._put_conn(conn)


def keep(pool: HTTPConnectionPool, conn: HTTPConnection) -> None:
    """Back to the pool as it is (nothing was sent on it)."""
    pool._put_conn(conn)


def discard(pool: HTTPConnectionPool, conn: HTTPConnection) -> None:
    """Closed; its place in the pool is free again."""
    conn.close()
    pool._put_conn(conn)
