"""INI configuration: every setting declared once, with its parser, default and doc.

Each setting is declared once, on its section's dataclass field (``setting()``: parser,
default, doc); the tables ``GATEWAY``, ``REGISTRY``, ``SERVICE``, ``API`` are read from
those fields, and are the source for parsing, validation, defaults, ``kproxy check``
messages and the README's reference::

    >>> config = load("conf/kproxy.ini")          # raises ConfigError listing every problem
    >>> config.services["sd-app"].port
    '80'

A ``ConfigError`` carries one ``Problem`` per mistake, each printed as
``FILE: [section] key: message``, so an operator fixes a file in one pass.
"""

from __future__ import annotations

import configparser
import difflib
import ipaddress
import os
import re
import unicodedata
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable
from urllib.parse import urlsplit

from .node import Node, parse_nodes, split_host_port

REQUIRED: Any = object()


@dataclass(frozen=True)
class Setting:
    """One key of a section, as ``setting()`` declared it on its dataclass field."""
    key: str
    parse: Callable[[str], Any]
    default: Any
    doc: str
    restart: bool = False  # read only when the processes start: a reload says so, and keeps the old value
    secret: bool = False   # its value never appears in a problem, nor in the dataclass's repr


def setting(parse: Callable[[str], Any], default: Any, doc: str, *, restart: bool = False,
            secret: bool = False) -> Any:
    """Declare a setting where its typed field is: parser, default and documentation in one
    place, as gunicorn's config does. ``settings_of`` reads them back."""
    return field(default=default, repr=not secret,
                 metadata={"kproxy": {"parse": parse, "doc": doc, "restart": restart, "secret": secret}})


def settings_of(section: type) -> tuple[Setting, ...]:
    """The settings a section's dataclass declares, in their order."""
    return tuple(Setting(f.name, default=f.default, **f.metadata["kproxy"])
                 for f in fields(section) if "kproxy" in f.metadata)


@dataclass(frozen=True)
class Problem:
    file: str
    section: str | None
    key: str | None
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.section is not None:
            where += f": [{self.section}]"
        if self.key is not None:
            where += f" {self.key}"
        # one line per problem, whatever a multi-line value put in the message
        return _LINE_BREAK.sub(lambda m: m[0].encode("unicode_escape").decode(), f"{where}: {self.message}")


_LINE_BREAK = re.compile("[\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")  # what str.splitlines() splits on


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(map(str, problems)))


# -- value parsers: each takes the raw string and returns a value or raises ValueError --

def _one_line(value: str) -> str:
    # an indented line continues the value above it: a path or name cannot hold one (the
    # problem does not quote it, see _value_problem)
    if "\n" in value:
        raise ValueError("must be on one line")
    return value


def _text(value: str) -> str:
    return _one_line(value)


def _bearer_token(value: str) -> str:
    # a header value with a line break or a control character fails in the HTTP client,
    # whose error quotes the value: refuse it here, without quoting it
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in value):
        raise ValueError("may not hold control characters or line breaks (a token wrapped onto "
                         "a second line?)")
    return value


def _boolean(value: str) -> bool:
    states = configparser.ConfigParser.BOOLEAN_STATES
    if value.lower() not in states:
        raise ValueError(f"{value!r} is not a boolean (true/false, yes/no, on/off, 1/0)")
    return states[value.lower()]


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number of seconds") from None
    if not 0 < seconds <= 86400:
        raise ValueError(f"{value!r} must be more than 0 and at most 86400 seconds")
    return seconds


def _count(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        if not value.isdigit() or not low <= int(value) <= high:
            raise ValueError(f"{value!r} must be a whole number from {low} to {high}")
        return int(value)
    return parse


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _size(value: str) -> int:
    match = re.fullmatch(r"(\d+)([kmg]?)", value.lower())
    if not match:
        raise ValueError(f"{value!r} is not a size in bytes (such as 1048576, 512k, 10m, 1g)")
    return int(match[1]) * _UNITS[match[2]]


def _choice(*options: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value.lower() not in options:
            raise ValueError(f"{value!r} must be one of: {', '.join(options)}")
        return value.lower()
    return parse


def _listen(value: str) -> tuple[str, int]:
    if value.rpartition(":")[2] == "0":  # port 0: let the OS pick (tests, demos)
        return split_host_port(value[:-1] + "1")[0], 0
    return split_host_port(value)


def _networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for word in value.replace(",", " ").split():
        try:
            networks.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            raise ValueError(f"{word!r} is not an IP address or network") from None
    return tuple(networks)


def _admin_prefix(value: str) -> str:
    if not (value.startswith("/") and value.endswith("/")):
        raise ValueError(f"{value!r} must start and end with '/', as in /-/")
    return value


def _url(value: str) -> str:
    _one_line(value)
    if any(c.isspace() or not c.isprintable() for c in value):  # urlsplit would drop some silently
        raise ValueError(f"{value!r} is not an http(s):// URL (it holds spaces or control characters)")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http(s):// URL")
    return value.rstrip("/")


def _regex(value: str) -> re.Pattern[str]:
    _one_line(value)
    try:
        return re.compile(value)
    except re.error as e:
        raise ValueError(f"{value!r} is not a valid regular expression: {e}") from None


_HOST_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_HOST = re.compile(rf"(\*\.)?{_HOST_LABEL}(\.{_HOST_LABEL})*\.?")


def _host(value: str) -> str:
    host = value.lower().rstrip(".")
    if host and not _HOST.fullmatch(host):
        raise ValueError(f"{value!r} is not a host name or *.wildcard (no port, no scheme)")
    return host


def _path_prefix(value: str) -> str:
    if value:
        _path(value)
    return value.rstrip("/")


_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")


def _label_value(value: str) -> str | None:
    """A Kubernetes label value (a zone, a node name); empty is None."""
    if value == "":
        return None
    if not _LABEL_VALUE.fullmatch(value):
        raise ValueError("must be a Kubernetes label value: up to 63 letters, digits, '-', '_' or '.', "
                         "starting and ending with a letter or digit")
    return value


def _positive_seconds(value: str) -> float:
    seconds = _seconds(value)
    if seconds <= 0:
        raise ValueError("must be more than 0 seconds")
    return seconds


def _path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"{value!r} must start with '/'")
    if any(c in value for c in "<>?# ") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError(f"{value!r} may not contain '<', '>', '?', '#', spaces or control characters")
    return value


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _methods(value: str) -> frozenset[str] | None:
    words = value.replace(",", " ").split()
    if words == ["*"]:
        return None
    for word in words:
        if not _TOKEN.fullmatch(word):
            raise ValueError(f"{word!r} is not an HTTP method")
    methods = {w.upper() for w in words}
    if "GET" in methods:
        methods.add("HEAD")
    return frozenset(methods)


_PORT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _port(value: str) -> str:
    if value.isdigit():
        if not 0 < int(value) < 65536:
            raise ValueError(f"{value!r} must be 1-65535 or a port name")
    elif not (len(value) <= 63 and _PORT_NAME.fullmatch(value)):
        raise ValueError(f"{value!r} is neither a port number nor a port name")
    return value


def _nodes(value: str) -> tuple[Node, ...]:
    return parse_nodes(value)


def _label_selector(value: str) -> str:
    _one_line(value)
    if value.count("(") != value.count(")"):
        raise ValueError(f"{value!r} is not a label selector (unbalanced parentheses)")
    return value


# -- the settings: each section's dataclass, one field per key --

@dataclass(frozen=True)
class GatewayConfig:
    listen: tuple[str, int] = setting(_listen, ("127.0.0.1", 9080), "host:port that ``kproxy serve`` listens on.",
                                      restart=True)
    admin_prefix: str = setting(_admin_prefix, "/-/",
                                "Path under which healthz, readyz, metrics and discovery are served.")
    admin_allow: tuple[Any, ...] = setting(_networks, _networks("127.0.0.0/8 ::1"),
                                           "Client networks that may read metrics and the discovery dump.")
    trusted_proxies: tuple[Any, ...] = setting(_networks, (),
                                               "Proxies in front of kproxy whose X-Forwarded-* headers are believed (see "
                                               "kproxy/client.py). Empty: none; the client is the TCP peer.")
    connect_timeout: float = setting(_seconds, 3.0, "Seconds to connect to an upstream node.")
    read_timeout: float = setting(_seconds, 60.0,
                                  "Seconds an upstream has to send its whole response head once the request is sent, "
                                  "and then each wait for body bytes (else 504).")
    upstream_keepalive_timeout: float = setting(_seconds, 1.5,
                                                "Seconds an idle pooled connection to a node may still be reused; older ones are closed. "
                                                "Below the keep-alive of common servers (gunicorn 2 s, Node.js and uvicorn 5 s), so a node "
                                                "never closes a connection just as kproxy reuses it.")
    threads: int = setting(_count(1, 1024), 1024,
                           "Most request threads of ``kproxy serve`` and of each gunicorn worker, made as "
                           "requests come (an idle worker has few): one per request in progress, waiting "
                           "for its upstream or relaying a stream. Also the idle connections kept per "
                           "upstream node. See docs/performance.rst for the cost of each.", restart=True)
    queue_timeout: float = setting(_seconds, 10.0,
                                   "Seconds a request whose head has come may wait for a request thread when "
                                   "all ``threads`` are busy; past it, it is answered 503 with the JSON error "
                                   "``overloaded`` and its connection closed.", restart=True)
    workers: int = setting(_count(1, 64), 1, "Worker processes under gunicorn (conf/gunicorn.conf.py).",
                           restart=True)
    keepalive_timeout: float = setting(_seconds, 5.0,
                                       "Seconds an idle client keep-alive connection is kept open.", restart=True)
    client_header_timeout: float = setting(_seconds, 10.0,
                                           "Seconds a client has to send a whole request head once it started (else 408): "
                                           "a slow client cannot hold a thread for longer.", restart=True)
    client_body_timeout: float = setting(_seconds, 30.0,
                                         "Seconds each read of a request body may wait for the client.", restart=True)
    client_send_timeout: float = setting(_seconds, 30.0,
                                         "Seconds each write of an answer may wait for a client that does not read.", restart=True)
    max_body_size: int = setting(_size, 0,
                                 "Largest request body accepted, in bytes (``10m``, ``512k`` also work); larger ones get "
                                 "413. ``0``: no limit.")
    zone: str | None = setting(_label_value, None,
                               "This gateway's zone (``topology.kubernetes.io/zone`` of its node), for "
                               "``topology``. Default: ``$KPROXY_ZONE``; empty: unknown, zones are not "
                               "preferred. ``$KPROXY_NODE_NAME`` names its node, for ``PreferSameNode``.")
    node_cooldown: float = setting(_seconds, 10.0,
                                   "Seconds a node that refused a connection or timed out is skipped.")
    tunnel_idle_timeout: float = setting(_seconds, 300.0,
                                         "Seconds an Upgrade tunnel (WebSocket) may pass no byte either way before it is closed.")
    access_log: bool = setting(_boolean, True, "Log one line per request to stdout.", restart=True)
    access_log_format: str = setting(_choice("text", "json"), "text", "``text`` or ``json`` lines.",
                                     restart=True)


@dataclass(frozen=True)
class RegistryConfig:
    name: str  # the NAME of its section
    type: str = setting(_choice("kubernetes"), REQUIRED, "Registry type; ``kubernetes``.")
    api_server: str | None = setting(_url, None,
                                     "API server URL. Empty: in-cluster configuration (or ``kubeconfig``).")
    token: str | None = setting(_bearer_token, None, "Bearer token. Prefer ``token_file``.", secret=True)
    token_file: str | None = setting(_text, None,
                                     "File holding the bearer token; re-read on every reconnect and after a 401. A changed "
                                     "file (its inode, size, times or resolved path, so a projected volume's ``..data`` "
                                     "link swap counts) is noticed within a quarter second and ends any backoff at once.")
    ca_file: str | None = setting(_text, None, "CA bundle that verifies the API server's certificate.")
    insecure_skip_tls_verify: bool = setting(_boolean, False, "Do not verify the API server's TLS certificate.")
    kubeconfig: str | None = setting(_text, None, "A kubeconfig file, instead of ``api_server``/token/CA.")
    context: str | None = setting(_text, None, "Context to use from ``kubeconfig``.")
    namespace_pattern: re.Pattern[str] | None = setting(_regex, None,
                                                        "Regex a namespace's WHOLE name must match to be watched. A plain name watches "
                                                        "only that namespace. Empty: all namespaces.")
    label_selector: str | None = setting(_label_selector, None, "Kubernetes label selector, applied by the server.")
    resource: str = setting(_choice("endpointslices", "endpoints"), "endpointslices",
                            "Watch EndpointSlices (falls back to Endpoints where not served) or Endpoints.")
    enabled: bool = setting(_boolean, True, "false: every upstream using this registry answers 503.")

    @property
    def single_namespace(self) -> str | None:
        """The one namespace to watch when ``namespace_pattern`` is a plain name."""
        pattern = self.namespace_pattern
        if pattern is not None and _PORT_NAME.fullmatch(pattern.pattern):
            return pattern.pattern
        return None

    def watches_namespace(self, namespace: str) -> bool:
        return self.namespace_pattern is None or bool(self.namespace_pattern.fullmatch(namespace))


@dataclass(frozen=True)
class ServiceConfig:
    name: str  # the NAME of its section
    host: str = setting(_host, "", "Exact host or ``*.example.org`` (one label). Empty: any host.")
    path_prefix: str = setting(_path_prefix, "", "Path prefix of every api of the service, e.g. /v1.")
    nodes: tuple[Node, ...] | None = setting(_nodes, None, "Static upstream: ``host:port [weight=N] ...``.")
    registry: str | None = setting(_text, None, "Discovery upstream: the ``[registry:NAME]`` to use ...")
    namespace: str | None = setting(_text, None, "... the Kubernetes namespace ...")
    service_name: str | None = setting(_text, None, "... the Kubernetes Service name ...")
    port: str | None = setting(_port, None, "... and the Service port (spec.ports[].port) or its name.")
    scheme: str = setting(_choice("http", "https"), "http", "Scheme used to reach the nodes.")
    ca_file: str | None = setting(_text, None, "CA bundle that verifies https nodes (default: system CAs).")
    insecure_skip_tls_verify: bool = setting(_boolean, False, "Do not verify https nodes.")
    pass_host: str = setting(_choice("pass", "node", "rewrite"), "pass",
                             "Host header sent upstream: the client's (pass), the node's address (node), "
                             "or ``upstream_host`` (rewrite).")
    upstream_host: str | None = setting(_text, None, "Host header for ``pass_host = rewrite``.")
    retries: int | None = setting(_count(0, 100), None,
                                  "How many other nodes to try after a failure. Default: number of nodes - 1.")
    topology: str = setting(_choice("auto", "prefer-zone", "off"), "auto",
                            "Which nodes to prefer by zone. ``auto``: as the cluster says (EndpointSlice "
                            "hints for this gateway's zone or node; without hints, a Service's "
                            "``trafficDistribution`` PreferClose/PreferSameZone/PreferSameNode: the same "
                            "node or zone). ``prefer-zone``: always the ready nodes in ``zone``. ``off``: "
                            "ignore zones. When no preferred node is ready, all ready nodes serve.")
    slow_start: float = setting(_seconds, 0.0,
                                "Seconds over which a node that joins after the first sync, or returns from "
                                "ejection or a failed health check, ramps from 10% to its full weight. 0: off.")
    health_check_path: str | None = setting(_path, None,
                                            "Active health checks when set: ``GET`` this path on every node "
                                            "(2xx/3xx = healthy); once per pod (its discovery process) "
                                            "with workers > 1.")
    health_check_host: str | None = setting(_text, None,
                                            "Host header of the checks. Default: ``upstream_host`` with "
                                            "``pass_host = rewrite``, else the node's address (a check has "
                                            "no client Host to pass).")
    health_check_interval: float = setting(_positive_seconds, 5.0, "Seconds between checks of each node.")
    health_check_timeout: float = setting(_positive_seconds, 2.0,
                                          "Seconds for a check's answer head; no answer in time = failed.")
    healthy_threshold: int = setting(_count(1, 100), 2, "Passed checks in a row that return a node to rotation.")
    unhealthy_threshold: int = setting(_count(1, 100), 3, "Failed checks in a row that take a node out.")


@dataclass(frozen=True)
class ApiConfig:
    name: str  # the NAME of its section
    service: str = setting(_text, REQUIRED, "The ``[service:NAME]`` this api belongs to.")
    path: str = setting(_path, REQUIRED, "Path after the service's path_prefix, e.g. /anything.")
    match: str = setting(_choice("prefix", "exact"), "prefix",
                         "``prefix`` matches whole path segments below ``path``; ``exact`` only ``path``.")
    strip_prefix: bool = setting(_boolean, False, "Remove the service's path_prefix before forwarding.")
    methods: frozenset[str] | None = setting(_methods, None, "``*`` or a list such as ``GET POST`` (GET allows HEAD).")


GATEWAY = settings_of(GatewayConfig)
REGISTRY = settings_of(RegistryConfig)
SERVICE = settings_of(ServiceConfig)
API = settings_of(ApiConfig)


@dataclass(frozen=True)
class Config:
    path: str
    gateway: GatewayConfig
    registries: dict[str, RegistryConfig]
    services: dict[str, ServiceConfig]
    apis: dict[str, ApiConfig]
    warnings: tuple[Problem, ...] = ()


_SECTIONS = {"registry": (REGISTRY, RegistryConfig), "service": (SERVICE, ServiceConfig),
             "api": (API, ApiConfig)}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate an INI file; raise ConfigError with every problem found."""
    path = os.fspath(path)
    return from_bytes(read_bytes(path), path)


def read_bytes(path: str) -> bytes:
    """The file's bytes, read once: what a reload validates is what its workers load."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError([Problem(path, None, None, f"cannot read: {e}")]) from None


def from_bytes(data: bytes, path: str) -> Config:
    """Validate the bytes of an INI file; ``path`` names the file in problems and in the config."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:  # names the byte and its offset, never the text around it
        raise ConfigError([Problem(path, None, None, f"cannot read: {e}")]) from None
    return parse(text, path)


def restart_needed(started: GatewayConfig, new: GatewayConfig) -> list[str]:
    """The [kproxy] keys whose new value only a restart applies."""
    return [s.key for s in GATEWAY if s.restart and getattr(started, s.key) != getattr(new, s.key)]


def keep_restart_settings(config: Config, started: Config) -> Config:
    """``config`` as a reloaded process runs it: with the restart-only settings of ``started``."""
    kept = {s.key: getattr(started.gateway, s.key) for s in GATEWAY if s.restart}
    return replace(config, gateway=replace(config.gateway, **kept))


def parse(text: str, path: str = "<string>") -> Config:
    """Validate INI text; ``path`` only names the file in problems."""
    problems: list[Problem] = []
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"),
                                       default_section="\0none", empty_lines_in_values=False, strict=False)
    parser.optionxform = str  # keys are case-sensitive: "Listen" is a typo, say so
    lines = _scan(text)
    problems += _duplicates(lines, path)  # strict=False reads on past them, so report them here
    # configparser's errors quote the line, and a token can stand on it: name its number,
    # section and key instead
    try:
        parser.read_string(text, source=path)
    except configparser.MissingSectionHeaderError as e:
        key = _shown_key(_line_key(e.line.strip()))
        what = f"{key!r} is" if key else "a line is"
        problems.append(Problem(path, None, None, f"line {e.lineno}: {what} outside any [section]; "
                                "not an INI file?"))
        raise ConfigError(problems) from None
    except configparser.ParsingError as e:
        for lineno, _ in e.errors:
            section = lines[lineno - 1].section if lineno <= len(lines) else None
            problems.append(Problem(path, section, None, f"line {lineno}: not key = value (the line is "
                                    "not shown: a secret may stand there; a value on a line of its "
                                    "own, or a continuation that lost its indent?)"))
    where = {(line.section, line.key): line.number for line in reversed(lines) if line.key}

    gateway = None
    sections: dict[str, dict[str, Any]] = {"registry": {}, "service": {}, "api": {}}
    for section in parser.sections():
        values = dict(parser.items(section))
        if section == "kproxy":
            gateway = GatewayConfig(**_read_section(path, section, values, GATEWAY, problems, where))
            continue
        kind, sep, name = section.partition(":")
        if not sep or kind not in _SECTIONS:
            problems.append(Problem(path, section, None, "unknown section; expected [kproxy], "
                                    "[registry:NAME], [service:NAME] or [api:NAME]"))
            continue
        if not _NAME.fullmatch(name):
            problems.append(Problem(path, section, None, f"{name!r} is not a valid name "
                                    "(letters, digits, '-', '_', '.')"))
            continue
        settings, _ = _SECTIONS[kind]
        sections[kind][name] = _read_section(path, section, values, settings, problems, where)
    if gateway is None:
        gateway = GatewayConfig(**_read_section(path, "kproxy", {}, GATEWAY, problems, where))

    registries = {n: RegistryConfig(name=n, **v) for n, v in sections["registry"].items()}
    services = {n: ServiceConfig(name=n, **v) for n, v in sections["service"].items()}
    apis = {n: ApiConfig(name=n, **v) for n, v in sections["api"].items()}
    warnings: list[Problem] = []
    _check_registries(path, registries, problems, warnings)
    _check_services(path, services, registries, problems, warnings)
    _check_apis(path, apis, services, problems)
    if gateway.zone is None and os.environ.get("KPROXY_ZONE"):
        try:
            gateway = replace(gateway, zone=_label_value(os.environ["KPROXY_ZONE"]))
        except ValueError as e:
            problems.append(Problem(path, "kproxy", "zone", f"$KPROXY_ZONE {e}"))
    if problems:
        raise ConfigError(problems)
    return Config(path, gateway, registries, services, apis, tuple(warnings))


_SECTION_LINE = re.compile(r"\[(?P<name>.+)\]")
# a "key" longer than any key is more likely a value that lost its line (a token with '='
# padding), so problems do not name it
_KEY_MAX = 32


@dataclass(frozen=True)
class _Line:
    number: int
    section: str | None  # the section the line is in
    key: str | None      # the key it sets, if it starts one
    header: bool         # a [section] line


def _line_key(stripped: str) -> str:
    return re.split(r"[=:]", stripped, maxsplit=1)[0].strip()


def _shown_key(key: str) -> str | None:
    return key if len(key) <= _KEY_MAX and key.isprintable() else None


def _scan(text: str) -> list[_Line]:
    """Each line's section and key, as configparser reads them (it splits at '\\n' only)."""
    lines = []
    section = None
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        key, header = None, False
        # blank lines, comments and continuations start nothing
        if stripped and stripped[0] not in "#;" and not line[0].isspace():
            match = _SECTION_LINE.match(stripped)
            if match:
                section, header = match["name"], True
            elif section is not None:
                key = _line_key(stripped)
        lines.append(_Line(number, section, key, header))
    return lines


def _duplicates(lines: list[_Line], path: str) -> list[Problem]:
    """Sections and keys given twice (configparser would keep the last one silently)."""
    problems = []
    first_line: dict[tuple[str | None, str | None], int] = {}
    for line in lines:
        if not (line.header or line.key):
            continue
        where = (line.section, line.key)
        if where in first_line:
            lines_given = f"lines {first_line[where]} and {line.number}"
            if line.header:
                problems.append(Problem(path, line.section, None, f"section given twice ({lines_given})"))
            elif _shown_key(line.key):
                problems.append(Problem(path, line.section, line.key, f"set twice ({lines_given})"))
            else:
                problems.append(Problem(path, line.section, None, f"a key that is not shown (longer than "
                                        f"any key) is set twice ({lines_given})"))
        else:
            first_line[where] = line.number
    return problems


def _read_section(path: str, section: str, values: dict[str, str], settings: tuple[Setting, ...],
                  problems: list[Problem], where: dict[tuple[str | None, str | None], int]) -> dict[str, Any]:
    known = {s.key: s for s in settings}
    for key in sorted(values.keys() - known.keys(), key=lambda k: where.get((section, k), 0)):
        if not _shown_key(key):
            line = where.get((section, key))
            problems.append(Problem(path, section, None, (f"line {line}: " if line else "") + "unknown "
                                    "key, not shown since it is longer than any key (a value on a "
                                    "line of its own?)"))
            continue
        hint = difflib.get_close_matches(key, known, n=1)
        problems.append(Problem(path, section, key, "unknown key" + (f"; did you mean {hint[0]!r}?" if hint else "")))
    result: dict[str, Any] = {}
    for setting in settings:
        raw = values.get(setting.key, "").strip()
        if not raw:
            if setting.default is REQUIRED:
                problems.append(Problem(path, section, setting.key, "required"))
                result[setting.key] = None
            else:
                result[setting.key] = setting.default
            continue
        try:
            result[setting.key] = setting.parse(raw)
        except ValueError as e:
            problems.append(Problem(path, section, setting.key, _value_problem(setting, raw, str(e))))
            result[setting.key] = None if setting.default is REQUIRED else setting.default
    return result


def _value_problem(setting: Setting, raw: str, message: str) -> str:
    """The message for a value that did not parse, quoting no line a secret may stand on."""
    lines = raw.count("\n") + 1
    if lines > 1:  # an indented line continues the value above it, whatever it held
        return (f"invalid value over {lines} lines, not shown since a secret may stand on one "
                "(an indented line continues the key above it)")
    if setting.secret and raw in message:
        return "invalid value (not shown: it is secret)"
    return message


def _missing_file_warning(path: str, section: str, key: str, value: str | None,
                          warnings: list[Problem]) -> None:
    if value and not os.path.exists(value):
        warnings.append(Problem(path, section, key, f"warning: {value} does not exist here "
                                "(fine if it exists where kproxy runs, e.g. inside a pod)"))


def _check_registries(path: str, registries: dict[str, RegistryConfig], problems: list[Problem],
                      warnings: list[Problem]) -> None:
    for r in registries.values():
        section = f"registry:{r.name}"
        if r.token and r.token_file:
            problems.append(Problem(path, section, "token", "set token or token_file, not both"))
        if r.ca_file and r.insecure_skip_tls_verify:
            problems.append(Problem(path, section, "insecure_skip_tls_verify",
                                    "set ca_file or insecure_skip_tls_verify, not both"))
        if r.kubeconfig and (r.api_server or r.token or r.token_file):
            problems.append(Problem(path, section, "kubeconfig",
                                    "kubeconfig replaces api_server, token and token_file; drop them"))
        if r.context and not r.kubeconfig:
            problems.append(Problem(path, section, "context", "context needs kubeconfig"))
        if r.api_server and not (r.token or r.token_file):
            warnings.append(Problem(path, section, "token", "warning: no token or token_file; "
                                    "requests to the API server will be anonymous"))
        elif r.api_server and urlsplit(r.api_server).scheme == "http":
            given = "token" if r.token else "token_file"
            warnings.append(Problem(path, section, "api_server", f"warning: http:// sends the {given}'s "
                                    "bearer token in clear to the API server; use https://"))
        for key in ("token_file", "ca_file", "kubeconfig"):
            _missing_file_warning(path, section, key, getattr(r, key), warnings)


def _check_services(path: str, services: dict[str, ServiceConfig], registries: dict[str, RegistryConfig],
                    problems: list[Problem], warnings: list[Problem]) -> None:
    discovery_keys = ("namespace", "service_name", "port")
    for s in services.values():
        section = f"service:{s.name}"
        # keys whose value was already reported as invalid: do not also call them missing
        invalid = {p.key for p in problems if p.section == section}
        if s.nodes and s.registry:
            problems.append(Problem(path, section, "nodes", "set nodes (static) or registry "
                                    "(discovery), not both"))
        elif s.registry:
            if s.registry not in registries:
                problems.append(Problem(path, section, "registry", f"no [registry:{s.registry}] section"))
            for key in discovery_keys:
                if not getattr(s, key) and key not in invalid:
                    problems.append(Problem(path, section, key, "required with registry"))
            registry = registries.get(s.registry)
            if registry and s.namespace and not registry.watches_namespace(s.namespace):
                problems.append(Problem(path, section, "namespace", f"{s.namespace!r} does not match "
                                        f"namespace_pattern of [registry:{s.registry}]"))
        elif not s.nodes:
            if "nodes" not in invalid:
                problems.append(Problem(path, section, "nodes", "required: set nodes, or registry "
                                        "with namespace, service_name and port"))
        else:
            for key in discovery_keys:
                if getattr(s, key):
                    problems.append(Problem(path, section, key, "only used with registry"))
        if s.pass_host == "rewrite" and not s.upstream_host:
            problems.append(Problem(path, section, "upstream_host", "required with pass_host = rewrite"))
        if s.health_check_timeout >= s.health_check_interval and s.health_check_path:
            problems.append(Problem(path, section, "health_check_timeout", "must be less than "
                                    "health_check_interval"))
        if s.ca_file and s.insecure_skip_tls_verify:
            problems.append(Problem(path, section, "insecure_skip_tls_verify",
                                    "set ca_file or insecure_skip_tls_verify, not both"))
        _missing_file_warning(path, section, "ca_file", s.ca_file, warnings)


def _check_apis(path: str, apis: dict[str, ApiConfig], services: dict[str, ServiceConfig],
                problems: list[Problem]) -> None:
    seen: dict[tuple[str, str, str], list[ApiConfig]] = {}
    for a in apis.values():
        section = f"api:{a.name}"
        service = services.get(a.service) if a.service else None
        if a.service and service is None:
            problems.append(Problem(path, section, "service", f"no [service:{a.service}] section"))
        if service is None or a.path is None:
            continue
        full = service.path_prefix + a.path
        if a.match == "prefix":  # /p/ is the same prefix as /p
            full = full.rstrip("/") or "/"
        route = (service.host, full, a.match)
        for other in seen.setdefault(route, []):
            if a.methods is None or other.methods is None or a.methods & other.methods:
                problems.append(Problem(path, section, "path", f"same route as [api:{other.name}] "
                                        f"(host {route[0] or '*'}, path {route[1]}, {a.match} match, "
                                        "overlapping methods)"))
        seen[route].append(a)


def reference() -> str:
    """The configuration reference as reStructuredText, from the tables above."""
    out = []
    for title, settings in (("[kproxy]", GATEWAY), ("[registry:NAME]", REGISTRY),
                            ("[service:NAME]", SERVICE), ("[api:NAME]", API)):
        out += [title, "~" * len(title), "", ".. list-table::", "   :header-rows: 1", "",
                "   * - key", "     - default", "     - meaning"]
        for s in settings:
            default = "(required)" if s.default is REQUIRED else _show_default(s)
            doc = s.doc + (" A reload does not change it: it needs a restart." if s.restart else "")
            out += [f"   * - ``{s.key}``", f"     - {default}", f"     - {doc}"]
        out.append("")
    return "\n".join(out)


def _show_default(setting: Setting) -> str:
    value = setting.default
    if value is None or value == "":
        return "(empty)"
    if setting.key == "listen":
        return "``127.0.0.1:9080``"
    if setting.key == "admin_allow":
        return "``127.0.0.0/8 ::1``"
    if isinstance(value, bool):
        return f"``{str(value).lower()}``"
    if isinstance(value, float) and value.is_integer():
        return f"``{int(value)}``"
    return f"``{value}``"


if __name__ == "__main__":  # python -m kproxy.config: the reference section of README.rst
    print(reference())
