"""The connection to one Kubernetes API server, as the ``kubernetes`` client configures it.

kubeconfig, in-cluster config, TLS and client certificates come from the official client;
requests go through its urllib3 pool raw, and the bearer token is read fresh::

    api = ApiConnection(config.registries["my-k8s-cluster"])
    response = api.get("/api/v1/endpoints", {"watch": "1"}, read_timeout=330)
    api.credentials_mark()    # changes when token_file is replaced: retry at once
    api.scrub(text)           # an error text with every token it used removed
"""

from __future__ import annotations

import json
import logging
import threading
import os
from dataclasses import dataclass
from typing import Any, Hashable, Mapping
from urllib.parse import urlencode

import urllib3

from ..config import RegistryConfig

log = logging.getLogger("kproxy.discovery")

SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
SERVICE_ACCOUNT_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
# TCP keepalive finds a silently vanished API server in about a minute, long before the
# watch's read timeout (which must outlast the server's own watch timeout)
KEEPALIVE = dict(idle=30, interval=10, count=3)


@dataclass(frozen=True)
class EndpointApi:
    group_version: str  # "v1" or "discovery.k8s.io/v1" / "discovery.k8s.io/v1beta1"
    resource: str       # "endpoints" or "endpointslices"

    def collection(self, namespace: str | None) -> str:
        return collection_path(self.group_version, self.resource, namespace)

    def __str__(self) -> str:
        return f"{self.group_version} {self.resource}"


ENDPOINTS = EndpointApi("v1", "endpoints")


def collection_path(group_version: str, resource: str, namespace: str | None) -> str:
    base = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    return f"{base}/namespaces/{namespace}/{resource}" if namespace else f"{base}/{resource}"


def preload_client() -> None:
    """Import what the first connection needs (the ``kubernetes`` client: a quarter of a
    second here) before it is needed: the discovery process does it while its first
    worker subscribes, so the first list does not wait for it."""
    from kubernetes import client, config  # noqa: F401
    from kubernetes.utils import keepalive  # noqa: F401


class ApiConnection:
    """The API server as the ``kubernetes`` client configures it; raw responses, our headers.

    The official client resolves kubeconfig, in-cluster config, TLS and client certificates;
    requests go through its urllib3 pool unparsed (``preload_content=False``) because its
    models cost four times the CPU and twice the memory on large lists. The bearer token
    is read from ``token_file`` on every request (a watch is one request per reconnect) and
    again after a 401, so rotated service-account tokens work without a restart;
    ``credentials_mark()`` lets a failing reflector see the file change and retry at once.
    """

    def __init__(self, config: RegistryConfig, connect_timeout: float = 10.0):
        self._config = config
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._client: Any = None  # kubernetes.client.ApiClient, built on first use
        in_cluster = not config.kubeconfig and not config.api_server
        self._token_file = config.token_file or (SERVICE_ACCOUNT_TOKEN if in_cluster and not config.token else None)
        self.tokens: list[str] = []  # recently used tokens, so error texts can be scrubbed

    def _api_client(self) -> Any:
        with self._lock:
            if self._client is None:
                from kubernetes import client as k8s
                self._client = k8s.ApiClient(self._configuration())
            return self._client

    def _configuration(self) -> Any:
        from kubernetes import client as k8s
        from kubernetes import config as k8s_config
        from kubernetes.utils.keepalive import tcp_keepalive_socket_options
        config = self._config
        c = k8s.Configuration()
        if config.kubeconfig:
            k8s_config.load_kube_config(config_file=config.kubeconfig, context=config.context,
                                        client_configuration=c, persist_config=False)
        elif config.api_server:
            c.host = config.api_server
        else:
            from kubernetes.config.incluster_config import InClusterConfigLoader
            InClusterConfigLoader(token_filename=config.token_file or SERVICE_ACCOUNT_TOKEN,
                                  cert_filename=config.ca_file or SERVICE_ACCOUNT_CA).load_and_set(c)
        # only the registry's own settings decide verification: urllib3 never reads
        # REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE, and no ca_file means the system CAs
        if config.ca_file:
            c.ssl_ca_cert = config.ca_file
        if config.insecure_skip_tls_verify:
            c.verify_ssl = False
        c.socket_options = tcp_keepalive_socket_options(**KEEPALIVE)
        return c

    def _authorization(self) -> str | None:
        if self._token_file:
            try:
                with open(self._token_file, encoding="utf-8") as f:
                    token = f.read().strip()
            except OSError as e:
                raise RuntimeError(f"cannot read token_file {self._token_file}: {e.strerror}") from None
            if not token:
                raise RuntimeError(f"token_file {self._token_file} is empty")
        elif self._config.token:
            token = self._config.token
        else:  # kubeconfig or in-cluster: the client's own (refreshing) credentials, if any
            auth = self._api_client().configuration.auth_settings().get("BearerToken")
            value = auth and auth.get("value")
            if not value:
                return None
            token = value.split(" ", 1)[-1]
        if token not in self.tokens:
            self.tokens = (self.tokens + [token])[-4:]
        return f"Bearer {token}"

    def credentials_mark(self) -> Hashable:
        """Changes whenever ``token_file`` may hold another token; None without a file.

        Only a stat and a symlink walk, never a read, so a failing reflector can ask several
        times a second. The file's identity, size and times catch a rewrite or a rename over
        it; the resolved path catches a Kubernetes projected volume, where ``token`` links to
        ``..data/token`` and the kubelet swaps the ``..data`` link to a new directory.
        """
        if not self._token_file:
            return None
        try:
            st = os.stat(self._token_file)
            return (os.path.realpath(self._token_file), st.st_dev, st.st_ino, st.st_size,
                    st.st_mtime_ns, st.st_ctime_ns)
        except OSError as e:  # absent or unreadable now: appearing later is a change too
            return ("unreadable", e.errno)

    def get(self, path: str, params: Mapping[str, str], read_timeout: float) -> urllib3.BaseHTTPResponse:
        client = self._api_client()
        url = client.configuration.host.rstrip("/") + path + ("?" + urlencode(params) if params else "")
        authorization = self._authorization()
        response = self._request(client, url, authorization, read_timeout)
        if response.status == 401 and self._token_file:
            fresh = self._authorization()
            if fresh != authorization:  # the file was rotated under us: retry at once
                response.drain_conn()
                response.release_conn()
                response = self._request(client, url, fresh, read_timeout)
        return response

    def _request(self, client: Any, url: str, authorization: str | None,
                 read_timeout: float) -> urllib3.BaseHTTPResponse:
        headers = {"Accept": "application/json", "User-Agent": "kproxy"}
        if authorization:
            headers["Authorization"] = authorization
        return client.rest_client.pool_manager.request(
            "GET", url, headers=headers, preload_content=False, retries=False,
            timeout=urllib3.Timeout(connect=self._connect_timeout, read=read_timeout))

    def get_json(self, path: str, params: Mapping[str, str] | None = None) -> tuple[int, Any]:
        """A small GET (discovery, probes): status and parsed body."""
        response = self.get(path, params or {}, 30.0)
        try:
            data = response.data
        finally:
            response.release_conn()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, None

    def scrub(self, text: str | None) -> str | None:
        if text:
            for token in self.tokens:
                text = text.replace(token, "***")
        return text

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.rest_client.pool_manager.clear()


