"""Active health checks: each node of an upstream is asked ``GET path`` every
``interval`` seconds, and taken out of rotation after ``unhealthy_threshold`` failed
checks in a row, back in (slowly, if the service has ``slow_start``) after
``healthy_threshold`` good ones::

    checker = HealthChecker(upstream, HealthCheck("/healthz", interval=5, timeout=2))
    checker.start()     # after fork: one daemon thread per checked upstream
    checker.stop()

A check passes on a 2xx or 3xx answer within ``timeout`` (connect and whole answer
head); a refused connection, a timeout, another status or a malformed answer fails it.
Checks go to every current node, whether or not it is ejected, so a node that comes back
is seen. Each worker process checks on its own: a pod with N workers sends N checks per
node and interval (docs/reliability.rst).
"""

from __future__ import annotations

import http.client
import logging
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable

from . import metrics
from .node import Node
from .pool import TLSPolicy
from .upstream import NoNodes, Upstream

log = logging.getLogger("kproxy")


@dataclass(frozen=True, slots=True)
class HealthCheck:
    path: str
    interval: float = 5.0
    timeout: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    host: str | None = None  # the Host header; the node's address when None


def probe(node: Node, check: HealthCheck, scheme: str = "http", tls: TLSPolicy | None = None) -> str | None:
    """One check of ``node``: None if it passed, else why it failed."""
    if scheme == "https":
        context = ssl.create_default_context(cafile=tls.ca_file if tls else None)
        if tls is not None and not tls.verify:
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(node.host, node.port, timeout=check.timeout,
                                                                       context=context)
    else:
        conn = http.client.HTTPConnection(node.host, node.port, timeout=check.timeout)
    deadline = time.monotonic() + check.timeout
    try:
        conn.request("GET", check.path, headers={"Host": check.host or node.address,
                                                 "User-Agent": "kproxy-health-check", "Connection": "close"})
        conn.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        response = conn.getresponse()
        if time.monotonic() > deadline:
            return "timed out"
        if not 200 <= response.status < 400:
            return f"status {response.status}"
        return None
    except (OSError, http.client.HTTPException) as e:
        return "timed out" if isinstance(e, TimeoutError) else (str(e) or type(e).__name__)
    finally:
        conn.close()


class HealthChecker:
    """Checks every node of ``upstream`` on one daemon thread."""

    def __init__(self, upstream: Upstream, check: HealthCheck,
                 probe: Callable[[Node, HealthCheck, str, TLSPolicy | None], str | None] = probe):
        self.upstream = upstream
        self.check = check
        self._probe = probe
        self._streaks: dict[tuple[str, int], int] = {}  # address -> passes (> 0) or failures (< 0) in a row
        self.last: dict[tuple[str, int], str | None] = {}  # address -> why its last check failed (None: passed)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.checks = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"kproxy-health-{self.upstream.name}",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.check.timeout + 1)

    def _run(self) -> None:
        while not self._stopping.is_set():
            started = time.monotonic()
            self.check_all()
            self._stopping.wait(max(self.check.interval - (time.monotonic() - started), 0.0))

    def check_all(self) -> None:
        """One round: every current node once (in turn, each bounded by the timeout)."""
        try:
            nodes = self.upstream.nodes()
        except NoNodes:
            return
        seen = set()
        for node in nodes:
            if self._stopping.is_set():
                return
            if node not in self._current():  # discovery removed it during this round: no check
                continue
            address = (node.host, node.port)
            seen.add(address)
            failure = self._probe(node, self.check, self.upstream.scheme, self.upstream.tls)
            self.checks += 1
            metrics.health_checked(self.upstream.name, failure is None)
            self.last[address] = failure
            self._record(node, address, failure)
        for address in set(self._streaks) - seen:  # nodes that left
            self._streaks.pop(address, None)
            self.last.pop(address, None)

    def _current(self) -> tuple[Node, ...]:
        try:
            return self.upstream.nodes()
        except NoNodes:
            return ()

    def dump(self) -> dict:
        """For ``/-/discovery``: the check and each node's last result."""
        c = self.check
        return {"path": c.path, "interval": c.interval, "timeout": c.timeout,
                "healthy_threshold": c.healthy_threshold, "unhealthy_threshold": c.unhealthy_threshold,
                "checks": self.checks,
                "nodes": {f"{h}:{p}" if ":" not in h else f"[{h}]:{p}": {
                    "last": "pass" if why is None else f"fail: {why}", "streak": self._streaks.get((h, p), 0)}
                    for (h, p), why in sorted(self.last.items())}}

    def _record(self, node: Node, address: tuple[str, int], failure: str | None) -> None:
        streak = self._streaks.get(address, 0)
        check = self.check
        if failure is None:
            streak = streak + 1 if streak > 0 else 1
            if streak == check.healthy_threshold:
                if self.upstream.is_unhealthy(node):
                    log.info("upstream %s node %s: healthy again", self.upstream.name, node.address)
                self.upstream.set_health(node, True)
        else:
            streak = streak - 1 if streak < 0 else -1
            if -streak == check.unhealthy_threshold:
                log.warning("upstream %s node %s: unhealthy (%s, %d checks in a row)", self.upstream.name,
                            node.address, failure, -streak)
                self.upstream.set_health(node, False)
        self._streaks[address] = streak
