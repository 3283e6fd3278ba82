"""Where a Kubernetes registry's first sync spends its time, in one cold process (run by
``python bench/discovery.py --parts phases``; never part of the tests).

    PYTHONPATH=CHECKOUT python bench/_sync_phases.py --config INI [--registry k8s]

kproxy is imported from PYTHONPATH, the checkout under test (bench/discovery.py points it at
this checkout or at a ``--baseline`` revision's worktree); this script imports nothing else
of either checkout, and prints the path of the kproxy it imported. In this order:

  imports              kproxy.discovery.kubernetes, then the kubernetes client (the registry
                       imports it on its first request)
  registry first sync  ``KubernetesRegistry(config).start()`` until ``.ready``: both reflectors'
                       first list (endpoints and Services), as a worker does it; then ``stop()``;
                       and the part of it the cyclic garbage collector took (gc.callbacks)
  connect              a new ApiConnection: the client, TLS, one small GET (/version)
  LIST over HTTP       the endpoints reflector's first list again, on that connection, with the
                       path and parameters the reflector sent (recorded from ApiConnection.get,
                       so a revision that lists differently is replayed as it lists), page
                       by page, each body read as bytes
  json.loads           of those bytes
  trim                 trim_endpoints (trim_slice for EndpointSlices) of every item
  Store.replace        the trimmed objects into a new Store(index=service_key)
  build views          build_view of every Service's objects (no Services are in the
                       namespace, so no Service object)

The replayed steps (connect to build views) run with the cyclic collector off, after a
``gc.collect()``: each shows its own work, not a collection its allocations happened to set
off (what collections cost a real sync is in the registry's line). A phase this revision
has no API for is skipped with the reason. The times are printed in ms; the last line is
``RESULT {json}`` for bench/discovery.py.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import sys
import time
from typing import Any, Callable, Iterator

if sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # bench/'s scripts are not modules to import here: kproxy comes from PYTHONPATH

PHASES = ("imports: kproxy.discovery.kubernetes", "imports: kubernetes client", "registry first sync (start -> ready)",
          "  of which cyclic GC", "connect (client, TLS, GET /version)", "LIST over HTTP (request + read)", "json.loads", "trim",
          "Store.replace", "build views (build_view)")


class Phases:
    def __init__(self) -> None:
        self.ms: dict[str, float | None] = {}
        self.notes: dict[str, str] = {}

    def timed(self, name: str, work: Callable[[], Any], quiet: bool = False) -> Any:
        """Run ``work()``, timing it as phase ``name`` (``quiet``: the collector off); None
        (and the phase skipped, with the reason) when this revision lacks what it calls."""
        with collector_off() if quiet else contextlib.nullcontext():
            started = time.perf_counter()
            try:
                result = work()
            except (ImportError, AttributeError, TypeError, KeyError) as e:
                self.skip(name, f"{type(e).__name__}: {e}")
                return None
            self.ms[name] = (time.perf_counter() - started) * 1e3
        return result

    def skip(self, name: str, reason: str) -> None:
        self.ms[name] = None
        self.notes[name] = reason[:300]
        print(f"  {name}: skipped ({reason[:300]})", flush=True)


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class GcTime:
    """A gc.callbacks entry: seconds spent in collections, and how many, while installed."""

    def __init__(self) -> None:
        self.seconds, self.collections, self._started = 0.0, 0, None

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self.collections += 1
            self._started = None


def record_list_requests(api_class: Any) -> list[tuple[str, dict[str, str]]]:
    """Wrap ``api_class.get`` to record every non-watch request's path and parameters."""
    seen: list[tuple[str, dict[str, str]]] = []
    original = api_class.get

    def get(self: Any, path: str, params: Any, *args: Any, **kwargs: Any) -> Any:
        params = dict(params or {})
        if params.get("watch") not in ("true", "1"):
            seen.append((path, params))
        return original(self, path, params, *args, **kwargs)

    api_class.get = get
    return seen


def wait_ready(registry: Any, timeout: float = 120.0) -> None:
    deadline = time.perf_counter() + timeout
    while not registry.ready:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"the registry was not ready in {timeout:.0f} s: {registry.dump().get('informers')}")
        time.sleep(0.002)


def optional(name: str) -> tuple[Any, str]:
    """The module, or None and why: a revision under test may not have it."""
    try:
        return importlib.import_module(name), ""
    except ImportError as e:
        return None, f"{name} does not import in this revision ({e})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a kproxy INI with the registry")
    parser.add_argument("--registry", default="k8s")
    args = parser.parse_args(argv)
    phases = Phases()
    result: dict[str, Any] = {"phases": phases.ms, "skipped": phases.notes}

    kubernetes_module = phases.timed(PHASES[0], lambda: importlib.import_module("kproxy.discovery.kubernetes"))
    import kproxy
    result["kproxy"] = kproxy.__file__
    print(f"kproxy imported from {kproxy.__file__}", flush=True)
    phases.timed(PHASES[1], lambda: [importlib.import_module(m) for m in
                                     ("kubernetes.client", "kubernetes.config", "kubernetes.utils.keepalive")])
    from kproxy.config import load
    config = load(args.config).registries[args.registry]
    apiserver, why = optional("kproxy.discovery.apiserver")
    if apiserver is not None and not hasattr(apiserver, "ApiConnection"):
        apiserver, why = None, "kproxy.discovery.apiserver has no ApiConnection"
    seen = record_list_requests(apiserver.ApiConnection) if apiserver is not None else []

    def first_sync() -> None:
        registry = kubernetes_module.KubernetesRegistry(config)
        registry.start()
        try:
            wait_ready(registry)
        finally:
            registry.stop()

    if kubernetes_module is None:
        phases.skip(PHASES[2], "kproxy.discovery.kubernetes did not import")
    else:
        collections = GcTime()
        gc.callbacks.append(collections)
        try:
            phases.timed(PHASES[2], first_sync)
        finally:
            gc.callbacks.remove(collections)
        if phases.ms.get(PHASES[2]) is not None:
            phases.ms[PHASES[3]] = collections.seconds * 1e3
            result["gc_collections"] = collections.collections
    if apiserver is None:
        for name in PHASES[4:]:
            phases.skip(name, why)
        return finish(result, phases)
    listed = [(path, params) for path, params in seen if path.endswith(("/endpoints", "/endpointslices"))]
    if not listed:
        print("  no endpoints LIST was recorded from ApiConnection.get: replaying limit=500", flush=True)
        listed = [(f"/api/v1/namespaces/{config.single_namespace}/endpoints", {"limit": "500"})]
    path, params = listed[0][0], {k: v for k, v in listed[0][1].items() if k != "continue"}
    result["list"] = {"path": path, "params": params}
    print(f"  the reflector's first LIST: {path} {params}", flush=True)

    api = apiserver.ApiConnection(config)

    def get(path: str, params: dict[str, str]) -> bytes:
        response = api.get(path, params, 60.0)
        try:
            data = response.data
        finally:
            response.release_conn()
        if response.status != 200:
            raise RuntimeError(f"GET {path} answered {response.status}: {data[:200]!r}")
        return data

    phases.timed(PHASES[4], lambda: get("/version", {}), quiet=True)
    bodies: list[dict[str, Any]] = []
    list_s = loads_s = 0.0
    size = 0
    with collector_off():
        for _ in range(10000):  # pages
            started = time.perf_counter()
            data = get(path, params)
            read = time.perf_counter()
            body = json.loads(data)
            done = time.perf_counter()
            list_s, loads_s, size = list_s + read - started, loads_s + done - read, size + len(data)
            bodies.append(body)
            token = (body.get("metadata") or {}).get("continue")
            if not token:
                break
            params = dict(params, **{"continue": token})
    phases.ms[PHASES[5]], phases.ms[PHASES[6]] = list_s * 1e3, loads_s * 1e3
    items = [item for body in bodies for item in body.get("items") or ()]
    resource_version = str((bodies[-1].get("metadata") or {}).get("resourceVersion") or "")
    result.update(pages=len(bodies), bytes=size, items=len(items))
    api.close()

    endpoints, why = optional("kproxy.discovery.endpoints")
    cache, why_cache = optional("kproxy.discovery.cache")
    trim_name = "trim_slice" if path.endswith("/endpointslices") else "trim_endpoints"
    trim = getattr(endpoints, trim_name, None)
    trimmed = store = None
    if trim is None:
        phases.skip(PHASES[7], why or f"kproxy.discovery.endpoints has no {trim_name}")
    else:
        result["trim"] = trim_name
        trimmed = phases.timed(PHASES[7], lambda: [t for t in map(trim, items) if t is not None], quiet=True)

    def replace() -> Any:
        new = cache.Store(index=endpoints.service_key)
        new.replace(trimmed, resource_version)
        return new

    if trimmed is None or cache is None:
        phases.skip(PHASES[8], why_cache or "nothing trimmed")
    else:
        store = phases.timed(PHASES[8], replace, quiet=True)
    if store is None:
        phases.skip(PHASES[9], "no store to build from")
    else:
        phases.timed(PHASES[9], lambda: {key: endpoints.build_view(store.by_index(key), None)
                                         for key in store.index_values()}, quiet=True)
    return finish(result, phases)


def finish(result: dict[str, Any], phases: Phases) -> int:
    for name in PHASES:
        if phases.ms.get(name) is not None:
            print(f"  {name:<40} {phases.ms[name]:9.1f} ms", flush=True)
    if "items" in result:
        print(f"  {result['items']:,} items, {result['pages']} page(s), {result['bytes'] / 1e6:.1f} MB of JSON",
              flush=True)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
