"""The fallback load generator when wrk is not installed: closed loop, ``-c`` keep-alive
connections driven by one selector loop, one request in flight per connection (as wrk).

    python bench/loadgen.py --port 9080 --path /v1/anything --host sd.httpbin.org -c 16 -d 4

Prints one JSON object: rps, p50_ms, p99_ms, requests, errors. Being Python, it caps
out far below wrk (about 10-20k req/s here): figures for fast servers (nginx) are the
generator's limit, not theirs; the Python contestants stay well below it.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import time


class Conn:
    __slots__ = ("sock", "buf", "sent_at", "need", "port")

    def __init__(self, port: int):
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buf = b""
        self.sent_at = 0.0
        self.need: int | None = None  # bytes of the whole response once the head is in


def response_length(buf: bytes) -> int | None:
    """Bytes of the first complete response in ``buf`` (Content-Length or chunked), or None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].decode("latin-1").lower()
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip() == "content-length":
            total = end + 4 + int(value.strip())
            return total if len(buf) >= total else None
        if name.strip() == "transfer-encoding" and "chunked" in value:
            pos = end + 4
            while True:
                line_end = buf.find(b"\r\n", pos)
                if line_end < 0:
                    return None
                size = int(buf[pos:line_end].split(b";")[0], 16)
                pos = line_end + 2 + size + 2
                if size == 0:
                    return pos if len(buf) >= pos else None
                if len(buf) < pos:
                    return None
    return end + 4  # no body


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--host", default="localhost")
    parser.add_argument("-c", type=int, default=16)
    parser.add_argument("-d", type=float, default=4.0)
    args = parser.parse_args()
    request = f"GET {args.path} HTTP/1.1\r\nHost: {args.host}\r\nUser-Agent: kproxy-bench\r\n\r\n".encode()
    selector = selectors.DefaultSelector()
    latencies: list[float] = []
    errors = 0

    def send(conn: Conn) -> None:
        conn.sent_at = time.perf_counter()
        conn.sock.send(request)  # a few bytes: fits the socket buffer of a fresh exchange

    for _ in range(args.c):
        conn = Conn(args.port)
        selector.register(conn.sock, selectors.EVENT_READ, conn)
        send(conn)
    start = time.perf_counter()
    deadline = start + args.d
    while (now := time.perf_counter()) < deadline:
        for key, _ in selector.select(timeout=min(0.1, deadline - now)):
            conn = key.data
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:  # closed by the server: count it and reconnect
                errors += 1
                selector.unregister(conn.sock)
                conn.sock.close()
                conn = Conn(args.port)
                selector.register(conn.sock, selectors.EVENT_READ, conn)
                send(conn)
                continue
            conn.buf += data
            total = response_length(conn.buf)
            if total is None:
                continue
            if not conn.buf.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2")):
                errors += 1
            latencies.append(time.perf_counter() - conn.sent_at)
            conn.buf = conn.buf[total:]
            send(conn)
    elapsed = time.perf_counter() - start
    for key in list(selector.get_map().values()):
        key.fileobj.close()
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3 if latencies else float("nan")
    print(json.dumps({"rps": len(latencies) / elapsed, "p50_ms": pct(0.50), "p99_ms": pct(0.99),
                      "requests": len(latencies), "errors": errors}))


if __name__ == "__main__":
    main()
