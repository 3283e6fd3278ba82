"""Contracts with the private parts of gunicorn and the kubernetes client that kproxy
relies on, one test per dependency: a release that renames or reshapes one fails here,
loudly and by name, instead of at a user's start-up (urllib3's is in test_pool.py,
prometheus_client's in test_metrics.py).

- gunicorn, all in kproxy/worker.py: the gthread worker kproxy extends, and the arbiter's
  parts that kproxy/server.py's hooks use through it (its reload, replaced by an in-place
  reload; its workers; the control-socket setting; its reaping of a child that is not a
  worker, the discovery process). The hooks also read ``server.log``,
  ``server.cfg``, ``worker.wsgi`` and ``worker.pid``, as gunicorn's example config does:
  pinned here too;
- kubernetes, in kproxy/discovery/apiserver.py (the client's configuration, its urllib3
  pool and its TCP keepalive options).
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap


def test_gunicorn_gthread_internals_are_there():
    from gunicorn.http.message import DEFAULT_MAX_HEADERFIELD_SIZE, MAX_HEADERS, MAX_REQUEST_LINE
    from gunicorn.http.unreader import Unreader
    from gunicorn.workers.gthread import TConn, ThreadWorker

    for name in ("enqueue_req", "handle", "finish_request", "murder_keepalived", "wait_for_and_dispatch_events",
                 "on_client_socket_readable", "on_pending_socket_readable", "init_process"):
        assert callable(getattr(ThreadWorker, name, None)), f"gunicorn ThreadWorker.{name}"
    worker_init = inspect.getsource(ThreadWorker.__init__) + inspect.getsource(ThreadWorker.init_process)
    for attribute in ("tpool", "poller", "keepalived_conns", "nr_conns", "method_queue", "pending_conns"):
        assert f"self.{attribute}" in worker_init, f"gunicorn ThreadWorker.{attribute}"
    conn_source = inspect.getsource(TConn)
    for attribute in ("self.sock", "self.parser", "self.initialized", "self.data_ready",
                      "def wait_for_data", "def set_timeout", "def init", "def close"):
        assert attribute in conn_source, f"gunicorn TConn {attribute}"
    assert callable(getattr(Unreader, "take_buffered", None)) and "self.buf" in inspect.getsource(Unreader)
    assert all(isinstance(n, int) for n in (MAX_REQUEST_LINE, MAX_HEADERS, DEFAULT_MAX_HEADERFIELD_SIZE))


def test_gunicorn_arbiter_parts_the_hooks_use_are_there():
    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter
    from gunicorn.config import Config
    from gunicorn.workers.base import Worker

    from kproxy.worker import ARBITER_SETTINGS, reload_in_place, worker_pids

    # a HUP reaches the reload kproxy puts on the instance (reload_in_place)
    assert "self.reload()" in inspect.getsource(Arbiter.handle_hup), "gunicorn Arbiter.handle_hup -> reload"
    assert isinstance(vars(Arbiter)["WORKERS"], dict), "gunicorn Arbiter.WORKERS: pid -> worker"
    setup = inspect.getsource(Arbiter.setup)
    assert "self.log =" in setup and "self.cfg =" in setup, "gunicorn Arbiter.log, Arbiter.cfg"
    assert "self.wsgi =" in inspect.getsource(Worker.load_wsgi), "gunicorn Worker.wsgi"
    assert "self.pid" in inspect.getsource(Worker.__init__), "gunicorn Worker.pid"
    settings = Config().settings
    for name, value in ARBITER_SETTINGS.items():
        assert name in settings, f"gunicorn setting {name}"
        settings[name].set(value)
        assert settings[name].get() == value

    # on a real arbiter (set up, not started: it binds nothing), a HUP runs kproxy's reload
    class App(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", ["127.0.0.1:0"])

        def load(self) -> None:
            return None
    arbiter = Arbiter(App())
    assert arbiter.cfg.workers == 1 and callable(arbiter.log.info)
    reloads = []
    reload_in_place(arbiter, lambda: reloads.append("in place"))
    arbiter.handle_hup()
    assert reloads == ["in place"]
    arbiter.WORKERS = {101: object(), 102: object()}  # what spawn_worker fills in, per instance here
    assert worker_pids(arbiter) == [101, 102]


def test_gunicorn_reaps_a_child_that_is_not_a_worker_and_carries_on():
    """The master starts the discovery process (kproxy/server.py, on_starting): when it
    exits, whatever its code, gunicorn reaps it as a stranger, never as a worker that failed
    to boot (which halts the master). Run in a child, since reap_workers waits on any pid."""
    script = textwrap.dedent("""
        import os, sys, time
        from gunicorn.arbiter import Arbiter

        class Log:
            def __getattr__(self, name):
                return lambda *args, **kwargs: None

        arbiter = Arbiter.__new__(Arbiter)
        arbiter.WORKERS, arbiter.reexec_pid, arbiter.dirty_arbiter_pid, arbiter.log = {}, 0, 0, Log()
        child = os.fork()
        if child == 0:
            os._exit(Arbiter.WORKER_BOOT_ERROR)
        for _ in range(500):
            time.sleep(0.01)
            with open(f"/proc/{child}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    break
        arbiter.reap_workers()  # raises HaltServer if it took the child for a worker
        print(os.path.exists(f"/proc/{child}"))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False", "gunicorn left the child unreaped"


def test_kubernetes_client_internals_are_there():
    from kubernetes import client, config
    from kubernetes.config.incluster_config import InClusterConfigLoader
    from kubernetes.utils.keepalive import tcp_keepalive_socket_options

    options = tcp_keepalive_socket_options(idle=30, interval=10, count=3)
    assert options and all(len(option) == 3 for option in options)
    assert "load_and_set" in vars(InClusterConfigLoader)
    assert callable(config.load_kube_config)
    configuration = client.Configuration()
    for attribute in ("host", "ssl_ca_cert", "verify_ssl", "socket_options"):
        assert hasattr(configuration, attribute), f"kubernetes Configuration.{attribute}"
    configuration.api_key = {"authorization": "Bearer t"}  # what kubeconfig loading sets
    assert configuration.auth_settings()["BearerToken"]["value"] == "Bearer t"
    api_client = client.ApiClient(configuration)
    try:
        assert callable(api_client.rest_client.pool_manager.request)
        assert callable(api_client.rest_client.pool_manager.clear)
    finally:
        api_client.close()
