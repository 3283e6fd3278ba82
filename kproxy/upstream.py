"""Upstreams: where a service's requests go, and which node takes the next one.

An ``Upstream`` asks its node source for the current nodes on every pick, so static
lists and live discovery feed it the same way::

    upstream = Upstream("sd-app", lambda: (Node("10.0.0.7", 8080), Node("10.0.0.8", 8080, 3)))
    node = upstream.pick()            # smooth weighted round robin
    upstream.failed(node)             # passive health: skipped for ``cooldown`` seconds

A source returns a tuple of nodes, or None when the service is unknown or its registry
is disabled. Sources that return the same tuple object while nothing changed let the
balancer skip its rebuild; when the nodes do change, weights and ejections of the
nodes that stay are kept, so a scale-out does not reset the rotation.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable

from .node import Node

NodeSource = Callable[[], "tuple[Node, ...] | None"]


class NoNodes(LookupError):
    """The service is unknown, disabled, or has no usable nodes."""


class Upstream:
    def __init__(self, name: str, source: NodeSource, cooldown: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.name = name
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
