"""``kproxy demo``: the Kubernetes service discovery walkthrough on this machine, with real parts.

One command shows the point of kproxy, a request routed by Kubernetes service discovery,
without a cluster of your own::

    kproxy demo                  # Ctrl-C stops everything it started
    kproxy demo --scale 2        # (another terminal) the Service gets its second httpbin node
    kproxy demo --keep           # or: leave it running in the background ...
    kproxy demo --stop           # ... and tear it down later

What runs, all on loopback:

* etcd + kube-apiserver of the test environment (:mod:`kproxy_tools.testenv`, the code the tests
  use, with its cache: the first run builds kube-apiserver from Debian's source, about
  5 minutes on 2 cores; later runs start in seconds);
* two httpbin nodes (``gunicorn httpbin:app``; when the ``httpbin`` package is not installed,
  :func:`echo_app`, a built-in stand-in that answers ``/anything`` with httpbin's JSON);
* in the apiserver: namespace ``apisix``, the selector-less Service ``apisix/httpbin`` (port
  80, named ``http``) with its EndpointSlices and Endpoints (one node; ``--scale N`` changes
  that), the walkthrough's ``rbac.yaml`` as written plus a ClusterRole for Services and
  EndpointSlices, and a token for ``apisix/apisix-k8s-sd-sa`` from the TokenRequest API;
* ``kproxy serve -c demo.ini``: the walkthrough's registry ``my-k8s-cluster``, service
  ``sd-app`` and api ``anything``, on 127.0.0.1:9080 (``--listen`` changes it). Its access
  log, shown as the demo's output, names the node that served each request.

State (INI, token, CA, logs, pids) lives in ``~/.cache/kproxy/demo`` (``$KPROXY_DEMO_DIR``
overrides it); one demo runs per state directory, and ``--scale``/``--stop`` find it there.
When the Kubernetes environment cannot be provided (``TestEnvUnavailable``: no root to
install packages, not Debian), the demo says why and serves the same routes from static
nodes; ``KPROXY_DEMO_KUBE=off`` asks for that mode.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import requests

from . import testenv
from .common import RESOURCES, KubeAPIError, KubeClient, children, session, tail, terminate

NAMESPACE = "apisix"
SERVICE = "httpbin"
SERVICE_ACCOUNT = "apisix-k8s-sd-sa"
REGISTRY = "my-k8s-cluster"
HOST = "sd.httpbin.org"
NODES = 2                    # httpbin nodes started; --scale picks how many the Service has
PORT_NAME = "http"
PROBE = "kproxy-demo-probe"  # X-Request-Id of the demo's own admin requests, left out of the shown log
TOKEN_SECONDS = 7 * 86400
DEFAULT_LISTEN = ("127.0.0.1", 9080)

#: The walkthrough's rbac.yaml, exactly as written there (applied object by object).
SEED_RBAC_YAML = """\
# rbac.yaml
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: apisix-k8s-sd-watcher
rules:
  - apiGroups: [""]
    resources: ["endpoints"]
    verbs: ["list", "watch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: apisix-k8s-sd-watcher-binding
subjects:
  - kind: ServiceAccount
    name: apisix-k8s-sd-sa
    namespace: apisix
roleRef:
  kind: ClusterRole
  name: apisix-k8s-sd-watcher
  apiGroup: rbac.authorization.k8s.io
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: apisix-k8s-sd-sa
  namespace: apisix
"""

#: What kproxy recommends on top of the walkthrough's role: Services (for the Service-port
#: mapping) and EndpointSlices, bound to the same ServiceAccount.
DISCOVERY_RBAC: list[dict[str, Any]] = [
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
     "metadata": {"name": "apisix-k8s-sd-discovery"},
     "rules": [{"apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch"]},
               {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                "verbs": ["list", "watch"]}]},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
     "metadata": {"name": "apisix-k8s-sd-discovery-binding"},
     "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}],
     "roleRef": {"kind": "ClusterRole", "name": "apisix-k8s-sd-discovery",
                 "apiGroup": "rbac.authorization.k8s.io"}},
]


class DemoError(Exception):
    """The demo cannot go on; the message says why (and where the logs are)."""


def say(text: str = "") -> None:
    print(text, flush=True)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _show(path: str | os.PathLike[str]) -> str:
    """A path as the user would type it (``~`` for the home directory)."""
    text, home = str(path), str(Path.home())
    return "~" + text[len(home):] if home != "/" and (text == home or text.startswith(home + "/")) else text


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _client_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host``."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


# -- where the demo keeps its state ------------------------------------------------------

def state_dir() -> Path:
    """``$KPROXY_DEMO_DIR``, or ``demo`` in the test environment's cache (``~/.cache/kproxy``)."""
    env = os.environ.get("KPROXY_DEMO_DIR")
    return Path(env) if env else testenv.cache_dir() / "demo"


class Paths:
    def __init__(self, base: Path):
        self.base = base
        self.state = base / "state.json"   # pid, mode, addresses, processes: for --scale and --stop
        self.lock = base / ".lock"         # held by the running demo for its lifetime
        self.log = base / "demo.log"       # a --keep demo's output (its access log)
        self.run = base / "run"            # INI, token, CA, rbac.yaml, process logs

    def read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state.read_text())
        except (OSError, ValueError):
            return None

    def write_state(self, state: dict[str, Any]) -> None:
        tmp = self.state.with_name(f".state.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=2)
        os.replace(tmp, self.state)

    def try_lock(self) -> Any:
        """The demo lock (an open file), or None when a running demo holds it."""
        self.base.mkdir(parents=True, exist_ok=True, mode=0o700)
        f = open(self.lock, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
        return f

    def remove(self, *, log: bool) -> None:
        shutil.rmtree(self.run, ignore_errors=True)
        for path in (self.state, *((self.log,) if log else ())):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


# -- processes ----------------------------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields from the state on (index 0 = field 3), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (OSError, ValueError):
        return None


def _start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def _alive(pid: int, start_time: int | None = None) -> bool:
    """``pid`` runs (not a zombie) and, when ``start_time`` is given, is the process we recorded."""
    fields = _stat(pid)
    if fields is None:
        if Path("/proc/self/stat").exists():
            return False
        try:  # no /proc: ask the kernel
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    return fields[0] != "Z" and (start_time is None or int(fields[19]) == start_time)


def _describe(pid: int) -> dict[str, Any]:
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        name = "?"
    return {"pid": pid, "start_time": _start_time(pid), "name": name}


def _stop_recorded(process: dict[str, Any], grace: float = 15.0) -> bool:
    """Stop a recorded process (not our child) and its process group; True if it ran."""
    pid, start = process["pid"], process.get("start_time")
    if not _alive(pid, start):
        return False
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait
        while _alive(pid, start) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _alive(pid, start):
            break
    return True


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # `kproxy serve` makes (and removes) its own
    env["PYTHONUNBUFFERED"] = "1"
    parent = str(Path(__file__).resolve().parent.parent)
    if not re.search(r"[/\\](site|dist)-packages$", parent):  # a source tree: children import this kproxy
        env["PYTHONPATH"] = os.pathsep.join(p for p in (parent, env.get("PYTHONPATH", "")) if p)
    return env


# -- Kubernetes objects -------------------------------------------------------------------

def service_object(target_port: int) -> dict[str, Any]:
    """``apisix/httpbin``: port 80 named ``http``, no selector (we write its endpoints)."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": SERVICE, "namespace": NAMESPACE, "labels": {"app": SERVICE}},
            "spec": {"ports": [{"name": PORT_NAME, "port": 80, "protocol": "TCP", "targetPort": target_port}]}}


def endpoint_objects(nodes: list[str], all_nodes: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(objects to apply, objects to delete) so that the Service has exactly ``nodes``.

    The nodes share 127.0.0.1 and differ by port, so each gets its own EndpointSlice
    (a slice has one port list); the Endpoints object has one subset per node.
    """
    def slice_(index: int, address: str) -> dict[str, Any]:
        host, port = address.rsplit(":", 1)
        return {"apiVersion": RESOURCES["EndpointSlice"][0], "kind": "EndpointSlice",
                "metadata": {"name": f"{SERVICE}-{index + 1}", "namespace": NAMESPACE,
                             "labels": {"kubernetes.io/service-name": SERVICE,
                                        "endpointslice.kubernetes.io/managed-by": "kproxy-demo"}},
                "addressType": "IPv4",
                "ports": [{"name": PORT_NAME, "port": int(port), "protocol": "TCP"}],
                "endpoints": [{"addresses": [host], "conditions": {"ready": True}}]}

    subsets = []
    for address in nodes:
        host, port = address.rsplit(":", 1)
        subsets.append({"addresses": [{"ip": host}],
                        "ports": [{"name": PORT_NAME, "port": int(port), "protocol": "TCP"}]})
    endpoints = {"apiVersion": "v1", "kind": "Endpoints",
                 "metadata": {"name": SERVICE, "namespace": NAMESPACE, "labels": {"app": SERVICE}},
                 "subsets": subsets}
    apply = [slice_(i, a) for i, a in enumerate(all_nodes) if a in nodes] + [endpoints]
    delete = [slice_(i, a) for i, a in enumerate(all_nodes) if a not in nodes]
    return apply, delete


def set_endpoints(apply: Callable[[dict[str, Any]], Any], delete: Callable[[dict[str, Any]], Any],
                  nodes: list[str], all_nodes: list[str]) -> None:
    to_apply, to_delete = endpoint_objects(nodes, all_nodes)
    for obj in to_apply:
        apply(obj)
    for obj in to_delete:
        delete(obj)


# -- the demo INI -------------------------------------------------------------------------

def demo_ini(listen: tuple[str, int], *, api_server: str | None = None, token_file: str | None = None,
             ca_file: str | None = None, nodes: Iterable[str] = ()) -> str:
    """The walkthrough's registry, service and api as kproxy config; static ``nodes``
    instead of the registry when ``api_server`` is None."""
    lines = ["; kproxy demo: the Kubernetes service discovery walkthrough as kproxy config.",
             "; Written by `kproxy demo`, removed when it stops.", "",
             "[kproxy]", f"listen = {_hostport(*listen)}", ""]
    if api_server is not None:
        lines += [f"[registry:{REGISTRY}]", "type = kubernetes",
                  "; in a pod: https://kubernetes.default:443 and the pod's service account files",
                  f"api_server = {api_server}",
                  f"; minted for {NAMESPACE}/{SERVICE_ACCOUNT} with the TokenRequest API",
                  f"token_file = {token_file}", f"ca_file = {ca_file}",
                  f"namespace_pattern = {NAMESPACE}", ""]
    lines += ["[service:sd-app]", f"host = {HOST}", "path_prefix = /v1"]
    if api_server is not None:
        lines += [f"registry = {REGISTRY}", f"namespace = {NAMESPACE}", f"service_name = {SERVICE}", "port = 80"]
    else:
        lines += ["; static nodes: the Kubernetes test environment is not available here",
                  f"nodes = {' '.join(nodes)}"]
    lines += ["", "[api:anything]", "service = sd-app", "path = /anything", "match = prefix",
              "strip_prefix = true", "methods = *", ""]
    return "\n".join(lines)


# -- a stand-in for httpbin ---------------------------------------------------------------

#: Headers httpbin leaves out of ``headers`` unless the query has ``show_env``.
_ENV_HEADERS = ("X-Varnish", "X-Request-Start", "X-Heroku-Queue-Depth", "X-Real-Ip", "X-Forwarded-Proto",
                "X-Forwarded-Protocol", "X-Forwarded-Ssl", "X-Heroku-Queue-Wait-Time", "X-Forwarded-For",
                "X-Heroku-Dynos-In-Use", "X-Forwarded-Port", "X-Request-Id", "Via", "Total-Route-Time",
                "Connect-Time")


def echo_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """httpbin's ``/anything`` (same JSON), for machines without the httpbin package."""
    import base64
    from werkzeug.wrappers import Request
    request = Request(environ)
    if request.path != "/anything" and not request.path.startswith("/anything/"):
        body = json.dumps({"error": "not found", "message": "kproxy demo's stand-in for httpbin serves "
                           "/anything only"}).encode()
        start_response("404 Not Found", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    def flat(multi: Any) -> dict[str, Any]:
        return {k: v[0] if len(v) == 1 else v for k, v in multi.lists()}

    def text(raw: bytes, content_type: str = "application/octet-stream") -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return f"data:{content_type};base64,{base64.b64encode(raw).decode()}"

    form = flat(request.form)  # parses form bodies; get_data() is then empty, as in httpbin
    files: dict[str, Any] = {}
    for key, upload in request.files.items(multi=True):
        value = text(upload.read(), upload.content_type or "application/octet-stream")
        files[key] = [*files[key], value] if isinstance(files.get(key), list) else \
            [files[key], value] if key in files else value
    raw = request.get_data()
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except ValueError:
        parsed = None
    headers = dict(request.headers.items())
    if "show_env" not in request.args:
        for name in _ENV_HEADERS:
            headers.pop(name, None)
    url = request.url
    scheme = request.headers.get("X-Forwarded-Proto") or request.headers.get("X-Forwarded-Protocol")
    if scheme is None and request.headers.get("X-Forwarded-Ssl") == "on":
        scheme = "https"
    if scheme:
        url = scheme + url[url.index(":"):]
    answer = {
        "args": flat(request.args),
        "data": text(raw),
        "files": files,
        "form": form,
        "headers": headers,
        "json": parsed,
        "method": request.method,
        "origin": request.headers.get("X-Forwarded-For", request.remote_addr),
        "url": url,
    }
    body = (json.dumps(answer, indent=2) + "\n").encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                              ("Access-Control-Allow-Origin", "*"),
                              ("Access-Control-Allow-Credentials", "true")])
    return [body]


def _httpbin_available() -> bool:
    """``import httpbin`` works (checked in a child: it pulls in Flask and logs warnings)."""
    try:
        r = subprocess.run([sys.executable, "-c", "import httpbin"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60, env=_child_env())
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


# -- the running demo ---------------------------------------------------------------------

class Demo:
    """Starts everything, prints how to use it, and stops everything on SIGINT/SIGTERM/SIGHUP."""

    def __init__(self, listen: tuple[str, int], paths: Paths, *, keep: bool = False):
        self.listen = listen
        self.paths = paths
        self.keep = keep  # we are the background process of `kproxy demo --keep`
        self.lock: Any = None
        self.kube: testenv.KubeAPIServer | None = None
        self.fallback_reason: str | None = None
        self.upstreams: list[tuple[str, subprocess.Popen[bytes]]] = []  # (address, process)
        self.upstream_app = "httpbin:app"
        self.gateway: subprocess.Popen[bytes] | None = None
        self.relay: threading.Thread | None = None
        self.state: dict[str, Any] = {}
        self.owns_state = False
        self.base_url = f"http://{_hostport(_client_host(listen[0]), listen[1])}"

    # the whole life of the demo
    def run(self) -> int:
        t0 = time.monotonic()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _interrupt)
        code = 0
        try:
            self._claim()
            say("kproxy demo: Kubernetes service discovery routing a real request, all on this machine")
            self._start_upstreams()
            self._start_kube()
            self._wait_upstreams()
            if self.kube is not None:
                self._setup_kube()
            self._start_gateway()
            self._record()
            self._print_ready(time.monotonic() - t0)
            self.state["status"] = "ready"
            self.paths.write_state(self.state)
            if self.keep:
                sys.stdout.flush()
            self._watch()
        except KeyboardInterrupt:
            _ignore_signals()
            say("\nkproxy demo: stopping" + (" before it was ready" if self.state.get("status") != "ready" else ""))
            code = 0 if self.state.get("status") == "ready" else 130
        except DemoError as e:
            _ignore_signals()
            _err(f"kproxy demo: {e}")
            code = 1
        finally:
            self._teardown()
        if code != 1 or self.owns_state:
            say("kproxy demo: stopped; nothing of it is left running.")
        return code

    def _claim(self) -> None:
        self.lock = self.paths.try_lock()
        if self.lock is None:
            state = self.paths.read_state() or {}
            raise DemoError(f"a demo is already running (pid {state.get('pid', '?')}, "
                            f"{state.get('listen', '?')}); stop it with `kproxy demo --stop`")
        stale = self.paths.read_state()
        if stale:
            _cleanup_leftovers(stale)
        self.paths.remove(log=False)
        if self.listen[1] == 0:
            raise DemoError("--listen needs a port (the demo prints the URL to use)")
        self._check_free(self.listen)
        self.paths.run.mkdir(parents=True, mode=0o700)
        self.state = {"pid": os.getpid(), "start_time": _start_time(os.getpid()), "status": "starting",
                      "keep": self.keep, "listen": _hostport(*self.listen), "url": self.base_url,
                      "run_dir": str(self.paths.run), "log": str(self.paths.log) if self.keep else None}
        self.paths.write_state(self.state)
        self.owns_state = True

    @staticmethod
    def _check_free(listen: tuple[str, int]) -> None:
        family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        with socket.socket(family) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(listen)
            except OSError as e:
                raise DemoError(f"cannot listen on {_hostport(*listen)}: {e.strerror}. Another kproxy demo "
                                f"(`kproxy demo --stop`) or another server? Pick another address with "
                                f"--listen 127.0.0.1:PORT") from None

    def _start_upstreams(self) -> None:
        if not _httpbin_available():
            self.upstream_app = "kproxy_tools.demo:echo_app"
        for i in range(NODES):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            address = f"127.0.0.1:{sock.getsockname()[1]}"
            fd = sock.fileno()
            with open(self.paths.run / f"httpbin-{i + 1}.log", "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "gunicorn", "-b", f"fd://{fd}", "-w", "1", "-k", "gthread",
                     "--threads", "8", "--no-control-socket", "-n", f"kproxy-demo-httpbin-{i + 1}",
                     self.upstream_app],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, pass_fds=(fd,),
                    start_new_session=True, env=_child_env())
            sock.close()  # the child has it; we must not keep the port open
            self.upstreams.append((address, proc))

    def _wait_upstreams(self, timeout: float = 60.0) -> None:
        s = session()
        for i, (address, proc) in enumerate(self.upstreams):
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise DemoError(f"httpbin node {address} exited ({proc.returncode}):\n"
                                    f"{tail(self.paths.run / f'httpbin-{i + 1}.log')}")
                with contextlib.suppress(requests.RequestException, ValueError):
                    r = s.get(f"http://{address}/anything", headers={"Host": HOST}, timeout=2)
                    if r.status_code == 200 and "url" in r.json():
                        break
                if time.monotonic() > deadline:
                    raise DemoError(f"httpbin node {address} did not answer in {timeout:.0f} s")
                time.sleep(0.1)
        nodes = " and ".join(a for a, _ in self.upstreams)
        if self.upstream_app == "httpbin:app":
            say(f"- httpbin nodes on {nodes} (gunicorn httpbin:app)")
        else:
            say(f"- httpbin nodes on {nodes}: the httpbin package is not installed (`pip install httpbin`), "
                "so these run kproxy's built-in stand-in, which answers /anything with httpbin's JSON")

    def _start_kube(self) -> None:
        if os.environ.get("KPROXY_DEMO_KUBE", "").lower() in ("off", "0", "false", "no"):
            self._say_fallback("KPROXY_DEMO_KUBE=off asks for the demo without Kubernetes.")
            return
        building = not testenv.binary_path().is_file()
        if building:
            say(textwrap.fill(
                f"- First run: building the Kubernetes test environment. kproxy builds a real kube-apiserver "
                f"{testenv.KUBE_VERSION} from Debian's source and caches it in {_show(testenv.cache_dir())}. "
                f"This takes about 5 minutes on an idle 2-core machine (this one has {os.cpu_count() or '?'} "
                f"cores; a busy machine takes longer) and happens once; later runs start in seconds. Progress:", 96, subsequent_indent="  "))

        def progress(message: str) -> None:
            say("  " + message)
        t0 = time.monotonic()
        done = threading.Event()

        def heartbeat() -> None:  # the build itself is one long quiet step
            while not done.wait(60):
                minutes = int(time.monotonic() - t0) // 60
                say(f"  ... still building: {minutes} min so far (about 5 min on an idle 2-core machine, "
                    "longer on a busy one)")
        if building:
            threading.Thread(target=heartbeat, name="build-progress", daemon=True).start()
        try:
            try:
                binary = testenv.provision(log=progress)
            finally:
                done.set()
            self.kube = testenv.KubeAPIServer(binary)
            self.kube.start()
        except testenv.TestEnvUnavailable as e:
            self.kube = None
            self._say_fallback(f"{e} (kproxy demo runs a real etcd and kube-apiserver: kube-apiserver is "
                               "built once from Debian's kubernetes source and etcd comes from Debian "
                               "packages, so it needs a Debian machine, and root unless the packages are "
                               "installed already.)")
            return
        except testenv.TestEnvError as e:
            if self.kube is not None:
                self.kube.stop()
            self.kube = None
            say("- the Kubernetes test environment failed to start:")
            say(textwrap.indent(str(e), "    "))
            self._say_fallback("It failed to start here (the error is above).")
            return
        say(f"- etcd + kube-apiserver {testenv.KUBE_VERSION} at {self.kube.url} ({time.monotonic() - t0:.1f} s)")

    def _say_fallback(self, reason: str) -> None:
        self.fallback_reason = reason
        say()
        say(textwrap.fill(
            f"Kubernetes discovery is not available, so this demo uses static nodes. {reason} Everything "
            f"below works the same, except that the service's nodes come from `nodes =` in the INI "
            f"instead of from the Service's EndpointSlices, and `kproxy demo --scale 2` rewrites that "
            f"line and reloads the gateway in place.", 96))
        say()

    def _setup_kube(self) -> None:
        import yaml  # PyYAML comes with the kubernetes client kproxy depends on
        kube = self.kube
        assert kube is not None
        nodes = [a for a, _ in self.upstreams]
        run = self.paths.run
        kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        kube.apply(service_object(int(nodes[0].rsplit(":", 1)[1])))
        set_endpoints(kube.apply, kube.delete, nodes[:1], nodes)
        say(f"- Service {NAMESPACE}/{SERVICE}: port 80 ({PORT_NAME}), no selector; its EndpointSlice "
            f"and Endpoints name 1 node, {nodes[0]}")
        (run / "rbac.yaml").write_text(SEED_RBAC_YAML)
        for obj in yaml.safe_load_all(SEED_RBAC_YAML):
            kube.apply(obj)
        for obj in DISCOVERY_RBAC:
            kube.apply(obj)
        token = kube.create_token(NAMESPACE, SERVICE_ACCOUNT, expiration_seconds=TOKEN_SECONDS)
        fd = os.open(run / "token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        shutil.copyfile(kube.ca_file, run / "ca.crt")
        say(f"- RBAC: the walkthrough's rbac.yaml + ClusterRole apisix-k8s-sd-discovery (services, "
            f"endpointslices); token for {NAMESPACE}/{SERVICE_ACCOUNT} from the TokenRequest API")

    def _start_gateway(self, timeout: float = 60.0) -> None:
        run = self.paths.run
        ini = run / "demo.ini"
        nodes = [a for a, _ in self.upstreams]
        if self.kube is not None:
            ini.write_text(demo_ini(self.listen, api_server=self.kube.url, token_file=str(run / "token"),
                                    ca_file=str(run / "ca.crt")))
        else:
            ini.write_text(demo_ini(self.listen, nodes=nodes[:1]))
        log_path = run / "gateway.log"
        with open(log_path, "ab") as log:
            self.gateway = subprocess.Popen(
                [sys.executable, "-m", "kproxy.cli", "serve", "-c", str(ini)],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                env=_child_env())
        self.relay = threading.Thread(target=_relay, args=(self.gateway.stdout,), name="access-log", daemon=True)
        self.relay.start()
        s = session()
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            if self.gateway.poll() is not None:
                raise DemoError(f"the gateway exited ({self.gateway.returncode}); its log:\n{tail(log_path)}")
            try:
                r = s.get(self.base_url + "/-/readyz", headers={"X-Request-Id": PROBE}, timeout=2)
                if r.status_code == 200:
                    break
                last = f"{r.status_code} {r.text.strip()}"
            except requests.RequestException as e:
                last = type(e).__name__
            if time.monotonic() > deadline:
                raise DemoError(f"the gateway was not ready in {timeout:.0f} s (readyz: {last}); its log:\n"
                                f"{tail(log_path)}")
            time.sleep(0.1)
        say(f"- gateway: kproxy serve -c {_show(ini)} on {_hostport(*self.listen)}")

    def _record(self) -> None:
        """Everything --scale and --stop need, and every process we started."""
        assert self.gateway is not None
        known = {self.gateway.pid: "gateway", **{p.pid: f"httpbin {a}" for a, p in self.upstreams}}
        processes = []
        for pid in sorted(set(children(os.getpid())) | set(known)):
            if _alive(pid):
                entry = _describe(pid)
                entry["role"] = known.get(pid, entry["name"])
                processes.append(entry)
        self.state.update({
            "mode": "kubernetes" if self.kube is not None else "static",
            "fallback_reason": self.fallback_reason,
            "config": str(self.paths.run / "demo.ini"),
            "upstreams": [a for a, _ in self.upstreams],
            "upstream_app": self.upstream_app,
            "scale": 1,
            "gateway": _describe(self.gateway.pid),
            "processes": processes,
            "kube": None if self.kube is None else {
                "url": self.kube.url, "token": self.kube.admin_token, "ca_file": str(self.paths.run / "ca.crt"),
                "etcd_port": self.kube.etcd_port, "workdir": str(self.kube.workdir)},
        })
        self.paths.write_state(self.state)

    def _print_ready(self, seconds: float) -> None:
        url = self.base_url
        scale = "kproxy demo --scale 2"
        what = ("scale Service apisix/httpbin out to both httpbin nodes (its EndpointSlices change; the "
                "gateway's discovery follows live)" if self.kube is not None else
                "scale sd-app out to both httpbin nodes (this rewrites `nodes =` and reloads the gateway)")
        say()
        say(f"Ready in {seconds:.1f} s. {'' if self.keep else 'In another terminal, '}send the walkthrough's "
            "request:")
        say()
        say(f"    curl {url}/v1/anything -H 'Host: {HOST}' -i")
        say()
        say(textwrap.fill(f"Then {what} and send the request a few times: each access-log line names the "
                          "node that answered.", 96))
        say()
        say(f"    {scale}")
        say()
        if self.kube is not None:
            say(f"Discovery dump: curl {url}/-/discovery")
        say(f"Metrics:        curl {url}/-/metrics")
        say(f"Config:         {_show(self.paths.run / 'demo.ini')}")
        if self.keep:
            say(f"The demo keeps running in the background. Access log: tail -f {_show(self.paths.log)}")
            say("Stop it with:   kproxy demo --stop")
        else:
            say("Ctrl-C stops everything. Access log (time client request status bytes seconds service api "
                "node ...):")

    def _watch(self) -> None:
        while True:
            assert self.gateway is not None
            if self.gateway.poll() is not None:
                raise DemoError(f"the gateway exited ({self.gateway.returncode}):\n"
                                f"{tail(self.paths.run / 'gateway.log')}")
            for i, (address, proc) in enumerate(self.upstreams):
                if proc.poll() is not None:
                    raise DemoError(f"httpbin node {address} exited ({proc.returncode}):\n"
                                    f"{tail(self.paths.run / f'httpbin-{i + 1}.log')}")
            if self.kube is not None and not self.kube.running:
                raise DemoError("etcd or kube-apiserver exited unexpectedly")
            time.sleep(0.5)

    def _teardown(self) -> None:
        _ignore_signals()  # finish stopping, whatever arrives now
        if self.gateway is not None and self.gateway.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.gateway.pid, signal.SIGTERM)
        for _, proc in self.upstreams:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        terminate(self.gateway)
        for _, proc in self.upstreams:
            terminate(proc)
        if self.kube is not None:
            self.kube.stop()
        if self.relay is not None:
            self.relay.join(timeout=2)
        if self.owns_state:
            self.paths.remove(log=self.keep)
        if self.lock is not None:
            self.lock.close()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _ignore_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def _relay(stream: Any) -> None:
    """The gateway's stdout (its access log) to ours, without the demo's own probes."""
    probe = PROBE.encode()
    with contextlib.suppress(Exception):
        for line in stream:
            if probe not in line:
                sys.stdout.buffer.write(line)
                sys.stdout.buffer.flush()


def _cleanup_leftovers(state: dict[str, Any]) -> int:
    """Stop what a demo that died without cleaning up left behind; return how many."""
    stopped = 0
    for process in state.get("processes") or []:
        stopped += _stop_recorded(process)
    kube = state.get("kube") or {}
    workdir = kube.get("workdir")
    if workdir and os.path.basename(workdir).startswith("kproxy-kube-"):
        shutil.rmtree(workdir, ignore_errors=True)
    return stopped


# -- commands -----------------------------------------------------------------------------

def command(listen: tuple[str, int] | None = None, *, keep: bool = False, stop: bool = False,
            scale: int | None = None) -> int:
    """``kproxy demo`` and its options (see the module docstring)."""
    paths = Paths(state_dir())
    if stop:
        return stop_demo(paths)
    if scale is not None:
        return scale_demo(paths, scale)
    listen = listen or DEFAULT_LISTEN
    if keep:
        return launch_kept(paths, listen)
    return Demo(listen, paths).run()


def launch_kept(paths: Paths, listen: tuple[str, int]) -> int:
    """``kproxy demo --keep``: run the demo as a background process, show its output until it
    is ready, and return; ``kproxy demo --stop`` ends it."""
    lock = paths.try_lock()
    if lock is None:
        state = paths.read_state() or {}
        _err(f"kproxy demo: a demo is already running (pid {state.get('pid', '?')}, {state.get('listen', '?')}); "
             "stop it with `kproxy demo --stop`")
        return 1
    lock.close()  # the background demo takes it
    with open(paths.log, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kproxy_tools.demo", "--keep", "--listen", _hostport(*listen)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env=_child_env())
    out = sys.stdout.buffer
    try:
        with open(paths.log, "rb") as f:
            while True:
                chunk = f.read()
                if chunk:
                    out.write(chunk)
                    out.flush()
                state = paths.read_state() or {}
                if state.get("pid") == proc.pid and state.get("status") == "ready":
                    out.write(f.read())
                    out.flush()
                    return 0
                if proc.poll() is not None:
                    out.write(f.read())
                    out.flush()
                    return proc.returncode or 1
                time.sleep(0.1)
    except KeyboardInterrupt:
        _err("kproxy demo: interrupted; stopping the demo being started")
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        proc.wait()
        return 130


def stop_demo(paths: Paths, timeout: float = 120.0) -> int:
    """``kproxy demo --stop``: end the demo of this state directory (kept or in a terminal)."""
    state = paths.read_state()
    if state is None:
        lock = paths.try_lock()
        if lock is not None:
            lock.close()
            say(f"kproxy demo: no demo is running (nothing in {_show(paths.base)})")
            return 0
        time.sleep(2)  # a demo that holds the lock writes its state at once
        state = paths.read_state()
        if state is None:
            _err(f"kproxy demo: a demo holds {_show(paths.lock)} but wrote no state; cannot stop it")
            return 1
    pid, start = state["pid"], state.get("start_time")
    if _alive(pid, start):
        say(f"kproxy demo: stopping the demo (pid {pid}) ...")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid, start) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid, start):
            _err(f"kproxy demo: pid {pid} did not stop in {timeout:.0f} s; killing what it started")
            os.kill(pid, signal.SIGKILL)
    leftovers = _cleanup_leftovers(state)
    lock = paths.try_lock()
    if lock is not None:
        paths.remove(log=True)
        lock.close()
    say("kproxy demo: stopped" + (f" ({leftovers} leftover processes ended)" if leftovers else "")
        + "; nothing of it is left running.")
    return 0


def scale_demo(paths: Paths, n: int) -> int:
    """``kproxy demo --scale N``: the running demo's service gets its first N httpbin nodes."""
    state = paths.read_state()
    if state is None or not _alive(state["pid"], state.get("start_time")):
        _err("kproxy demo: no demo is running; start one with `kproxy demo` (or `kproxy demo --keep`)")
        return 1
    if state.get("status") != "ready":
        _err("kproxy demo: the demo is still starting; try again once it says Ready")
        return 1
    all_nodes: list[str] = state["upstreams"]
    low = 0 if state["mode"] == "kubernetes" else 1
    if not low <= n <= len(all_nodes):
        _err(f"kproxy demo: the demo runs {len(all_nodes)} httpbin nodes; scale from {low} to {len(all_nodes)}")
        return 1
    nodes = all_nodes[:n]
    shown = ", ".join(nodes) or "none (requests get 503 no_upstream)"
    if state["mode"] == "kubernetes":
        kube = state["kube"]
        client = KubeClient(kube["url"], kube["token"], kube["ca_file"])
        t0 = time.monotonic()
        try:
            set_endpoints(client.apply, client.delete, nodes, all_nodes)
        except (KubeAPIError, requests.RequestException) as e:
            _err(f"kproxy demo: the demo's kube-apiserver refused the change: {e}")
            return 1
        say(f"Service {NAMESPACE}/{SERVICE} now has {n} node{'s' if n != 1 else ''}: {shown} "
            f"(EndpointSlices and Endpoints updated)")
        seen = _wait_discovered(state["url"], set(nodes))
        if seen is None:
            _err("kproxy demo: the gateway's discovery dump does not show the change yet; see "
                 f"curl {state['url']}/-/discovery")
            return 1
        say(f"The gateway's discovery saw it in {time.monotonic() - t0:.2f} s. Send the request a few "
            "times and watch the access log:")
    else:
        ini = Path(state["config"])
        text = re.sub(r"(?m)^nodes = .*$", "nodes = " + " ".join(nodes), ini.read_text())
        ini.write_text(text)
        gateway = state["gateway"]
        if not _alive(gateway["pid"], gateway.get("start_time")):
            _err("kproxy demo: the gateway is not running")
            return 1
        os.kill(gateway["pid"], signal.SIGHUP)  # `kproxy serve` reloads the INI in place
        say(f"sd-app now has {n} static node{'s' if n != 1 else ''}: {shown} (INI rewritten, gateway "
            "reloaded with SIGHUP). Send the request a few times and watch the access log:")
    state["scale"] = n
    paths.write_state(state)
    say(f"    curl {state['url']}/v1/anything -H 'Host: {HOST}' -i")
    return 0


def discovered_nodes(url: str) -> set[str] | None:
    """The addresses the gateway's discovery dump lists for apisix/httpbin (None: no answer)."""
    try:
        r = session().get(url + "/-/discovery", headers={"X-Request-Id": PROBE}, timeout=5)
        registry = r.json()["registries"][REGISTRY]
    except (requests.RequestException, ValueError, KeyError):
        return None
    service = (registry.get("services") or {}).get(f"{NAMESPACE}/{SERVICE}") or {}
    found: set[str] = set()
    for addresses in (service.get("ports") or {}).values():
        found.update(addresses)
    return found


def _wait_discovered(url: str, expected: set[str], timeout: float = 15.0) -> set[str] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = discovered_nodes(url)
        if seen == expected:
            return seen
        time.sleep(0.05)
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m kproxy_tools.demo --keep --listen HOST:PORT``: the background process of
    ``kproxy demo --keep`` (use ``kproxy demo``)."""
    from kproxy.node import split_host_port
    parser = argparse.ArgumentParser(prog="python -m kproxy_tools.demo")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--listen", default=_hostport(*DEFAULT_LISTEN))
    args = parser.parse_args(argv)
    return Demo(split_host_port(args.listen), Paths(state_dir()), keep=args.keep).run()


if __name__ == "__main__":
    sys.exit(main())
