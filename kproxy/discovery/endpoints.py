"""What Kubernetes endpoints mean for routing: objects trimmed to what the port mapping
needs, and one Service's nodes by port (``ServiceView``), built by a pure function::

    view = build_view([trim_slice(slice_a), trim_slice(slice_b)], trim_service(service))
    view.ports["80"]      # (Node('10.1.2.3', 8080), ...): the Service port, by number or name

Port semantics: ``port`` is the Service port (``spec.ports[].port``) or its name. Its name
picks the endpoint ports of that name (``""`` for a single unnamed port), whatever their
numbers. When Services are not readable (the seed's RBAC grants only endpoints), the port
is matched against endpoint port names and numbers instead, and the dump says so; a single
unnamed endpoint port is the only port of its Service, so it answers any port number.

Endpoint semantics: every slice of a service is merged and de-duplicated by address and
port; ready endpoints (``ready`` unset counts as ready) are used; when none is ready, the
serving ones (terminating included), so a draining service still answers; never the rest.

Topology: each node carries its ``Placement``: the endpoint's zone (v1 ``zone``, v1beta1
``topology["topology.kubernetes.io/zone"]``), its node (``nodeName``, or v1beta1's
``kubernetes.io/hostname``), its ``hints.forZones``/``forNodes`` and the Service's
``spec.trafficDistribution``. Which of them to follow is the upstream's choice.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping

from ..node import Node, Placement
from .cache import Object

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ZONE_LABEL = "topology.kubernetes.io/zone"
HOSTNAME_LABEL = "kubernetes.io/hostname"
READY, SERVING = 2, 1  # endpoint states kept by the trimmers; not-ready ones are dropped
EMPTY: tuple[Node, ...] = ()

ServiceKey = tuple[str, str]


# -- trimming objects to what the port mapping needs --
# A trimmed endpoints object: {"metadata": {namespace, name, resourceVersion}, "service": name,
#   "groups": [(ports, endpoints)]} where ports = ((name, number), ...) and
#   endpoints = ((address, READY|SERVING, placement), ...): every port of a group applies to
#   every endpoint; placement is a Placement without the Service's distribution, or None.

def _metadata(obj: Object) -> dict[str, str]:
    m = obj["metadata"]
    return {"namespace": m.get("namespace") or "", "name": m["name"],
            "resourceVersion": m.get("resourceVersion") or ""}


def _tcp_ports(ports: Iterable[dict[str, Any]] | None) -> tuple[tuple[str, int], ...]:
    out = []
    for p in ports or ():
        if (p.get("protocol") or "TCP") == "TCP" and isinstance(p.get("port"), int):
            name = p.get("name") or ""
            if not isinstance(name, str):
                raise ValueError(f"port name {name!r} is not a string")
            out.append((name, p["port"]))
    return tuple(out)


def _ip(value: Any) -> str | None:
    """An endpoint address as a canonical IP string; None for anything else (the API
    server only stores IPs; a hostname or junk here must not become a node)."""
    if not isinstance(value, str):
        return None
    try:
        # the first list parses every address of the cluster: inet_pton takes a tenth of
        # ipaddress's time, and accepts only the canonical dotted quad (no leading zeros)
        if socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, value)) == value:
            return value
    except (OSError, ValueError):  # not IPv4 (ValueError: an embedded NUL)
        pass
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def trim_endpoints(obj: Object) -> Object:
    """v1 Endpoints: ``addresses`` are ready; ``notReadyAddresses`` are never used."""
    groups = []
    for subset in obj.get("subsets") or ():
        ports = _tcp_ports(subset.get("ports"))
        addresses = tuple((ip, READY, _placement(None, a.get("nodeName"), None))
                          for a, ip in ((a, _ip(a.get("ip"))) for a in subset.get("addresses") or ()) if ip)
        if ports and addresses:
            groups.append((ports, addresses))
    return {"metadata": _metadata(obj), "service": obj["metadata"]["name"], "groups": groups}


def trim_slice(obj: Object) -> Object | None:
    """EndpointSlice (v1 or v1beta1); None for a slice that belongs to no service."""
    service = (obj["metadata"].get("labels") or {}).get(SERVICE_NAME_LABEL)
    if not service:
        return None
    if not isinstance(service, str):
        raise ValueError(f"label {SERVICE_NAME_LABEL} is not a string")
    endpoints = []
    for endpoint in obj.get("endpoints") or ():
        addresses = endpoint.get("addresses") or ()
        # the addresses of one endpoint are fungible: consumers use the first
        address = _ip(addresses[0]) if isinstance(addresses, list) and addresses else None
        if address is None:
            continue
        conditions = endpoint.get("conditions") or {}
        if conditions.get("ready") is not False:  # unset means ready
            state = READY
        elif conditions.get("serving") is True:  # not ready, but still serving (draining)
            state = SERVING
        else:
            continue
        topology = endpoint.get("topology") or {}  # v1beta1
        zone = endpoint.get("zone") or topology.get(ZONE_LABEL)
        node_name = endpoint.get("nodeName") or topology.get(HOSTNAME_LABEL)
        endpoints.append((address, state, _placement(zone, node_name, endpoint.get("hints"))))
    ports = _tcp_ports(obj.get("ports"))
    groups = [(ports, tuple(endpoints))] if ports and endpoints else []
    return {"metadata": _metadata(obj), "service": service, "groups": groups}


def _placement(zone: Any, node_name: Any, hints: Any) -> Placement | None:
    for_zones = for_nodes = None
    if isinstance(hints, dict):
        for_zones = _names(hints.get("forZones"))
        for_nodes = _names(hints.get("forNodes"))
    zone = zone if isinstance(zone, str) and zone else None
    node_name = node_name if isinstance(node_name, str) and node_name else None
    if zone is None and node_name is None and for_zones is None and for_nodes is None:
        return None
    return Placement(zone, node_name, for_zones, for_nodes)


def _names(entries: Any) -> frozenset[str] | None:
    """``[{"name": "a"}, ...]`` (hints' forZones, forNodes) as a set; None if absent."""
    if not isinstance(entries, list):
        return None
    return frozenset(e["name"] for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str))


def trim_service(obj: Object) -> Object:
    spec = obj.get("spec") or {}
    distribution = spec.get("trafficDistribution")
    return {"metadata": _metadata(obj), "ports": _tcp_ports(spec.get("ports")),
            "distribution": distribution if isinstance(distribution, str) else None}


def service_key(obj: Object) -> ServiceKey:
    return obj["metadata"]["namespace"], obj["service"]


# -- the per-service view on the request path --

@dataclass(frozen=True)
class ServiceView:
    """Nodes of one service by config port string; immutable, shared with readers."""
    ports: Mapping[str, tuple[Node, ...]]
    any_port: tuple[Node, ...] | None = None  # without a Service: a single unnamed port
    source: str = "service"                    # "service" or "endpoints" (port matching)
    service_ports: tuple[tuple[str, int], ...] | None = None


def build_view(endpoint_objects: Iterable[Object], service: Object | None) -> ServiceView:
    """Merge a service's endpoints objects and map them to its ports (pure function)."""
    # port name -> (address, number) -> (state, placement)
    merged: dict[str, dict[tuple[str, int], tuple[int, Placement | None]]] = {}
    for obj in endpoint_objects:
        for ports, endpoints in obj["groups"]:
            for name, number in ports:
                entries = merged.setdefault(name, {})
                for address, state, placement in endpoints:
                    if entries.get((address, number), _NONE)[0] < state:
                        entries[(address, number)] = (state, placement)
    distribution = service.get("distribution") if service is not None else None
    built: list[tuple[Mapping[tuple[str, int], tuple[int, Placement | None]], tuple[Node, ...]]] = []
    interned: dict[tuple[Node, ...], tuple[Node, ...]] = {}
    placements: dict[Placement, Placement] = {}

    def usable(entries: Mapping[tuple[str, int], tuple[int, Placement | None]]) -> tuple[Node, ...]:
        # a port is often reachable by name and by number: build its nodes once (making
        # nodes is most of a first sync's time), and let equal node lists share one tuple
        for seen, nodes in built:
            if seen == entries:
                return nodes
        nodes = _usable(entries, distribution, placements)
        nodes = interned.setdefault(nodes, nodes)
        built.append((entries, nodes))
        return nodes

    if service is not None:
        ports: dict[str, tuple[Node, ...]] = {}
        for name, number in service["ports"]:
            nodes = usable(merged.get(name, {}))
            ports.setdefault(str(number), nodes)
            if name:
                ports[name] = nodes
        return ServiceView(ports, None, "service", service["ports"])
    if set(merged) == {""}:
        return ServiceView({}, usable(merged[""]), "endpoints")
    ports = {}
    by_number: dict[int, dict[tuple[str, int], tuple[int, Placement | None]]] = {}
    for name, entries in merged.items():
        if name:
            ports[name] = usable(entries)
        for (address, number), state in entries.items():
            by_number.setdefault(number, {})[(address, number)] = state
    for number, entries in by_number.items():
        ports.setdefault(str(number), usable(entries))
    return ServiceView(ports, None, "endpoints")


_NONE = (0, None)


def _usable(entries: Mapping[tuple[str, int], tuple[int, Placement | None]], distribution: str | None,
            placements: dict[Placement, Placement]) -> tuple[Node, ...]:
    state = READY if any(s == READY for s, _ in entries.values()) else SERVING
    chosen = sorted(((key, placement) for key, (s, placement) in entries.items() if s == state),
                    key=lambda pair: pair[0])
    if not chosen:
        return EMPTY
    nodes = []
    for (address, number), placement in chosen:
        if distribution is not None:
            placement = replace(placement or Placement(), distribution=distribution)
        if placement is not None:
            placement = placements.setdefault(placement, placement)  # shared, not one per node
        nodes.append(Node(address, number, placement=placement, terminating=state == SERVING))
    return tuple(nodes)


def keep_unchanged(view: ServiceView, old: ServiceView | None) -> ServiceView:
    """Keep the old tuple objects where nothing changed: the balancer compares by identity."""
    if old is None:
        return view
    if view == old:
        return old
    previous = {nodes: nodes for nodes in old.ports.values()}
    if old.any_port is not None:
        previous.setdefault(old.any_port, old.any_port)

    def keep(key: str, nodes: tuple[Node, ...]) -> tuple[Node, ...]:
        before = old.ports.get(key)
        return before if before == nodes else previous.get(nodes, nodes)

    ports = {key: keep(key, nodes) for key, nodes in view.ports.items()}
    any_port = None if view.any_port is None else previous.get(view.any_port, view.any_port)
    return ServiceView(ports, any_port, view.source, view.service_ports)
