"""A real kube-apiserver + etcd on loopback, for tests and for ``kproxy demo``.

There is no Docker, kind or minikube on the machines this project runs on, and no
package registry ships a kube-apiserver binary.  Debian does ship everything needed
to build one, so this module builds it once from Debian's ``kubernetes`` source
package (upstream v1.20.2 with ``vendor/``), caches the binary, and runs it against
a throw-away etcd on 127.0.0.1.

Usage::

    python -m kproxy_tools.testenv provision   # build (first time ~5 min) and print the binary path
    python -m kproxy_tools.testenv run         # start etcd + apiserver, print URL/token, Ctrl-C stops

    from kproxy_tools.testenv import KubeAPIServer
    with KubeAPIServer() as kube:
        kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}})
        print(kube.request("GET", "/api/v1/namespaces").json())

What the server is and is not:

* RBAC is enforced.  ``admin_token`` is in ``system:masters``; ServiceAccount tokens
  come from the TokenRequest API (:meth:`KubeAPIServer.create_token`).
* No controller-manager, scheduler or kubelet run: nothing creates Endpoints from Pods,
  ServiceAccount token Secrets never appear, and a deleted Namespace stays Terminating.
  Use selector-less Services and write Endpoints / EndpointSlices yourself.
* v1.20 serves EndpointSlices as ``discovery.k8s.io/v1beta1`` only.
* The binary is a TEST-ONLY build: it accepts loopback addresses in v1 Endpoints
  (see :func:`_patch_loopback_endpoints`), which a real cluster rejects.

The binary is cached in ``$KPROXY_CACHE_DIR`` or ``~/.cache/kproxy``.  Building needs
root when Debian packages are missing (they are installed with apt-get);
:class:`TestEnvUnavailable` is raised when that is not possible.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import glob
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence

import requests

from .common import KubeClient, free_ports, session, spawn, tail, terminate

__all__ = [
    "KUBE_VERSION",
    "KubeAPIServer",
    "TestEnvError",
    "TestEnvUnavailable",
    "binary_path",
    "cache_dir",
    "find_tool",
    "provision",
]

Log = Callable[[str], None]

#: Upstream Kubernetes version of the Debian source package we build.
KUBE_VERSION = "v1.20.2"
#: Debian (bookworm) source package version that contains KUBE_VERSION.
DEBIAN_SOURCE = "kubernetes"
DEBIAN_SOURCE_VERSION = "1.20.5+really1.20.2-1.1+deb12u1"
DEBIAN_SOURCE_LINE = "deb-src http://deb.debian.org/debian bookworm main"
#: Bump whenever the patches applied to the source tree change, so that a stale
#: cached binary is never reused.
PATCH_REVISION = "kproxy1"

#: Needed to run the server (etcd, etcdctl; openssl makes the service-account key).
RUNTIME_PACKAGES = ("etcd-server", "etcd-client", "openssl")
#: Needed only to build the binary.  ``make`` is used by the Kubernetes build and is
#: not always present on a minimal image.
BUILD_PACKAGES = ("golang-go", "rsync", "make", "golang-github-modern-go-reflect2-dev")

REFLECT2_SRC = pathlib.Path("/usr/share/gocode/src/github.com/modern-go/reflect2")

ADMIN_TOKEN = "admintoken"


class TestEnvError(RuntimeError):
    """Provisioning or starting the test environment failed."""

    __test__ = False  # not a pytest test class, despite the name


class TestEnvUnavailable(TestEnvError):
    """The test environment cannot be provided on this machine (e.g. not root)."""

    __test__ = False


# --------------------------------------------------------------------------- provisioning


def cache_dir() -> pathlib.Path:
    """Where built binaries are kept: ``$KPROXY_CACHE_DIR`` or ``~/.cache/kproxy``."""
    env = os.environ.get("KPROXY_CACHE_DIR")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "kproxy"


def binary_path() -> pathlib.Path:
    """Path of the cached kube-apiserver binary (which may not exist yet)."""
    return cache_dir() / f"kube-apiserver-{KUBE_VERSION}-{PATCH_REVISION}"


def find_tool(name: str) -> pathlib.Path | None:
    """Find an executable on PATH, or in /usr/bin and /usr/sbin (Debian's etcd)."""
    found = shutil.which(name)
    if found:
        return pathlib.Path(found)
    for d in ("/usr/bin", "/usr/sbin", "/usr/local/bin"):
        p = pathlib.Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def _run_logged(
    cmd: Sequence[str],
    logfile: pathlib.Path,
    *,
    cwd: pathlib.Path | None = None,
    env: dict[str, str] | None = None,
    what: str,
) -> None:
    """Run ``cmd`` with its output appended to ``logfile``; raise with the log's tail."""
    with open(logfile, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        rc = subprocess.run(
            list(cmd), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        ).returncode
    if rc != 0:
        raise TestEnvError(
            f"{what} failed (exit {rc}); full log: {logfile}\n--- last lines ---\n"
            f"{tail(logfile, 40)}"
        )


def _missing_packages(packages: Sequence[str]) -> list[str]:
    if not shutil.which("dpkg-query"):
        # Not Debian: we cannot check; let the caller decide based on the tools.
        return list(packages)
    missing = []
    for pkg in packages:
        r = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        if r.returncode != 0 or not r.stdout.strip().endswith(" installed"):
            missing.append(pkg)
    return missing


def _ensure_packages(packages: Sequence[str], log: Log, logfile: pathlib.Path) -> None:
    missing = _missing_packages(packages)
    if not missing:
        return
    if not shutil.which("apt-get"):
        raise TestEnvUnavailable(
            "The kproxy test environment builds kube-apiserver from Debian's source package "
            "and runs Debian's etcd, so it needs a Debian (bookworm) machine with apt-get. "
            f"Missing here: {', '.join(missing)}."
        )
    if os.geteuid() != 0:
        raise TestEnvUnavailable(
            "The kproxy test environment needs these Debian packages, which are not installed: "
            f"{', '.join(missing)}. Installing them needs root. Run "
            f"`sudo apt-get update && sudo apt-get install -y {' '.join(missing)}` "
            "(or run `python -m kproxy_tools.testenv provision` as root once), then try again; "
            "the kube-apiserver binary itself is built as the current user and cached in "
            f"{cache_dir()}."
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Only refresh the package lists when something actually has to be installed.
    log(f"testenv: apt-get update (to install {', '.join(missing)})")
    _run_logged(["apt-get", "update"], logfile, env=env, what="apt-get update")
    log(f"testenv: apt-get install {' '.join(missing)}")
    _run_logged(
        ["apt-get", "install", "-y", "--no-install-recommends", *missing],
        logfile, env=env, what="apt-get install",
    )


def _fetch_source(workdir: pathlib.Path, log: Log, logfile: pathlib.Path) -> pathlib.Path:
    """Download and unpack Debian's kubernetes source; return the tree's root.

    Source indexes are not configured on the machine, and we must not change the
    system's apt configuration, so apt runs with a private sources list, list
    directory and cache directory under ``workdir``.
    """
    aptdir = workdir / "apt"
    (aptdir / "lists" / "partial").mkdir(parents=True)
    (aptdir / "cache" / "archives" / "partial").mkdir(parents=True)
    (aptdir / "sources.list").write_text(DEBIAN_SOURCE_LINE + "\n")
    opts = [
        "-o", f"Dir::Etc::sourcelist={aptdir / 'sources.list'}",
        "-o", "Dir::Etc::sourceparts=-",
        "-o", f"Dir::State::Lists={aptdir / 'lists'}",
        "-o", f"Dir::Cache={aptdir / 'cache'}",
    ]
    if os.geteuid() == 0:
        # apt would drop to the _apt user, which cannot write into our private dirs.
        opts += ["-o", "APT::Sandbox::User=root"]
    log("testenv: fetching the source index (private apt config; system sources untouched)")
    _run_logged(["apt-get", *opts, "update"], logfile, what="apt-get update (source index)")
    src = workdir / "src"
    src.mkdir()
    log(f"testenv: downloading {DEBIAN_SOURCE}={DEBIAN_SOURCE_VERSION} source (~34 MB)")
    _run_logged(
        ["apt-get", *opts, "source", "--download-only",
         f"{DEBIAN_SOURCE}={DEBIAN_SOURCE_VERSION}"],
        logfile, cwd=src, what="apt-get source",
    )
    origs = glob.glob(str(src / f"{DEBIAN_SOURCE}_*.orig.tar.*"))
    if len(origs) != 1:
        raise TestEnvError(f"expected one orig tarball in {src}, found {origs}")
    log("testenv: unpacking the source tree")
    with tarfile.open(origs[0]) as tar:
        if hasattr(tarfile, "tar_filter"):  # Python >= 3.11.4: refuse absolute paths etc.
            tar.extractall(src, filter="tar")
        else:
            tar.extractall(src)
    roots = [p for p in src.iterdir() if p.is_dir() and (p / "cmd" / "kube-apiserver").is_dir()]
    if len(roots) != 1:
        raise TestEnvError(f"could not find the kubernetes tree under {src}: {roots}")
    return roots[0]


def _replace_reflect2(tree: pathlib.Path, log: Log) -> None:
    """Swap the vendored reflect2 v1.0.1 for Debian's v1.0.2.

    v1.0.1 does not match the runtime internals of Go >= 1.18 (bookworm has 1.19): the
    built apiserver panics, then dies with SIGSEGV, on the first JSON body that carries
    a map (labels, annotations).  v1.0.2 has the same API and knows Go 1.18+.
    """
    dst = tree / "vendor" / "github.com" / "modern-go" / "reflect2"
    if not REFLECT2_SRC.is_dir() or not dst.is_dir():
        raise TestEnvError(f"reflect2 fix: missing {REFLECT2_SRC} or {dst}")
    log("testenv: replacing vendored reflect2 v1.0.1 with Debian's v1.0.2 (Go 1.18+ fix)")
    for old in [*dst.glob("*.go"), *dst.glob("*.s")]:
        old.unlink()
    copied = 0
    for new in [*REFLECT2_SRC.glob("*.go"), *REFLECT2_SRC.glob("*.s")]:
        if new.name.endswith("_test.go"):
            continue
        shutil.copy2(new, dst / new.name)
        copied += 1
    if not copied:
        raise TestEnvError(f"reflect2 fix: no source files in {REFLECT2_SRC}")


# The line in validateEndpointAddress() that rejects loopback (and other special) IPs.
_NONSPECIAL_CALL = '\tallErrs = append(allErrs, validateNonSpecialIP(address.IP, fldPath.Child("ip"))...)\n'
_NONSPECIAL_PATCHED = (
    "\t// kproxy TEST-ONLY BUILD: accept loopback addresses in v1 Endpoints so tests can\n"
    "\t// point Services at servers on 127.0.0.x. Never use this binary for a real cluster.\n"
    "\tif ip := net.ParseIP(address.IP); ip == nil || !ip.IsLoopback() {\n"
    '\t\tallErrs = append(allErrs, validateNonSpecialIP(address.IP, fldPath.Child("ip"))...)\n'
    "\t}\n"
)


def _patch_loopback_endpoints(tree: pathlib.Path, log: Log) -> None:
    """TEST-ONLY: let v1 Endpoints carry 127.0.0.0/8 and ::1 addresses.

    A real apiserver rejects loopback addresses in ``EndpointAddress`` (via
    ``validateNonSpecialIP``); EndpointSlices are not checked.  kproxy's tests run
    their upstreams on 127.0.0.x, so this build skips that one call for loopback IPs
    in ``validateEndpointAddress`` only (Service externalIPs etc. are still checked).
    This makes the binary unfit for anything but tests.
    """
    path = tree / "pkg" / "apis" / "core" / "validation" / "validation.go"
    text = path.read_text()
    start = text.find("\nfunc validateEndpointAddress(")
    end = text.find("\n}\n", start)
    if start < 0 or end < 0:
        raise TestEnvError(f"loopback patch: validateEndpointAddress not found in {path}")
    body = text[start:end]
    if body.count(_NONSPECIAL_CALL) != 1:
        raise TestEnvError(f"loopback patch: expected call not found once in {path}")
    log("testenv: TEST-ONLY patch: allowing loopback IPs in v1 Endpoints addresses")
    path.write_text(text[:start] + body.replace(_NONSPECIAL_CALL, _NONSPECIAL_PATCHED) + text[end:])


def _build(tree: pathlib.Path, log: Log, logfile: pathlib.Path) -> pathlib.Path:
    # v1.20's build runs in GOPATH mode; plain `go build` trips over go.mod checks, the
    # Makefile path works.  It wants the tree at $GOPATH/src/k8s.io/kubernetes.
    gopath = tree / ".go"
    (gopath / "src" / "k8s.io").mkdir(parents=True)
    (gopath / "src" / "k8s.io" / "kubernetes").symlink_to("../../..")
    env = dict(
        os.environ,
        GOPATH=str(gopath),
        CGO_ENABLED="0",
        # Keep Go's build cache inside the tree so it is deleted with it (~1 GB).
        GOCACHE=str(tree / ".gocache"),
        # Everything is vendored; never reach out to a module proxy.
        GOPROXY="off",
        GOFLAGS="",
    )
    log("testenv: building kube-apiserver (make WHAT=cmd/kube-apiserver; ~5 min on 2 cores)")
    _run_logged(
        ["make", "WHAT=cmd/kube-apiserver"], logfile, cwd=tree, env=env,
        what="kube-apiserver build",
    )
    out = tree / "_output" / "bin" / "kube-apiserver"
    if not out.is_file():
        raise TestEnvError(f"build finished but {out} is missing; log: {logfile}")
    return out


def _check_runtime_tools() -> None:
    missing = [t for t in ("etcd", "etcdctl", "openssl") if find_tool(t) is None]
    if missing:
        raise TestEnvUnavailable(
            f"Required tools not found: {', '.join(missing)} (Debian packages "
            f"{', '.join(RUNTIME_PACKAGES)})."
        )


def provision(log: Log = print) -> pathlib.Path:
    """Return the path of the cached kube-apiserver binary, building it if missing.

    Also makes sure etcd, etcdctl and openssl are installed.  The first build takes
    about 5 minutes (2 cores); later calls return at once.  Concurrent callers are
    serialised with a lock file, so only one of them builds.
    """
    target = binary_path()
    if target.is_file() and all(find_tool(t) for t in ("etcd", "etcdctl", "openssl")):
        return target

    cdir = cache_dir()
    cdir.mkdir(parents=True, exist_ok=True)
    logfile = cdir / f"{target.name}.build.log"
    with open(cdir / f".{target.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("testenv: another process is provisioning; waiting for it to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)

        if target.is_file():
            _ensure_packages(RUNTIME_PACKAGES, log, logfile)
            _check_runtime_tools()
            return target

        log(
            f"testenv: kube-apiserver {KUBE_VERSION} is not cached; building it from Debian's "
            f"source. The first build takes about 5 minutes; it is cached at {target} after. "
            f"Build log: {logfile}"
        )
        logfile.write_text("")
        t0 = time.monotonic()
        _ensure_packages(RUNTIME_PACKAGES + BUILD_PACKAGES, log, logfile)
        _check_runtime_tools()

        # Leftovers of an interrupted build (we hold the lock, so nobody else uses them).
        for stale in cdir.glob("build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        workdir = pathlib.Path(tempfile.mkdtemp(prefix="build-", dir=cdir))
        try:
            tree = _fetch_source(workdir, log, logfile)
            _replace_reflect2(tree, log)
            _patch_loopback_endpoints(tree, log)
            built = _build(tree, log, logfile)
            # Copy next to the target and rename, so a reader never sees half a binary.
            tmp = cdir / f".{target.name}.tmp.{os.getpid()}"
            shutil.copy2(built, tmp)
            tmp.chmod(0o755)
            os.replace(tmp, target)
        finally:
            log("testenv: removing the source tree")
            shutil.rmtree(workdir, ignore_errors=True)
        log(f"testenv: built {target} in {time.monotonic() - t0:.0f} s")
        return target



# --------------------------------------------------------------------------- running

class KubeAPIServer(KubeClient):
    """etcd + kube-apiserver on 127.0.0.1, each on a free port, in a temporary directory.

    Use as a context manager, or call :meth:`start` and :meth:`stop` (``stop`` is also
    registered with :mod:`atexit`).  :meth:`restart_apiserver` restarts only the
    apiserver on the same port, with the same etcd and serving certificate, as an
    upgrade would: every watch is dropped, data is kept, clients can reconnect.
    As a :class:`KubeClient` (request, get, apply, delete, create_token) it speaks to
    that apiserver as ``admin_token``, which is in ``system:masters``.
    """

    def __init__(  # KubeClient.__init__ is not called: url and ca_file exist once started
        self,
        binary: str | os.PathLike[str] | None = None,
        *,
        log: Log | None = None,
        ready_timeout: float = 90.0,
        watch_cache: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        """``binary`` defaults to :func:`provision` (which builds it on first use);
        ``extra_args`` are appended to kube-apiserver's command line.

        ``watch_cache``: with it (the default, as in real clusters) watches are served
        from the apiserver's memory, so a watch from an old resourceVersion keeps
        working after :meth:`compact` and gets 410 Expired only once that version is
        older than the cache, e.g. after :meth:`restart_apiserver`.  Without it every
        watch reads etcd, and :meth:`compact` alone makes older watches get 410.
        """
        self._binary = pathlib.Path(binary) if binary else None
        self.watch_cache = watch_cache
        self._log: Log = log or (lambda _msg: None)
        self.ready_timeout = ready_timeout
        self.extra_args = list(extra_args)
        self.admin_token = ADMIN_TOKEN
        self.workdir: pathlib.Path | None = None
        self.port: int | None = None
        self.etcd_port: int | None = None
        self._etcd: subprocess.Popen[bytes] | None = None
        self._apiserver: subprocess.Popen[bytes] | None = None
        self._session = session()

    # -- addresses ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``https://127.0.0.1:PORT`` of the apiserver."""
        self._require_started()
        return f"https://127.0.0.1:{self.port}"

    @property
    def etcd_url(self) -> str:
        self._require_started()
        return f"http://127.0.0.1:{self.etcd_port}"

    @property
    def ca_file(self) -> str:
        """The apiserver's self-signed serving certificate (SAN 127.0.0.1, not localhost);
        it is its own CA, so pass it as ``verify``."""
        self._require_started()
        assert self.workdir is not None
        return str(self.workdir / "certs" / "apiserver.crt")

    @property
    def kubeconfig(self) -> str:
        """Path of a kubeconfig (JSON) for the admin user, written at start."""
        self._require_started()
        assert self.workdir is not None
        return str(self.workdir / "kubeconfig")

    @property
    def token(self) -> str:
        return self.admin_token

    def _require_started(self) -> None:
        if self.workdir is None:
            raise TestEnvError("KubeAPIServer is not started")

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> KubeAPIServer:
        if self.workdir is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> KubeAPIServer:
        """Start etcd and kube-apiserver and wait until ``/readyz`` answers 200."""
        if self.workdir is not None:
            raise TestEnvError("KubeAPIServer is already started")
        if self._binary is None:
            self._binary = provision(log=self._log)
        _check_runtime_tools()
        # /dev/shm is RAM-backed: etcd's fsyncs cost nothing there.
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.workdir = pathlib.Path(tempfile.mkdtemp(prefix="kproxy-kube-", dir=base))
        atexit.register(self.stop)
        try:
            t0 = time.monotonic()
            self.port, self.etcd_port, peer_port = free_ports(3)
            self._start_etcd(peer_port)
            self._write_credentials()
            self.start_apiserver()
            self._log(f"testenv: apiserver ready at {self.url} in {time.monotonic() - t0:.1f} s")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_etcd(self, peer_port: int) -> None:
        assert self.workdir is not None
        etcd = find_tool("etcd")
        peer = f"http://127.0.0.1:{peer_port}"
        cmd = [
            str(etcd),
            "--name", "kproxy",
            "--data-dir", str(self.workdir / "etcd"),
            "--listen-client-urls", self.etcd_url,
            "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", peer,
            # Defaults name http://localhost:2380, which may be taken by another etcd.
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"kproxy={peer}",
        ]
        self._etcd = self._spawn(cmd, "etcd.log")
        deadline = time.monotonic() + 30
        while True:
            if self._etcd.poll() is not None:
                raise TestEnvError(
                    f"etcd exited with {self._etcd.returncode}:\n{tail(self.workdir / 'etcd.log', 40)}"
                )
            with contextlib.suppress(requests.RequestException):
                r = self._session.get(f"{self.etcd_url}/health", timeout=2)
                if r.ok and r.json().get("health") == "true":
                    return
            if time.monotonic() > deadline:
                raise TestEnvError(f"etcd not healthy in 30 s:\n{tail(self.workdir / 'etcd.log', 40)}")
            time.sleep(0.1)

    def _write_credentials(self) -> None:
        assert self.workdir is not None
        d = self.workdir
        # Service-account signing key pair, for the TokenRequest API.
        for cmd in (
            ["openssl", "genrsa", "-out", str(d / "sa.key"), "2048"],
            ["openssl", "rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub")],
        ):
            r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if r.returncode != 0:
                raise TestEnvError(f"{' '.join(cmd)} failed: {r.stderr}")
        (d / "tokens.csv").write_text(f'{self.admin_token},admin,admin,"system:masters"\n')
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kproxy", "cluster": {
                "server": self.url, "certificate-authority": self.ca_file}}],
            "users": [{"name": "admin", "user": {"token": self.admin_token}}],
            "contexts": [{"name": "kproxy", "context": {"cluster": "kproxy", "user": "admin"}}],
            "current-context": "kproxy",
        }
        (d / "kubeconfig").write_text(json.dumps(kubeconfig, indent=2))

    def _spawn(self, cmd: list[str], logname: str) -> subprocess.Popen[bytes]:
        assert self.workdir is not None
        return spawn(cmd, self.workdir / logname, cwd=self.workdir)

    def start_apiserver(self) -> None:
        """Start kube-apiserver (again) on the same port, etcd and certificate directory."""
        self._require_started()
        assert self.workdir is not None and self._binary is not None
        if self._apiserver is not None and self._apiserver.poll() is None:
            raise TestEnvError("kube-apiserver is already running")
        if self._etcd is None or self._etcd.poll() is not None:
            raise TestEnvError("etcd is not running")
        d = self.workdir
        cmd = [
            str(self._binary),
            f"--etcd-servers={self.etcd_url}",
            f"--secure-port={self.port}",
            "--bind-address=127.0.0.1",
            # The "kubernetes" Service's Endpoints then name the real, loopback address
            # (accepted by this test build) instead of a guess at the host's interface.
            "--advertise-address=127.0.0.1",
            "--insecure-port=0",
            f"--cert-dir={d / 'certs'}",
            f"--token-auth-file={d / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            "--service-cluster-ip-range=10.96.0.0/16",
            *([] if self.watch_cache else ["--watch-cache=false"]),
            *self.extra_args,
        ]
        self._apiserver = self._spawn(cmd, "kube-apiserver.log")
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.workdir is not None and self._apiserver is not None
        logfile = self.workdir / "kube-apiserver.log"
        deadline = time.monotonic() + self.ready_timeout
        last = "no answer yet"
        while True:
            if self._apiserver.poll() is not None:
                raise TestEnvError(
                    f"kube-apiserver exited with {self._apiserver.returncode} before it was "
                    f"ready; log {logfile}:\n{tail(logfile, 40)}"
                )
            try:
                r = self.request("GET", "/readyz", timeout=2)
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}: {r.text[-300:]}"
            except (requests.RequestException, OSError) as e:
                # Before the certificate exists, verify= fails with OSError / SSLError.
                last = repr(e)
            if time.monotonic() > deadline:
                raise TestEnvError(
                    f"kube-apiserver not ready in {self.ready_timeout:.0f} s (last: {last}); "
                    f"log {logfile}:\n{tail(logfile, 40)}"
                )
            time.sleep(0.2)

    def stop_apiserver(self, grace: float = 5.0) -> None:
        """Stop kube-apiserver only (etcd keeps running): SIGTERM, then SIGKILL after
        ``grace`` seconds.  Its graceful shutdown waits up to 60 s for open HTTP/1.1
        watches to end by themselves, so watches still open after ``grace`` are cut
        (the client sees the connection drop), as when an upgrade kills the process."""
        terminate(self._apiserver, grace)
        self._apiserver = None

    def restart_apiserver(self, grace: float = 5.0) -> None:
        """Stop and start kube-apiserver, as an upgrade would; data is kept, every
        watch is dropped, and the URL and certificate stay the same."""
        self.stop_apiserver(grace)
        self.start_apiserver()

    def stop(self) -> None:
        """Stop both processes and delete the temporary directory.  Idempotent."""
        self.stop_apiserver()
        terminate(self._etcd)
        self._etcd = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        atexit.unregister(self.stop)

    @property
    def running(self) -> bool:
        """Both processes are alive."""
        return all(p is not None and p.poll() is None for p in (self._etcd, self._apiserver))

    # -- etcd ----------------------------------------------------------------------------

    def _etcdctl(self, *args: str) -> str:
        env = dict(os.environ, ETCDCTL_API="3")
        r = subprocess.run(
            [str(find_tool("etcdctl")), f"--endpoints={self.etcd_url}", *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60,
        )
        if r.returncode != 0:
            raise TestEnvError(f"etcdctl {' '.join(args)} failed: {r.stderr.strip()}")
        return r.stdout

    def etcd_revision(self) -> int:
        """etcd's current revision (the newest resourceVersion the apiserver can hand out)."""
        status = json.loads(self._etcdctl("endpoint", "status", "-w", "json"))
        return int(status[0]["Status"]["header"]["revision"])

    def compact(self, revision: int) -> None:
        """Compact etcd's history up to ``revision``.

        Reads of older resourceVersions that reach etcd then get 410 Expired: a LIST
        with ``resourceVersionMatch=Exact``, and watches when ``watch_cache=False``.
        With the watch cache on, a watch is still served from memory (see __init__).
        """
        self._etcdctl("compact", str(int(revision)), "--physical")

# --------------------------------------------------------------------------- command line


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run_forever() -> int:
    def on_term(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # Explicitly, for both: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    with KubeAPIServer(log=_stderr) as kube:
        print(f"url:         {kube.url}")
        print(f"admin token: {kube.admin_token}")
        print(f"ca_file:     {kube.ca_file}")
        print(f"kubeconfig:  {kube.kubeconfig}")
        print(f"etcd:        {kube.etcd_url}")
        print(f"try: curl --cacert {kube.ca_file} -H 'Authorization: Bearer "
              f"{kube.admin_token}' {kube.url}/api/v1/namespaces")
        print("Ctrl-C stops.", flush=True)
        try:
            while kube.running:
                time.sleep(1)
        except KeyboardInterrupt:
            _stderr("testenv: stopping")
            return 0
        _stderr(f"testenv: a server process exited; logs were in {kube.workdir}")
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kproxy_tools.testenv",
        description="A real kube-apiserver + etcd on 127.0.0.1 for tests and demos.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("provision", help="build and cache kube-apiserver; print its path")
    sub.add_parser("run", help="start etcd + kube-apiserver until Ctrl-C")
    args = parser.parse_args(argv)
    try:
        if args.command == "provision":
            print(provision(log=_stderr))
            return 0
        return _run_forever()
    except TestEnvError as e:
        _stderr(f"testenv: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
