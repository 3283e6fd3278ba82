"""Generic list+watch of one Kubernetes collection, on its own daemon thread.

Modelled on client-go's Reflector. It knows the API machinery (paged LIST, WATCH from the
list's resourceVersion, bookmarks, 410 Gone, backoff), nothing of what the objects mean::

    reflector = Reflector("endpoints", transport, lambda: "/api/v1/endpoints", store, on_change,
                        params={"labelSelector": "app=web"}, transform=trim)
    reflector.start()      # after fork: LIST (paged), then WATCH, forever
    reflector.synced       # True once the first full list is in the store
    reflector.stats()      # state, counters, last error: for metrics and the discovery dump
    reflector.stop()       # closes the open response, so the thread ends promptly

``transform(obj)`` trims an object to what the consumer needs, or returns None to drop it;
``on_change(changes, relisted)`` gets the store's ``(key, old, new)`` triples after every write;
``on_error(exception)`` hears of every failure (before the backoff wait).
``path()`` is called before each LIST, so the consumer may pick the resource lazily (it may
raise; that counts as a failure and is retried with backoff).

A transport that has ``credentials_mark()`` (the token file's state) is asked for it before
each attempt and, while the reflector waits out a backoff, every ``credentials_poll``
seconds: a new token is tried at once, with the backoff schedule started afresh, instead of
after up to ``backoff_cap`` seconds. A watch that is open when its token is revoked is left
alone: kube-apiserver v1.20 authenticates a request only when it starts, and keeps
delivering events on an open watch after the token is rejected for new requests.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Hashable, Iterator, Mapping, Protocol

import urllib3

from .cache import Change, Object, Store

log = logging.getLogger("kproxy.discovery")

_MALFORMED: Any = object()


class Transport(Protocol):
    """One authenticated GET against the API server, body not yet read. It may also have
    ``credentials_mark() -> Hashable``, a cheap value that changes with the credentials."""

    def get(self, path: str, params: Mapping[str, str], read_timeout: float) -> urllib3.BaseHTTPResponse: ...


@dataclass(frozen=True)
class Timing:
    backoff_initial: float = 0.8
    backoff_cap: float = 30.0
    # a connection that stayed up this long was healthy: the next failure starts the
    # backoff from the beginning again
    healthy_after: float = 30.0
    # the server ends each watch after a random 5-10 min, spreading reconnects
    watch_timeout: tuple[int, int] = (300, 600)
    # Kubernetes 1.20 sends a bookmark only shortly before the server timeout, so an idle
    # watch legitimately stays silent that long: the read timeout must be longer than the
    # server's. A peer that vanished silently is caught earlier by TCP keepalive.
    watch_read_grace: float = 30.0
    list_read_timeout: float = 60.0
    page_size: int = 500
    # how often a failing reflector looks at the token file (a stat, no read)
    credentials_poll: float = 0.25


@dataclass(slots=True)
class Counts:
    """What a reflector has done since it started; each field written by its thread only."""
    lists: int = 0
    relists: int = 0           # lists after the first
    watches: int = 0
    watch_restarts: int = 0    # watches after the first, whatever ended the one before
    events: int = 0
    bookmarks: int = 0
    malformed: int = 0         # watch events logged and skipped
    errors: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Counts)))


class Expired(Exception):
    """410 Gone / Expired: the resourceVersion (or continue token) is too old; relist."""


class ApiStatusError(Exception):
    def __init__(self, status: int | None, reason: str, message: str):
        self.status = status
        self.reason = reason
        super().__init__(f"HTTP {status} {reason}: {message}" if message else f"HTTP {status} {reason}")


class Reflector:
    """List then watch one collection; keep ``store`` equal to the server's view of it."""

    def __init__(self, name: str, transport: Transport, path: Callable[[], str], store: Store,
                 on_change: Callable[[list[Change], bool], None], *,
                 params: Mapping[str, str] | None = None,
                 transform: Callable[[Object], Object | None] | None = None,
                 on_error: Callable[[Exception], None] | None = None,
                 timing: Timing = Timing(), thread_name: str | None = None):
        self.name = name
        self.store = store
        self._transport = transport
        self._credentials_mark: Callable[[], Hashable] | None = getattr(transport, "credentials_mark", None)
        self._attempt_mark: Hashable = None
        self._path_fn = path
        self._on_change = on_change
        self._on_error = on_error
        self._params = {k: v for k, v in (params or {}).items() if v}
        self._transform = transform or (lambda obj: obj)
        self._timing = timing
        self._thread_name = thread_name or f"kproxy-reflector-{name}"
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._response: urllib3.BaseHTTPResponse | None = None
        self._synced = threading.Event()
        self._healthy_since: float | None = None
        self._failures = 0
        self._expired_streak = 0
        # read by stats(); plain attributes, each written by the reflector thread only
        self.path = ""
        self.state = "new"
        self.counts = Counts()
        self.last_sync: float | None = None
        self.last_event: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_status: int | None = None
        self.failing = False

    # -- control --

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self._synced.wait(timeout)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._interrupt()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self.state = "stopped"

    def _interrupt(self) -> None:
        response = self._response
        if response is None:
            return
        try:  # shutdown() wakes a recv() blocked in another thread; close() alone does not
            response.shutdown()
        except Exception:
            pass
        try:
            response.close()
        except Exception:
            pass

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name, "path": self.path, "state": self.state, "synced": self.synced,
            "resource_version": self.store.resource_version, "objects": len(self.store),
            **{("malformed_events" if k == "malformed" else k): v for k, v in asdict(self.counts).items()},
            "failing": self.failing,
            "backoff_step": self._failures, "last_status": self.last_status,
            "last_error": self.last_error, "last_error_at": self.last_error_at,
            "last_sync": self.last_sync, "last_event": self.last_event,
        }

    # -- the loop --

    def _run(self) -> None:
        relist = True
        while not self._stopping.is_set():
            # taken before the request reads the token: any later change means a retry may
            # succeed where this attempt failed
            self._attempt_mark = self._mark()
            try:
                if relist:
                    self._list()
                    relist = False
                started, events_before = time.monotonic(), self.counts.events + self.counts.bookmarks
                self._watch()
                if self._stopping.is_set():
                    break
                if time.monotonic() - started < 1 and self.counts.events + self.counts.bookmarks == events_before:
                    # a server that ends every watch at once would make this loop spin
                    raise ApiStatusError(None, "watch closed", "the server ended the watch immediately")
            except Expired as e:
                if self._stopping.is_set():
                    break
                relist = True
                self._expired_streak += 1
                log.info("%s: %s; relisting", self.name, e)
                if self._expired_streak > 1:  # expired again right after a relist: do not hammer
                    self._failed(e)
            except Exception as e:
                if self._stopping.is_set():
                    break
                self._failed(e)
        self.state = "stopped"

    def _failed(self, error: Exception) -> None:
        now = time.monotonic()
        if self._healthy_since is not None and now - self._healthy_since >= self._timing.healthy_after:
            self._failures = 0
        self._healthy_since = None
        self._failures += 1
        self.counts.errors += 1
        self.failing = True
        message = _describe(error)
        self.last_status = getattr(error, "status", None)
        if message != self.last_error:
            log.warning("%s: %s (retrying with backoff; the last known objects stay in use)",
                        self.name, message)
        else:
            log.debug("%s: %s (failure %d)", self.name, message, self._failures)
        self.last_error, self.last_error_at = message, time.time()
        if self._on_error is not None:
            try:
                self._on_error(error)
            except Exception:
                log.exception("%s: error handler failed", self.name)
        t = self._timing
        delay = min(t.backoff_cap, t.backoff_initial * 2 ** min(self._failures - 1, 16))
        self.state = "backoff"
        self._backoff(delay * random.uniform(0.8, 1.2))

    def _backoff(self, delay: float) -> None:
        """Wait ``delay`` seconds, or until stopped, or until the credentials change."""
        if self._credentials_mark is None:
            self._stopping.wait(delay)
            return
        deadline = time.monotonic() + delay
        while not self._stopping.wait(min(self._timing.credentials_poll, max(0.0, deadline - time.monotonic()))):
            if self._mark() != self._attempt_mark:
                log.info("%s: the token file changed; retrying now", self.name)
                # a new token deserves the short schedule: a stray failure on its first try
                # (a stale connection, a server that restarts) must not cost a capped wait
                self._failures = 0
                return
            if time.monotonic() >= deadline:
                return

    def _mark(self) -> Hashable:
        if self._credentials_mark is None:
            return None
        try:
            return self._credentials_mark()
        except Exception:  # a mark is only a hint to retry early; never a reason to stop
            return None

    def _succeeded(self) -> None:
        if self._healthy_since is None:
            self._healthy_since = time.monotonic()
        if self.failing:
            log.info("%s: connected again", self.name)
        self.failing = False
        self.last_status = None

    # -- LIST --

    def _list(self) -> None:
        self.state = "listing"
        self.path = self._path_fn()
        objects: list[Object] = []
        params = dict(self._params, limit=str(self._timing.page_size))
        if not self.counts.lists:
            # as client-go: the first list may come from the API server's watch cache (one
            # answer, no etcd read, at most a little stale: the watch catches up from its
            # resourceVersion); a relist after 410 Gone asks etcd, page by page
            params["resourceVersion"] = "0"
        restarted = False
        while True:
            try:
                data = self._get(self.path, params, self._timing.list_read_timeout)
            except Expired:
                if "continue" not in params or restarted:
                    raise
                # the continue token outlived etcd's compaction: start the list over
                objects, restarted = [], True
                params.pop("continue")
                continue
            with collection_paused():  # not while the bytes come: that may take a minute
                items, metadata = _list_page(data)
                del data
                items.reverse()
                while items:  # each listed object is freed as soon as it is trimmed
                    obj = self._transformed(items.pop())
                    if obj is not None and obj is not _MALFORMED:
                        objects.append(obj)
            if not metadata.get("continue"):
                break
            params["continue"] = metadata["continue"]
        resource_version = str(metadata.get("resourceVersion") or "")
        with collection_paused():
            changes = self.store.replace(objects, resource_version)
        del objects
        self._notify(changes, True)
        if self.counts.lists:
            self.counts.relists += 1
        self.counts.lists += 1
        self.last_sync = time.time()
        self._synced.set()
        self._succeeded()

    def _get(self, path: str, params: Mapping[str, str], read_timeout: float) -> bytes:
        response = self._transport.get(path, params, read_timeout)
        self._response = response
        try:
            if response.status != 200:
                raise _status_error(response)
            return response.data
        finally:
            self._response = None
            response.release_conn()

    # -- WATCH --

    def _watch(self) -> None:
        timeout = random.randint(*self._timing.watch_timeout)
        params = dict(self._params, watch="true", allowWatchBookmarks="true",
                      resourceVersion=self.store.resource_version, timeoutSeconds=str(timeout))
        response = self._transport.get(self.path, params, timeout + self._timing.watch_read_grace)
        self._response = response
        try:
            if self._stopping.is_set():
                return
            if response.status != 200:
                raise _status_error(response)
            if self.counts.watches:  # every watch after the first, whatever ended the previous one
                self.counts.watch_restarts += 1
            self.counts.watches += 1
            self.state = "watching"
            self._succeeded()
            for line in _lines(response):
                if self._stopping.is_set():
                    return
                self._handle(line)
        finally:
            self._response = None
            response.close()  # a watch that ended early is not reusable: never pool it

    def _handle(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
            return self._skip("not JSON", line)
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            return self._skip("no object", line)
        event_type, obj = event.get("type"), event["object"]
        if event_type == "ERROR":
            raise _status_from_body(obj, None)
        metadata = obj.get("metadata")
        resource_version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
        if event_type == "BOOKMARK":
            if not isinstance(resource_version, str) or not resource_version:
                return self._skip("bookmark without resourceVersion", line)
            self.store.bookmark(resource_version)
            self.counts.bookmarks += 1
            self._expired_streak = 0
            return
        if event_type not in ("ADDED", "MODIFIED", "DELETED"):
            return self._skip(f"unknown event type {event_type!r}", line)
        if not _named(obj):
            return self._skip("object without a usable metadata.name/namespace/resourceVersion", line)
        if event_type == "DELETED":
            change = self.store.apply("DELETED", obj)
        else:
            new = self._transformed(obj)
            if new is _MALFORMED:
                return None
            # an object the transform drops (filtered out) must not linger from before
            change = self.store.apply(event_type, new) if new is not None else self.store.apply("DELETED", obj)
        if isinstance(resource_version, str) and resource_version:
            self.store.bookmark(resource_version)
        self.counts.events += 1
        self.last_event = time.time()
        self._expired_streak = 0
        if change is not None:
            self._notify([change], False)

    def _transformed(self, obj: Any) -> Any:
        """The transformed object, None when the transform drops it, or _MALFORMED."""
        if not _named(obj):
            self._skip("object without a usable metadata.name/namespace/resourceVersion", obj)
            return _MALFORMED
        try:
            return self._transform(obj)
        except Exception as e:  # one odd object must not stop the whole resource
            self._skip(f"unexpected object shape ({type(e).__name__}: {e})", obj)
            return _MALFORMED

    def _skip(self, why: str, what: Any) -> None:
        self.counts.malformed += 1
        text = what if isinstance(what, (bytes, str)) else json.dumps(what, default=str)
        log.warning("%s: skipped a malformed watch event or object (%s): %.200r", self.name, why, text)

    def _notify(self, changes: list[Change], relisted: bool) -> None:
        if not changes and not relisted:
            return
        try:
            self._on_change(changes, relisted)
        except Exception:  # a consumer bug must not kill the watch; it is loud in the log
            self.counts.errors += 1
            log.exception("%s: change handler failed", self.name)


_pause_lock = threading.Lock()
_pauses = 0
_collector_was_enabled = False


class collection_paused:
    """The cyclic garbage collector off while a list is parsed, trimmed (here) and built
    into views (by the consumer), never while waiting::

        with collection_paused():
            objects = [trim(item) for item in json.loads(data)["items"]]

    A list allocates hundreds of thousands of objects that live on, none of them in a
    cycle: each allocation burst would start a collection that walks them again (json.loads
    of a 50,000-address list took twice as long with it). Counted, so threads that list at
    once keep it off until the last one is done, and an application that turned the
    collector off itself keeps it off.
    """

    def __enter__(self) -> None:
        global _pauses, _collector_was_enabled
        with _pause_lock:
            if _pauses == 0:
                _collector_was_enabled = gc.isenabled()
                gc.disable()
            _pauses += 1

    def __exit__(self, *exc: object) -> None:
        global _pauses
        with _pause_lock:
            _pauses -= 1
            if _pauses == 0 and _collector_was_enabled:
                gc.enable()


def _list_page(data: bytes) -> tuple[list[Any], dict[str, Any]]:
    """A LIST response's items and metadata."""
    try:
        body = json.loads(data)
    except ValueError:
        raise ApiStatusError(200, "bad JSON", "the list response is not JSON") from None
    if not isinstance(body, dict):
        raise ApiStatusError(200, "bad list", "the response is not a Kubernetes list")
    items, metadata = body.get("items"), body.get("metadata")
    if not isinstance(items, list) or not isinstance(metadata, dict):
        raise ApiStatusError(200, "bad list", "the response is not a Kubernetes list")
    return items, metadata


def _named(obj: Any) -> bool:
    """Whether the object's metadata can key the store: a name, and a namespace and
    resourceVersion that are strings where present."""
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    return (isinstance(metadata, dict) and isinstance(metadata.get("name"), str) and bool(metadata["name"])
            and all(isinstance(metadata.get(key, ""), str) for key in ("namespace", "resourceVersion")))


def _lines(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """The watch stream's newline-delimited JSON, one event as soon as its chunk arrives."""
    if response.chunked and response.supports_chunked_reads():
        chunks: Iterator[bytes] = response.read_chunked(65536, decode_content=True)
    else:  # read1 returns what is there instead of waiting for a full buffer
        chunks = iter(lambda: response.read1(65536), b"")
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        if b"\n" not in chunk:
            continue
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer


def _status_error(response: urllib3.BaseHTTPResponse) -> Exception:
    try:
        body = json.loads(response.data)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"code": response.status, "reason": response.reason or "", "message": ""}
    return _status_from_body(body, response.status)


def _status_from_body(status: dict[str, Any], http_status: int | None) -> Exception:
    """A Kubernetes ``Status`` (error body or ERROR event) as the exception it means."""
    code = status.get("code") if isinstance(status.get("code"), int) else http_status
    reason = str(status.get("reason") or "")
    message = str(status.get("message") or "")
    if code == 410 or reason in ("Expired", "Gone"):
        return Expired(message or "resourceVersion too old (410 Gone)")
    return ApiStatusError(code, reason, message)


def _describe(error: Exception) -> str:
    if isinstance(error, ApiStatusError):
        return str(error)
    # urllib3 errors name host, port and path, never headers: no token can leak from here
    return f"{type(error).__name__}: {error}"
