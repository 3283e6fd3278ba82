"""kproxy: a Kubernetes-aware API gateway for Python WSGI stacks."""
