"""Admin endpoints under ``admin_prefix`` (default ``/-/``).

=============  ==========================================================  ===============
path           answer                                                      who may read it
=============  ==========================================================  ===============
``healthz``    200 while the process serves                                anyone (probes)
``readyz``     200 once every enabled registry has listed, else 503        anyone (probes)
``metrics``    Prometheus text exposition                                  ``admin_allow``
``discovery``  JSON: every registry's state and endpoints, no secrets      ``admin_allow``
``status``     JSON: what the dashboard shows (kproxy.status, README.rst)  ``admin_allow``
(the root)     the dashboard: an HTML page polling ``status``              ``admin_allow``
=============  ==========================================================  ===============

The client is the TCP peer, never a forwarded header any client can write; only behind
``trusted_proxies`` is it taken from their ``X-Forwarded-For`` (kproxy.client).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Mapping, Sequence

from . import metrics, status
from .client import Network, address_in
from .discovery import Registry, all_ready

if TYPE_CHECKING:
    from .config import Config, RegistryConfig
    from .record import RequestRecord
    from .health import HealthChecker, SharedHealthChecker
    from .upstream import Upstream

Answer = tuple[int, bytes, str] | tuple[int, bytes, str, list[tuple[str, str]]]
JSON = "application/json"


class Admin:
    """The admin endpoints of one loaded config: who may read them (``allow``), and the
    registries they report on (``configs`` names every one, ``registries`` those running);
    for the dashboard, the config and its upstreams."""

    def __init__(self, allow: Sequence[Network], configs: Mapping[str, RegistryConfig],
                 registries: Mapping[str, Registry], config: Config, upstreams: Mapping[str, Upstream],
                 health_checkers: Sequence[HealthChecker | SharedHealthChecker] = ()):
        self.allow = allow
        self.configs = configs
        self.registries = registries
        self.config = config
        self.upstreams = upstreams
        self.health_checkers = health_checkers
        self.loaded = time.time()

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
        if name not in ("metrics", "discovery", "status") and name not in status.STATIC:
            record.service = record.api = "-"
            return None
        if not address_in(record.client, self.allow):
            what = name or "the dashboard"
            return 403, _json({"error": "forbidden", "message": f"{what} is served to admin_allow only"}), JSON
        if name == "metrics":
            body, content_type = metrics.exposition(self.registries, self.upstreams)
            return 200, body, content_type
        if name == "discovery":
            return 200, _json(self.discovery()), JSON
        if name == "status":
            document = status.status(self.config, self.upstreams, self.registries, self.configs, self.loaded,
                                     environ.get("SERVER_SOFTWARE"))
            return 200, _json(document), JSON, [("Cache-Control", "no-store")]
        body, content_type = status.static_file(name)  # type: ignore[misc]
        return 200, body, content_type, status.HEADERS

    def discovery(self) -> dict:
        out = {}
        for name, registry_config in self.configs.items():
            registry = self.registries.get(name)
            if registry is not None:
                out[name] = registry.dump()
            else:
                out[name] = {"enabled": registry_config.enabled,
                             "state": "disabled" if not registry_config.enabled else "not started"}
        checked = {checker.upstream.name: checker.dump() for checker in self.health_checkers}
        return {"registries": out, **({"health_checks": checked} if checked else {})}


def _json(value: object) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True, default=str).encode() + b"\n"
