"""The gunicorn entry point: ``KPROXY_CONFIG=FILE gunicorn -c conf/gunicorn.conf.py kproxy.wsgi:application``.

The config is the one the gunicorn master validated last (``conf/gunicorn.conf.py``), or
``$KPROXY_CONFIG`` read here under another server. Discovery starts in the
``post_worker_init`` hook (kproxy.server), after fork.
"""

from .server import worker_app

application = worker_app()
