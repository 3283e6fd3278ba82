"""The gunicorn entry point: ``KPROXY_CONFIG=FILE gunicorn -c conf/gunicorn.conf.py kproxy.wsgi:application``.

The config is loaded when a worker imports this module; discovery starts in the
``post_worker_init`` hook of ``conf/gunicorn.conf.py`` (kproxy.server), after fork.
"""

import os

from .app import Gateway
from .config import load

application = Gateway(load(os.environ["KPROXY_CONFIG"]))
