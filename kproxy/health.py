"""Active health checks: each node of an upstream is asked ``GET path`` every
``interval`` seconds, and taken out of rotation after ``unhealthy_threshold`` failed
checks in a row, back in (slowly, if the service has ``slow_start``) after
``healthy_threshold`` good ones::

    checker = HealthChecker(upstream, HealthCheck("/healthz", interval=5, timeout=2))
    checker.start()     # after fork: one daemon thread per checked upstream
    checker.unhealthy   # the addresses it took out
    checker.stop()

A check passes on a 2xx or 3xx answer within ``timeout`` (connect and whole answer
head); a refused connection, a timeout, another status or a malformed answer fails it.
Checks go to every current node, whether or not it is ejected, so a node that comes back
is seen; a node that discovery removed is not checked again.

Under gunicorn with shared discovery (workers > 1), the checks run once per pod: the
pod's discovery process runs a ``HealthChecker`` per service and sends its verdicts to
every worker, whose ``SharedHealthChecker`` applies them to its own upstream::

    checker = SharedHealthChecker(upstream, check, {"nodes": [["10.0.0.7", 8080, 1]]})
    checker.start()     # subscribes; the verdict so far arrives at once, then after each round
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from . import metrics
from .discovery.shared import Follower
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


Address = tuple[str, int]


class HealthChecker:
    """Checks every node of ``upstream`` on one daemon thread, and tells the upstream
    which nodes are out (``Upstream.set_unhealthy``) whenever that changes.
    ``on_update()`` runs after each change and after each round (the pod's discovery
    process sends the verdicts on to the workers from it)."""

    def __init__(self, upstream: Upstream, check: HealthCheck,
                 probe: Callable[[Node, HealthCheck, str, TLSPolicy | None], str | None] = probe,
                 on_update: Callable[[], None] | None = None, unhealthy: Iterable[Address] = ()):
        self.upstream = upstream
        self.check = check
        self._probe = probe
        self._on_update = on_update
        # ``unhealthy``: a verdict this checker takes over (a discovery process that replaces
        # one that died): those nodes stay out until they pass healthy_threshold checks
        self.unhealthy: frozenset[Address] = frozenset(unhealthy)
        self._streaks: dict[Address, int] = dict.fromkeys(self.unhealthy, -check.unhealthy_threshold)
        self.last: dict[Address, str | None] = {}  # why its last check failed (None: passed)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.checks = 0

    def take_over(self, old: HealthChecker | SharedHealthChecker) -> None:
        """Start from ``old``'s verdict if it checked the same service the same way (a
        reload): a node that was out stays out until it passes its checks."""
        if isinstance(old, HealthChecker) and (old.upstream.name, old.check) == (self.upstream.name, self.check):
            self._streaks, self.last, self.checks = dict(old._streaks), dict(old.last), old.checks
            self.unhealthy = old.unhealthy
            self.upstream.set_unhealthy(self.unhealthy)

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
            nodes = ()
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
        for address in set(self._streaks) - seen:  # nodes that left: a node that returns starts afresh
            self._streaks.pop(address, None)
            self.last.pop(address, None)
        if not self.unhealthy <= seen:
            self._set_unhealthy(self.unhealthy & seen)
        if self._on_update is not None:
            self._on_update()

    def _current(self) -> tuple[Node, ...]:
        try:
            return self.upstream.nodes()
        except NoNodes:
            return ()

    def dump(self) -> dict:
        """For ``/-/discovery``: the check and each node's last result."""
        return {**_settings(self.check), "checks": self.checks, "checked_by": os.getpid(),
                "nodes": {f"{h}:{p}" if ":" not in h else f"[{h}]:{p}": {
                    "last": "pass" if why is None else f"fail: {why}", "streak": self._streaks.get((h, p), 0)}
                    for (h, p), why in sorted(self.last.items())}}

    def _record(self, node: Node, address: Address, failure: str | None) -> None:
        streak = self._streaks.get(address, 0)
        check = self.check
        if failure is None:
            streak = streak + 1 if streak > 0 else 1
            if streak == check.healthy_threshold and address in self.unhealthy:
                log.info("upstream %s node %s: healthy again", self.upstream.name, node.address)
                self._set_unhealthy(self.unhealthy - {address})
        else:
            streak = streak - 1 if streak < 0 else -1
            if -streak == check.unhealthy_threshold:
                log.warning("upstream %s node %s: unhealthy (%s, %d checks in a row)", self.upstream.name,
                            node.address, failure, -streak)
                self._set_unhealthy(self.unhealthy | {address})
        self._streaks[address] = streak

    def _set_unhealthy(self, addresses: frozenset[Address]) -> None:
        self.unhealthy = addresses
        self.upstream.set_unhealthy(addresses)
        if self._on_update is not None:  # a node out of rotation is news at once, not after the round
            self._on_update()


class SharedHealthChecker(Follower):
    """The checks of ``upstream`` as the pod's discovery process runs them, once for all
    workers; their verdicts are applied to this worker's upstream as they arrive, and
    kept while the discovery process is away. ``source`` says where the process finds
    the nodes: ``{"nodes": [[host, port, weight], ...]}``, or ``{"registry": [name,
    hash], "namespace": ..., "service": ..., "port": ...}`` (``shared.registry_key``)."""

    def __init__(self, upstream: Upstream, check: HealthCheck, source: dict[str, Any],
                 directory: str | None = None):
        self.upstream = upstream
        self.check = check
        tls = [upstream.tls.ca_file, upstream.tls.verify] if upstream.tls is not None else None
        spec = {"service": upstream.name, "check": dataclasses.asdict(check), "scheme": upstream.scheme,
                "tls": tls, "source": source}
        text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
        # workers with the same settings share one checker in the discovery process
        self._request = {"op": "health", "name": upstream.name, "hash": hashlib.sha256(text.encode()).hexdigest(),
                         "spec": spec}
        super().__init__(f"health checks of {upstream.name}", f"kproxy-health-{upstream.name}", directory)
        self._unhealthy: list[list[Any]] = []  # the last verdict, as it came
        self._dump: dict[str, Any] = {}

    def take_over(self, old: HealthChecker | SharedHealthChecker) -> None:
        """Start from ``old``'s verdict if it followed the same checks (a reload), so the
        new upstream has it before its first request, not only once the process answers."""
        if isinstance(old, SharedHealthChecker) and old._request["hash"] == self._request["hash"]:
            self._unhealthy, self._dump = old._unhealthy, old._dump
            self.upstream.set_unhealthy({(host, port) for host, port in self._unhealthy})

    def _subscription(self) -> bytes:
        # with the verdict so far: a discovery process that replaces a dead one starts from
        # it, so no node that was out comes back before it passes its checks
        return json.dumps({**self._request, "unhealthy": self._unhealthy}).encode()

    def _apply(self, payload: bytes, first: bool) -> None:
        verdict = json.loads(payload)
        self.upstream.set_unhealthy({(host, port) for host, port in verdict["unhealthy"]})
        self._unhealthy, self._dump = verdict["unhealthy"], verdict["dump"]

    def dump(self) -> dict:
        """The discovery process's dump as it came with the last verdict (the same from
        every worker), and whether this worker follows it now."""
        return {**_settings(self.check), "checks": 0, "nodes": {}, **self._dump, "connected": self.connected}


def _settings(check: HealthCheck) -> dict[str, Any]:
    return {name: value for name, value in dataclasses.asdict(check).items() if name != "host"}
