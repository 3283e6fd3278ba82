"""The deployment in ``deploy/``: the Dockerfile and the Kubernetes manifests.

Every manifest is submitted to the real kube-apiserver (v1.20) of the test environment with
server-side dry run (``?dryRun=All``), so a field the API rejects fails here; so are the
YAML examples of README.rst's "Deploying in a cluster". The ConfigMap's INI must pass
``kproxy check``; the RBAC must be least privilege, and enough: the ConfigMap's INI runs
under gunicorn as the image runs it, with the in-cluster configuration and a token of a
ServiceAccount bound by ``rbac.yaml``, and serves the seed's request.

There is no Docker engine here: the Dockerfile is checked statically.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import Any, Iterable

import pytest
import requests
import yaml

from kproxy.config import parse
from kproxy_tools.common import terminate

from .conftest import ROOT, free_port, session, wait_until

DEPLOY = ROOT / "deploy"
MANIFESTS = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"
NAMESPACE = "apisix"  # the seed's
EXPECTED_FILES = {"serviceaccount.yaml", "rbac.yaml", "configmap.yaml", "deployment.yaml", "service.yaml"}
# what kproxy's discovery reads, and how: (apiGroup, resource, verb)
DISCOVERY_GRANTS = {(group, resource, verb) for group, resource in
                    (("discovery.k8s.io", "endpointslices"), ("", "services"), ("", "endpoints"))
                    for verb in ("list", "watch")}


# -- reading the files --

def manifest_objects() -> list[tuple[str, dict[str, Any]]]:
    """(file name, object) for every object of every manifest."""
    out = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            if obj is not None:
                out.append((path.name, obj))
    return out


def only(kind: str) -> dict[str, Any]:
    found = [obj for _, obj in manifest_objects() if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {MANIFESTS}, found {len(found)}"
    return found[0]


def configmap_ini() -> str:
    return only("ConfigMap")["data"]["kproxy.ini"]


def readme_section() -> str:
    text = (ROOT / "README.rst").read_text()
    match = re.search(r"^Deploying in a cluster\n-+\n(.*?)(?=^\S[^\n]*\n-{3,}\n)", text, re.M | re.S)
    assert match, "README.rst has no 'Deploying in a cluster' section followed by another section"
    return match.group(1)


def readme_yaml_objects() -> list[dict[str, Any]]:
    """The objects of every ``.. code-block:: yaml`` in the README's deployment section."""
    objects = []
    for block in re.findall(r"^\.\. code-block:: yaml\n\n((?:(?:    .*)?\n)+)", readme_section(), re.M):
        text = "\n".join(line[4:] for line in block.splitlines())
        objects += [obj for obj in yaml.safe_load_all(text) if obj is not None]
    return objects


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        instruction, _, arguments = line.strip().partition(" ")
        out.append((instruction.upper(), arguments.strip()))
    return out


def container() -> dict[str, Any]:
    containers = only("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


def image_env() -> dict[str, str]:
    env = {}
    for instruction, arguments in dockerfile_instructions():
        if instruction == "ENV":
            for word in shlex.split(arguments):
                key, _, value = word.partition("=")
                env[key] = value
    return env


# -- the API server --

def collection_path(kube, obj: dict[str, Any]) -> str:
    """The collection URL of ``obj``, from the server's own API discovery."""
    api_version = obj["apiVersion"]
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    r = kube.request("GET", base)
    assert r.status_code == 200, f"{api_version} is not served by the test API server (v1.20): {r.text}"
    resources = [res for res in r.json()["resources"] if res["kind"] == obj["kind"] and "/" not in res["name"]]
    assert resources, f"{obj['kind']} is not served as {api_version}"
    resource = resources[0]
    if resource["namespaced"]:
        namespace = obj["metadata"].get("namespace")
        assert namespace, f"{obj['kind']} {obj['metadata']['name']} names no namespace"
        return f"{base}/namespaces/{namespace}/{resource['name']}"
    return f"{base}/{resource['name']}"


def ensure_namespace(kube, name: str) -> None:
    """Create ``name`` for real (dry-run objects in it need it), unless it exists."""
    r = kube.request("GET", f"/api/v1/namespaces/{name}")
    if r.status_code == 404:
        r = kube.request("POST", "/api/v1/namespaces",
                         json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        assert r.status_code in (201, 409), r.text
        r = kube.request("GET", f"/api/v1/namespaces/{name}")
    assert r.status_code == 200, r.text
    assert r.json()["status"].get("phase") != "Terminating", f"namespace {name} is being deleted"


def missing_fields(sent: Any, stored: Any, path: str = "") -> list[str]:
    """Paths of ``sent`` that ``stored`` lacks or holds another value at (defaults the
    server adds are fine)."""
    if isinstance(sent, dict):
        if not isinstance(stored, dict):
            return [path or "."]
        return [p for key, value in sent.items()
                for p in (missing_fields(value, stored[key], f"{path}.{key}") if key in stored else [f"{path}.{key}"])]
    if isinstance(sent, list):
        if not isinstance(stored, list) or len(stored) != len(sent):
            return [path]
        return [p for i, (a, b) in enumerate(zip(sent, stored)) for p in missing_fields(a, b, f"{path}[{i}]")]
    return [] if sent == stored else [f"{path} ({sent!r} came back as {stored!r})"]


def dry_run(kube, obj: dict[str, Any]) -> None:
    path = collection_path(kube, obj)
    r = kube.request("POST", path, json=obj, params={"dryRun": "All"})
    message = r.text
    try:
        message = r.json().get("message", r.text)
    except ValueError:
        pass
    assert r.status_code in (200, 201), \
        f"{obj['kind']} {obj['metadata']['name']} rejected by the API server: {r.status_code} {message}"
    # v1.20 drops unknown fields silently (strict field validation came in 1.25): everything
    # sent must come back, so a misspelt or misplaced field fails too
    dropped = missing_fields(obj, r.json())
    assert not dropped, f"{obj['kind']} {obj['metadata']['name']}: the API server dropped {dropped}"
    # a dry run stores nothing
    assert kube.request("GET", f"{path}/{obj['metadata']['name']}").status_code == 404


# -- the manifests as files --

def test_every_manifest_is_there_and_parses():
    names = {path.name for path in MANIFESTS.glob("*.yaml")}
    assert EXPECTED_FILES <= names, f"missing: {EXPECTED_FILES - names}"
    kinds = {obj["kind"] for _, obj in manifest_objects()}
    assert kinds == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "Service"}
    for name, obj in manifest_objects():
        assert obj.get("apiVersion") and obj["metadata"].get("name"), f"{name}: {obj}"
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{name}: {obj['kind']} not in {NAMESPACE}"


@pytest.mark.parametrize("name,obj", manifest_objects(),
                         ids=[f"{n}:{o['kind']}/{o['metadata']['name']}" for n, o in manifest_objects()])
def test_manifest_passes_server_side_dry_run(kube, name, obj):
    ensure_namespace(kube, NAMESPACE)
    dry_run(kube, obj)


def test_readme_examples_pass_server_side_dry_run(kube):
    objects = readme_yaml_objects()
    assert {o["kind"] for o in objects} >= {"Role", "RoleBinding"}, "the namespaced RBAC alternative"
    ensure_namespace(kube, NAMESPACE)
    for obj in objects:
        dry_run(kube, obj)


# -- the ConfigMap's INI --

def test_configmap_ini_passes_kproxy_check(tmp_path):
    config = parse(configmap_ini(), "configmap.yaml")
    assert config.warnings == ()
    ini = tmp_path / "kproxy.ini"
    ini.write_text(configmap_ini())
    result = subprocess.run([sys.executable, "-m", "kproxy.cli", "check", "-c", str(ini)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{ini}: ok (1 services, 1 apis, 1 registries)"


def test_configmap_ini_is_the_seed_config_in_cluster():
    config = parse(configmap_ini(), "configmap.yaml")
    seed = parse((ROOT / "conf" / "kproxy.ini").read_text(), "conf/kproxy.ini")
    assert config.gateway.listen == ("0.0.0.0", 9080)
    assert config.services == seed.services and config.apis == seed.apis
    (registry,) = config.registries.values()
    assert registry.name == "my-k8s-cluster" and registry.type == "kubernetes" and registry.enabled
    assert registry.namespace_pattern.pattern == NAMESPACE
    # in-cluster: nothing that points at an API server or at credentials
    assert (registry.api_server, registry.token, registry.token_file, registry.ca_file, registry.kubeconfig) \
        == (None, None, None, None, None)


# -- RBAC --

def grants(rules: Iterable[dict[str, Any]]) -> set[tuple[str, str, str]]:
    out = set()
    for rule in rules:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        out |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return out


def test_clusterrole_is_least_privilege():
    role = only("ClusterRole")
    assert grants(role["rules"]) == DISCOVERY_GRANTS
    binding = only("ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    account = only("ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": account["metadata"]["namespace"]}]


def test_readme_namespaced_rbac_is_the_same_grant():
    objects = {o["kind"]: o for o in readme_yaml_objects()}
    role, binding = objects["Role"], objects["RoleBinding"]
    assert grants(role["rules"]) == DISCOVERY_GRANTS
    # the Role lives in the namespace the ConfigMap's plain namespace_pattern watches
    (registry,) = parse(configmap_ini()).registries.values()
    assert registry.single_namespace == role["metadata"]["namespace"] == binding["metadata"]["namespace"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    account = only("ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": account["metadata"]["namespace"]}]


# -- the Deployment, the Service, the image: consistent with each other and with the INI --

def test_deployment():
    deployment = only("Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    c = container()
    config = parse(configmap_ini())
    assert spec["replicas"] == 2
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["serviceAccountName"] == only("ServiceAccount")["metadata"]["name"]
    assert pod.get("automountServiceAccountToken", True), "the in-cluster configuration needs the token"

    # the probes: the admin endpoints of the INI, on the port the INI listens on
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    admin = config.gateway.admin_prefix
    for probe, endpoint in (("livenessProbe", "healthz"), ("readinessProbe", "readyz")):
        get = c[probe]["httpGet"]
        assert get["path"] == admin + endpoint
        assert ports.get(get["port"], get["port"]) == config.gateway.listen[1]

    # the INI: the ConfigMap, mounted where KPROXY_CONFIG (the image's and the pod's) points
    env = env_of(c)
    path = env["KPROXY_CONFIG"]
    assert path == image_env()["KPROXY_CONFIG"] == "/etc/kproxy/kproxy.ini"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    mount = mounts[os.path.dirname(path)]
    assert mount.get("readOnly") is True and "subPath" not in mount  # subPath mounts never update
    assert volumes[mount["name"]]["configMap"]["name"] == only("ConfigMap")["metadata"]["name"]
    assert os.path.basename(path) in only("ConfigMap")["data"]

    # a read-only root: gunicorn's heartbeat files (in the temp dir) and the metrics dir in an emptyDir
    security = {**pod.get("securityContext", {}), **c["securityContext"]}
    assert security["runAsNonRoot"] is True and security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert env["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/kproxy-metrics"

    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= c["resources"][kind].keys()


def test_service_reaches_the_pods():
    service = only("Service")
    deployment = only("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert port["port"] == 80
    assert ports.get(port["targetPort"], port["targetPort"]) == 9080 == parse(configmap_ini()).gateway.listen[1]


def test_dockerfile():
    instructions = dockerfile_instructions()
    values = {}
    for instruction, arguments in instructions:
        values.setdefault(instruction, []).append(arguments)
    (base,) = values["FROM"]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    (workdir,) = values["WORKDIR"]
    assert values["EXPOSE"] == ["9080"]
    assert image_env()["KPROXY_CONFIG"] == "/etc/kproxy/kproxy.ini"

    # every COPY source exists in the repository (the build context is its root) ...
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    destinations = {}
    for arguments in values["COPY"]:
        *sources, destination = shlex.split(arguments)
        assert not any(s.startswith("--") for s in sources), "keep COPY plain"
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            # ... and the ignore file lets it into the context
            assert f"!{source}" in ignore or f"!{source}/" in ignore, f"{source} is excluded by the dockerignore"
            destinations[source] = destination
    assert any(d.startswith("/tmp/") for s, d in destinations.items() if s == "kproxy")
    assert any("pip install" in arguments for arguments in values["RUN"])
    # setup.cfg reads README.rst: it must be in the source that is installed
    assert {"setup.py", "setup.cfg", "README.rst", "kproxy"} <= destinations.keys()

    # the command, and conf/gunicorn.conf.py where it looks for it (relative to WORKDIR)
    (cmd,) = values["CMD"]
    assert json.loads(cmd) == ["gunicorn", "-c", "conf/gunicorn.conf.py", "kproxy.wsgi:application"]
    conf = destinations["conf"]
    assert os.path.normpath(os.path.join(workdir, conf)) == os.path.join(workdir, "conf")

    # non-root, numerically (runAsNonRoot cannot verify a user name), and the pod agrees
    user = values["USER"][-1]
    assert [i for i, _ in instructions][-1] == "CMD" and instructions.index(("USER", user)) > max(
        i for i, (instruction, _) in enumerate(instructions) if instruction == "RUN")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or int(gid) != 0)
    pod_security = only("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert pod_security.get("runAsUser", int(uid)) == int(uid)


# -- the deployment, run: RBAC and in-cluster configuration against the real API server --

def renamed_rbac(namespace: str) -> list[dict[str, Any]]:
    """serviceaccount.yaml and rbac.yaml, moved to ``namespace`` (the cluster-wide names get
    the namespace as a prefix, so the dry runs above never meet a stored object)."""
    account, role, binding = (json.loads(json.dumps(only(k)))
                              for k in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding"))
    account["metadata"]["namespace"] = namespace
    for obj in (role, binding):
        obj["metadata"]["name"] = f"{namespace}-{obj['metadata']['name']}"
    binding["roleRef"]["name"] = role["metadata"]["name"]
    binding["subjects"][0]["namespace"] = namespace
    return [account, role, binding]


def test_configmap_ini_serves_the_seed_with_the_manifests_rbac(kube, namespace, httpbin_server, tmp_path):
    """The image's command on the ConfigMap's INI, in-cluster configuration, with a token of
    a ServiceAccount that has exactly rbac.yaml's grant: ready, on EndpointSlices and
    Services (no 403 fallback), and the seed's request answered by httpbin."""
    for obj in renamed_rbac(namespace):
        kube.apply(obj)
    token = tmp_path / "token"
    token.write_text(kube.create_token(namespace, only("ServiceAccount")["metadata"]["name"]))

    # the seed's backend, in this test's namespace: Service port 80 -> httpbin's port
    kube.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "httpbin", "namespace": namespace},
                "spec": {"ports": [{"port": 80, "targetPort": httpbin_server.port, "protocol": "TCP"}]}})
    kube.apply({"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
                "metadata": {"name": "httpbin-1", "namespace": namespace,
                             "labels": {"kubernetes.io/service-name": "httpbin"}},
                "addressType": "IPv4", "ports": [{"port": httpbin_server.port, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]})

    # the ConfigMap's INI; the mounted ServiceAccount files are elsewhere here, and the
    # namespace is this test's
    ini = configmap_ini().replace("namespace_pattern = apisix", f"namespace_pattern = {namespace}")
    ini = ini.replace("namespace = apisix", f"namespace = {namespace}")
    ini = re.sub(r"(?m)^(type = kubernetes.*)$", lambda m: f"{m.group(1)}\ntoken_file = {token}\n"
                 f"ca_file = {kube.ca_file}", ini, count=1)
    assert parse(ini).registries["my-k8s-cluster"].api_server is None
    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "kproxy.ini"
    config.write_text(ini)

    # the image: WORKDIR holding conf/, the Dockerfile's CMD, the Deployment's environment
    workdir = tmp_path / "workdir"
    shutil.copytree(ROOT / "conf", workdir / "conf")
    (cmd,) = [json.loads(a) for i, a in dockerfile_instructions() if i == "CMD"]
    port = free_port()
    command = [sys.executable, "-m", *cmd, "-b", f"127.0.0.1:{port}"]  # the pod's port is taken here
    env = {**os.environ, **image_env(), **env_of(container())}
    env.update(KPROXY_CONFIG=str(config),
               PROMETHEUS_MULTIPROC_DIR=str(tmp_path / env["PROMETHEUS_MULTIPROC_DIR"].lstrip("/")),
               KUBERNETES_SERVICE_HOST="127.0.0.1", KUBERNETES_SERVICE_PORT=str(kube.port),
               PYTHONPATH=str(ROOT))
    log = open(tmp_path / "gunicorn.log", "wb")
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    c = container()

    def answers(path: str) -> int:
        assert process.poll() is None, (tmp_path / "gunicorn.log").read_text()
        try:
            return session().get(url + path, timeout=5).status_code
        except requests.ConnectionError:
            return 0
    try:
        wait_until(lambda: answers(c["livenessProbe"]["httpGet"]["path"]) == 200, timeout=30)
        wait_until(lambda: answers(c["readinessProbe"]["httpGet"]["path"]) == 200, timeout=30)

        response = session().get(url + "/v1/anything", timeout=10,
                                 headers={"Host": "sd.httpbin.org", "User-Agent": "curl/7.76.1", "Accept": "*/*"})
        assert response.status_code == 200, response.text
        assert response.headers["X-Kproxy-Upstream-Status"] == "200"
        assert response.json()["url"] == "http://sd.httpbin.org/anything"

        dump = session().get(url + "/-/discovery", timeout=5).json()["registries"]["my-k8s-cluster"]
        assert dump["config"]["auth"] == "token_file" and dump["config"]["api_server"] is None
        assert dump["endpoints_api"] == "discovery.k8s.io/v1beta1 endpointslices"
        assert dump["warnings"] == []
        assert dump["services"][f"{namespace}/httpbin"]["port_source"] == "service"
        assert token.read_text() not in json.dumps(dump)
    finally:
        terminate(process, grace=20)
        log.close()
