"""Serving on gunicorn: ``kproxy serve`` and the hooks of ``conf/gunicorn.conf.py``.

``kproxy serve -c FILE`` runs gunicorn's ``gthread`` worker in-process (with deadlines for
slow clients, ``kproxy.worker``): a bounded pool
of ``threads`` request threads per worker, HTTP/1.1 keep-alive with idle connections
parked in a poller (not holding a thread), ``workers`` processes. The production
deployment (``KPROXY_CONFIG=FILE gunicorn -c conf/gunicorn.conf.py kproxy.wsgi:application``)
is the same server with the same hooks, so both behave alike:

- ``on_starting``: a fresh ``PROMETHEUS_MULTIPROC_DIR`` so metrics add up over workers;
- ``post_worker_init``: discovery threads start in each worker, after fork (never in
  the master), and the worker waits briefly for the first list before it accepts;
  ``post_fork`` holds HUPs back until then;
- ``when_ready``: SIGHUP reloads the INI in place: the master reads the file once and
  checks it; if it is valid, the master hands those very bytes to the workers (a file in a
  private directory, replaced atomically) and tells each to swap routes, so a file edited
  again meanwhile is not what a worker loads. Registries whose settings did not change
  keep their cache and watch, requests in flight finish. A file that fails ``kproxy
  check`` is refused with its problems logged, and the running config stays. A changed
  setting that only a restart applies (``restart`` in kproxy/config.py) is logged by name;
- ``child_exit``: a dead worker's live gauges are dropped;
- ``on_starting``: with ``workers > 1``, the workers share one discovery process
  (``kproxy.discovery.shared``) instead of watching the API server each; the master starts
  it here when the config has a registry or a health check, and a worker starts a new one
  whenever none answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from typing import Any

from . import config as configmod

log = logging.getLogger("kproxy")

READY_WAIT = 5.0  # seconds a new worker waits for its registries' first list

# The last valid config, kept by the master and inherited by every worker it forks: a
# worker that starts after a bad file was written (a crash, max_requests) still boots
# with the config that is running, instead of failing on the file.
_current: configmod.Config | None = None
# The config the processes started with: settings a reload cannot apply keep its values.
_started: configmod.Config | None = None
# The master's private directory for the bytes a reload validated; made before any
# worker forks, so every worker knows it.
_handoff_dir: str | None = None
# The discovery process the master started (workers > 1); see on_starting.
_discovery: Any = None


def remember(config: configmod.Config) -> None:
    global _current, _started
    _current = config
    if _started is None:
        _started = config


def digest(data: bytes) -> str:
    """A short name for a config's bytes in the logs (a hash: it reveals nothing in them)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()[:12]


def worker_app() -> Any:
    """The WSGI app for a gunicorn worker: a Gateway on the running config."""
    from .app import Gateway
    config = _current or configmod.load(os.environ["KPROXY_CONFIG"])
    return Gateway(configmod.keep_restart_settings(config, _started) if _started else config)


def gunicorn_settings(config: configmod.Config, listen: tuple[str, int] | None = None) -> dict[str, Any]:
    """gunicorn settings that follow from a kproxy config."""
    from .worker import ARBITER_SETTINGS
    host, port = listen or config.gateway.listen
    gateway = config.gateway
    return {
        "bind": [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"],
        "worker_class": "kproxy.worker.DeadlineThreadWorker",
        "workers": gateway.workers,
        "threads": gateway.threads,
        "keepalive": max(1, round(gateway.keepalive_timeout)),
        # the read timeout bounds a request; the worker's heartbeat runs apart from it
        "timeout": 30,
        "graceful_timeout": 30,
        "proc_name": "kproxy",
        "accesslog": None,  # kproxy's own access log has the upstream fields
        # the scheme is the one the client connected with: a client-sent X-Forwarded-Proto
        # must not turn into wsgi.url_scheme (and so into what kproxy forwards)
        "forwarded_allow_ips": "",
        "secure_scheme_headers": {},
        **ARBITER_SETTINGS,
    }


def prepare_metrics_dir() -> None:
    """Give gunicorn workers a shared, empty metrics directory. Must run before
    prometheus_client is imported: it picks its storage at import time."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        path = tempfile.mkdtemp(prefix="kproxy-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    else:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):  # files of a previous run would add to our counters
            if name.endswith(".db"):
                os.unlink(os.path.join(path, name))


def configure_logging() -> None:
    """kproxy's logs to stderr, the access log to stdout (a no-op if the app already
    configured these loggers)."""
    import sys
    formatter = logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    main = logging.getLogger("kproxy")
    if not main.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(formatter)
        main.addHandler(handler)
        main.setLevel(logging.INFO)
    access = logging.getLogger("kproxy.access")
    if not access.handlers:
        from .accesslog import AccessLogHandler
        handler = AccessLogHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False


# -- gunicorn hooks (also imported by conf/gunicorn.conf.py) --

def on_starting(server: Any) -> None:
    prepare_metrics_dir()
    configure_logging()
    from .discovery import shared
    directory = shared.prepare(server.cfg.workers)  # workers > 1: one discovery process feeds them all
    if directory and _current is not None and shared.needed(_current):
        _start_discovery(server, directory)


def _start_discovery(server: Any, directory: str) -> None:
    # Started here, the process boots while the workers do, not after the first of them has.
    # Kept referenced: gunicorn reaps it (a child that is not a worker), never Popen's
    # finalizer, which might wait on a pid reused since.
    global _discovery
    from .discovery import shared
    try:
        _discovery = shared.start_process(directory, os.getpid())
        if _discovery is not None:
            server.log.info("started the discovery process (pid %d)", _discovery.pid)
    except OSError as e:  # the workers start one when none answers
        server.log.warning("cannot start the discovery process (%s); a worker will try", e)


def when_ready(server: Any) -> None:
    global _handoff_dir
    # gunicorn's own HUP starts new workers, which would list every registry again;
    # reload in place instead (see module docstring)
    _handoff_dir = tempfile.mkdtemp(prefix="kproxy-reload-")  # 0700: the config may hold a token
    os.environ["KPROXY_RELOAD_STATUS"] = os.path.join(_handoff_dir, "reload.json")  # for the dashboard
    from .worker import reload_in_place
    reload_in_place(server, lambda: _reload_workers(server))
    for warning in _current.warnings if _current else ():  # what `kproxy check` warns of
        server.log.warning("%s", warning)


def post_fork(server: Any, worker: Any) -> None:
    # A new worker would die of a HUP (gunicorn resets it to the default action) until
    # post_worker_init installs the reload handler: hold HUPs back until then.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})


def post_worker_init(worker: Any) -> None:
    gateway = _gateway(worker.wsgi)
    if gateway is None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        return
    worker.header_timeout = gateway.config.gateway.client_header_timeout
    worker.body_timeout = gateway.config.gateway.client_body_timeout
    worker.send_timeout = gateway.config.gateway.client_send_timeout
    from .memory import trim_periodically
    trim_periodically()
    gateway.start()
    deadline = time.monotonic() + READY_WAIT
    while not gateway.ready and time.monotonic() < deadline:
        time.sleep(0.02)
    path = gateway.config.path

    def reload_in_place(signum: int, frame: Any) -> None:
        # the signal handler runs in the worker's main loop: do the work elsewhere
        threading.Thread(target=_reload_gateway, args=(gateway, path), name="kproxy-reload",
                         daemon=True).start()
    signal.signal(signal.SIGHUP, reload_in_place)
    signal.siginterrupt(signal.SIGHUP, False)  # let requests in flight run undisturbed
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # a HUP held back runs now


def child_exit(server: Any, worker: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if os.path.basename(path).startswith("kproxy-metrics-"):  # only the one we made
        shutil.rmtree(path, ignore_errors=True)
    if _handoff_dir:
        shutil.rmtree(_handoff_dir, ignore_errors=True)
    from .discovery import shared
    shared.cleanup()


def _gateway(app: Any) -> Any:
    from .app import Gateway
    from .middleware import KProxyMiddleware
    if isinstance(app, KProxyMiddleware):
        return app.gateway
    return app if isinstance(app, Gateway) else None


def _reload_workers(server: Any) -> None:
    path = os.environ.get("KPROXY_CONFIG")  # set by conf/gunicorn.conf.py and by serve()
    if not path:
        server.log.error("reload: no config path (KPROXY_CONFIG) to reload")
        return
    try:
        data = configmod.read_bytes(path)
        config = configmod.from_bytes(data, path)
    except configmod.ConfigError as e:
        for problem in e.problems:  # file, section, key: a Problem quotes no secret
            server.log.error("reload refused: %s", problem)
        server.log.error("reload refused: %s is invalid; the running config stays", path)
        _record_reload(path, f"refused: {len(e.problems)} problems (see the log)")
        return
    try:
        _hand_over(data)
    except OSError as e:  # e.g. a tmp cleaner removed the directory
        server.log.error("reload refused: cannot hand %s over to the workers (%s); the running config stays",
                         path, e)
        _record_reload(path, "refused: cannot hand the config over to the workers")
        return
    for key in configmod.restart_needed(_started.gateway, config.gateway) if _started else ():
        server.log.warning("reload: [kproxy] %s changed; it takes effect after a restart", key)
    for warning in config.warnings:
        server.log.warning("reload: %s", warning)
    remember(config)  # before the HUPs: a worker forked from now on boots with it
    from .worker import worker_pids
    pids = worker_pids(server)
    server.log.info("reload: %s (%s) is valid; reloading %d workers in place", path, digest(data), len(pids))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            pass
    _record_reload(path, "ok")


def _record_reload(path: str, result: str) -> None:
    """What the master made of a HUP, for every worker's dashboard (a refused reload never
    reaches the workers otherwise). Names the file and the count of problems, never them."""
    status = os.environ.get("KPROXY_RELOAD_STATUS")
    if not status:
        return
    try:
        fd, temporary = tempfile.mkstemp(dir=os.path.dirname(status))
        with os.fdopen(fd, "w") as f:
            json.dump({"time": time.time(), "result": result, "config_file": path}, f)
        os.replace(temporary, status)
    except OSError:
        pass  # the dashboard then shows the last reload a worker applied


def _hand_over(data: bytes) -> None:
    """Leave the validated bytes where the workers read them, whole or not at all."""
    assert _handoff_dir is not None, "when_ready makes the directory"
    os.makedirs(_handoff_dir, mode=0o700, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=_handoff_dir)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(temporary, os.path.join(_handoff_dir, "config"))


def _reload_gateway(gateway: Any, path: str) -> None:
    """In a worker: load the bytes the master validated, never the file itself, which may
    have changed again since."""
    try:
        with open(os.path.join(_handoff_dir or "", "config"), "rb") as f:
            data = f.read()
    except OSError:
        log.error("reload: the master has handed over no config; send HUP to the master, not to a worker")
        return
    try:
        config = configmod.from_bytes(data, path)
        gateway.reload(configmod.keep_restart_settings(config, _started) if _started else config)
    except Exception:  # the master validated these bytes: only a bug gets here
        log.exception("reload of %s (%s) failed; the running config stays", path, digest(data))
        return
    log.info("reload: worker %d runs %s (%s)", os.getpid(), path, digest(data))


def serve(config_path: str, listen: tuple[str, int] | None = None) -> None:
    """Run ``kproxy serve``: gunicorn with the settings above and the hooks of this module."""
    prepare_metrics_dir()  # before prometheus_client is imported (by kproxy.app)
    config = configmod.load(config_path)
    remember(config)
    os.environ["KPROXY_CONFIG"] = config_path
    from gunicorn.app.base import BaseApplication

    class ServeApplication(BaseApplication):
        def load_config(self) -> None:
            settings = gunicorn_settings(config, listen)
            settings.update(on_starting=on_starting, when_ready=when_ready, post_fork=post_fork,
                            post_worker_init=post_worker_init, child_exit=child_exit, on_exit=on_exit)
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return worker_app()

    ServeApplication().run()
