"""The pod's discovery process: one ``KubernetesRegistry`` per registry config, and one
``HealthChecker`` per health-checked service, for every gunicorn worker
(``kproxy.discovery.shared`` explains the layout and the channel)::

    python -m kproxy.discovery.process --dir DIR --master PID [--lock-fd FD]

The master, or a worker, starts it (``shared.start_process``) and hands it ``DIR/lock``,
locked; it serves ``DIR/socket`` until the master ``PID`` exits or the directory is
removed. A registry, or a service's checks, run while a worker subscribes to them, and
``GRACE`` seconds after the last one left, so a restarting worker, or a reload that keeps
them, finds the cache, the watches and the health verdicts still there, and a reload that
changed them lets the old ones go. Once a registry has listed (or it has run
``SETTLE_AFTER`` seconds) it records that it works, so that its successor starts at once;
one that dies before then is followed after a growing wait (``shared.backoff``).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import logging
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterable, Mapping

from ..health import HealthCheck, HealthChecker
from ..node import Node
from ..pool import TLSPolicy
from ..upstream import NodeSource, RegistryNodes, StaticNodes, Upstream
from .apiserver import preload_client
from .endpoints import ServiceKey, ServiceView
from .kubernetes import KubernetesRegistry
from .shared import (LOCK, SOCKET, config_from_fields, encode_view, frame, full_body, read_frame, record, registry_key,
                     send_frame, settled)

log = logging.getLogger("kproxy.discovery")

GRACE = 10.0          # seconds a registry outlives its last subscriber
TICK = 0.05           # seconds between readiness checks when nothing changes
SETTLE_AFTER = 10.0   # seconds after which a process that listed nothing counts as working
BACKLOG_LIMIT = 256 << 20  # bytes queued for a worker that does not read: it is cut off


class FullFrame:
    """A full snapshot for the workers that joined at one version, encoded by the first of
    their writer threads to send it: never under the channel's lock, so a joining worker
    (50 ms of encoding for 5,000 Services) holds up no change to the others."""

    def __init__(self, snapshot: Mapping[ServiceKey, ServiceView], version: int):
        self._snapshot = snapshot
        self._version = version
        self._payload: bytes | None = None
        self._lock = threading.Lock()

    def payload(self) -> bytes:
        with self._lock:
            if self._payload is None:
                self._payload = frame("full", self._version, [full_body(self._snapshot)])
            return self._payload


class Subscriber:
    """One worker's connection to one registry; frames go out on its own thread, so a
    worker that stops reading never holds up the others or the reflectors."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._queue: queue.SimpleQueue[tuple[bytes | FullFrame, int] | None] = queue.SimpleQueue()
        self._queued = 0
        self._lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._write, name="kproxy-discovery-writer", daemon=True).start()

    def send(self, payload: bytes | FullFrame) -> None:
        size = len(payload) if isinstance(payload, bytes) else 0  # a full frame is made when sent
        with self._lock:
            if self.closed:
                return
            self._queued += size
            if self._queued > BACKLOG_LIMIT:
                log.warning("a worker reads no frames (%d bytes queued): disconnecting it", self._queued)
                self.close()
                return
        self._queue.put((payload, size))

    def _write(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            payload, size = item
            with self._lock:
                self._queued -= size
            try:
                send_frame(self.sock, payload if isinstance(payload, bytes) else payload.payload())
            except OSError:
                self.close()
                return
            except Exception:  # a snapshot that cannot be encoded: the worker reconnects, not waits
                log.exception("encoding the full snapshot for a worker failed")
                self.close()
                return

    def close(self) -> None:
        self.closed = True
        self._queue.put(None)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Followed:
    """What workers subscribe to, and who does; idle since the last one left."""

    def __init__(self, key: tuple[str, str]):
        self.key = key
        self._lock = threading.Lock()
        self._followers: set[Subscriber] = set()
        self._waiting: set[Subscriber] = set()  # subscribed, not yet sent their first frame
        self.idle_since: float | None = time.monotonic()

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._followers.discard(subscriber)
            self._waiting.discard(subscriber)
            if not self._followers and not self._waiting:
                self.idle_since = time.monotonic()

    def _close_all(self) -> None:
        with self._lock:
            for subscriber in self._followers | self._waiting:
                subscriber.close()


class Channel(Followed):
    """One registry and the workers that follow it: the full snapshot to each new one once
    the registry has listed, then every change as the Services it touched."""

    def __init__(self, key: tuple[str, str], registry: KubernetesRegistry, on_ready: Callable[[], None]):
        super().__init__(key)
        self.registry = registry
        self._on_ready = on_ready
        self._wake = threading.Event()
        self._published: dict[ServiceKey, ServiceView] = {}
        self._version = 0
        self._stopped = threading.Event()
        registry.add_listener(self._wake.set)

    def start(self) -> None:
        self.registry.start()
        threading.Thread(target=self._publish_loop, name=f"kproxy-{self.key[0]}-publish", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        self.registry.stop()
        self._close_all()

    def subscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._waiting.add(subscriber)
            self.idle_since = None
        self._wake.set()

    def _publish_loop(self) -> None:
        # one thread publishes: a burst of events costs one pass over the snapshot
        while not self._stopped.is_set():
            self._wake.wait(TICK)
            self._wake.clear()
            try:
                self._publish()
            except Exception:
                log.exception("registry %s: publishing failed", self.key[0])

    def _publish(self) -> None:
        with self._lock:
            if not self.registry.ready:
                return  # before the first full list there is nothing a worker may route by
            current = self.registry.snapshot()
            if current is not self._published:
                if not self._version:
                    self._on_ready()
                previous, self._published = self._published, current
                if not self._followers:
                    # nobody to send a delta to (the first list, all workers waiting): the
                    # joining workers get the full snapshot, encoded once, below
                    self._version += 1
                else:
                    changed = []
                    for key, view in current.items():
                        if previous.get(key) is not view:  # the registry keeps unchanged views
                            changed.append(record(key, encode_view(view)))
                    for key in previous.keys() - current.keys():
                        changed.append(record(key, b""))
                    if changed:
                        self._version += 1
                        delta = frame("delta", self._version, changed)
                        for subscriber in self._followers:
                            subscriber.send(delta)
            if self._waiting:
                # encoded again for the workers that join, not kept: the encoded records of
                # 5,000 Services would be another 0.7 MB here for the pod's life
                full = FullFrame(self._published, self._version)
                for subscriber in self._waiting:
                    subscriber.send(full)
                self._followers |= self._waiting
                self._waiting.clear()


class HealthChannel(Followed):
    """One service's active health checks, run here once for every worker that routes to
    it: each worker gets the verdict so far when it subscribes, then after every change
    and every round (``SharedHealthChecker`` applies it)."""

    def __init__(self, key: tuple[str, str], spec: Mapping[str, Any], hub: Hub,
                 unhealthy: Iterable[tuple[str, int]] = ()):
        super().__init__(key)
        tls = spec["tls"]
        upstream = Upstream(spec["service"], _node_source(spec["source"], hub), scheme=spec["scheme"],
                            tls=TLSPolicy(*tls) if tls else None)
        # ``unhealthy``: the first worker's last verdict, from the process this one replaces
        self.checker = HealthChecker(upstream, HealthCheck(**spec["check"]), on_update=self._publish,
                                     unhealthy=unhealthy)

    def start(self) -> None:
        self.checker.start()

    def stop(self) -> None:
        self.checker.stop()
        self._close_all()

    def subscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._followers.add(subscriber)
            self.idle_since = None
            subscriber.send(self._verdict())

    def _publish(self) -> None:
        verdict = self._verdict()
        with self._lock:
            for subscriber in self._followers:
                subscriber.send(verdict)

    def _verdict(self) -> bytes:
        checker = self.checker
        return json.dumps({"unhealthy": sorted(checker.unhealthy), "dump": checker.dump()}).encode()


def _node_source(source: Mapping[str, Any], hub: Hub) -> NodeSource:
    if "nodes" in source:
        return StaticNodes(tuple(Node(host, port, weight) for host, port, weight in source["nodes"]))
    return RegistryNodes(_RegistryLookup(hub, tuple(source["registry"])), source["namespace"], source["service"],
                         source["port"])


class _RegistryLookup:
    """The nodes of the registry the workers follow under ``key``, while it runs here."""

    def __init__(self, hub: Hub, key: tuple[str, str]):
        self._hub, self._key = hub, key

    def nodes(self, namespace: str, service: str, port: str) -> tuple[Node, ...] | None:
        channel = self._hub.channel(self._key)
        return channel.registry.nodes(namespace, service, port) if channel is not None else None


class Hub:
    """The registries' channels and the services' health channels, each by (name, hash of
    its settings), and the socket workers reach them on."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, SOCKET)
        self._channels: dict[tuple[str, str], Channel] = {}
        self._health: dict[tuple[str, str], HealthChannel] = {}
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._settled = False

    def settle(self) -> None:
        """This process works (a registry listed, or it ran SETTLE_AFTER seconds): the pod
        need not wait before it starts the next one (``shared.backoff``)."""
        if not self._settled:
            self._settled = True
            try:
                settled(self.directory)
            except OSError as e:
                log.warning("discovery process: cannot record that it works: %s", e)

    def channel(self, key: tuple[str, str]) -> Channel | None:
        return self._channels.get(key)

    def serve(self, listener: socket.socket, master_fd: int, identity: int) -> None:
        """Until the master exits or the socket file ``identity`` (its inode) is gone."""
        while True:
            readable, _, _ = select.select([listener, master_fd], [], [], 1.0)
            if master_fd in readable:
                log.info("discovery process: the gunicorn master is gone; exiting")
                return
            if listener in readable:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                threading.Thread(target=self._handle, args=(conn,), name="kproxy-discovery-conn",
                                 daemon=True).start()
            try:
                if os.stat(self.path).st_ino != identity:
                    raise FileNotFoundError
            except FileNotFoundError:
                log.info("discovery process: %s was removed; exiting", self.path)
                return
            self._stop_idle()
            if time.monotonic() - self._started >= SETTLE_AFTER:
                self.settle()  # health checks alone never list

    def _stop_idle(self) -> None:
        now = time.monotonic()
        idle: list[Followed] = []
        with self._lock:
            for followed in (self._channels, self._health):
                gone = [c for c in followed.values() if c.idle_since is not None and now - c.idle_since > GRACE]
                for channel in gone:
                    del followed[channel.key]
                idle += gone
        for channel in idle:
            log.info("%s %s: no worker follows it any more; stopping %s", *(
                ("registry", channel.key[0], "its watches") if isinstance(channel, Channel) else
                ("service", channel.key[0], "its health checks")))
            threading.Thread(target=channel.stop, daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            reader = conn.makefile("rb")
            payload = read_frame(reader)
            if payload is None:
                return
            request = json.loads(payload)
            key = (request["name"], request["hash"])
            if request["op"] == "subscribe":
                config = config_from_fields(request["config"])
                if registry_key(config) != key:
                    raise ValueError(f"registry {key[0]}: the config does not match its hash")
                self._follow(conn, reader, self._channels, key,
                             lambda: Channel(key, KubernetesRegistry(config), self.settle))
                return
            if request["op"] == "health":
                spec, verdict = request["spec"], [(host, port) for host, port in request.get("unhealthy", ())]
                self._follow(conn, reader, self._health, key, lambda: HealthChannel(key, spec, self, verdict))
                return
            with self._lock:
                channel = self._channels.get(key)
            if channel is None:
                answer: Any = {"error": f"registry {key[0]} is not running here"}
            elif request["op"] == "dump":
                answer = channel.registry.dump()
            elif request["op"] == "stats":
                answer = dataclasses.asdict(channel.registry.stats())
            else:
                answer = {"error": f"unknown op {request['op']!r}"}
            send_frame(conn, json.dumps(answer, default=str).encode())
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("discovery process: a request failed: %s", e)
        finally:
            conn.close()

    def _follow(self, conn: socket.socket, reader: Any, channels: dict[tuple[str, str], Any],
                key: tuple[str, str], make: Callable[[], Channel | HealthChannel]) -> None:
        """Subscribe the worker on ``conn`` to the channel ``key`` (made and started if it
        is not running) until the worker leaves."""
        with self._lock:  # never subscribed to a channel that _stop_idle is taking away
            channel = channels.get(key)
            if channel is None:
                log.info("%s %s: starting its %s for the workers (config %s)", *(
                    ("registry", key[0], "watches") if channels is self._channels else
                    ("service", key[0], "health checks")), key[1][:12])
                channel = channels[key] = make()
                channel.start()
            subscriber = Subscriber(conn)
            channel.subscribe(subscriber)
        try:
            while reader.read(4096):  # workers send nothing more: this waits for them to leave
                pass
        except OSError:
            pass
        finally:
            channel.unsubscribe(subscriber)
            subscriber.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kproxy.discovery.process")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--master", type=int, required=True)
    parser.add_argument("--lock-fd", type=int)
    args = parser.parse_args(argv)
    # started from a worker thread that holds SIGHUP back: take every signal again; a HUP
    # or Ctrl-C meant for the master's process group is not for this process
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    from ..memory import trim_periodically
    from ..server import configure_logging
    configure_logging()
    trim_periodically()  # as in the workers: a relist's parse leaves freed memory behind

    lock_fd = args.lock_fd if args.lock_fd is not None else os.open(os.path.join(args.dir, LOCK),
                                                                    os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already when handed over
    except BlockingIOError:
        return 0  # another discovery process serves this pod
    try:
        master_fd = os.pidfd_open(args.master)
    except ProcessLookupError:
        return 0
    path = os.path.join(args.dir, SOCKET)
    try:
        os.unlink(path)  # a dead predecessor's; we hold the lock
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(128)
    identity = os.stat(path).st_ino
    log.info("discovery process %d serves the workers of master %d on %s", os.getpid(), args.master, path)
    threading.Thread(target=preload_client, name="kproxy-preload", daemon=True).start()
    hub = Hub(args.dir)
    try:
        hub.serve(listener, master_fd, identity)
    finally:
        try:
            if os.stat(path).st_ino == identity:  # still ours: no successor bound it
                os.unlink(path)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
