"""Contracts with the private parts of gunicorn and the kubernetes client that kproxy
relies on, one test per dependency: a release that renames or reshapes one fails here,
loudly and by name, instead of at a user's start-up (urllib3's is in test_pool.py,
prometheus_client's in test_metrics.py).

- gunicorn, in kproxy/worker.py (the gthread worker kproxy extends) and kproxy/server.py
  (the arbiter's reload, replaced by an in-place reload);
- kubernetes, in kproxy/discovery/apiserver.py (the client's configuration, its urllib3
  pool and its TCP keepalive options).
"""

from __future__ import annotations

import inspect


def test_gunicorn_gthread_and_arbiter_internals_are_there():
    from gunicorn.arbiter import Arbiter
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
    assert callable(Arbiter.reload) and "WORKERS" in vars(Arbiter)


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
