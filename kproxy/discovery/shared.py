"""Shared discovery: one set of watches per pod, however many gunicorn workers it runs.

With ``workers > 1`` (``kproxy serve`` and ``conf/gunicorn.conf.py``), the gunicorn master
makes a private directory (0700) and names it in ``$KPROXY_DISCOVERY_DIR`` before it forks
any worker (``prepare``). Each worker's registry is then a ``SharedRegistry``: it holds no
watch, it follows the pod's discovery process (``kproxy.discovery.process``), which runs
one ``KubernetesRegistry`` per registry config for all workers::

    gunicorn master ── worker ── worker ── worker ── worker
                          │        │         │         │     Unix socket DIR/socket
                          └────────┴── discovery process ──── watches ── API server

The channel, per registry and worker: one Unix stream socket. The worker subscribes with
the registry's name, the hash of its config (``registry_key``) and the config itself (it
holds the token: it is never logged); the discovery process answers with the full
snapshot once its registry has listed, then with the Services that changed (``frame``).

Election: the discovery process holds an ``flock`` on ``DIR/lock`` for its life. The master
starts the first one as it starts (``start_process``), so that it boots beside the workers.
A worker that cannot connect takes that lock (without waiting) and, if it got it, starts a
new discovery process and hands it the locked file, so two never run. Whoever holds the
lock keeps ``DIR/starts``: the starts in a row that ended before they listed, and when
the last began, from which the next start waits (``backoff``). The process lives in the
master's process group, exits when the master does (it watches the master's pid through
a pidfd), and outlives any worker.

While disconnected, a worker routes by its last snapshot; it is replaced only by a new full
snapshot, which a new discovery process sends only after its first full list: never an
empty one in between. ``/-/discovery`` and the discovery metrics come from the discovery
process (asked on demand), so every worker answers the same.

Memory: a worker keeps the last full snapshot as the one bytes object it received (its
records sorted, found by bisection; a plain IPv4 node is 6 bytes) and the Services changed
since in a dict, and builds a ``ServiceView`` the first time a request asks for that
Service: a worker routing to 3 of 5,000 Services holds 3 views and no object per Service,
and the pod holds one cache. The discovery process keeps no encoded copy: it encodes the
full snapshot again for each worker that joins.
This module imports neither the Kubernetes client nor the reflector: a worker stays light.
"""

from __future__ import annotations

import bisect
import dataclasses
import fcntl
import hashlib
import json
import logging
import operator
import os
import pickle
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

from ..node import Node
from . import RegistryStats
from .endpoints import EMPTY, ServiceKey, ServiceView, keep_unchanged

if TYPE_CHECKING:
    from ..config import Config, RegistryConfig

log = logging.getLogger("kproxy.discovery")

ENV = "KPROXY_DISCOVERY_DIR"      # set by the gunicorn master when workers > 1
SWITCH = "KPROXY_SHARED_DISCOVERY"  # "off": every worker runs its own watches, as before
SOCKET, LOCK, STARTS = "socket", "lock", "starts"
RETRY = 0.05          # seconds between attempts to reach the discovery process (a connect())
SPAWN_INTERVAL = 1.0  # a worker starts at most one discovery process a second: one that
                      # dies at once is retried, not started in a tight loop
BACKOFF_MAX = 30.0    # seconds: the longest wait between starts of a process that keeps dying
REQUEST_TIMEOUT = 5.0  # seconds for a dump or stats answer
_LENGTH = struct.Struct("!I")
MAX_FRAME = 1 << 30


# -- the master's part --

def prepare(workers: int) -> str | None:
    """In the gunicorn master, before any fork: the directory workers meet in, or None
    (one worker, or switched off): discovery then stays in each worker."""
    os.environ.pop(ENV, None)  # a re-exec'd master (USR2) makes its own
    if workers <= 1 or os.environ.get(SWITCH, "").lower() in ("off", "0", "false", "no"):
        return None
    path = tempfile.mkdtemp(prefix="kproxy-discovery-")  # 0700: subscriptions carry tokens
    os.environ[ENV] = path
    return path


def needed(config: Config) -> bool:
    """Whether a config gives the discovery process work: a registry or a health check."""
    return bool(config.registries) or any(s.health_check_path for s in config.services.values())


def backoff(unsettled: int) -> float:
    """Seconds from the last start to the next after ``unsettled`` starts in a row ended
    before they settled (listed, or ran for a while): 0, then 1, 2, 4 ... up to BACKOFF_MAX.
    A process that dies as it lists (out of memory on a large cluster, say) would otherwise
    be started again at once, and LIST the whole cluster again, for as long as it dies."""
    return 0.0 if unsettled <= 0 else min(2.0 ** (unsettled - 1), BACKOFF_MAX)


def _read_starts(directory: str) -> tuple[int, float]:
    try:
        with open(os.path.join(directory, STARTS)) as f:
            unsettled, at = f.read().split()
        return int(unsettled), float(at)
    except (OSError, ValueError):
        return 0, float("-inf")


def _write_starts(directory: str, unsettled: int, at: float) -> None:
    # only the holder of the lock writes: a starter, then the process it started
    path = os.path.join(directory, STARTS)
    with open(path + ".new", "w") as f:
        f.write(f"{unsettled} {at!r}\n")
    os.replace(path + ".new", path)


def settled(directory: str) -> None:
    """In the discovery process, once it works: the next start, when it ends, waits for
    nothing."""
    _write_starts(directory, 0, time.monotonic())  # CLOCK_MONOTONIC: one clock for the pod's processes


def start_process(directory: str, master: int) -> subprocess.Popen | None:
    """Start the pod's discovery process unless one holds the lock (runs or is starting)
    or the last ones died before they settled and their ``backoff`` has not passed: the
    new process, or None. Raises OSError when it cannot be started."""
    try:
        fd = os.open(os.path.join(directory, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:  # the master removed the directory: it is exiting
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        unsettled, last = _read_starts(directory)
        if time.monotonic() - last < backoff(unsettled):
            return None
        if unsettled:
            log.warning("discovery process: %d start%s in a row ended before listing; starting another, "
                        "and the next no sooner than %g s after it", unsettled, "s" if unsettled > 1 else "",
                        backoff(unsettled + 1))
        _write_starts(directory, unsettled + 1, time.monotonic())
        # the child inherits the locked file: the lock passes to it, never released between
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        command = [sys.executable, "-m", "kproxy.discovery.process", "--dir", directory,
                   "--master", str(master), "--lock-fd", str(fd)]
        return subprocess.Popen(command, pass_fds=(fd,), stdin=subprocess.DEVNULL, env=env)
    finally:
        os.close(fd)


def cleanup() -> None:
    """In the gunicorn master, at exit: the discovery process sees its socket go and ends
    (it also ends when the master's pid does)."""
    path = os.environ.get(ENV)
    if path and os.path.basename(path).startswith("kproxy-discovery-"):
        shutil.rmtree(path, ignore_errors=True)


def enabled() -> bool:
    """Registries made in this process should follow the discovery process."""
    return bool(os.environ.get(ENV))


# -- the wire --

def config_fields(config: RegistryConfig) -> dict[str, Any]:
    """A registry config as JSON (the token included: it goes only over the private socket)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = value.pattern if isinstance(value, re.Pattern) else value
    return out


def config_from_fields(fields: Mapping[str, Any]) -> RegistryConfig:
    from ..config import RegistryConfig
    values = dict(fields)
    if values.get("namespace_pattern") is not None:
        values["namespace_pattern"] = re.compile(values["namespace_pattern"])
    return RegistryConfig(**values)


def registry_key(config: RegistryConfig) -> tuple[str, str]:
    """(name, hash of every setting): workers with equal settings share one registry."""
    text = json.dumps(config_fields(config), sort_keys=True, separators=(",", ":"))
    return config.name, hashlib.sha256(text.encode()).hexdigest()


def send_frame(sock: socket.socket, payload: bytes) -> None:
    if len(payload) > MAX_FRAME:
        raise ValueError(f"frame of {len(payload)} bytes is too large")
    if len(payload) < 65536:
        sock.sendall(_LENGTH.pack(len(payload)) + payload)
    else:  # a full snapshot: no copy of megabytes just to prepend four bytes
        sock.sendall(_LENGTH.pack(len(payload)))
        sock.sendall(payload)


def read_frame(reader: Any) -> bytes | None:
    """The next frame from a buffered reader; None at a clean end of stream."""
    head = reader.read(_LENGTH.size)
    if not head:
        return None
    if len(head) < _LENGTH.size:
        raise ConnectionError("the stream ended inside a frame")
    length, = _LENGTH.unpack(head)
    if length > MAX_FRAME:
        raise ConnectionError(f"frame of {length} bytes announced")
    payload = reader.read(length)
    if len(payload) < length:
        raise ConnectionError("the stream ended inside a frame")
    return payload


_NODE_FIELDS = [f for f in dataclasses.fields(Node) if f.init]  # what Node(...) takes
_NODE_DEFAULTS = [f.default for f in _NODE_FIELDS]
_RECORD = struct.Struct("!HHI")  # namespace, name and view lengths
_IPV4 = struct.Struct("!4sH")    # a node that is only an IPv4 address and a port


def _node_values(node: Node) -> tuple[Any, ...]:
    """A node as its field values, the trailing defaults left out (most nodes: host, port)."""
    values = [getattr(node, f.name) for f in _NODE_FIELDS]
    while len(values) > 2 and values[-1] == _NODE_DEFAULTS[len(values) - 1]:
        values.pop()
    return tuple(values)


_node_tail = operator.attrgetter(*(f.name for f in _NODE_FIELDS[2:]))  # all but host and port
_PLAIN_TAIL = _node_tail(Node("0.0.0.0", 1))  # as every node has them by default


def _pack(nodes: tuple[Node, ...]) -> bytes | tuple[tuple[Any, ...], ...]:
    """A node list as 6 bytes a node when every node is a plain IPv4 address and port (the
    common case), else as each node's field values."""
    packed = []
    for node in nodes:
        if _node_tail(node) != _PLAIN_TAIL:
            break
        try:
            address = socket.inet_aton(node.host)
        except OSError:
            break
        if socket.inet_ntoa(address) != node.host:  # "127.1" is not written back as it came
            break
        packed.append(_IPV4.pack(address, node.port))
    else:
        return b"".join(packed)
    return tuple(_node_values(n) for n in nodes)


def _unpack(nodes: bytes | tuple[tuple[Any, ...], ...]) -> tuple[Node, ...]:
    if isinstance(nodes, bytes):
        return tuple(Node(socket.inet_ntoa(address), port) for address, port in _IPV4.iter_unpack(nodes)) or EMPTY
    return tuple(Node(*values) for values in nodes) or EMPTY


def encode_view(view: ServiceView) -> bytes:
    """A ServiceView as compact bytes: each distinct node list once, ports point into them
    (about 110 bytes for ten IPv4 addresses, against 460 for the objects pickled as they are)."""
    lists: list[bytes | tuple[tuple[Any, ...], ...]] = []
    index: dict[tuple[Node, ...], int] = {}

    def ref(nodes: tuple[Node, ...]) -> int:
        if nodes not in index:
            index[nodes] = len(lists)
            lists.append(_pack(nodes))
        return index[nodes]
    ports = {port: ref(nodes) for port, nodes in view.ports.items()}
    any_port = None if view.any_port is None else ref(view.any_port)
    return pickle.dumps((lists, ports, any_port, view.source, view.service_ports), protocol=5)


def decode_view(blob: bytes) -> ServiceView:
    # only the pod's own discovery process can write to this worker's socket (a 0700
    # directory of the same user), so its bytes are as trusted as the worker's own code
    lists, ports, any_port, source, service_ports = pickle.loads(blob)
    nodes = [_unpack(node_list) for node_list in lists]
    return ServiceView({port: nodes[i] for port, i in ports.items()},
                       None if any_port is None else nodes[any_port], source, service_ports)


def record(key: ServiceKey, blob: bytes) -> bytes:
    """One Service in a frame; an empty view says it is gone."""
    namespace, name = key[0].encode(), key[1].encode()
    return _RECORD.pack(len(namespace), len(name), len(blob)) + namespace + name + blob


def records(body: bytes | memoryview) -> Iterator[tuple[ServiceKey, bytes]]:
    view, offset = memoryview(body), 0
    while offset < len(view):
        ns_len, name_len, blob_len = _RECORD.unpack_from(view, offset)
        offset += _RECORD.size
        namespace = sys.intern(bytes(view[offset:offset + ns_len]).decode())  # a few, shared
        name = bytes(view[offset + ns_len:offset + ns_len + name_len]).decode()
        offset += ns_len + name_len
        yield (namespace, name), bytes(view[offset:offset + blob_len])
        offset += blob_len
    if offset != len(view):
        raise ValueError("a record runs past the end of its frame")


def full_body(snapshot: Mapping[ServiceKey, ServiceView]) -> bytearray:
    """Every Service's record, sorted by namespace and name as ``Snapshot.parse`` wants them
    (str order is the order of their UTF-8 bytes)."""
    body = bytearray()
    for key in sorted(snapshot):
        body += record(key, encode_view(snapshot[key]))  # one record alive at a time
    return body


def frame(kind: str, version: int, body: Iterable[bytes]) -> bytes:
    """A snapshot (``full``, its records sorted by namespace and name) or the Services that
    changed (``delta``): a JSON line, then the records."""
    header = json.dumps({"type": kind, "version": version, "pid": os.getpid()}).encode()
    return b"".join([header, b"\n", *body])


class Snapshot:
    """What a worker routes by, immutable: the last full snapshot as it arrived (one bytes
    object; its records are sorted, so a Service is found by bisection over their offsets)
    and the Services changed since (``changes``; an empty view: gone). A worker keeps no
    object per Service: 5,000 Services of ten addresses are about 0.6 MB."""

    def __init__(self, body: bytes, offsets: array, changes: dict[ServiceKey, bytes], size: int):
        self._body, self._offsets, self.changes, self.size = body, offsets, changes, size

    @classmethod
    def parse(cls, payload: bytes, start: int = 0) -> Snapshot:
        """The records of a full frame from ``start``; ValueError if they are not in order."""
        offsets, offset, end, previous = array("I"), start, len(payload), None
        while offset < end:
            offsets.append(offset)
            key = cls._key_at(payload, offset)
            if previous is not None and key <= previous:
                raise ValueError("the records of a full snapshot are not sorted")
            ns_len, name_len, blob_len = _RECORD.unpack_from(payload, offset)
            offset += _RECORD.size + ns_len + name_len + blob_len
            previous = key
        if offset != end:
            raise ValueError("a record runs past the end of its frame")
        return cls(payload, offsets, {}, len(offsets))

    @staticmethod
    def _key_at(body: bytes, offset: int) -> tuple[bytes, bytes]:
        ns_len, name_len, _ = _RECORD.unpack_from(body, offset)
        offset += _RECORD.size
        return body[offset:offset + ns_len], body[offset + ns_len:offset + ns_len + name_len]

    def _base(self, key: ServiceKey) -> bytes | None:
        wanted = (key[0].encode(), key[1].encode())
        i = bisect.bisect_left(self._offsets, wanted, key=lambda o: self._key_at(self._body, o))
        if i == len(self._offsets) or self._key_at(self._body, self._offsets[i]) != wanted:
            return None
        offset = self._offsets[i]
        ns_len, name_len, blob_len = _RECORD.unpack_from(self._body, offset)
        offset += _RECORD.size + ns_len + name_len
        return self._body[offset:offset + blob_len]

    def get(self, key: ServiceKey) -> bytes | None:
        blob = self.changes.get(key)
        if blob is None:
            return self._base(key)
        return blob or None

    def changed(self, changes: Iterable[tuple[ServiceKey, bytes]]) -> Snapshot:
        """This snapshot with a delta's records applied; rewritten whole once the changes
        are a quarter of it, so they never outgrow it."""
        merged, size = dict(self.changes), self.size
        for key, blob in changes:
            before = bool(merged[key]) if key in merged else self._base(key) is not None
            size += bool(blob) - before
            merged[key] = blob
        out = Snapshot(self._body, self._offsets, merged, size)
        if len(merged) > max(256, len(self._offsets) // 4):
            out = Snapshot.parse(b"".join(record(key, blob) for key, blob in sorted(out.items())))
        return out

    def items(self) -> Iterator[tuple[ServiceKey, bytes]]:
        for offset in self._offsets:
            ns_len, name_len, blob_len = _RECORD.unpack_from(self._body, offset)
            offset += _RECORD.size
            key = (self._body[offset:offset + ns_len].decode(),
                   self._body[offset + ns_len:offset + ns_len + name_len].decode())
            if key not in self.changes:
                offset += ns_len + name_len
                yield key, self._body[offset:offset + blob_len]
        yield from ((key, blob) for key, blob in self.changes.items() if blob)

    def __len__(self) -> int:
        return self.size


EMPTY_SNAPSHOT = Snapshot(b"", array("I"), {}, 0)


# -- the worker's part --

class Follower:
    """One subscription of this worker to the pod's discovery process, kept on its own
    thread: it connects (starting the process when none answers, see the module
    docstring), sends ``_subscription()`` and hands every frame to ``_apply``; when the
    connection is lost it reconnects and subscribes again. Subclasses say what they
    subscribe to and what a frame means."""

    def __init__(self, name: str, thread_name: str, directory: str | None = None):
        self.name = name  # for the log: "registry k", "health checks of web"
        self._thread_name = thread_name
        self._dir = directory or os.environ[ENV]
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._child: subprocess.Popen | None = None
        self._master = os.getppid()
        self.connected = False
        self.reconnects = 0
        self.spawned = 0            # discovery processes this worker started
        self._spawned_at = float("-inf")

    def start(self) -> None:
        if self._thread is not None:
            return
        self._master = os.getppid()
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        sock = self._sock
        if sock is not None:
            try:  # wakes the reader thread's recv
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def _subscription(self) -> bytes:
        raise NotImplementedError

    def _apply(self, payload: bytes, first: bool) -> None:
        raise NotImplementedError

    def _lost(self) -> None:
        """The connection is gone (the reader thread reconnects next)."""

    def _run(self) -> None:
        lost_at: float | None = None
        while not self._stopping.is_set():
            sock = self._connect()
            if sock is None:
                self._reap()
                self._elect()
                self._stopping.wait(RETRY)
                continue
            if lost_at is not None:
                self.reconnects += 1
                log.info("%s: reached the discovery process again after %.1f s", self.name,
                         time.monotonic() - lost_at)
            try:
                self._follow(sock)
            except (OSError, ValueError, KeyError) as e:
                if not self._stopping.is_set():
                    log.warning("%s: the discovery process connection failed: %s", self.name, e)
            finally:
                self.connected = False
                self._sock = None
                sock.close()
            if not self._stopping.is_set():
                lost_at = time.monotonic()
                self._lost()

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.path.join(self._dir, SOCKET))
        except OSError:
            sock.close()
            return None
        return sock

    def _elect(self) -> None:
        """Start a discovery process if none holds the lock (none runs or is starting)."""
        if os.getppid() != self._master:  # the master is gone: so is the pod
            return
        if time.monotonic() - self._spawned_at < SPAWN_INTERVAL:
            return
        try:
            child = start_process(self._dir, self._master)
        except OSError as e:  # out of processes or memory: the worker lives on, and tries again
            self._spawned_at = time.monotonic()
            log.warning("%s: cannot start the discovery process (%s); trying again in %g s", self.name, e,
                        SPAWN_INTERVAL)
            return
        if child is not None:  # else one runs or is starting, or the pod backs off: not a start
            self._spawned_at = time.monotonic()
            log.info("%s: no discovery process answered; started one (pid %d)", self.name, child.pid)
            self._child = child
            self.spawned += 1

    def _reap(self) -> None:
        if self._child is not None and self._child.poll() is not None:
            self._child = None

    def _follow(self, sock: socket.socket) -> None:
        self._sock = sock
        if self._stopping.is_set():
            return
        send_frame(sock, self._subscription())
        self.connected = True
        reader = sock.makefile("rb", buffering=1 << 16)
        first = True
        while True:
            payload = read_frame(reader)
            if payload is None:
                return
            self._apply(payload, first)
            first = False

    def ask(self, request: Mapping[str, Any]) -> Any:
        """One question to the discovery process (``dump``, ``stats``): its JSON answer."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(REQUEST_TIMEOUT)
        try:
            sock.connect(os.path.join(self._dir, SOCKET))
            send_frame(sock, json.dumps(request).encode())
            payload = read_frame(sock.makefile("rb"))
        finally:
            sock.close()
        if payload is None:
            raise ConnectionError("no answer")
        answer = json.loads(payload)
        if "error" in answer:
            raise ConnectionError(answer["error"])
        return answer


class SharedRegistry(Follower):
    """A registry that follows the pod's discovery process (see the module docstring)."""

    type = "kubernetes"

    def __init__(self, config: RegistryConfig, directory: str | None = None):
        self.config = config
        self._key = registry_key(config)
        super().__init__(f"registry {config.name}", f"kproxy-{config.name}-shared", directory)
        # the request path reads both without a lock: the snapshot is swapped whole, and a
        # view is set whole (under _decode_lock) for each Service a request asked for
        self._snapshot = EMPTY_SNAPSHOT
        self._views: dict[ServiceKey, tuple[bytes, ServiceView]] = {}
        self._decode_lock = threading.Lock()
        self._ready = False
        self.version = 0            # of the last frame applied
        self.discovery_pid: int | None = None
        self.updated: float | None = None
        self._last_stats: RegistryStats | None = None

    def start(self) -> None:
        if self.config.enabled:
            super().start()

    @property
    def ready(self) -> bool:
        """This worker has the first full snapshot (it keeps it while disconnected)."""
        return self._ready or not self.config.enabled

    # -- the request path --

    def nodes(self, namespace: str, service: str, port: str) -> tuple[Node, ...] | None:
        cached = self._views.get((namespace, service))
        view = cached[1] if cached is not None else self._view((namespace, service))
        if view is None:
            return None
        nodes = view.ports.get(port)
        if nodes is not None:
            return nodes
        if view.any_port is not None and port.isdigit():  # as KubernetesRegistry.nodes
            return view.any_port
        return EMPTY

    def _view(self, key: ServiceKey) -> ServiceView | None:
        """The first request for a Service builds its view; the reader thread keeps it
        current from then on (``_refresh``)."""
        if self._snapshot.get(key) is None:  # an unknown Service takes no lock
            return None
        with self._decode_lock:
            cached = self._views.get(key)
            if cached is not None:
                return cached[1]
            blob = self._snapshot.get(key)
            if blob is None:
                return None
            view = decode_view(blob)
            self._views[key] = (blob, view)
            return view

    def _refresh(self, keys: Iterable[ServiceKey]) -> None:
        """Under _decode_lock: the views of these Services, from the current snapshot; node
        lists that did not change keep their tuple, which the balancer compares."""
        for key in keys:
            cached = self._views.get(key)
            if cached is None:
                continue
            blob = self._snapshot.get(key)
            if blob is None:
                del self._views[key]
            elif blob != cached[0]:
                self._views[key] = (blob, keep_unchanged(decode_view(blob), cached[1]))

    # -- following the discovery process (reader thread) --

    def _subscription(self) -> bytes:
        return json.dumps({"op": "subscribe", "name": self._key[0], "hash": self._key[1],
                           "config": config_fields(self.config)}).encode()

    def _lost(self) -> None:
        log.warning("registry %s: lost the discovery process; routing by the last snapshot "
                    "(%d services) until a new one has listed", self.config.name, len(self._snapshot))

    def _apply(self, payload: bytes, first: bool) -> None:
        start = payload.index(b"\n") + 1
        meta = json.loads(payload[:start])
        full = meta["type"] == "full"
        if first and not full:
            raise ValueError("the discovery process sent a change before its snapshot")
        if full:  # kept as it came: no copy, no object per Service
            new, touched = Snapshot.parse(payload, start), None
        else:
            changes = list(records(memoryview(payload)[start:]))
            new, touched = self._snapshot.changed(changes), [key for key, _ in changes]
        with self._decode_lock:
            self._snapshot = new
            self._refresh(list(self._views) if touched is None else touched)
        self.version = meta["version"]
        self.discovery_pid = meta["pid"]
        self.updated = time.time()
        if full and not self._ready:
            self._ready = True
            log.info("registry %s: %d services from the discovery process (pid %d)", self.config.name,
                     len(new), meta["pid"])

    # -- reporting: the discovery process's numbers, the same from every worker --

    def _ask(self, op: str) -> Any:
        return self.ask({"op": op, "name": self._key[0], "hash": self._key[1]})

    def stats(self) -> RegistryStats:
        try:
            stats = RegistryStats(**self._ask("stats"))
            self._last_stats = stats
            return stats
        except (OSError, ValueError, TypeError) as e:
            log.debug("registry %s: no stats from the discovery process: %s", self.config.name, e)
        last = self._last_stats or RegistryStats("syncing", False)
        return dataclasses.replace(last, state="degraded" if self._ready else "error", ready=self.ready)

    def dump(self) -> dict[str, Any]:
        try:
            out = self._ask("dump")
        except (OSError, ValueError) as e:
            out = self._local_dump(f"the discovery process does not answer: {e}")
        # "pid" says who answered, as it did when each worker had its own registry; it
        # and "worker" are the only parts that differ between workers
        out["discovery_pid"] = out.get("pid")
        out["pid"] = os.getpid()
        out["worker"] = {
            "connected": self.connected, "ready": self.ready, "version": self.version,
            "services": len(self._snapshot), "updated": self.updated, "snapshot_from": self.discovery_pid,
            "reconnects": self.reconnects, "spawned": self.spawned,
        }
        return out

    def _local_dump(self, error: str) -> dict[str, Any]:
        """What this worker routes by, when the discovery process cannot say."""
        services = {}
        for (namespace, name), blob in sorted(self._snapshot.items()):
            view = decode_view(blob)
            ports = {port: [n.address for n in nodes] for port, nodes in sorted(view.ports.items())}
            if view.any_port is not None:
                ports["*"] = [n.address for n in view.any_port]
            services[f"{namespace}/{name}"] = {"namespace": namespace, "service": name,
                                               "port_source": view.source, "ports": ports}
        return {"name": self.config.name, "type": self.type, "state": "degraded" if self._ready else "error",
                "ready": self.ready, "pid": self.discovery_pid, "warnings": [error], "services": services}
