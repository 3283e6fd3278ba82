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
from dataclasses import dataclass
from itertools import chain
from typing import IO, TYPE_CHECKING, Callable, Collection, Iterable, Protocol, Sequence

from .node import Node
from .transport import ConnectFailed, UpstreamFailure, UpstreamResponse

if TYPE_CHECKING:
    from .record import RequestRecord
    from .pool import TLSPolicy
    from .transport import Transport

log = logging.getLogger("kproxy")

NodeSource = Callable[[], "tuple[Node, ...] | None"]
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


SLOW_START_FLOOR = 0.1  # a node's share of its weight when its slow start begins
PREFER_ZONE = frozenset({"PreferClose", "PreferSameZone", "PreferSameNode"})


@dataclass(frozen=True, slots=True)
class NodeState:
    node: Node
    state: str        # ready, serving-terminating, slow-starting, ejected, unhealthy
    weight: float     # its weight now, slow start applied
    locality: str     # same, other, unknown (zone)


def topology_tiers(nodes: tuple[Node, ...], topology: str, zone: str | None,
                   node_name: str | None) -> tuple[tuple[Node, ...], ...]:
    """The nodes in preference tiers, most preferred first; the last tier is all of them.

    ``auto`` follows the cluster: EndpointSlice hints when every node has them (as
    kube-proxy does), else the Service's ``trafficDistribution`` (same node for
    ``PreferSameNode``, then same zone). ``prefer-zone``: kproxy's zone first. ``off``:
    one tier. Empty tiers are left out, so a zone with no node falls back to all."""
    tiers: list[tuple[Node, ...]] = []
    if topology == "prefer-zone" and zone:
        tiers.append(tuple(n for n in nodes if n.zone == zone))
    elif topology == "auto":
        placements = [n.placement for n in nodes]
        distribution = next((p.distribution for p in placements if p is not None and p.distribution), None)
        if all(p is not None and (p.for_zones is not None or p.for_nodes is not None) for p in placements):
            if node_name and distribution == "PreferSameNode":
                tiers.append(tuple(n for n in nodes if node_name in (n.placement.for_nodes or ())))
            if zone:
                tiers.append(tuple(n for n in nodes if zone in (n.placement.for_zones or ())))
        elif distribution in PREFER_ZONE:
            if node_name and distribution == "PreferSameNode":
                tiers.append(tuple(n for n in nodes if n.placement is not None and n.placement.node_name == node_name))
            if zone:
                tiers.append(tuple(n for n in nodes if n.zone == zone))
    return tuple(t for t in tiers if t and len(t) < len(nodes)) + (nodes,)


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
    once). ``zone``, ``node_name``, ``topology``: which nodes are preferred (``topology``).
    ``slow_start``: seconds over which a node that joins ramps up to its full weight.

    Which node takes a request, in order: nodes not yet tried, not ejected and not
    failing their health checks; of those, the most preferred topology tier that has any
    (same node, same zone, then all); then smooth weighted round robin (nginx's), each
    weight scaled by the node's slow-start ramp. Nodes are told apart by address, so a
    node whose zone or readiness changes keeps its place, ejection and ramp."""

    def __init__(self, name: str, source: NodeSource, cooldown: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, *, scheme: str = "http",
                 tls: TLSPolicy | None = None, pass_host: str = "pass", upstream_host: str | None = None,
                 retries: int | None = None, zone: str | None = None, node_name: str | None = None,
                 topology: str = "auto", slow_start: float = 0.0):
        self.name = name
        self.scheme, self.tls = scheme, tls
        self.pass_host, self.upstream_host = pass_host, upstream_host
        self.retries = retries
        self.zone, self.node_name, self.topology = zone, node_name, topology
        self.slow_start = slow_start
        self._source = source
        self._cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._nodes: tuple[Node, ...] | None = None
        self._tiers: tuple[tuple[Node, ...], ...] = ()
        self._current: dict[Node, float] = {}
        self._ejected: dict[Node, float] = {}    # node -> time it may come back
        self._unhealthy: set[Node] = set()       # failing active health checks
        self._unhealthy_addresses: frozenset[tuple[str, int]] = frozenset()  # the checks' verdict
        self._ramp_from: dict[Node, float] = {}  # node -> time its slow start began

    def nodes(self) -> tuple[Node, ...]:
        nodes = self._source()
        if not nodes:
            raise NoNodes(self.name)
        return nodes

    def pick(self, exclude: Iterable[Node] = (), nodes: tuple[Node, ...] | None = None) -> Node:
        """The next node (see the class), skipping ``exclude``. When every node is ejected
        or unhealthy, those marks are ignored: trying a node that may have recovered beats
        refusing outright. ``nodes``: a list the caller already has from ``nodes()`` (one
        request, one view of the service)."""
        if nodes is None:
            nodes = self.nodes()
        with self._lock:
            if nodes is not self._nodes:
                self._adopt(nodes)
            now = self._clock()
            ejected, unhealthy = self._ejected, self._unhealthy
            candidates: Sequence[Node] = ()
            for tier in self._tiers:
                if ejected or unhealthy:
                    candidates = [n for n in tier if n not in exclude and n not in unhealthy
                                  and ejected.get(n, 0.0) <= now]
                elif exclude:
                    candidates = [n for n in tier if n not in exclude]
                else:  # the common case: nothing tried, ejected or unhealthy
                    candidates = tier
                if candidates:
                    break
            if not candidates:
                candidates = [n for n in nodes if n not in exclude]
                if not candidates:
                    raise NoNodes(self.name)
            if len(candidates) == 1:
                return candidates[0]
            current = self._current
            ramps = self._ramp_from
            total = 0.0
            best = candidates[0]
            best_current = float("-inf")
            for node in candidates:
                weight = node.weight if not ramps or node not in ramps else node.weight * self._ramp(node, now)
                value = current[node] + weight
                current[node] = value
                total += weight
                if value > best_current:
                    best, best_current = node, value
            current[best] = best_current - total
            return best

    def _ramp(self, node: Node, now: float) -> float:
        # linear from SLOW_START_FLOOR to 1 over slow_start seconds, as Envoy's slow start
        # with aggression 1 and min_weight_percent 10
        elapsed = now - self._ramp_from[node]
        if elapsed >= self.slow_start:
            del self._ramp_from[node]
            return 1.0
        return max(SLOW_START_FLOOR, elapsed / self.slow_start)

    def _adopt(self, nodes: tuple[Node, ...]) -> None:
        # state follows a node's address: its zone or readiness may change, it stays the node
        first = self._nodes is None
        known = chain(self._nodes or (), self._ejected, self._unhealthy, self._ramp_from)
        by_address = {(n.host, n.port): n for n in known}
        moved = {n: by_address.get((n.host, n.port)) for n in nodes}
        self._nodes = nodes
        self._current = {n: self._current.get(old, 0.0) if old else 0.0 for n, old in moved.items()}
        self._ejected = {n: self._ejected[old] for n, old in moved.items() if old in self._ejected}
        # by address: a verdict on a node this upstream had not seen yet applies when it comes
        self._unhealthy = {n for n in nodes if (n.host, n.port) in self._unhealthy_addresses}
        ramps = {n: self._ramp_from[old] for n, old in moved.items() if old in self._ramp_from}
        if self.slow_start and not first:  # the first sync is never slowed
            now = self._clock()
            for n, old in moved.items():
                if old is None:
                    ramps[n] = now
        self._ramp_from = ramps
        self._tiers = topology_tiers(nodes, self.topology, self.zone, self.node_name)

    def failed(self, node: Node) -> None:
        """Eject ``node`` for the cool-down: it refused a connection or timed out. It comes
        back slowly (``slow_start``) when the cool-down ends."""
        with self._lock:
            until = self._clock() + self._cooldown
            self._ejected[node] = until
            if self.slow_start:
                self._ramp_from[node] = until

    def set_unhealthy(self, addresses: Collection[tuple[str, int]]) -> None:
        """The active health checks' verdict on every node: these ``(host, port)`` are out
        of rotation, the rest in; a node that comes back ramps up (``slow_start``)."""
        with self._lock:
            nodes = self._source()  # the checks may come before any request
            if nodes and nodes is not self._nodes:
                self._adopt(nodes)
            self._unhealthy_addresses = frozenset(addresses)
            returning = [n for n in self._unhealthy if (n.host, n.port) not in self._unhealthy_addresses]
            if self.slow_start and returning:
                now = self._clock()
                for node in returning:
                    self._ramp_from[node] = now
            self._unhealthy = {n for n in self._nodes or () if (n.host, n.port) in self._unhealthy_addresses}

    def is_unhealthy(self, node: Node) -> bool:
        return (node.host, node.port) in self._unhealthy_addresses

    def ejected(self) -> list[Node]:
        now = self._clock()
        with self._lock:
            return [n for n, t in self._ejected.items() if t > now]

    def states(self) -> list[NodeState]:
        """Every current node as operators see it: for the dashboard and the status JSON."""
        now = self._clock()
        with self._lock:
            out = []
            for n in self._nodes or ():
                if n in self._unhealthy:
                    state = "unhealthy"
                elif self._ejected.get(n, 0.0) > now:
                    state = "ejected"
                elif n in self._ramp_from and now - self._ramp_from[n] < self.slow_start:
                    state = "slow-starting"
                elif n.terminating:
                    state = "serving-terminating"
                else:
                    state = "ready"
                ramp = self._ramp(n, now) if n in self._ramp_from and self._ramp_from[n] <= now else 1.0
                out.append(NodeState(n, state, n.weight * ramp, self.locality(n)))
            return out

    def locality(self, node: Node) -> str:
        """``same`` or ``other`` zone than kproxy's, or ``unknown``."""
        if self.zone is None or node.zone is None:
            return "unknown"
        return "same" if node.zone == self.zone else "other"

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
            record.locality = self.locality(node)
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
