"""A node: one upstream address that can take a request.

Static upstreams list nodes in the INI (``10.0.0.7:8080 10.0.0.8:8080 weight=3``);
discovery builds them from endpoints. Nodes are immutable and hashable so the
balancer can keep per-node state (weights, ejections) across node-list changes::

    >>> Node.parse("[fd00::7]:8080 weight=2")
    Node(host='fd00::7', port=8080, weight=2)
    >>> Node("fd00::7", 8080).address
    '[fd00::7]:8080'
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the cluster says a node runs, and where it wants its traffic to come from:
    the endpoint's zone and node, its EndpointSlice hints (None: the slice gave none), and
    its Service's ``trafficDistribution``. One object is shared by the nodes that agree."""
    zone: str | None = None
    node_name: str | None = None
    for_zones: frozenset[str] | None = None
    for_nodes: frozenset[str] | None = None
    distribution: str | None = None     # PreferClose, PreferSameZone, PreferSameNode


@dataclass(frozen=True, slots=True)
class Node:
    host: str
    port: int
    weight: int = 1
    placement: Placement | None = field(default=None, repr=False)
    terminating: bool = field(default=False, repr=False)  # serving, not ready: the service drains
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # the balancer looks nodes up several times per request: hash the fields once
        object.__setattr__(self, "_hash", hash((self.host, self.port, self.weight, self.placement, self.terminating)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def zone(self) -> str | None:
        return self.placement.zone if self.placement is not None else None

    @property
    def address(self) -> str:
        """``host:port``, with IPv6 hosts in brackets as URLs want them."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Node:
        """Parse ``host:port`` with an optional ``weight=N`` (space or comma separated)."""
        address, _, options = text.strip().partition(" ")
        host, port = split_host_port(address)
        weight = 1
        for option in options.replace(",", " ").split():
            name, sep, value = option.partition("=")
            if name != "weight" or not sep:
                raise ValueError(f"unknown node option {option!r} (only weight=N)")
            if not value.isdigit() or not 1 <= int(value) <= 1000:
                raise ValueError(f"weight must be a whole number from 1 to 1000, not {value!r}")
            weight = int(value)
        return cls(host, port, weight)


def split_host_port(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into its parts; raises ValueError naming the problem."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"{text!r}: IPv6 addresses need brackets, as in [::1]:8080")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: port must be 1-65535")
    return host, int(port)


def parse_nodes(text: str) -> tuple[Node, ...]:
    """Parse a ``nodes =`` value: whitespace-separated ``host:port``, each optionally
    followed by ``weight=N``."""
    nodes: list[str] = []
    for word in text.split():
        if word.startswith("weight="):
            if not nodes:
                raise ValueError(f"{word!r} must follow a host:port")
            nodes[-1] += " " + word
        else:
            nodes.append(word)
    if not nodes:
        raise ValueError("no nodes given")
    return tuple(Node.parse(n) for n in nodes)
