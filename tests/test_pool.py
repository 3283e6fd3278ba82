"""The urllib3 contract of kproxy/pool.py: the private hooks it relies on still behave as it
expects. A urllib3 release that changes one fails here, by name, rather than in a user's
gateway. The node is a real socket server on 127.0.0.1."""

from __future__ import annotations

import socket
import time

from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

from kproxy import pool
from kproxy.node import Node

from .conftest import RawUpstream


def answer_ok(conn: socket.socket) -> None:
    while True:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        if not conn.recv(65536):
            return


def test_urllib3_pools_have_the_hooks_kproxy_sets_and_calls():
    for name in ("_get_conn", "_put_conn", "QueueCls", "ConnectionCls"):
        assert hasattr(HTTPConnectionPool, name), f"urllib3's HTTPConnectionPool has no {name}"
    assert isinstance(HTTPConnection.is_connected, property), "urllib3's HTTPConnection.is_connected"


def test_a_pool_is_made_of_kproxy_s_connections_and_idle_stack():
    pools = pool.NodePools(pool_size=2)
    try:
        node_pool, conn = pools.get(Node("127.0.0.1", 9), "http", None)
        assert isinstance(node_pool.pool, pool.IdleConnections)
        assert isinstance(conn, pool._NodeConnection) and conn.sock is None  # not connected until asked
        pool.keep(node_pool, conn)
        assert pools.get(Node("127.0.0.1", 9), "http", None)[0] is node_pool  # one pool per node
    finally:
        pools.close()


def test_get_conn_asks_is_connected_before_handing_a_pooled_connection_out():
    server = RawUpstream(answer_ok)
    pools = pool.NodePools(pool_size=2)
    node = Node("127.0.0.1", server.port)
    try:
        node_pool, conn = pools.get(node, "http", None)
        conn.connect()
        pool.reuse(node_pool, conn, keepalive=60)
        again = pools.get(node, "http", None)[1]
        assert again is conn and again.sock is not None  # passed the check: reused as it is
        pool.reuse(node_pool, again, keepalive=0)
        time.sleep(0.01)
        expired = pools.get(node, "http", None)[1]
        # is_connected said no: urllib3 closed it and hands the same object out to reconnect
        assert expired.sock is None
    finally:
        pools.close()
        server.stop()
