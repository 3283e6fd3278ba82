"""kproxy's development tooling, kept out of the ``kproxy`` package (which holds the
gateway only, and is all that the container image installs):

- :mod:`kproxy_tools.testenv`: a real etcd + kube-apiserver on loopback for the tests,
  the benchmarks and the demo (installs Debian packages, builds kube-apiserver from
  Debian's source once and caches it): ``python -m kproxy_tools.testenv provision``;
- :mod:`kproxy_tools.demo`: what ``kproxy demo`` runs (the command imports it lazily);
- :mod:`kproxy_tools.common`: the helpers these, the tests and the benchmarks share
  (free ports, processes, log tails, a loopback client, Kubernetes ``apply``).

``pip install .`` installs it beside ``kproxy`` as its own top-level package.
"""
