"""The real kube-apiserver of ``kproxy_tools.testenv`` for the discovery benchmarks.

Only a cached binary is used: the benchmark never builds or installs one (``python -m
kproxy_tools.testenv provision`` does, once). Credentials are a ServiceAccount token with the
recommended RBAC (list/watch endpointslices, endpoints, services), written to a file as
a pod would have it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from bench._common import ROOT


def unavailable() -> str | None:
    """Why the real API server cannot be used here, or None."""
    try:
        from kproxy_tools import testenv
    except ImportError as e:
        return f"kproxy_tools.testenv cannot be imported: {e}"
    if not testenv.binary_path().exists():
        return (f"kube-apiserver is not built ({testenv.binary_path()} is missing); "
                "run `python -m kproxy_tools.testenv provision` once")
    for tool in ("etcd", "etcdctl", "openssl"):
        if testenv.find_tool(tool) is None:
            return f"{tool} is not installed (python -m kproxy_tools.testenv provision installs it)"
    return None


def discovery_unfinished() -> str | None:
    """Why kproxy's discovery cannot be benchmarked yet, or None (a static check; the
    contestant still has to become ready and route before it is measured)."""
    try:
        from kproxy.discovery import create_registry  # noqa: F401
        from kproxy.discovery.kubernetes import KubernetesRegistry
    except Exception as e:  # an unfinished module may fail in any way
        return f"kproxy.discovery is not importable: {e!r}"
    for name in ("start", "stop", "nodes", "ready"):
        if not hasattr(KubernetesRegistry, name):
            return f"KubernetesRegistry has no {name}"
    return None


def discovery_commit() -> str:
    """The last commit that touched kproxy/discovery (printed with the results)."""
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h %s", "--", "kproxy/discovery"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kproxy/discovery"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (out[:100] or "none") + (" (+ uncommitted changes)" if dirty else "")


def start() -> Any:
    from kproxy_tools.testenv import KubeAPIServer, binary_path
    return KubeAPIServer(binary_path()).start()


def token_file(kube: Any, workdir: Path, namespace: str = "kproxy-system") -> Path:
    """A ServiceAccount token allowed to list and watch endpoints everywhere, in a file."""
    kube.apply({"kind": "Namespace", "metadata": {"name": namespace}})
    kube.apply({"kind": "ServiceAccount", "metadata": {"name": "kproxy", "namespace": namespace}})
    kube.apply({"kind": "ClusterRole", "metadata": {"name": "kproxy-bench"}, "rules": [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
        {"apiGroups": [""], "resources": ["services", "endpoints"], "verbs": ["list", "watch"]},
    ]})
    kube.apply({"kind": "ClusterRoleBinding", "metadata": {"name": "kproxy-bench"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kproxy-bench"},
                "subjects": [{"kind": "ServiceAccount", "name": "kproxy", "namespace": namespace}]})
    path = workdir / "token"
    path.write_text(kube.create_token(namespace, "kproxy", 3600))
    return path


def registry_section(name: str, kube: Any, token: Path, namespace_pattern: str,
                     resource: str = "endpointslices") -> str:
    return (f"[registry:{name}]\ntype = kubernetes\napi_server = {kube.url}\ntoken_file = {token}\n"
            f"ca_file = {kube.ca_file}\nnamespace_pattern = {namespace_pattern}\nresource = {resource}\n")


def service_obj(namespace: str, name: str, target_port: int) -> dict:
    """A selector-less Service with port 80 named http."""
    return {"kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": target_port, "protocol": "TCP"}]}}


def slice_obj(namespace: str, service: str, port: int, addresses: list[str] = ("127.0.0.1",),
              name: str | None = None) -> dict:
    return {"kind": "EndpointSlice",
            "metadata": {"name": name or f"{service}-1", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}


def endpoints_obj(namespace: str, name: str, port: int, addresses: list[str] = ("127.0.0.1",)) -> dict:
    return {"kind": "Endpoints", "metadata": {"name": name, "namespace": namespace},
            "subsets": [{"addresses": [{"ip": a} for a in addresses],
                         "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}]}
