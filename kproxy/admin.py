"""Admin endpoints under ``admin_prefix`` (default ``/-/``).

=============  ==========================================================  ===============
path           answer                                                      who may read it
=============  ==========================================================  ===============
``healthz``    200 while the process serves                                anyone (probes)
``readyz``     200 once every enabled registry has listed, else 503        anyone (probes)
``metrics``    Prometheus text exposition                                  ``admin_allow``
``discovery``  JSON: every registry's state and endpoints, no secrets      ``admin_allow``
=============  ==========================================================  ===============

The client is the TCP peer, never a forwarded header any client can write; only behind
``trusted_proxies`` is it taken from their ``X-Forwarded-For`` (kproxy.client).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Mapping, Sequence

from . import metrics
from .client import Network, address_in
from .discovery import Registry, all_ready

if TYPE_CHECKING:
    from .config import RegistryConfig
    from .record import RequestRecord

Answer = tuple[int, bytes, str]
JSON = "application/json"


class Admin:
    """The admin endpoints of one loaded config: who may read them (``allow``), and the
    registries they report on (``configs`` names every one, ``registries`` those running)."""

    def __init__(self, allow: Sequence[Network], configs: Mapping[str, RegistryConfig],
                 registries: Mapping[str, Registry]):
        self.allow = allow
        self.configs = configs
        self.registries = registries

    def handle(self, environ: dict, name: str, record: RequestRecord) -> Answer | None:
        """The answer for admin path ``name``, or None if it is not an admin path."""
        record.service = record.api = "-admin"
        if name == "healthz":
            return 200, b'{"status": "ok"}\n', JSON
        if name == "readyz":
            ready = all_ready(self.configs, self.registries)
            body = {"status": "ready" if ready else "not ready",
                    "registries": {n: r.ready for n, r in self.registries.items()}}
            return (200 if ready else 503), _json(body), JSON
        if name not in ("metrics", "discovery"):
            record.service = record.api = "-"
            return None
        if not address_in(record.client, self.allow):
            return 403, _json({"error": "forbidden", "message": f"{name} is served to admin_allow only"}), JSON
        if name == "metrics":
            body, content_type = metrics.exposition(self.registries)
            return 200, body, content_type
        return 200, _json(self.discovery()), JSON

    def discovery(self) -> dict:
        out = {}
        for name, registry_config in self.configs.items():
            registry = self.registries.get(name)
            if registry is not None:
                out[name] = registry.dump()
            else:
                out[name] = {"enabled": registry_config.enabled,
                             "state": "disabled" if not registry_config.enabled else "not started"}
        return {"registries": out}


def _json(value: object) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True, default=str).encode() + b"\n"
