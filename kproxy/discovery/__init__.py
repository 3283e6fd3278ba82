"""Service discovery: registries that turn a service reference into nodes.

    registry = create_registry(config.registries["my-k8s-cluster"])
    registry.start()                                  # after fork, in each worker
    registry.nodes("apisix", "httpbin", "80")         # tuple of Node, () or None
"""

from __future__ import annotations

from ..config import RegistryConfig
from .kubernetes import KubernetesRegistry

Registry = KubernetesRegistry  # the only type so far; others would share its public methods


def create_registry(config: RegistryConfig) -> Registry:
    """The registry for ``config.type``; it starts nothing until ``start()``."""
    if config.type == "kubernetes":
        return KubernetesRegistry(config)
    raise ValueError(f"unknown registry type {config.type!r}")
