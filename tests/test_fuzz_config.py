"""Fuzzing the INI parser and validator (kproxy/config.py).

Properties:

- any text: ``parse(text, "f.ini")`` returns a Config or raises ConfigError, never another
  exception, and every problem prints as one line ``f.ini: [section] key: message`` (the
  ``[section]`` and ``key`` parts where the problem has them);
- a structured file with known mistakes (unknown keys, invalid values, unknown sections,
  bad section names) gets a problem naming the section and key of each mistake;
- a valid generated file round-trips: the parsed values are the ones generated.

Run: ``python -m pytest tests/test_fuzz_config.py``.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import re
import string
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kproxy.config import API, GATEWAY, REGISTRY, SERVICE, Config, ConfigError, parse
from kproxy.node import Node

# more examples for a longer run: KPROXY_FUZZ_SCALE=10 python -m pytest tests/test_fuzz_*.py
SCALE = float(os.environ.get("KPROXY_FUZZ_SCALE", "1"))

FILE = "f.ini"
TABLES = {"kproxy": GATEWAY, "registry": REGISTRY, "service": SERVICE, "api": API}
NAME_CHARS = string.ascii_letters + string.digits + "_.-"
BOOLEANS = configparser.ConfigParser.BOOLEAN_STATES

# values that tend to break parsers: empty, interpolation and section syntax, numbers in
# odd forms, non-ASCII digits, control characters, huge
ODD_VALUES = ["", " ", "%", "%(x)s", "%%", "[", "[a]", "]", "=", "a=b", ":", "::", "*", "0", "-1",
              "00", "1e999", "nan", "inf", "-0", "0x10", "²", "١٢", "true", "TRUE", "maybe", "/", "//",
              "/a b", "/a?b", "\x00", "\x7f", "é", "\u2028", "\x85", "\r", "a\x0cb", "\t", "😀",
              "10.0.0.1:", ":80", "[::1]", "[::1]:99999", "h:1 weight=0", "weight=2", "h:1 weight",
              "(", "a(b", "*.", "*.*.x", "-a.org", "a" * 64 + ".org", "https://", "ftp://x",
              "9" * 5000, "x" * 20000, "1k" * 3, "10m", "1G", "512kb", "GET POST", "G:ET", "* GET"]
odd_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
values = st.one_of(st.sampled_from(ODD_VALUES), odd_text,
                   st.text(alphabet="%[]=:;# \t/.*0123456789abcxyzGETPOS-", max_size=30))


def check_problem_lines(error: ConfigError) -> None:
    assert error.problems, "a ConfigError without problems"
    for problem in error.problems:
        line = str(problem)
        assert problem.file == FILE and line.startswith(FILE + ": "), line
        assert line.splitlines() == [line], f"a problem over several lines: {line!r}"
        if problem.key is not None:
            assert problem.section is not None, line
        if problem.section is not None:
            where = f"{FILE}: [{problem.section}]" + (f" {problem.key}" if problem.key is not None else "")
            assert line.startswith(where + ": "), line
    assert str(error) == "\n".join(map(str, error.problems))


def parse_or_problems(text: str) -> Config | ConfigError:
    """parse() may return or raise ConfigError; anything else fails the test."""
    try:
        config = parse(text, FILE)
    except ConfigError as e:
        check_problem_lines(e)
        return e
    assert isinstance(config, Config)
    for warning in config.warnings:
        assert str(warning).startswith(f"{FILE}: [{warning.section}] {warning.key}: warning: ")
        assert str(warning).splitlines() == [str(warning)]
    return config


# -- any text --

FRAGMENTS = ["[", "]", "kproxy", "registry:", "service:", "api:", "r", "s", "a", "=", ":", ";", "#",
             " ", "\t", "\n", "\n", "\n", "\r\n", "%", "listen", "type", "kubernetes", "nodes",
             "127.0.0.1:1", "service", "path", "/", "methods", "GET", "port", "registry", "host",
             "namespace_pattern", "(", "*", "true", "\x00none", "é", "\u2028", "\x0c", "    "]


@settings(max_examples=int(250 * SCALE), deadline=None)
@given(st.one_of(st.text(max_size=300),
                 st.lists(st.sampled_from(FRAGMENTS), max_size=80).map("".join)))
def test_any_text_gives_a_config_or_problem_lines(text):
    parse_or_problems(text)


# -- structured files with known mistakes --

kinds = st.sampled_from(["kproxy", "registry", "service", "api"])
section_names = st.text(NAME_CHARS, min_size=1, max_size=12).filter(lambda n: n[0] not in "_.-")
BAD_SECTIONS = ["kproxy2", "KPROXY", "service", "service:", "api:a b", "registry:ü", "api:-x", "x:y",
                "services:s", " api:a", "api:a:b", "DEFAULT", "a]b"]
KEY_TYPOS = ["Listen", "listen ", "lisen", "thread", "path_prefx", "nodes_", "method", "tokenfile", "x",
             "émoji", "a%b", "0", "-", "Type", "servce"]


def reference_parser() -> configparser.ConfigParser:
    """configparser set up as kproxy's: the oracle for what each line means as INI."""
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"),
                                       default_section="\0none", empty_lines_in_values=False, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    return parser


@st.composite
def mistaken_files(draw) -> tuple[str, set[tuple[str, str | None]]]:
    """An INI text and the (section, key) pairs that must be named in its problems: unknown
    sections and bad names, unknown keys, values the key's own parser refuses."""
    lines: list[str] = []
    bad_sections: set[str] = set()
    used: set[str] = set()
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.integers(0, 4)) == 0:
            section = draw(st.sampled_from(BAD_SECTIONS))
            bad_sections.add(section)
        else:
            kind = draw(kinds)
            section = kind if kind == "kproxy" else f"{kind}:{draw(section_names)}"
        if section in used:
            continue
        used.add(section)
        lines.append(f"[{section}]")
        table = TABLES.get(section.partition(":")[0], ())
        keys = draw(st.lists(st.sampled_from(sorted(s.key for s in table) + KEY_TYPOS), unique=True,
                             max_size=6))
        for key in keys:
            value = draw(values).replace("\n", " ")
            if draw(st.integers(0, 5)) == 0:  # a continuation line: the value spans two lines
                value += "\n" + draw(st.sampled_from([" ", "\t", "    "])) + draw(values).replace("\n", " ")
            lines.append(f"{key} = {value}")
    text = "\n".join(lines) + "\n"
    expected: set[tuple[str, str | None]] = {(s, None) for s in bad_sections}
    parser = reference_parser()
    try:
        parser.read_string(text)
    except configparser.Error:
        return text, expected  # an odd value made a line unparsable: it is reported, by line
    for section in parser.sections():
        if section in bad_sections:
            continue
        table = {s.key: s for s in TABLES[section.partition(":")[0]]}
        for key, value in parser.items(section):
            if key not in table:
                expected.add((section, key))
                continue
            raw = value.strip()
            try:
                if raw:
                    table[key].parse(raw)
            except ValueError:
                expected.add((section, key))
    return text, expected


@settings(max_examples=int(250 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mistaken_files())
def test_every_mistake_is_named_by_section_and_key(case):
    text, expected = case
    result = parse_or_problems(text)
    if not expected:
        return
    assert isinstance(result, ConfigError), f"no problem for {expected} in {text!r}"
    named = {(p.section, p.key) for p in result.problems}
    assert expected <= named, (expected - named, [str(p) for p in result.problems])


# -- valid files round-trip --

def cased(draw, word: str) -> str:
    return "".join(c.upper() if draw(st.booleans()) else c for c in word)


safe_text = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters=";#"),
                    min_size=1, max_size=30).map(str.strip).filter(bool)
dns_label = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=8)
dns_name = st.lists(dns_label, min_size=1, max_size=3).map(".".join)
networks = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 128)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.ip_addresses().map(str))
seconds = st.one_of(st.integers(1, 86400).map(str), st.floats(0.001, 86400).map(repr))
path_words = st.text(string.ascii_letters + string.digits + "-._~%!$&'()*+,=:@", min_size=1, max_size=6)
paths = st.lists(path_words, max_size=3).map(lambda ws: "/" + "/".join(ws))
methods = st.lists(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND"]),
                   min_size=1, max_size=3, unique=True)


@st.composite
def valid_files(draw) -> tuple[str, dict[str, dict[str, dict[str, Any]]]]:
    """A valid INI file and, for each section, the values parse() must give."""
    sections: dict[str, dict[str, tuple[str, Any]]] = {}  # section -> key -> (raw, expected)

    gateway: dict[str, tuple[str, Any]] = {}
    if draw(st.booleans()):
        host = draw(st.sampled_from(["127.0.0.1", "0.0.0.0", "localhost", "[::1]", "gw.example.org"]))
        port = draw(st.integers(0, 65535))
        gateway["listen"] = (f"{host}:{port}", (host.strip("[]"), port))
    if draw(st.booleans()):
        prefix = "/" + draw(path_words) + "/"
        gateway["admin_prefix"] = (prefix, prefix)
    for key in ("admin_allow", "trusted_proxies"):
        if draw(st.booleans()):
            words = draw(st.lists(networks, min_size=1, max_size=3))
            gateway[key] = (draw(st.sampled_from([" ", ", ", ","])).join(words),
                            tuple(ipaddress.ip_network(w, strict=False) for w in words))
    for key in ("connect_timeout", "read_timeout", "keepalive_timeout", "client_header_timeout",
                "client_body_timeout", "node_cooldown"):
        if draw(st.booleans()):
            raw = draw(seconds)
            gateway[key] = (raw, float(raw))
    for key, high in (("threads", 1024), ("workers", 64)):
        if draw(st.booleans()):
            number = draw(st.integers(1, high))
            gateway[key] = (draw(st.sampled_from(["", "0", "00"])) + str(number), number)
    if draw(st.booleans()):
        number, unit = draw(st.integers(0, 10**6)), draw(st.sampled_from(["", "k", "K", "m", "M", "g"]))
        gateway["max_body_size"] = (f"{number}{unit}", number * {"": 1, "k": 1 << 10, "m": 1 << 20,
                                                               "g": 1 << 30}[unit.lower()])
    if draw(st.booleans()):
        word = draw(st.sampled_from(sorted(BOOLEANS)))
        gateway["access_log"] = (cased(draw, word), BOOLEANS[word])
    if draw(st.booleans()):
        word = draw(st.sampled_from(["text", "json"]))
        gateway["access_log_format"] = (cased(draw, word), word)
    if gateway or draw(st.booleans()):
        sections["kproxy"] = gateway

    names = st.text(NAME_CHARS, min_size=1, max_size=10).filter(lambda n: n[0] not in "_.-")
    registries: dict[str, str | None] = {}  # name -> a namespace it watches (None: any)
    for name in draw(st.lists(names, max_size=2, unique=True)):
        r: dict[str, tuple[str, Any]] = {"type": (cased(draw, "kubernetes"), "kubernetes")}
        auth = draw(st.sampled_from(["token", "token_file", "anonymous", "kubeconfig", "in-cluster"]))
        if auth in ("token", "token_file", "anonymous"):
            url = f"https://{draw(dns_name)}:{draw(st.integers(1, 65535))}" + draw(st.sampled_from(["", "/", "/k8s/"]))
            r["api_server"] = (url, url.rstrip("/"))
        if auth == "token":
            token = draw(safe_text)
            r["token"] = (token, token)
        elif auth == "token_file":
            r["token_file"] = ("/nonexistent/token", "/nonexistent/token")
        elif auth == "kubeconfig":
            r["kubeconfig"] = ("/nonexistent/kubeconfig", "/nonexistent/kubeconfig")
            if draw(st.booleans()):
                context = draw(safe_text)
                r["context"] = (context, context)
        tls = draw(st.sampled_from(["ca", "insecure", "system"]))
        if tls == "ca":
            r["ca_file"] = ("/nonexistent/ca.crt", "/nonexistent/ca.crt")
        elif tls == "insecure":
            r["insecure_skip_tls_verify"] = (cased(draw, "true"), True)
        pattern = draw(st.sampled_from([None, "apisix", "team-.*", "prod|staging"]))
        if pattern:
            r["namespace_pattern"] = (pattern, pattern)
        registries[name] = {None: None, "apisix": "apisix", "team-.*": "team-a",
                            "prod|staging": "staging"}[pattern]
        if draw(st.booleans()):
            selector = draw(st.sampled_from(["app=web", "tier in (a,b)", "!canary", "a=b,c!=d"]))
            r["label_selector"] = (selector, selector)
        if draw(st.booleans()):
            word = draw(st.sampled_from(["endpointslices", "endpoints"]))
            r["resource"] = (cased(draw, word), word)
        if draw(st.booleans()):
            word = draw(st.sampled_from(sorted(BOOLEANS)))
            r["enabled"] = (word, BOOLEANS[word])
        sections[f"registry:{name}"] = r

    services: dict[str, tuple[str, str]] = {}  # name -> (host, path_prefix) as parsed
    for name in draw(st.lists(names, min_size=1, max_size=3, unique=True)):
        s: dict[str, tuple[str, Any]] = {}
        host = draw(st.sampled_from(["", "*."])) + draw(dns_name)
        host = draw(st.sampled_from([host, "", host.upper(), host + "."]))
        if host or draw(st.booleans()):
            s["host"] = (host, host.lower().rstrip("."))
        prefix = draw(st.sampled_from(["", "/", "/v1", "/v1/", "/api/v2"]))
        if prefix or draw(st.booleans()):
            s["path_prefix"] = (prefix, prefix.rstrip("/"))
        if registries and draw(st.booleans()):
            registry = draw(st.sampled_from(sorted(registries)))
            namespace = registries[registry] or draw(dns_label)
            port = draw(st.sampled_from(["80", "8080", "http", "web-admin", "65535"]))
            s.update(registry=(registry, registry), namespace=(namespace, namespace),
                     service_name=(name.lower(), name.lower()), port=(port, port))
        else:
            nodes = draw(st.lists(st.tuples(st.sampled_from(["10.0.0.7", "[fd00::9]", "node.local"]),
                                            st.integers(1, 65535), st.none() | st.integers(1, 1000)),
                                  min_size=1, max_size=3))
            raw = " ".join(f"{h}:{p}" + (f" weight={w}" if w else "") for h, p, w in nodes)
            s["nodes"] = (raw, tuple(Node(h.strip("[]"), p, w or 1) for h, p, w in nodes))
        if draw(st.booleans()):
            word = draw(st.sampled_from(["http", "https"]))
            s["scheme"] = (cased(draw, word), word)
        pass_host = draw(st.sampled_from([None, "pass", "node", "rewrite"]))
        if pass_host:
            s["pass_host"] = (pass_host, pass_host)
        if pass_host == "rewrite" or draw(st.booleans()):
            upstream_host = draw(safe_text)
            s["upstream_host"] = (upstream_host, upstream_host)
        tls = draw(st.sampled_from(["ca", "insecure", "system"]))
        if tls == "ca":
            s["ca_file"] = ("/nonexistent/ca.pem", "/nonexistent/ca.pem")
        elif tls == "insecure":
            s["insecure_skip_tls_verify"] = ("yes", True)
        if draw(st.booleans()):
            retries = draw(st.integers(0, 100))
            s["retries"] = (str(retries), retries)
        services[name] = (s.get("host", ("", ""))[1], s.get("path_prefix", ("", ""))[1])
        sections[f"service:{name}"] = s

    routes: list[tuple[tuple[str, str, str], frozenset[str] | None]] = []
    for name in draw(st.lists(names, max_size=4, unique=True)):
        service = draw(st.sampled_from(sorted(services)))
        path, match = draw(paths), draw(st.sampled_from(["prefix", "exact"]))
        words = draw(st.none() | methods)
        allowed = None if words is None else frozenset({w.upper() for w in words}
                                                       | ({"HEAD"} if "GET" in words else set()))
        host, prefix = services[service]
        full = prefix + path
        route = (host, full.rstrip("/") or "/" if match == "prefix" else full, match)
        if any(route == other and (allowed is None or theirs is None or allowed & theirs)
               for other, theirs in routes):
            continue  # the same route with overlapping methods: a mistake, not a valid file
        routes.append((route, allowed))
        a: dict[str, tuple[str, Any]] = {"service": (service, service), "path": (path, path)}
        if match != "prefix" or draw(st.booleans()):
            a["match"] = (cased(draw, match), match)
        if draw(st.booleans()):
            word = draw(st.sampled_from(sorted(BOOLEANS)))
            a["strip_prefix"] = (word, BOOLEANS[word])
        if words is not None:
            a["methods"] = (draw(st.sampled_from([" ", ", ", ","])).join(cased(draw, w) for w in words), allowed)
        elif draw(st.booleans()):
            a["methods"] = ("*", None)
        sections[f"api:{name}"] = a

    # render: sections and keys in any order, ':' or '=', spacing, comments, blank lines
    order = draw(st.permutations(sorted(sections)))
    lines = []
    for section in order:
        if draw(st.booleans()):
            lines.append(draw(st.sampled_from(["; a comment", "# another", "", "   "])))
        lines.append(f"[{section}]" + draw(st.sampled_from(["", "  ; section comment"])))
        for key in draw(st.permutations(sorted(sections[section]))):
            raw = sections[section][key][0]
            delimiter = draw(st.sampled_from([" = ", "=", ": ", " :  "]))
            comment = draw(st.sampled_from(["", "  ; why", "\t# why"]))
            lines.append(f"{key}{delimiter}{raw}{comment}")
    expected = {section: {k: v[1] for k, v in keys.items()} for section, keys in sections.items()}
    return "\n".join(lines) + "\n", expected


def parsed_sections(config: Config) -> dict[str, Any]:
    out: dict[str, Any] = {"kproxy": config.gateway}
    out.update({f"registry:{n}": r for n, r in config.registries.items()})
    out.update({f"service:{n}": s for n, s in config.services.items()})
    out.update({f"api:{n}": a for n, a in config.apis.items()})
    return out


@settings(max_examples=int(150 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_files())
def test_a_valid_file_round_trips(case):
    text, expected = case
    try:
        config = parse(text, FILE)
    except ConfigError as e:
        raise AssertionError(f"a valid file was refused:\n{e}\n---\n{text}") from None
    got = parsed_sections(config)
    assert set(got) - {"kproxy"} == set(expected) - {"kproxy"}
    for section, keys in expected.items():
        for key, value in keys.items():
            actual = getattr(got[section], key)
            if isinstance(actual, re.Pattern):
                actual = actual.pattern
            assert actual == value, (section, key, actual, value)
    # what was not given has its declared default
    for section, obj in got.items():
        table = TABLES[section.partition(":")[0]]
        for setting in table:
            if setting.key not in expected.get(section, {}):
                assert getattr(obj, setting.key) == setting.default, (section, setting.key)


@settings(max_examples=int(100 * SCALE), deadline=None)
@given(st.sampled_from(["", "/", "/v1", "/v1/"]), paths, st.sampled_from(["prefix", "exact"]),
       st.none() | methods, st.none() | methods)
def test_the_same_route_twice_is_refused_trailing_slash_or_not(prefix, path, match, first, second):
    """Two apis with the same host and route and overlapping methods: which one serves a
    request would depend on the order of the file. A prefix /p/ is the same route as /p."""
    other = path.rstrip("/") + "/" if match == "prefix" or path == "/" else path
    text = (f"[service:s]\nnodes = 127.0.0.1:1\npath_prefix = {prefix}\n"
            f"[api:a]\nservice = s\npath = {path}\nmatch = {match}\nmethods = {' '.join(first or '*')}\n"
            f"[api:b]\nservice = s\npath = {other}\nmatch = {match}\nmethods = {' '.join(second or '*')}\n")
    def allowed(words):  # GET allows HEAD
        return set(words) | ({"HEAD"} if "GET" in words else set())
    overlap = first is None or second is None or allowed(first) & allowed(second)
    result = parse_or_problems(text)
    if overlap:
        assert isinstance(result, ConfigError) and [(p.section, p.key) for p in result.problems] == \
            [("api:b", "path")], text
    else:
        assert isinstance(result, Config), text
