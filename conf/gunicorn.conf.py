# gunicorn settings for kproxy:
#   KPROXY_CONFIG=conf/kproxy.ini gunicorn -c conf/gunicorn.conf.py kproxy.wsgi:application
# bind, workers, threads and keep-alive come from the INI's [kproxy] section; the hooks
# start discovery in each worker after fork, aggregate metrics over workers, and make
# HUP reload the INI in place (see kproxy/server.py).
import os
import sys

from kproxy import server as _kproxy
from kproxy.config import ConfigError, load

_kproxy.prepare_metrics_dir()  # before any worker imports prometheus_client

try:
    _config = load(os.environ.get("KPROXY_CONFIG", "conf/kproxy.ini"))
except ConfigError as _e:  # never half-start: refuse here, in the master, with every problem
    print(_e, file=sys.stderr)
    sys.exit(1)
os.environ.setdefault("KPROXY_CONFIG", _config.path)
_kproxy.remember(_config)

globals().update(_kproxy.gunicorn_settings(_config))
on_starting = _kproxy.on_starting
when_ready = _kproxy.when_ready
post_fork = _kproxy.post_fork
post_worker_init = _kproxy.post_worker_init
child_exit = _kproxy.child_exit
on_exit = _kproxy.on_exit
