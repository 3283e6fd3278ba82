"""Upstreams: a service's nodes, which node takes the next request, and what to do when
a node fails it: Envoy's cluster (load balancing, outlier ejection, retry policy) in one
place::

    upstream = Upstream("sd-app", StaticNodes((Node("10.0.0.7", 8080), Node("10.0.0.8", 8080, 3))))
    node = upstream.pick()            # smooth weighted round robin
    upstream.failed(node)             # passive health: skipped for ``cooldown`` seconds
    response = upstream.send(transport, record, "/anything", headers)   # with retries

An ``Upstream`` asks its node source for the current nodes on every request, so static
lists (``StaticNodes``) and live discovery (``RegistryNodes``) feed it the same way. A
source returns a tuple of nodes, or None when the service is unknown or its registry is
disabled. Sources that return the same tuple object while nothing changed let the
balancer skip its rebuild; when the nodes do change, weights and ejections of the nodes
that stay are kept, so a scale-out does not reset the rotation.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import IO, TYPE_CHECKING, Callable, Iterable, Protocol

from .node import Node
from .transport import ConnectFailed, UpstreamFailure, UpstreamResponse

if TYPE_CHECKING:
    from .record import RequestRecord
    from .pool import TLSPolicy
    from .transport import Transport

log = logging.getLogger("kproxy")

NodeSource = Callable[[], "tuple[Node, ...] | None"]
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class NoNodes(LookupError):
    """The service is unknown, disabled, or has no usable nodes."""


class StaticNodes:
    """The nodes an INI ``nodes =`` line lists: the same tuple every time."""

    __slots__ = ("_nodes",)

    def __init__(self, nodes: tuple[Node, ...]):
        self._nodes = nodes

    def __call__(self) -> tuple[Node, ...]:
        return self._nodes


class NodeLookup(Protocol):
    def nodes(self, namespace: str, service: str, port: str) -> tuple[Node, ...] | None: ...


class RegistryNodes:
    """A Service's ready endpoints in a registry (None: no registry, as when it is disabled).
    The registry keeps them as a snapshot it swaps whole, so this reads without a lock."""

    __slots__ = ("registry", "namespace", "service", "port")

    def __init__(self, registry: NodeLookup | None, namespace: str, service: str, port: str):
        self.registry, self.namespace, self.service, self.port = registry, namespace, service, port

    def __call__(self) -> tuple[Node, ...] | None:
        registry = self.registry
        return registry.nodes(self.namespace, self.service, self.port) if registry is not None else None


class Upstream:
    """``scheme``, ``tls``: how nodes are spoken to. ``pass_host``: the Host a node sees
    (``pass`` the client's, ``node`` its address, ``rewrite`` ``upstream_host``).
    ``retries``: how many other nodes a failed request may try (None: each other node
    once)."""

    def __init__(self, name: str, source: NodeSource, cooldown: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, *, scheme: str = "http",
                 tls: TLSPolicy | None = None, pass_host: str = "pass", upstream_host: str | None = None,
                 retries: int | None = None):
        self.name = name
        self.scheme, self.tls = scheme, tls
        self.pass_host, self.upstream_host = pass_host, upstream_host
        self.retries = retries
        self._source = source
        self._cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._nodes: tuple[Node, ...] | None = None
        self._current: dict[Node, int] = {}
        self._ejected: dict[Node, float] = {}  # node -> time it may come back

    def nodes(self) -> tuple[Node, ...]:
        nodes = self._source()
        if not nodes:
            raise NoNodes(self.name)
        return nodes

    def pick(self, exclude: Iterable[Node] = (), nodes: tuple[Node, ...] | None = None) -> Node:
        """The next node by smooth weighted round robin (nginx's algorithm), skipping
        ``exclude`` and ejected nodes. When every node is ejected, ejections are ignored:
        trying a node that may have recovered beats refusing outright. ``nodes``: a list
        the caller already has from ``nodes()`` (one request, one view of the service)."""
        if nodes is None:
            nodes = self.nodes()
        with self._lock:
            if nodes is not self._nodes:
                self._adopt(nodes)
            now = self._clock()
            candidates = [n for n in nodes if n not in exclude and self._ejected.get(n, 0.0) <= now]
            if not candidates:
                candidates = [n for n in nodes if n not in exclude]
                if not candidates:
                    raise NoNodes(self.name)
            if len(candidates) == 1:
                return candidates[0]
            current = self._current
            total = 0
            best = candidates[0]
            for node in candidates:
                current[node] += node.weight
                total += node.weight
                if current[node] > current[best]:
                    best = node
            current[best] -= total
            return best

    def _adopt(self, nodes: tuple[Node, ...]) -> None:
        self._nodes = nodes
        self._current = {n: self._current.get(n, 0) for n in nodes}
        self._ejected = {n: t for n, t in self._ejected.items() if n in self._current}

    def failed(self, node: Node) -> None:
        """Eject ``node`` for the cool-down: it refused a connection or timed out."""
        with self._lock:
            self._ejected[node] = self._clock() + self._cooldown

    def ejected(self) -> list[Node]:
        now = self._clock()
        with self._lock:
            return [n for n, t in self._ejected.items() if t > now]

    def send(self, transport: Transport, record: RequestRecord, target: str, headers: dict[str, str],
             body: IO[bytes] | Iterable[bytes] | None = None, chunked: bool = False,
             host: str | None = None, nodes: tuple[Node, ...] | None = None) -> UpstreamResponse:
        """Send the request to the next node, and on to others while that is safe: after a
        connect failure (nothing was sent) whatever the method, after a failure once the
        request was sent only if it can be replayed (no body, idempotent method). Nodes
        that refused or timed out are ejected. ``host``: the client's Host (for ``pass``).
        ``record`` gets the node, the attempts, the failures and the ejections.

        Raises NoNodes when there was no node to try, the last UpstreamFailure when every
        try failed; the client's own failures (InvalidRequest, ClientDisconnected,
        BodyTooLarge) pass through untried elsewhere."""
        if nodes is None:
            nodes = self.nodes()
        if self.pass_host == "rewrite":
            headers["Host"] = self.upstream_host or ""
        elif host is not None:
            headers["Host"] = host
        replayable = body is None and record.method in IDEMPOTENT
        retries = self.retries if self.retries is not None else len(nodes) - 1
        tried: list[Node] = []
        failure: UpstreamFailure | None = None
        while len(tried) <= retries:
            try:
                node = self.pick(exclude=tried, nodes=nodes)
            except NoNodes:
                break
            tried.append(node)
            if self.pass_host == "node":
                headers["Host"] = node.address
            record.node, record.attempts = node, len(tried)
            sent = time.perf_counter()
            try:
                response = transport.send(node, record.method, target, headers, body, chunked,
                                          self.scheme, self.tls, replayable)
            except UpstreamFailure as e:
                failure = e
                record.failures.append(e.kind)
                if isinstance(e, ConnectFailed) or e.timed_out:
                    self.failed(node)
                    record.ejections += 1
                log.warning("upstream %s node %s: %s (request %s)", self.name, node.address, e.reason,
                            record.request_id)
                if isinstance(e, ConnectFailed) or replayable:
                    continue
                break
            record.upstream_seconds = time.perf_counter() - sent
            record.upstream_status = response.status
            return response
        if failure is None:
            raise NoNodes(self.name)
        raise failure
