"""The reflector's store: the objects of one watched resource, keyed by (namespace, name).

Modelled on client-go's ``cache.Store``/``Indexer``: a reflector thread writes, anyone reads.
A relist swaps the whole content at once, so no reader ever sees a half-listed resource::

    store = Store(index=lambda obj: obj["service"])
    changes = store.replace(listed_objects, list_resource_version)  # relist: whole swap
    change = store.apply("MODIFIED", obj)                            # one watch event
    store.by_index("web")                                            # objects feeding "web"

Every write returns what changed as ``(key, old, new)`` triples (``None`` = absent), so the
consumer rebuilds only what those objects feed. The lock is held only for dict updates,
never while listing or parsing: readers never wait on the network.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Hashable, Iterable

Key = tuple[str, str]
Object = dict[str, Any]
Change = tuple[Key, "Object | None", "Object | None"]


def object_key(obj: Object) -> Key:
    meta = obj["metadata"]
    return meta.get("namespace") or "", meta["name"]


def _resource_version(obj: Object | None) -> str | None:
    return None if obj is None else obj["metadata"].get("resourceVersion")


class Store:
    """Objects keyed by (namespace, name), with one optional secondary index."""

    def __init__(self, index: Callable[[Object], Hashable | None] | None = None):
        self._lock = threading.Lock()
        self._items: dict[Key, Object] = {}
        self._index_fn = index
        self._index: dict[Hashable, set[Key]] = {}
        self.resource_version = ""

    def replace(self, objects: Iterable[Object], resource_version: str) -> list[Change]:
        """Swap in a complete list; objects absent from it are deleted."""
        items = {object_key(o): o for o in objects}
        index: dict[Hashable, set[Key]] = {}
        if self._index_fn is not None:
            for key, obj in items.items():
                value = self._index_fn(obj)
                if value is not None:
                    index.setdefault(value, set()).add(key)
        with self._lock:
            old_items, self._items, self._index = self._items, items, index
            self.resource_version = resource_version
        changes: list[Change] = []
        for key, obj in items.items():
            old = old_items.get(key)
            # unchanged objects are left out, so a relist costs nothing downstream for them
            if old is None or old != obj:
                changes.append((key, old, obj))
        changes.extend((key, old, None) for key, old in old_items.items() if key not in items)
        return changes

    def apply(self, event_type: str, obj: Object) -> Change | None:
        """Apply one watch event (ADDED, MODIFIED or DELETED); None when nothing changed."""
        key = object_key(obj)
        with self._lock:
            old = self._items.get(key)
            if event_type == "DELETED":
                if old is None:
                    return None
                del self._items[key]
                new = None
            else:
                self._items[key] = new = obj
            self._reindex(key, old, new)
            rv = _resource_version(obj)
            if rv:
                self.resource_version = rv
        return key, old, new

    def bookmark(self, resource_version: str) -> None:
        self.resource_version = resource_version

    def _reindex(self, key: Key, old: Object | None, new: Object | None) -> None:
        if self._index_fn is None:
            return
        before = None if old is None else self._index_fn(old)
        after = None if new is None else self._index_fn(new)
        if before == after:
            return
        if before is not None:
            keys = self._index.get(before)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._index[before]
        if after is not None:
            self._index.setdefault(after, set()).add(key)

    def get(self, key: Key) -> Object | None:
        return self._items.get(key)

    def by_index(self, value: Hashable) -> list[Object]:
        with self._lock:
            return [self._items[k] for k in self._index.get(value, ())]

    def index_values(self) -> list[Hashable]:
        with self._lock:
            return list(self._index)

    def list(self) -> list[Object]:
        with self._lock:
            return list(self._items.values())

    def keys(self) -> list[Key]:
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        return len(self._items)
