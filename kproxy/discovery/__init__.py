"""Service discovery: registries that turn a service reference into nodes.

    registry = create_registry(config.registries["my-k8s-cluster"])
    registry.start()                                  # after fork, in each worker
    registry.nodes("apisix", "httpbin", "80")         # tuple of Node, () or None

The request path, the admin endpoints and the metrics see a registry only through
``Registry``; the Kubernetes client is imported when a Kubernetes registry is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Protocol

if TYPE_CHECKING:
    from ..config import RegistryConfig
    from ..node import Node


@dataclass(frozen=True, slots=True)
class RegistryStats:
    """A registry's numbers for metrics: its snapshot, and totals over its reflectors."""
    state: str                  # ok, syncing, degraded, error, stopped, not started, disabled
    ready: bool
    services: int = 0           # Services with at least one usable node
    endpoints: int = 0          # distinct usable nodes
    known_services: int = 0
    changes: int = 0            # snapshots published
    last_sync: float | None = None  # time of the last full list or watch event
    lists: int = 0
    relists: int = 0
    watches: int = 0
    watch_restarts: int = 0
    events: int = 0
    bookmarks: int = 0
    malformed: int = 0
    errors: int = 0


class Registry(Protocol):
    """What the rest of kproxy may ask a registry."""

    def start(self) -> None:
        """Start watching (after fork, once per process)."""

    def stop(self) -> None: ...

    @property
    def ready(self) -> bool:
        """Every watched resource has completed its first full list."""

    def nodes(self, namespace: str, service: str, port: str) -> tuple[Node, ...] | None:
        """A Service port's usable nodes: None for an unknown Service, () for none usable.
        Called on every request: lock-free."""

    def stats(self) -> RegistryStats:
        """Numbers for metrics."""

    def dump(self) -> dict[str, Any]:
        """JSON-able state for ``/-/discovery``: never a token."""


def create_registry(config: RegistryConfig) -> Registry:
    """The registry for ``config.type``; it starts nothing until ``start()``."""
    if config.type == "kubernetes":
        from .kubernetes import KubernetesRegistry
        return KubernetesRegistry(config)
    raise ValueError(f"unknown registry type {config.type!r}")


def all_ready(configs: Mapping[str, RegistryConfig], registries: Mapping[str, Registry]) -> bool:
    """Every enabled registry has listed (what ``/-/readyz`` says)."""
    return all(name in registries and registries[name].ready for name, c in configs.items() if c.enabled)
