"""Specification of the INI configuration (kproxy/config.py, kproxy/node.py) and of the
``kproxy check`` / ``kproxy routes`` commands.

Every problem is one line ``FILE: [section] key: message``; the tests assert the exact
file, section and key of each line, and that a file with N mistakes gives N lines.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from kproxy import cli
from kproxy.config import (API, GATEWAY, REGISTRY, SERVICE, ConfigError,
                           load, parse, reference)
from kproxy.node import Node, parse_nodes, split_host_port

ROOT = Path(__file__).resolve().parent.parent

# The contract's seed walkthrough, verbatim (CONTRACT.md, "INI configuration").
CONTRACT_SEED = """\
[kproxy]
listen = 127.0.0.1:9080          ; host:port for `kproxy serve`
admin_prefix = /-/               ; health, readiness, metrics, discovery dump live under it
admin_allow = 127.0.0.0/8 ::1    ; who may read metrics and the discovery dump
connect_timeout = 3              ; seconds
read_timeout = 60                ; seconds

[registry:my-k8s-cluster]
type = kubernetes
api_server = https://kubernetes.default:443
token_file = /var/run/secrets/kubernetes.io/serviceaccount/token   ; or: token = <bearer token>
ca_file = /var/run/secrets/kubernetes.io/serviceaccount/ca.crt     ; or: insecure_skip_tls_verify = true
namespace_pattern = apisix       ; regex; a namespace is watched only if the WHOLE name matches
label_selector =                 ; optional Kubernetes label selector
enabled = true                   ; false: every upstream that uses this registry answers 503

[service:sd-app]
host = sd.httpbin.org            ; exact host, or *.example.org; empty = any host
path_prefix = /v1
registry = my-k8s-cluster        ; discovery upstream ...
namespace = apisix
service_name = httpbin
port = 80                        ; the Service port (spec.ports[].port) or its port name
; nodes = 10.0.0.7:8080 10.0.0.8:8080   ; ... or a static upstream instead of registry/namespace/service_name/port
pass_host = pass                 ; pass (client Host, default) | node | rewrite (with upstream_host = ...)

[api:anything]
service = sd-app
path = /anything
match = prefix                   ; prefix | exact
strip_prefix = true              ; strip the service's path_prefix before forwarding
methods = *                      ; * or a list: GET POST
"""

# A minimal valid static config; tests add or change sections around it.
SERVICE_S = """\
[service:s]
nodes = 127.0.0.1:8081
"""
API_A = """\
[api:a]
service = s
path = /a
"""
VALID = SERVICE_S + "\n" + API_A

REGISTRY_R = """\
[registry:r]
type = kubernetes
api_server = https://10.0.0.1:6443
token = secret
namespace_pattern = apisix|prod-.*
"""
DISCOVERY_S = """\
[service:s]
registry = r
namespace = apisix
service_name = httpbin
port = 80
"""


def write(tmp_path: Path, text: str, name: str = "kproxy.ini") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problem_lines(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path)
    return [str(p) for p in info.value.problems]


def only_problem(tmp_path: Path, text: str) -> tuple[str, str]:
    """The single problem line a file with exactly one mistake must give, and its file."""
    path = write(tmp_path, text)
    lines = problem_lines(path)
    assert len(lines) == 1, lines
    return str(path), lines[0]


# -- valid files --

def test_seed_config_file_loads_as_the_walkthrough_describes():
    config = load(ROOT / "conf" / "kproxy.ini")
    registry = config.registries["my-k8s-cluster"]
    assert registry.type == "kubernetes"
    assert registry.api_server == "https://kubernetes.default:443"
    assert registry.token_file == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert registry.ca_file == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    assert registry.watches_namespace("apisix") and not registry.watches_namespace("apisix-dev")
    assert registry.enabled is True
    service = config.services["sd-app"]
    assert (service.host, service.path_prefix, service.registry, service.namespace,
            service.service_name, service.port, service.nodes) == \
        ("sd.httpbin.org", "/v1", "my-k8s-cluster", "apisix", "httpbin", "80", None)
    api = config.apis["anything"]
    assert (api.service, api.path, api.match, api.strip_prefix, api.methods) == \
        ("sd-app", "/anything", "prefix", True, None)
    # the only things `check` may say about the seed outside a pod are warnings
    assert {w.key for w in config.warnings} <= {"token_file", "ca_file"}


def test_contract_seed_block_loads_verbatim_with_its_inline_comments():
    config = parse(CONTRACT_SEED, "seed.ini")
    gateway = config.gateway
    assert gateway.listen == ("127.0.0.1", 9080)
    assert gateway.admin_prefix == "/-/"
    assert gateway.connect_timeout == 3 and gateway.read_timeout == 60
    registry = config.registries["my-k8s-cluster"]
    assert registry.label_selector is None  # "label_selector =  ; comment" is empty
    assert registry.namespace_pattern.pattern == "apisix"
    assert registry.token_file == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    service = config.services["sd-app"]
    assert service.nodes is None and service.pass_host == "pass" and service.port == "80"
    assert config.apis["anything"].methods is None


def test_static_example_loads_with_static_nodes():
    config = load(ROOT / "conf" / "static-example.ini")
    assert config.registries == {}
    service = config.services["httpbin"]
    assert service.nodes == (Node("127.0.0.1", 8081),)
    assert service.registry is None
    assert config.apis["status"].methods == frozenset({"GET", "HEAD"})
    assert config.warnings == ()


def test_defaults_match_the_contract():
    config = parse("[registry:r]\ntype = kubernetes\n\n" + VALID)
    gateway = config.gateway
    assert gateway.listen == ("127.0.0.1", 9080)
    assert gateway.admin_prefix == "/-/"
    assert gateway.admin_allow == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1"))
    assert gateway.connect_timeout == 3.0
    assert gateway.read_timeout == 60.0
    assert gateway.node_cooldown == 10.0
    registry = config.registries["r"]
    assert registry.enabled is True
    assert registry.namespace_pattern is None and registry.watches_namespace("anything")
    assert registry.label_selector is None
    assert registry.insecure_skip_tls_verify is False
    service = config.services["s"]
    assert service.host == ""            # any host
    assert service.path_prefix == ""
    assert service.pass_host == "pass"
    assert service.scheme == "http"
    assert service.retries is None       # nodes - 1, decided by the proxy
    api = config.apis["a"]
    assert api.match == "prefix"
    assert api.methods is None           # every method
    assert api.strip_prefix is False


# -- one test per error kind --

def test_unknown_key_is_reported_with_a_did_you_mean(tmp_path):
    path, line = only_problem(tmp_path, "[kproxy]\nlistn = 127.0.0.1:9080\n\n" + VALID)
    assert line == f"{path}: [kproxy] listn: unknown key; did you mean 'listen'?"


def test_unknown_key_in_an_api_section_suggests_the_close_key(tmp_path):
    path, line = only_problem(tmp_path, VALID + "metods = GET\n")
    assert line == f"{path}: [api:a] metods: unknown key; did you mean 'methods'?"


def test_unknown_key_without_a_close_match_has_no_suggestion(tmp_path):
    path, line = only_problem(tmp_path, VALID + "frobnicate = 1\n")
    assert line == f"{path}: [api:a] frobnicate: unknown key"


def test_keys_are_case_sensitive(tmp_path):
    path, line = only_problem(tmp_path, "[kproxy]\nListen = 127.0.0.1:9080\n\n" + VALID)
    assert line == f"{path}: [kproxy] Listen: unknown key; did you mean 'listen'?"


def test_missing_required_key(tmp_path):
    path, line = only_problem(tmp_path, SERVICE_S + "\n[api:a]\nservice = s\n")
    assert line == f"{path}: [api:a] path: required"


def test_required_key_set_to_empty_counts_as_missing(tmp_path):
    path, line = only_problem(tmp_path, SERVICE_S + "\n[api:a]\nservice =\npath = /a\n")
    assert line == f"{path}: [api:a] service: required"


def test_bad_host_port_in_listen(tmp_path):
    path, line = only_problem(tmp_path, "[kproxy]\nlisten = localhost\n\n" + VALID)
    assert line == f"{path}: [kproxy] listen: 'localhost' is not host:port"


def test_port_out_of_range_in_listen(tmp_path):
    path, line = only_problem(tmp_path, "[kproxy]\nlisten = 127.0.0.1:70000\n\n" + VALID)
    assert line.startswith(f"{path}: [kproxy] listen: ")
    assert "port must be 1-65535" in line


def test_listen_port_zero_lets_the_os_pick():
    assert parse("[kproxy]\nlisten = 127.0.0.1:0\n").gateway.listen == ("127.0.0.1", 0)


def test_bad_host_port_in_nodes_is_one_problem_on_nodes(tmp_path):
    path, line = only_problem(tmp_path, "[service:s]\nnodes = 127.0.0.1\n\n" + API_A)
    assert line == f"{path}: [service:s] nodes: '127.0.0.1' is not host:port"


def test_bad_regex(tmp_path):
    path, line = only_problem(tmp_path, "[registry:r]\ntype = kubernetes\nnamespace_pattern = (\n")
    assert line.startswith(f"{path}: [registry:r] namespace_pattern: '(' is not a valid regular expression")


def test_bad_boolean(tmp_path):
    path, line = only_problem(tmp_path, VALID + "strip_prefix = maybe\n")
    assert line.startswith(f"{path}: [api:a] strip_prefix: 'maybe' is not a boolean")


def test_bad_number_of_seconds(tmp_path):
    path, line = only_problem(tmp_path, "[kproxy]\nconnect_timeout = fast\n\n" + VALID)
    assert line == f"{path}: [kproxy] connect_timeout: 'fast' is not a number of seconds"


def test_number_out_of_range(tmp_path):
    path, line = only_problem(tmp_path, "[kproxy]\nthreads = 0\n\n" + VALID)
    assert line == f"{path}: [kproxy] threads: '0' must be a whole number from 1 to 1024"


def test_negative_retries_are_rejected(tmp_path):
    path, line = only_problem(tmp_path, SERVICE_S + "retries = -1\n\n" + API_A)
    assert line.startswith(f"{path}: [service:s] retries: '-1' must be a whole number")


def test_bad_choice(tmp_path):
    path, line = only_problem(tmp_path, VALID + "match = regex\n")
    assert line == f"{path}: [api:a] match: 'regex' must be one of: prefix, exact"


def test_api_pointing_to_an_unknown_service(tmp_path):
    path, line = only_problem(tmp_path, SERVICE_S + "\n[api:a]\nservice = nope\npath = /a\n")
    assert line == f"{path}: [api:a] service: no [service:nope] section"


def test_service_with_both_nodes_and_registry(tmp_path):
    path, line = only_problem(tmp_path, REGISTRY_R + "\n" + DISCOVERY_S
                              + "nodes = 127.0.0.1:8081\n\n" + API_A)
    assert line.startswith(f"{path}: [service:s] nodes: ")
    assert "not both" in line


def test_service_with_neither_nodes_nor_registry(tmp_path):
    path, line = only_problem(tmp_path, "[service:s]\nhost = example.org\n\n" + API_A)
    assert line.startswith(f"{path}: [service:s] nodes: required")


def test_registry_missing_type(tmp_path):
    path, line = only_problem(tmp_path, "[registry:r]\napi_server = https://10.0.0.1:6443\n"
                              "token = secret\n")
    assert line == f"{path}: [registry:r] type: required"


def test_service_naming_an_unknown_registry(tmp_path):
    path, line = only_problem(tmp_path, DISCOVERY_S.replace("registry = r", "registry = nope")
                              + "\n" + API_A)
    assert line == f"{path}: [service:s] registry: no [registry:nope] section"


@pytest.mark.parametrize("key", ["namespace", "service_name", "port"])
def test_discovery_service_missing_a_discovery_key(tmp_path, key):
    text = "\n".join(line for line in DISCOVERY_S.splitlines() if not line.startswith(key + " "))
    path, line = only_problem(tmp_path, REGISTRY_R + "\n" + text + "\n\n" + API_A)
    assert line == f"{path}: [service:s] {key}: required with registry"


def test_invalid_discovery_port_is_one_problem_on_port(tmp_path):
    path, line = only_problem(tmp_path, REGISTRY_R + "\n"
                              + DISCOVERY_S.replace("port = 80", "port = 99999") + "\n" + API_A)
    assert line == f"{path}: [service:s] port: '99999' must be 1-65535 or a port name"


def test_discovery_port_may_be_a_port_name():
    config = parse(REGISTRY_R + "\n" + DISCOVERY_S.replace("port = 80", "port = http-web") + "\n" + API_A)
    assert config.services["s"].port == "http-web"


def test_namespace_not_matching_the_registrys_namespace_pattern(tmp_path):
    path, line = only_problem(tmp_path, REGISTRY_R + "\n"
                              + DISCOVERY_S.replace("namespace = apisix", "namespace = default")
                              + "\n" + API_A)
    assert line == (f"{path}: [service:s] namespace: 'default' does not match namespace_pattern "
                    "of [registry:r]")


def test_namespace_pattern_must_match_the_whole_name(tmp_path):
    # "prod-.*" matches "prod-eu"; "apisix" must not match "apisix-dev" (no partial match)
    parse(REGISTRY_R + "\n" + DISCOVERY_S.replace("namespace = apisix", "namespace = prod-eu")
          + "\n" + API_A)
    path, line = only_problem(tmp_path, REGISTRY_R + "\n"
                              + DISCOVERY_S.replace("namespace = apisix", "namespace = apisix-dev")
                              + "\n" + API_A)
    assert line.startswith(f"{path}: [service:s] namespace: 'apisix-dev' does not match")


def test_pass_host_rewrite_without_upstream_host(tmp_path):
    path, line = only_problem(tmp_path, SERVICE_S + "pass_host = rewrite\n\n" + API_A)
    assert line == f"{path}: [service:s] upstream_host: required with pass_host = rewrite"


def test_pass_host_rewrite_with_upstream_host_is_valid():
    config = parse(SERVICE_S + "pass_host = rewrite\nupstream_host = internal.svc\n\n" + API_A)
    assert config.services["s"].upstream_host == "internal.svc"


def test_token_and_token_file_both_set(tmp_path):
    token_file = write(tmp_path, "secret\n", "token")
    path, line = only_problem(tmp_path, REGISTRY_R + f"token_file = {token_file}\n")
    assert line == f"{path}: [registry:r] token: set token or token_file, not both"


def test_duplicate_route_with_overlapping_methods(tmp_path):
    path, line = only_problem(tmp_path, VALID + "methods = GET POST\n\n"
                              "[api:b]\nservice = s\npath = /a\nmethods = POST PUT\n")
    assert line.startswith(f"{path}: [api:b] path: same route as [api:a]")


def test_duplicate_route_when_one_api_allows_every_method(tmp_path):
    path, line = only_problem(tmp_path, VALID + "\n[api:b]\nservice = s\npath = /a\nmethods = GET\n")
    assert line.startswith(f"{path}: [api:b] path: same route as [api:a]")


def test_duplicate_route_compares_the_full_path_prefix_plus_path(tmp_path):
    path, line = only_problem(tmp_path, """\
[service:s]
host = example.org
path_prefix = /v1
nodes = 127.0.0.1:8081

[service:t]
host = example.org
nodes = 127.0.0.1:8082

[api:a]
service = s
path = /a

[api:b]
service = t
path = /v1/a
""")
    assert line.startswith(f"{path}: [api:b] path: same route as [api:a]")


def test_same_route_with_disjoint_methods_is_not_an_error():
    config = parse(VALID + "methods = GET\n\n[api:b]\nservice = s\npath = /a\nmethods = POST PUT\n")
    assert set(config.apis) == {"a", "b"}


def test_same_path_with_different_match_or_host_is_not_a_duplicate():
    config = parse(VALID + "\n[api:b]\nservice = s\npath = /a\nmatch = exact\n\n"
                   "[service:t]\nhost = example.org\nnodes = 127.0.0.1:8082\n\n"
                   "[api:c]\nservice = t\npath = /a\n")
    assert set(config.apis) == {"a", "b", "c"}


def test_unknown_section(tmp_path):
    path, line = only_problem(tmp_path, VALID + "\n[frontend]\nlisten = 1.2.3.4:80\n")
    assert line.startswith(f"{path}: [frontend]: unknown section")


def test_section_with_an_invalid_name(tmp_path):
    path, line = only_problem(tmp_path, VALID + "\n[service:]\nnodes = 127.0.0.1:1\n")
    assert line.startswith(f"{path}: [service:]: ")
    assert "not a valid name" in line


def test_duplicate_section(tmp_path):
    path, line = only_problem(tmp_path, "[kproxy]\nthreads = 2\n\n[kproxy]\nworkers = 2\n")
    assert line == f"{path}: [kproxy]: section given twice (lines 1 and 4)"


def test_duplicate_key(tmp_path):
    path, line = only_problem(tmp_path, "[kproxy]\nthreads = 2\nthreads = 4\n")
    assert line == f"{path}: [kproxy] threads: set twice (lines 2 and 3)"


def test_duplicates_do_not_hide_other_problems(tmp_path):
    lines = problem_lines(write(tmp_path, "[kproxy]\nthreads = 2\nthreads = 4\nlisten = nowhere\n"))
    assert len(lines) == 2
    assert any("[kproxy] threads: set twice" in line for line in lines)
    assert any("[kproxy] listen:" in line for line in lines)


def test_not_an_ini_file(tmp_path):
    path, line = only_problem(tmp_path, "listen: 127.0.0.1:9080\nservices:\n  - name: s\n")
    assert line == f"{path}: line 1: 'listen' is outside any [section]; not an INI file?"


def test_not_an_ini_file_when_a_line_is_not_key_value(tmp_path):
    path, line = only_problem(tmp_path, "[kproxy]\nthis is not a setting\n")
    assert line == (f"{path}: [kproxy]: line 2: not key = value (the line is not shown: a secret may stand "
                    "there; a value on a line of its own, or a continuation that lost its indent?)")


def test_missing_file_is_reported_as_unreadable(tmp_path):
    path = tmp_path / "nope.ini"
    assert problem_lines(path) == [f"{path}: cannot read: [Errno 2] No such file or directory: "
                                   f"'{path}'"]


def test_directory_is_reported_as_unreadable(tmp_path):
    lines = problem_lines(tmp_path)
    assert len(lines) == 1 and lines[0].startswith(f"{tmp_path}: cannot read: ")


def test_binary_file_is_reported_as_unreadable(tmp_path):
    path = tmp_path / "kproxy.ini"
    path.write_bytes(b"[kproxy]\nlisten = \xff\xfe\n")
    lines = problem_lines(path)
    assert len(lines) == 1 and lines[0].startswith(f"{path}: cannot read: ")


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, """\
[kproxy]
listen = nowhere
read_timout = 60

[service:s]
nodes = 127.0.0.1:8081
pass_host = rewrite

[api:a]
service = missing
path = /a
""")
    assert problem_lines(path) == [
        f"{path}: [kproxy] read_timout: unknown key; did you mean 'read_timeout'?",
        f"{path}: [kproxy] listen: 'nowhere' is not host:port",
        f"{path}: [service:s] upstream_host: required with pass_host = rewrite",
        f"{path}: [api:a] service: no [service:missing] section",
    ]


def test_config_error_message_is_one_line_per_problem(tmp_path):
    with pytest.raises(ConfigError) as info:
        parse("[kproxy]\nlisten = x\nthreads = many\n", "F.ini")
    assert str(info.value).splitlines() == [
        "F.ini: [kproxy] listen: 'x' is not host:port",
        "F.ini: [kproxy] threads: 'many' must be a whole number from 1 to 1024",
    ]


# -- warnings, not errors --

def test_missing_token_file_and_ca_file_are_warnings_not_errors(tmp_path):
    missing = tmp_path / "not-here"
    config = parse(f"""\
[registry:r]
type = kubernetes
api_server = https://10.0.0.1:6443
token_file = {missing}/token
ca_file = {missing}/ca.crt

[service:s]
nodes = 127.0.0.1:8443
scheme = https
ca_file = {missing}/upstream-ca.crt
""", "F.ini")
    warnings = [str(w) for w in config.warnings]
    assert len(warnings) == 3, warnings
    assert warnings[0].startswith(f"F.ini: [registry:r] token_file: warning: {missing}/token does not exist")
    assert warnings[1].startswith(f"F.ini: [registry:r] ca_file: warning: {missing}/ca.crt does not exist")
    assert warnings[2].startswith(f"F.ini: [service:s] ca_file: warning: {missing}/upstream-ca.crt does not exist")


def test_existing_token_file_and_ca_file_give_no_warning(tmp_path):
    token, ca = write(tmp_path, "secret\n", "token"), write(tmp_path, "pem\n", "ca.crt")
    config = parse(f"[registry:r]\ntype = kubernetes\napi_server = https://10.0.0.1:6443\n"
                   f"token_file = {token}\nca_file = {ca}\n")
    assert config.warnings == ()


# -- nodes --

def test_node_list_with_weights():
    assert parse_nodes("10.0.0.7:8080 10.0.0.8:8080 weight=3") == (
        Node("10.0.0.7", 8080, 1), Node("10.0.0.8", 8080, 3))


def test_node_weight_defaults_to_one_and_host_names_are_allowed():
    assert Node.parse("httpbin.default.svc:80") == Node("httpbin.default.svc", 80, 1)


def test_ipv6_node_in_brackets():
    node = Node.parse("[fd00::7]:8080 weight=2")
    assert node == Node("fd00::7", 8080, 2)
    assert node.address == "[fd00::7]:8080"
    assert Node("10.0.0.7", 8080).address == "10.0.0.7:8080"


def test_ipv6_node_without_brackets_is_rejected():
    with pytest.raises(ValueError, match="brackets"):
        Node.parse("fd00::7:8080")


@pytest.mark.parametrize("text", ["a:1 weight=0", "a:1 weight=1001", "a:1 weight=x", "a:1 weight=",
                                  "a:1 weight=-1"])
def test_bad_weight_is_rejected(text):
    with pytest.raises(ValueError, match="weight"):
        parse_nodes(text)


def test_weight_before_any_node_is_rejected():
    with pytest.raises(ValueError, match="must follow a host:port"):
        parse_nodes("weight=2 10.0.0.7:8080")


def test_unknown_node_option_is_rejected():
    with pytest.raises(ValueError, match="unknown node option"):
        Node.parse("10.0.0.7:8080 max_fails=3")


@pytest.mark.parametrize("text", ["10.0.0.7", ":8080", "10.0.0.7:", "10.0.0.7:0", "10.0.0.7:65536",
                                  "10.0.0.7:http", "[::1]8080", "[]:80"])
def test_bad_host_port_is_rejected(text):
    with pytest.raises(ValueError):
        split_host_port(text)


def test_bad_weight_in_config_is_one_problem_on_nodes(tmp_path):
    path, line = only_problem(tmp_path, "[service:s]\nnodes = 127.0.0.1:8081 weight=0\n\n" + API_A)
    assert line == f"{path}: [service:s] nodes: weight must be a whole number from 1 to 1000, not '0'"


def test_nodes_in_config_parse_to_nodes():
    config = parse("[service:s]\nnodes = 10.0.0.7:8080 [fd00::8]:8080 weight=3\n\n" + API_A)
    assert config.services["s"].nodes == (Node("10.0.0.7", 8080), Node("fd00::8", 8080, 3))


# -- methods --

def test_methods_get_also_allows_head():
    assert parse(VALID + "methods = GET\n").apis["a"].methods == frozenset({"GET", "HEAD"})


def test_methods_are_upper_cased_and_may_be_comma_separated():
    assert parse(VALID + "methods = get, post\n").apis["a"].methods == frozenset({"GET", "HEAD", "POST"})


def test_methods_without_get_do_not_add_head():
    assert parse(VALID + "methods = POST\n").apis["a"].methods == frozenset({"POST"})


def test_methods_star_allows_every_method():
    assert parse(VALID + "methods = *\n").apis["a"].methods is None


def test_method_that_is_not_an_http_token_is_rejected(tmp_path):
    path, line = only_problem(tmp_path, VALID + "methods = GET G(T\n")
    assert line == f"{path}: [api:a] methods: 'G(T' is not an HTTP method"


# -- the reference --

def test_reference_mentions_every_key_of_every_section():
    text = reference()
    for title in ("[kproxy]", "[registry:NAME]", "[service:NAME]", "[api:NAME]"):
        assert title in text
    for table in (GATEWAY, REGISTRY, SERVICE, API):
        for setting in table:
            assert f"``{setting.key}``" in text, setting.key


def test_reference_shows_the_contract_defaults():
    text = reference()
    assert "``127.0.0.1:9080``" in text
    assert "``127.0.0.0/8 ::1``" in text
    assert "``/-/``" in text


def test_each_setting_is_a_field_of_its_section_and_every_field_is_a_setting():
    # one declaration: the tables are read from the dataclasses, never kept beside them
    from dataclasses import fields
    from kproxy.config import ApiConfig, GatewayConfig, RegistryConfig, ServiceConfig
    for table, section in ((GATEWAY, GatewayConfig), (REGISTRY, RegistryConfig), (SERVICE, ServiceConfig),
                           (API, ApiConfig)):
        assert [s.key for s in table] == [f.name for f in fields(section) if f.name != "name"]
        assert all(s.default == f.default for s, f in zip(table, [f for f in fields(section) if f.name != "name"]))
    assert "token=" not in repr(parse("[registry:r]\ntype = kubernetes\ntoken = s3cr3t\n").registries["r"])


# -- the kproxy command --

def test_check_exits_0_on_the_static_example(capsys):
    path = str(ROOT / "conf" / "static-example.ini")
    assert cli.main(["check", "-c", path]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{path}: ok (1 services, 2 apis, 0 registries)"]


def test_check_exits_0_on_the_seed_and_prints_file_warnings(capsys):
    path = str(ROOT / "conf" / "kproxy.ini")
    assert cli.main(["check", "-c", path]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"{path}: ok (1 services, 1 apis, 1 registries)"
    for line in out[:-1]:  # token_file / ca_file only exist inside a pod
        assert re.match(rf"{re.escape(path)}: \[registry:my-k8s-cluster\] (token_file|ca_file): warning: ", line)


def test_check_exits_1_with_one_line_per_problem(tmp_path, capsys):
    path = write(tmp_path, """\
[kproxy]
listen = nowhere
threads = lots

[service:s]
nodes = 127.0.0.1:8081

[api:a]
service = s
path = a
""")
    assert cli.main(["check", "-c", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{path}: [kproxy] listen: 'nowhere' is not host:port",
        f"{path}: [kproxy] threads: 'lots' must be a whole number from 1 to 1024",
        f"{path}: [api:a] path: 'a' must start with '/'",
    ]


def test_check_exits_1_on_a_missing_file(tmp_path, capsys):
    path = tmp_path / "nope.ini"
    assert cli.main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(f"{path}: cannot read: ")


def _route_rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.strip()]


def test_routes_prints_host_path_match_methods_service_and_upstream(capsys):
    assert cli.main(["routes", "-c", str(ROOT / "conf" / "kproxy.ini")]) == 0
    header, *rows = _route_rows(capsys.readouterr().out)
    assert header == ["HOST", "PATH", "MATCH", "METHODS", "API", "SERVICE", "UPSTREAM"]
    assert len(rows) == 1
    row = rows[0]
    assert row[:4] == ["sd.httpbin.org", "/v1/anything", "prefix", "*"]
    assert row[-2:] == ["sd-app", "my-k8s-cluster:apisix/httpbin:80"]
    assert row[4] == "anything"


def test_routes_shows_any_host_method_lists_and_weighted_static_nodes(tmp_path, capsys):
    path = write(tmp_path, """\
[service:s]
nodes = 127.0.0.1:8081 127.0.0.1:8082 weight=2

[api:a]
service = s
path = /a
match = exact
methods = GET
""")
    assert cli.main(["routes", "-c", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert out[1].split()[:5] == ["*", "/a", "exact", "GET", "HEAD"]
    assert re.search(r" s +127\.0\.0\.1:8081 127\.0\.0\.1:8082 weight=2$", out[1].rstrip())


def test_routes_exits_1_on_an_invalid_config(tmp_path, capsys):
    path = write(tmp_path, "[api:a]\nservice = s\npath = /a\n")
    assert cli.main(["routes", "-c", str(path)]) == 1
    captured = capsys.readouterr()
    assert f"{path}: [api:a] service: no [service:s] section" in captured.err
    assert captured.out == ""


def test_path_may_not_carry_routing_syntax(tmp_path):
    path, line = only_problem(tmp_path, "[service:s]\nnodes = 127.0.0.1:80\n[api:a]\nservice = s\npath = /x/<id>\n")
    assert line.startswith(f"{path}: [api:a] path: '/x/<id>' may not contain '<'")


# -- no secret in a problem --

# a ServiceAccount-like JWT (base64url: no '=' or ':') and a padded static token
JWT = ("eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ"
       ".c2lnbmF0dXJlLXRoYXQtaXMtc2VjcmV0")
PADDED = "c2VjcmV0LXRva2VuLXRoYXQtbXVzdC1ub3QtbGVhaw=="
REGISTRY_HEAD = "[registry:r]\ntype = kubernetes\napi_server = https://10.0.0.1:6443\n"


def secret_parts(token: str) -> list[str]:
    """Every piece of the token a message might quote (a wrapped token is split in two)."""
    pieces = re.split(r"[.=]", token) + [token[: len(token) // 2], token[len(token) // 2:]]
    return [p for p in pieces if len(p) >= 8]


SECRET_SHAPES = {
    # the value on a line of its own: configparser cannot parse the line
    "own line": (JWT, REGISTRY_HEAD + f"token =\n{JWT}\n",
                 r"\[registry:r\]: line 5: not key = value \(the line is not shown"),
    # the same with '=' padding: configparser reads a key
    "own line, padded": (PADDED, REGISTRY_HEAD + f"token =\n{PADDED}\n",
                         r"\[registry:r\]: line 5: unknown key, not shown"),
    "padded, twice": (PADDED, REGISTRY_HEAD + f"{PADDED}\n{PADDED}\n",
                      r"\[registry:r\]: a key that is not shown .* is set twice \(lines 4 and 5\)"),
    "before any section": (JWT, f"{JWT}\n" + REGISTRY_HEAD, r"line 1: a line is outside any \[section\]"),
    "padded, before any section": (PADDED, f"{PADDED}\n" + REGISTRY_HEAD,
                                   r"line 1: a line is outside any \[section\]"),
    # wrapped onto an indented line: the value spans two lines
    "wrapped": (JWT, REGISTRY_HEAD + f"token = {JWT[:60]}\n  {JWT[60:]}\n",
                r"\[registry:r\] token: invalid value over 2 lines, not shown"),
    "continuing another key": (JWT, REGISTRY_HEAD.replace("6443\n", f"6443\n    {JWT}\n") + "token = t\n",
                               r"\[registry:r\] api_server: invalid value over 2 lines, not shown"),
    "continuing a path": (JWT, REGISTRY_HEAD + f"token_file = /var/run/token\n    {JWT}\n",
                          r"\[registry:r\] token_file: invalid value over 2 lines, not shown"),
    "with a tab": (JWT, REGISTRY_HEAD + f"token = {JWT[:60]}\t{JWT[60:]}\n",
                   r"\[registry:r\] token: may not hold control characters or line breaks"),
    "twice": (JWT, REGISTRY_HEAD + f"token = {JWT}\ntoken = {JWT}x\n",
              r"\[registry:r\] token: set twice \(lines 4 and 5\)"),
}


@pytest.mark.parametrize("shape", SECRET_SHAPES)
def test_check_never_quotes_a_token_whatever_the_mistake(tmp_path, capsys, shape):
    token, text, expected = SECRET_SHAPES[shape]
    path = write(tmp_path, text)
    assert cli.main(["check", "-c", str(path)]) == 1
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert re.search(re.escape(f"{path}: ") + expected, output), output
    for part in secret_parts(token):
        assert part not in output, (part, output)


def test_a_token_cannot_hold_a_control_character_or_a_line_separator():
    for value in ("abc\tdef", "abc\x00def", "abc\u2028def", "abc\x85def"):
        with pytest.raises(ConfigError) as info:
            parse(REGISTRY_HEAD + f"token = {value}\n")
        assert [str(p) for p in info.value.problems] == [
            "<string>: [registry:r] token: may not hold control characters or line breaks "
            "(a token wrapped onto a second line?)"]


def test_a_multi_line_value_that_does_not_parse_is_not_quoted():
    with pytest.raises(ConfigError) as info:
        parse(VALID.replace("nodes = 127.0.0.1:8081", "nodes = 127.0.0.1:8081\n  not-a-node-secret"))
    assert [str(p) for p in info.value.problems] == [
        "<string>: [service:s] nodes: invalid value over 2 lines, not shown since a secret may stand on one "
        "(an indented line continues the key above it)"]


# -- warnings: a token sent in clear --

@pytest.mark.parametrize("given", ["token = t0ken", "token_file = {tmp}/token"])
def test_check_warns_when_a_token_would_travel_to_an_http_api_server(tmp_path, capsys, given):
    (tmp_path / "token").write_text("t0ken")
    path = write(tmp_path, "[registry:r]\ntype = kubernetes\napi_server = http://10.0.0.1:8080\n"
                 + given.format(tmp=tmp_path) + "\n")
    assert cli.main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    key = given.split()[0]
    assert out == [f"{path}: [registry:r] api_server: warning: http:// sends the {key}'s bearer token in "
                   "clear to the API server; use https://",
                   f"{path}: ok (0 services, 0 apis, 1 registries)"]


def test_no_cleartext_warning_for_https_or_without_a_token(tmp_path, capsys):
    for api_server, token in (("https://10.0.0.1:6443", "token = t0ken\n"), ("http://10.0.0.1:8080", "")):
        path = write(tmp_path, f"[registry:r]\ntype = kubernetes\napi_server = {api_server}\n{token}")
        assert cli.main(["check", "-c", str(path)]) == 0
        assert "in clear" not in capsys.readouterr().out


# -- settings a reload cannot apply --

def test_restart_only_settings_are_declared_on_the_setting_and_named_by_restart_needed():
    from kproxy.config import restart_needed
    restart = {s.key for s in GATEWAY if s.restart}
    assert {"listen", "threads", "queue_timeout", "workers", "keepalive_timeout", "client_header_timeout",
            "client_body_timeout", "client_send_timeout", "access_log", "access_log_format"} == restart
    assert not any(s.restart for s in REGISTRY + SERVICE + API)
    before = parse("[kproxy]\nthreads = 8\nread_timeout = 60\n" + VALID).gateway
    after = parse("[kproxy]\nthreads = 16\nread_timeout = 5\nlisten = 127.0.0.1:1\n" + VALID).gateway
    assert restart_needed(before, after) == ["listen", "threads"]  # read_timeout applies on reload
    assert restart_needed(before, before) == []
    assert "``threads``" in reference() and "needs a restart" in reference()
    from kproxy.config import keep_restart_settings
    reloaded = keep_restart_settings(parse("[kproxy]\nthreads = 16\nread_timeout = 5\n" + VALID),
                                     parse("[kproxy]\nthreads = 8\n" + VALID))
    assert (reloaded.gateway.threads, reloaded.gateway.read_timeout) == (8, 5.0)
