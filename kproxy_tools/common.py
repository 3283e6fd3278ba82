"""What the test environment, the demo, the tests and the benchmarks all need: free
loopback ports, processes in their own session (started with their output in a log,
terminated with their whole process group), the tail of a log, a loopback-only HTTP client,
and a small Kubernetes client (create-or-replace ``apply``) for the test kube-apiserver.

Every process is started with ``start_new_session=True``: a Ctrl-C in the terminal
reaches the parent, not them, so the parent stops them in order, and ``killpg`` reaches
what they fork (gunicorn workers).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any, Iterator, Sequence

import requests

__all__ = ["KubeAPIError", "KubeClient", "Proc", "RESOURCES", "children", "free_port", "free_ports",
           "resource_path", "session", "spawn", "tail", "terminate"]


# -- ports and clients --------------------------------------------------------------------

def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def session() -> requests.Session:
    """A client that talks to loopback only: no proxies or CA bundles from the environment
    (the machine sets REQUESTS_CA_BUNDLE, which would override ``verify``)."""
    s = requests.Session()
    s.trust_env = False
    return s


# -- processes ----------------------------------------------------------------------------

def spawn(cmd: Sequence[str], log: Path, **popen: Any) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session, its output appended to ``log``; ``popen`` goes to
    ``subprocess.Popen`` (env, cwd, pass_fds ...)."""
    with open(log, "ab") as out:
        return subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **popen)


def terminate(proc: subprocess.Popen[Any] | None, grace: float = 15.0, first: int = signal.SIGTERM) -> None:
    """Stop a child started in its own session: ``first`` (SIGTERM) to its process group,
    SIGKILL after ``grace`` seconds; then SIGKILL what is left of the group (workers
    orphaned by a master that died first)."""
    if proc is None:
        return
    if proc.poll() is None:
        for sig, wait in ((first, grace), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)  # own session: pgid == pid
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log, or a note that there is none."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def proc_stats() -> Iterator[tuple[int, list[str]]]:
    """For every process: its pid and the fields of /proc/PID/stat after the command name
    (state, ppid, pgrp, ...; ``man 5 proc`` numbers them from 3)."""
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        fields = f.read().rpartition(")")[2].split()
                except OSError:  # gone meanwhile
                    continue
                yield int(name), fields


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the workers of a gunicorn master), from /proc."""
    return sorted(child for child, fields in proc_stats() if int(fields[1]) == pid)


def process_group(pgid: int) -> list[int]:
    """The live processes of a process group (a pod: master, workers, discovery process)."""
    return sorted(pid for pid, fields in proc_stats() if fields[0] != "Z" and int(fields[2]) == pgid)


def is_discovery_process(pid: int) -> bool:
    """Whether ``pid`` is a pod's discovery process (``python -m kproxy.discovery.process``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"kproxy.discovery.process" in f.read()
    except OSError:
        return False


def gunicorn_workers(master: int) -> list[int]:
    """The workers of a gunicorn master: its children but the pod's discovery process."""
    return [pid for pid in children(master) if not is_discovery_process(pid)]


class Proc:
    """A process we started (:func:`spawn`), output to ``log``; :meth:`stop` ends its group."""

    def __init__(self, name: str, cmd: Sequence[str], log: Path, *, env: dict[str, str] | None = None,
                 cwd: str | os.PathLike[str] | None = None, stop_signal: int = signal.SIGTERM):
        self.name, self.cmd, self.log, self.stop_signal = name, list(cmd), Path(log), stop_signal
        self.port = 0  # set by callers whose process picks its own port
        self.popen = spawn(cmd, self.log, env=env, cwd=cwd)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        terminate(self.popen, grace, self.stop_signal)

    def tail(self, lines: int = 15) -> str:
        return tail(self.log, lines)


# -- Kubernetes -----------------------------------------------------------------------------

#: kind -> (default apiVersion, plural resource name, namespaced?) for :meth:`KubeClient.apply`.
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "Namespace": ("v1", "namespaces", False),
    "Service": ("v1", "services", True),
    "Endpoints": ("v1", "endpoints", True),
    "ServiceAccount": ("v1", "serviceaccounts", True),
    "ConfigMap": ("v1", "configmaps", True),
    "Secret": ("v1", "secrets", True),
    "EndpointSlice": ("discovery.k8s.io/v1beta1", "endpointslices", True),  # no v1 in 1.20
    "ClusterRole": ("rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    "Role": ("rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings", True),
}


def resource_path(obj: dict[str, Any], *, with_name: bool = True) -> str:
    """URL path of ``obj`` (or of its collection when ``with_name`` is false)."""
    kind = obj.get("kind")
    if kind not in RESOURCES:
        raise ValueError(f"unsupported kind {kind!r}; known: {', '.join(sorted(RESOURCES))}")
    default_version, plural, namespaced = RESOURCES[kind]
    api_version = obj.get("apiVersion") or default_version
    path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    meta = obj.get("metadata") or {}
    if namespaced:
        path += f"/namespaces/{meta.get('namespace') or 'default'}"
    path += f"/{plural}"
    if with_name:
        path += f"/{meta['name']}"
    return path


class KubeAPIError(RuntimeError):
    """The apiserver answered a helper's request with an error status."""

    def __init__(self, response: requests.Response) -> None:
        self.response = response
        self.status_code = response.status_code
        super().__init__(f"{response.request.method} {response.url} -> {response.status_code}: "
                         f"{response.text[:2000]}")


class KubeClient:
    """Requests to a kube-apiserver with one bearer token, verified against ``ca_file``."""

    def __init__(self, url: str, token: str, ca_file: str):
        self.url, self.token, self.ca_file = url, token, ca_file
        self._session = session()

    def request(self, method: str, path: str, json: Any = None, token: str | None = None,
                **kwargs: Any) -> requests.Response:
        """One request (as ``token`` when given); extra keyword arguments (``params``,
        ``stream``, ``timeout``, ``headers``) go to requests."""
        headers = dict(kwargs.pop("headers", None) or {})
        headers.setdefault("Authorization", f"Bearer {token or self.token}")
        kwargs.setdefault("timeout", 30)
        return self._session.request(method, self.url + path, json=json, headers=headers, verify=self.ca_file,
                                     **kwargs)

    def get(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """The stored version of ``obj`` (found by kind/namespace/name), or None."""
        r = self.request("GET", resource_path(obj))
        if r.status_code == 404:
            return None
        if not r.ok:
            raise KubeAPIError(r)
        return r.json()

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create ``obj``, or replace it if it exists; return the stored object.

        Supports the kinds in :data:`RESOURCES`; ``apiVersion`` defaults per kind and
        ``metadata.namespace`` to ``default``.  This is a plain create-or-PUT, not
        server-side apply: fields left out of ``obj`` are dropped.
        """
        kind = obj.get("kind")
        if kind not in RESOURCES:
            raise ValueError(f"unsupported kind {kind!r}; known: {', '.join(sorted(RESOURCES))}")
        body = dict(obj)
        body.setdefault("apiVersion", RESOURCES[kind][0])
        r = self.request("POST", resource_path(body, with_name=False), json=body)
        for _ in range(5):
            if r.status_code != 409:
                break
            current = self.get(body)
            if current is None:  # deleted meanwhile
                r = self.request("POST", resource_path(body, with_name=False), json=body)
                continue
            body = {**body, "metadata": {**body["metadata"],
                                         "resourceVersion": current["metadata"]["resourceVersion"]}}
            if kind == "Service":
                # clusterIP is immutable once allocated; keep it when the caller left it out.
                spec = dict(body.get("spec") or {})
                for key in ("clusterIP", "clusterIPs"):
                    if key in current.get("spec", {}) and not spec.get(key):
                        spec[key] = current["spec"][key]
                body["spec"] = spec
            r = self.request("PUT", resource_path(body), json=body)
        if not r.ok:
            raise KubeAPIError(r)
        return r.json()

    def delete(self, obj: dict[str, Any]) -> bool:
        """Delete ``obj``; False if it did not exist.  (No namespace controller runs in the
        test environment, so a deleted Namespace stays Terminating.)"""
        r = self.request("DELETE", resource_path(obj))
        if r.status_code == 404:
            return False
        if not r.ok:
            raise KubeAPIError(r)
        return True

    def create_token(self, namespace: str, serviceaccount: str, expiration_seconds: int = 3600) -> str:
        """A bearer token for the ServiceAccount, minted with the TokenRequest API
        (the ServiceAccount must exist; expiration is at least 600 s)."""
        r = self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{serviceaccount}/token",
                         json={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                               "spec": {"expirationSeconds": int(expiration_seconds)}})
        if not r.ok:
            raise KubeAPIError(r)
        return r.json()["status"]["token"]
