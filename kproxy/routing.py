"""Routing: (Host, path, method) -> the api that serves it, on a Werkzeug ``Map``.

::

    router = Router()
    router.add("sd.httpbin.org", "/v1/anything", "prefix", None, target="anything")
    router.match("sd.httpbin.org:9080", "/v1/anything/x", "GET")   # -> "anything"

Rules of the contract, and how the ``Map`` gives them:

- host: exact, ``*.example.org`` (exactly one label, as Kubernetes Ingress wildcards), or
  empty for any host. Werkzeug's state-machine matcher tries static parts before
  converters, so an exact host is preferred to a wildcard, and a wildcard to "any".
- prefix match on whole segments: ``/p`` becomes the rules ``/p`` and ``/p/<rest>``, so
  ``/pq`` never matches. Static segments are tried first, so the longest path wins.
- exact beats prefix at equal length: exact rules are added first, and Werkzeug keeps the
  insertion order of rules with equal weight.
- methods: a path match whose methods exclude the request's keeps looking; if nothing
  else matches, MethodNotAllowed lists the union of the allowed methods.

Lookup walks a trie of path segments, so its cost does not grow with the number of routes
(``bench/route_lookup.py`` measures it); the answers to recent questions are remembered.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable

from werkzeug.exceptions import BadHost
from werkzeug.exceptions import MethodNotAllowed as _WerkzeugMethodNotAllowed
from werkzeug.exceptions import NotFound
from werkzeug.routing import BaseConverter, Map, Rule


class NoRoute(LookupError):
    pass


class MethodNotAllowed(LookupError):
    def __init__(self, allowed: Iterable[str]):
        self.allowed = sorted(allowed)
        super().__init__(", ".join(self.allowed))


class _Rest(BaseConverter):
    """The rest of a path below a prefix, empty included (``/p/`` matches ``/p/<rest>``)."""
    regex = ".*"
    part_isolating = False


class _Label(BaseConverter):
    """One DNS label: the ``*`` of ``*.example.org``."""
    regex = "[a-z0-9-]+"


_ANY_HOST = "<kproxy_any_host>"
_NO_HOST = "-"  # what an absent Host header is matched as: only "any host" routes take it
_ADAPTER_CACHE_SIZE = 256
_MATCH_CACHE_SIZE = 4096
# Werkzeug strips the leading slashes of a path before matching ("//a" would match as "/a"):
# under one static first segment, rules and paths keep every slash, so "//a" is routed as it
# is forwarded (docs/security.rst: "//" is routed as it is)
_BASE = "/_"


class Router:
    def __init__(self) -> None:
        self._map = Map(host_matching=True, strict_slashes=False, merge_slashes=False,
                        converters={"rest": _Rest, "label": _Label})
        self._pending: list[tuple[int, Rule]] = []
        self._count = 0
        self._build_lock = threading.Lock()
        self._adapters: dict[str | None, Any] = {}  # Host header -> MapAdapter
        self._matches: dict[tuple[str | None, str, str], Any] = {}  # (Host, path, method) -> target

    def add(self, host: str, path: str, match: str, methods: Iterable[str] | None, target: Any) -> None:
        """Route ``host`` + ``path`` (``match`` = "prefix" or "exact") to ``target``.

        ``methods`` None allows every method."""
        if host.startswith("*."):
            host_rule = "<label:kproxy_label>" + host[1:]
        else:
            host_rule = host or _ANY_HOST
        path = path or "/"
        if match == "prefix":  # /p/ is the same prefix as /p: the same rules, the same 405s
            path = path.rstrip("/") or "/"
        paths = [_BASE + path]
        if match == "prefix":
            paths.append(_BASE + path.rstrip("/") + "/<rest:kproxy_rest>")
        methods = None if methods is None else list(methods)
        # exact rules go first so that they win ties with prefix rules of the same path
        order = 0 if match == "exact" else 1
        for p in paths:
            # an exact /p must not also take /p/ (the Map is lenient about trailing slashes);
            # a rule ending in / stays lenient, or Werkzeug would answer /p with a redirect
            strict = match == "exact" and not p.endswith("/")
            rule = Rule(p, host=host_rule, endpoint=target, methods=methods, websocket=False,
                        strict_slashes=strict)
            self._pending.append((order, rule))
        self._count += 1
        self._matches.clear()

    def __len__(self) -> int:
        return self._count

    def build(self) -> None:
        """Add the routes given so far to the map (in the order that makes exact rules win
        ties); ``match`` does it on first use, but the gateway does it at config load."""
        with self._build_lock:  # requests may race to the first match
            self._pending.sort(key=lambda pair: pair[0])
            for _, rule in self._pending:
                self._map.add(rule)
            self._pending.clear()
            self._map.update()

    def _adapter(self, host: str | None) -> Any:
        # Binding costs as much as matching; a client's Host header is one of a few. The cache
        # is bounded: random Host headers (a scan) empty it rather than grow it.
        try:
            adapter = self._map.bind(normalize_host(host) or _NO_HOST)
        except BadHost:  # not a DNS name (an empty label, one over 63 characters): no named
            adapter = self._map.bind(_NO_HOST)  # host can match; any-host routes
        if len(self._adapters) >= _ADAPTER_CACHE_SIZE:
            self._adapters.clear()
        self._adapters[host] = adapter
        return adapter

    def match(self, host: str | None, path: str, method: str) -> Any:
        """The target for a request. ``host`` may carry a port. Raises NoRoute or
        MethodNotAllowed.

        Matches found are remembered: most traffic asks a few questions again and again,
        and a dictionary answers them in a tenth of the map's time. The memory is
        bounded: many different paths (ids in them, a scan) empty it rather than grow it."""
        key = (host, path, method)
        target = self._matches.get(key)
        if target is not None:
            return target
        target = self._lookup(host, path, method)
        if len(self._matches) >= _MATCH_CACHE_SIZE:
            self._matches.clear()
        self._matches[key] = target
        return target

    def _lookup(self, host: str | None, path: str, method: str) -> Any:
        if self._pending:
            self.build()
        adapter = self._adapters.get(host)
        if adapter is None:
            adapter = self._adapter(host)
        try:
            target, _ = adapter.match(_BASE + path, method=method)
        except NotFound:
            raise NoRoute(path) from None
        except _WerkzeugMethodNotAllowed as e:
            raise MethodNotAllowed(e.valid_methods or ()) from None
        return target


def normalize_host(host: str | None) -> str:
    """Lower-case host without port or trailing dot; ``[::1]:80`` -> ``[::1]``."""
    if not host:
        return ""
    host = host.lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    return host.partition(":")[0].rstrip(".")
