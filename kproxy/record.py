"""A request record: what happened to one request, from arrival to the last byte of its answer.

The gateway fills it in as the request goes (route, node, upstream status and time,
failures); when the answer is closed, every observer (metrics, the access log) reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .node import Node


@dataclass(slots=True)
class RequestRecord:
    method: str
    path: str
    client: str
    request_id: str
    started: float
    service: str = "-"
    api: str = "-"
    node: Node | None = None
    locality: str = "unknown"   # the node's zone against kproxy's: same, other, unknown
    upstream_status: int | None = None
    upstream_seconds: float | None = None
    status: int = 0
    bytes_sent: int = 0
    bytes_received: int | None = None  # from the client, counted for tunnels (a request body: None)
    attempts: int = 0
    failures: list[str] = field(default_factory=list)  # UpstreamFailure kinds, in order
    ejections: int = 0
    error: str | None = None
