"""Fuzzing the reflector's event handling (kproxy/discovery/reflector.py, cache.py) as the
Kubernetes registry uses it (kproxy/discovery/kubernetes.py).

The harness is the registry's own endpoints reflector, never started (no thread, no
network): a LIST goes through ``Reflector._list`` with a fake transport that answers one
JSON list, and each watch line through ``Reflector._handle``, the function the watch loop
calls for every line of the stream. The registry's transform (namespace filter, EndpointSlice
or Endpoints trimming) and change handler (the per-service snapshot) run as in production.
What it does not cover: the HTTP side of the watch (reconnects, backoff, timeouts),
covered by tests/test_discovery_*.py, and paged LISTs.

Properties, after every line:

- the store holds exactly what a model built from the valid events holds: the last version
  of each object (trimmed as the registry trims it), ADDED/MODIFIED of an object the
  registry filters out (other namespace, slice of no service) deletes it, DELETED deletes;
  a relist replaces everything;
- malformed lines and objects (not JSON, no object, no metadata.name, an unknown type, a
  bookmark without resourceVersion, a shape the trimmer cannot read) change nothing, are
  counted in ``malformed`` and never raise; an ERROR event raises Expired (410) or
  ApiStatusError, which end the watch (the harness then relists, or goes on);
- ``store.resource_version`` is the resourceVersion of the last list, bookmark or event
  that carried one, in arrival order (resourceVersions are opaque: out-of-order ones are
  not compared, as in client-go);
- the registry's snapshot equals the views built from the store's objects, and the store's
  index groups them by service.

Shapes a real API server cannot send, which fuzzing found breaking the reflector, are pinned
by the tests at the end.

Run: ``python -m pytest tests/test_fuzz_reflector.py``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.config import parse
from kproxy.discovery.reflector import ApiStatusError, Expired, _lines
from kproxy.discovery.apiserver import ENDPOINTS, EndpointApi
from kproxy.discovery.endpoints import SERVICE_NAME_LABEL, build_view, trim_endpoints, trim_slice
from kproxy.discovery.kubernetes import KubernetesRegistry

# more examples for a longer run: KPROXY_FUZZ_SCALE=10 python -m pytest tests/test_fuzz_*.py
SCALE = float(os.environ.get("KPROXY_FUZZ_SCALE", "1"))

SLICES = EndpointApi("discovery.k8s.io/v1", "endpointslices")
NAMES = ["a", "b", "c"]
WATCHED = ["ns-a", "ns-b"]
NAMESPACES = WATCHED + ["other", ""]  # "" and "other" are not watched when a pattern is set
SERVICES = ["web", "api"]
ADDRESSES = ["10.0.0.1", "10.0.0.2", "fd00::3"]
resource_versions = st.integers(1, 50).map(str)  # in no particular order


# -- the harness --

class FakeListResponse:
    status, reason = 200, "OK"

    def __init__(self, body: Any):
        self.data = json.dumps(body).encode()

    def release_conn(self) -> None:
        pass


class FakeTransport:
    """Answers every GET with the list set in ``body``."""

    def __init__(self) -> None:
        self.body: Any = None

    def get(self, path: str, params: Any, read_timeout: float) -> FakeListResponse:
        assert "watch" not in params
        return FakeListResponse(self.body)


def registry(resource: str, pattern: str | None) -> tuple[KubernetesRegistry, FakeTransport]:
    text = ("[registry:fuzz]\ntype = kubernetes\napi_server = https://127.0.0.1:1\ntoken = t\n"
            f"resource = {resource}\n" + (f"namespace_pattern = {pattern}\n" if pattern else ""))
    reg = KubernetesRegistry(parse(text).registries["fuzz"])
    reg._endpoint_api = SLICES if resource == "endpointslices" else ENDPOINTS  # no API discovery
    transport = FakeTransport()
    reg._endpoints._transport = transport
    reg._services_settled.set()  # no Services reflector runs: the first build waits for none
    return reg, transport


@contextmanager
def quiet() -> Iterator[None]:
    """Every malformed line is logged as a warning: thousands of them here."""
    logger = logging.getLogger("kproxy.discovery")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


# -- generation: objects tagged with what the registry must make of them --

@dataclass
class Obj:
    body: Any
    tag: str  # "valid", "filtered" (the transform drops it), "shape" (unreadable), "unnamed"
    key: tuple[str, str] | None = None


def metadata(draw, name: str, namespace: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace or draw(st.booleans()):
        meta["namespace"] = namespace
    if draw(st.integers(0, 3)):
        meta["resourceVersion"] = draw(resource_versions)
    return meta


@st.composite
def endpoint_objects(draw, resource: str, watched: list[str] | None) -> Obj:
    name, namespace = draw(st.sampled_from(NAMES)), draw(st.sampled_from(NAMESPACES))
    meta = metadata(draw, name, namespace)
    key = (namespace, name)
    filtered = watched is not None and namespace not in watched
    ports = draw(st.lists(st.fixed_dictionaries(
        {"port": st.sampled_from([80, 8080, 9000])},
        optional={"name": st.sampled_from(["", "http", "admin"]), "protocol": st.sampled_from(["TCP", "UDP"])}),
        max_size=2))
    if resource == "endpointslices":
        service = draw(st.sampled_from(SERVICES + [None]))
        if service:
            meta["labels"] = {SERVICE_NAME_LABEL: service, "x": "y"}
        endpoints = draw(st.lists(st.fixed_dictionaries(
            {"addresses": st.lists(st.sampled_from(ADDRESSES), max_size=2)},
            optional={"conditions": st.fixed_dictionaries({}, optional={
                k: st.none() | st.booleans() for k in ("ready", "serving", "terminating")})}), max_size=3))
        body = {"kind": "EndpointSlice", "metadata": meta, "addressType": "IPv4", "endpoints": endpoints,
                "ports": ports}
        filtered = filtered or not service
    else:
        subsets = draw(st.lists(st.fixed_dictionaries(
            {"addresses": st.lists(st.builds(lambda ip: {"ip": ip}, st.sampled_from(ADDRESSES)), max_size=2)},
            optional={"notReadyAddresses": st.lists(st.builds(lambda ip: {"ip": ip}, st.sampled_from(ADDRESSES)),
                                                    max_size=1),
                      "ports": st.just(ports)}), max_size=2))
        body = {"kind": "Endpoints", "metadata": meta, "subsets": subsets}
    return Obj(body, "filtered" if filtered else "valid", key)


@st.composite
def malformed_objects(draw, resource: str) -> Obj:
    name, namespace = draw(st.sampled_from(NAMES)), draw(st.sampled_from(WATCHED))
    meta = metadata(draw, name, namespace)
    unnamed = draw(st.sampled_from([
        None, [], "x", 5, {"kind": "Endpoints"}, {"metadata": None}, {"metadata": "m"}, {"metadata": ["name"]},
        {"metadata": {"namespace": namespace}}, {"metadata": {"name": ""}}, {"metadata": {"name": 7}},
        {"metadata": {"name": ["a"]}}, {"metadata": {"name": None, "namespace": namespace}}]))
    if draw(st.booleans()):
        return Obj(unnamed, "unnamed")
    if resource == "endpointslices":
        meta["labels"] = {SERVICE_NAME_LABEL: draw(st.sampled_from(SERVICES))}
        field_ = draw(st.sampled_from(["endpoints", "ports", "labels"]))
        bad = draw(st.sampled_from(["not a list", 5, {"a": 1}, [1], ["x"], [None]]
                                   + [[{"conditions": "ready", "addresses": ["10.0.0.1"]}]] * (field_ == "endpoints")))
        if field_ == "labels":
            meta["labels"] = draw(st.sampled_from([["x"], "x=y", 5]))
            body = {"metadata": meta, "endpoints": []}
        else:
            body = {"metadata": meta, field_: bad}
    else:
        body = {"metadata": meta, "subsets": draw(st.sampled_from(["not a list", 5, {"a": 1}, [1], ["x"],
                                                                   [{"addresses": "x"}],
                                                                   [{"ports": [1], "addresses": [{"ip": "10.0.0.1"}]}]]))}
    return Obj(body, "shape", (namespace, name))


BAD_LINES = [b"this is not json", b"{", b"[1, 2, 3]", b'"text"', b"null", b"42", b"{}", b'{"type": "ADDED"}',
             b'{"type": "ADDED", "object": null}', b'{"type": "ADDED", "object": []}', b"\xff\xfe\x00garbage",
             b'{"type": "ERROR"}', b'{"type": "BOOKMARK", "object": "x"}']


@dataclass
class Step:
    kind: str            # "event", "bad line", "bookmark", "error", "relist"
    line: bytes = b""
    event_type: str = ""
    obj: Obj | None = None
    rv: Any = None
    expired: bool = False
    items: list[Obj] = field(default_factory=list)


@st.composite
def steps(draw, resource: str, watched: list[str] | None) -> Step:
    choice = draw(st.integers(0, 9))
    if choice <= 4:
        event_type = draw(st.sampled_from(["ADDED", "MODIFIED", "DELETED"]))
        obj = draw(endpoint_objects(resource, watched) if choice <= 3 else malformed_objects(resource))
        return Step("event", json.dumps({"type": event_type, "object": obj.body}).encode(), event_type, obj)
    if choice == 5:
        rv = draw(resource_versions | st.sampled_from(["", None, 5, ["1"]]))
        meta = {} if rv is None else {"resourceVersion": rv}
        return Step("bookmark", json.dumps({"type": "BOOKMARK", "object": {"kind": "EndpointSlice",
                                                                           "metadata": meta}}).encode(), rv=rv)
    if choice == 6:
        line = draw(st.sampled_from(BAD_LINES) | st.binary(max_size=20).filter(lambda b: b.strip()))
        if draw(st.booleans()):  # an unknown event type, with a perfectly good object
            line = json.dumps({"type": draw(st.sampled_from(["SURPRISE", "added", None, 5])),
                               "object": draw(endpoint_objects(resource, watched)).body}).encode()
        return Step("bad line", line)
    if choice == 7:
        code = draw(st.sampled_from([410, 500, 403, None, "410"]))
        reason = draw(st.sampled_from(["Expired", "Gone", "InternalError", "", None]))
        status = {"kind": "Status", "code": code, "reason": reason, "message": "m"}
        return Step("error", json.dumps({"type": "ERROR", "object": status}).encode(),
                    expired=code == 410 or reason in ("Expired", "Gone"))
    return Step("relist", items=draw(st.lists(endpoint_objects(resource, watched) | malformed_objects(resource),
                                              max_size=5)), rv=draw(resource_versions))


@st.composite
def scenarios(draw) -> tuple[str, str | None, list[Obj], str, list[Step]]:
    resource = draw(st.sampled_from(["endpointslices", "endpoints"]))
    pattern = draw(st.sampled_from([None, "ns-a|ns-b"]))
    watched = None if pattern is None else WATCHED
    initial = draw(st.lists(endpoint_objects(resource, watched) | malformed_objects(resource), max_size=5))
    return (resource, pattern, initial, draw(resource_versions),
            draw(st.lists(steps(resource, watched), min_size=1, max_size=30)))


# -- the model --

class Model:
    def __init__(self, trim) -> None:
        self.trim = trim
        self.objects: dict[tuple[str, str], Any] = {}
        self.resource_version = ""
        self.malformed = self.events = self.bookmarks = 0

    def relist(self, items: list[Obj], rv: str) -> None:
        self.objects = {}
        for item in items:
            if item.tag == "valid":
                self.objects[item.key] = self.trim(item.body)
            elif item.tag in ("unnamed", "shape"):
                self.malformed += 1
        self.resource_version = rv

    def event(self, event_type: str, obj: Obj) -> None:
        if obj.tag == "unnamed" or (obj.tag == "shape" and event_type != "DELETED"):
            self.malformed += 1
            return
        if event_type == "DELETED" or obj.tag == "filtered":
            self.objects.pop(obj.key, None)
        elif obj.tag in ("valid",):
            self.objects[obj.key] = self.trim(obj.body)
        rv = obj.body["metadata"].get("resourceVersion")
        if isinstance(rv, str) and rv:
            self.resource_version = rv
        self.events += 1

    def bookmark(self, rv: Any) -> None:
        if isinstance(rv, str) and rv:
            self.resource_version = rv
            self.bookmarks += 1
        else:
            self.malformed += 1


def check(reg: KubernetesRegistry, model: Model) -> None:
    reflector, store = reg._endpoints, reg._endpoints_store
    assert {key: store.get(key) for key in store.keys()} == model.objects
    assert store.resource_version == model.resource_version
    assert (reflector.counts.malformed, reflector.counts.events, reflector.counts.bookmarks, reflector.counts.errors) == \
        (model.malformed, model.events, model.bookmarks, 0)
    by_service: dict[tuple[str, str], list[Any]] = {}
    for obj in model.objects.values():
        by_service.setdefault((obj["metadata"]["namespace"], obj["service"]), []).append(obj)
    assert set(store.index_values()) == set(by_service)
    for key, objects in by_service.items():
        assert sorted(map(repr, store.by_index(key))) == sorted(map(repr, objects))
    assert reg._snapshot == {key: build_view(objects, None) for key, objects in by_service.items()}


# -- the properties --

@settings(max_examples=int(150 * SCALE), deadline=None)
@given(scenarios())
def test_the_store_always_equals_the_model_of_the_valid_events(scenario):
    resource, pattern, initial, list_rv, script = scenario
    reg, transport = registry(resource, pattern)
    reflector = reg._endpoints
    model = Model(trim_slice if resource == "endpointslices" else trim_endpoints)
    with quiet():
        transport.body = {"kind": "List", "metadata": {"resourceVersion": list_rv},
                          "items": [o.body for o in initial]}
        reflector._list()
        model.relist(initial, list_rv)
        check(reg, model)
        for step in script:
            if step.kind == "relist":
                transport.body = {"kind": "List", "metadata": {"resourceVersion": step.rv},
                                  "items": [o.body for o in step.items]}
                reflector._list()
                model.relist(step.items, step.rv)
            elif step.kind == "error":
                with pytest.raises(Expired if step.expired else ApiStatusError):
                    reflector._handle(step.line)
            else:
                reflector._handle(step.line)  # must not raise
                if step.kind == "event":
                    model.event(step.event_type, step.obj)
                elif step.kind == "bookmark":
                    model.bookmark(step.rv)
                else:
                    model.malformed += 1
            check(reg, model)


class ChunkedStream:
    """A watch response body that arrives in the given pieces."""
    chunked = False

    def __init__(self, chunks: list[bytes]):
        self._chunks = iter(chunks)

    def read1(self, size: int) -> bytes:
        return next(self._chunks, b"")


@settings(max_examples=int(150 * SCALE), deadline=None)
@given(st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=10),
       st.sampled_from([b"\n", b"\r\n"]), st.booleans(), st.data())
def test_watch_lines_are_split_the_same_whatever_the_chunking(lines, end, final_newline, data):
    stream = end.join(lines) + (end if final_newline else b"")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)]) if stream[a:b]]
    assert list(_lines(ChunkedStream(chunks))) == [line for line in stream.split(b"\n") if line.strip()]


# -- shapes a real API server does not send, which the reflector does not survive --
# (found by the fuzzing above before they were excluded from it; kept as pinned reports)

def handle(resource: str, event: Any) -> tuple[KubernetesRegistry, BaseException | None]:
    reg, _ = registry(resource, None)
    line = event if isinstance(event, bytes) else json.dumps(event).encode()
    with quiet():
        try:
            reg._endpoints._handle(line)
        except Exception as e:  # noqa: BLE001 - the finding is which one
            return reg, e
    return reg, None


def test_unhashable_namespace_is_skipped_as_malformed():
    for event_type in ("ADDED", "DELETED"):
        reg, error = handle("endpoints", {"type": event_type,
                                          "object": {"metadata": {"name": "a", "namespace": ["x"]}}})
        assert error is None and reg._endpoints.counts.malformed == 1


def test_unhashable_service_label_is_skipped_as_malformed():
    reg, error = handle("endpointslices", {"type": "ADDED", "object": {"metadata": {
        "name": "a", "namespace": "ns", "labels": {SERVICE_NAME_LABEL: ["web"]}}, "endpoints": []}})
    assert error is None and reg._endpoints.counts.malformed == 1 and not reg._endpoints_store.keys()


def test_non_string_resource_version_is_not_taken():
    reg, error = handle("endpoints", {"type": "MODIFIED", "object": {"metadata": {
        "name": "a", "namespace": "ns", "resourceVersion": 12}}})
    assert error is None and reg._endpoints_store.resource_version == ""


def test_deeply_nested_line_is_skipped_as_malformed():
    reg, error = handle("endpoints", b"[" * 100_000)
    assert error is None and reg._endpoints.counts.malformed == 1


def test_non_string_address_does_not_leave_the_snapshot_stale():
    reg, error = handle("endpoints", {"type": "ADDED", "object": {"metadata": {"name": "a", "namespace": "ns"},
                                      "subsets": [{"addresses": [{"ip": "10.0.0.1"}, {"ip": 5}],
                                                   "ports": [{"port": 80}]}]}})
    assert error is None and reg._endpoints.counts.errors == 0
    assert set(reg._snapshot) == {(o["metadata"]["namespace"], o["service"]) for o in reg._endpoints_store.list()}


def test_string_addresses_do_not_become_nodes():
    reg, error = handle("endpointslices", {"type": "ADDED", "object": {
        "metadata": {"name": "a", "namespace": "ns", "labels": {SERVICE_NAME_LABEL: "web"}},
        "ports": [{"name": "", "port": 80}], "endpoints": [{"addresses": "10.0.0.1"}, {"addresses": ["not-an-ip"]}]}})
    assert error is None
    assert not reg.nodes("ns", "web", "80")
