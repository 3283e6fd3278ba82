"""What kproxy reads from a WSGI request: the path to route, the request-target to forward,
the body and its framing, the request id.

The target is parsed once (``parse_target``): its path is routed as decoded and forwarded
as the client sent it (``forward_target``), its Host (or absolute-form authority) routed
and forwarded alike; ``unsafe_path`` refuses the paths on which kproxy and an upstream
could disagree about which resource is meant (docs/security.rst).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import uuid
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

from .body import BodyReader, BodyTooLarge

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_PATH_SEGMENT = re.compile(r"[/\\]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]").search
_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})  # an empty one says so (some servers want 411)


class BadRequest(ValueError):
    """A request kproxy refuses with 400; ``error`` is the JSON error name."""

    def __init__(self, error: str, message: str):
        self.error = error
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Target:
    """The request-target and Host, parsed once: kproxy routes and forwards by this one
    parse, so what it routed and what the upstream receives cannot disagree."""
    host: str | None  # the absolute-form authority, else the Host header; None: neither
    path: str         # percent-decoded, as routed
    raw_path: str     # as the client sent it (percent-encoding kept), always origin-form
    query: str        # "" or "?..." as sent


def parse_target(environ: dict) -> Target:
    """The target of a request, or BadRequest for one kproxy will not route.

    Refused: a fragment (never part of a request-target, RFC 9112 §3.2), a form other than
    origin-form or absolute-form with an http/https scheme (any letter case), an invalid
    Host or authority, an HTTP/1.1 request without Host (RFC 9112 §3.2), and the paths of
    ``unsafe_path``. An absolute-form target's authority is the Host (RFC 9112 §3.2.2)."""
    host = environ.get("HTTP_HOST")
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    decoded_only = raw is None or bool(environ.get("SCRIPT_NAME"))
    if decoded_only:
        # a server that keeps no raw target, or a mount below a prefix: what it decoded
        raw_path = quote(environ.get("PATH_INFO", "") or "/", safe="/;=,:@!$&'()*+~")
        query = environ.get("QUERY_STRING", "")
        query = "?" + query if query else ""
    else:
        if "#" in raw:
            raise BadRequest("bad_target", "the request-target has a fragment")
        if not raw.startswith("/"):
            scheme, sep, rest = raw.partition("://")
            if not sep or scheme.lower() not in ("http", "https"):
                raise BadRequest("bad_target", "the request-target must be a path or an http(s) URL")
            end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
            host, raw = rest[:end], rest[end:]
            if not raw.startswith("/"):
                raw = "/" + raw
        raw_path, sep, query = raw.partition("?")
        query = sep + query
    if host is not None:
        if not valid_host(host):
            raise BadRequest("bad_host", "the Host is not a valid host[:port]")
    elif environ.get("SERVER_PROTOCOL") == "HTTP/1.1":
        raise BadRequest("bad_host", "an HTTP/1.1 request must have a Host")
    if decoded_only:
        path = _text(environ.get("PATH_INFO", "") or "/")
    else:
        path = _decode(raw_path)
    if unsafe_path(path):
        raise BadRequest("bad_path", "the path has a '.' or '..' segment or a control character")
    return Target(host, path, raw_path, query)


# reg-name as DNS has it, an IPv4 address, or a bracketed IPv6 address; then a port
_HOST = re.compile(r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")


def valid_host(host: str) -> bool:
    """A Host value kproxy may route and forward: ``host[:port]``, nothing else (no
    userinfo, no second value, no path)."""
    if not _HOST.fullmatch(host) or ".." in host:
        return False
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:host.index("]")])
        except ValueError:
            return False
    return True


def _text(latin1: str) -> str:
    # WSGI gives PATH_INFO as latin-1 text of the percent-decoded bytes; route on real text
    try:
        return latin1.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return latin1


def _decode(raw_path: str) -> str:
    if "%" not in raw_path:
        return raw_path
    data = unquote_to_bytes(raw_path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def unsafe_path(path: str) -> bool:
    """Dot-segments, also with ``;parameters`` (``..;``, which Tomcat, Jetty and Spring
    resolve as ``..``), or control characters, in the decoded path. The path is routed as
    decoded, and upstreams that decode %2F and resolve '..' would see another path than
    the one routed: refusing these keeps routes from being bypassed."""
    if _CONTROL(path):
        return True
    return "." in path and any(segment.partition(";")[0] in (".", "..")
                               for segment in _PATH_SEGMENT.split(path))


def request_id(environ: dict) -> str:
    """The client's ``X-Request-Id`` if it is a plain token (it goes into log lines), else a
    new one."""
    given = environ.get("HTTP_X_REQUEST_ID", "")
    return given if _REQUEST_ID.fullmatch(given) else new_request_id()


def new_request_id() -> str:
    """32 hex digits, unique per process start (a random prefix) and request (a counter):
    uuid4 would cost a system call for randomness on every request."""
    return f"{_id_prefix}{next(_id_counter):012x}"


def _new_id_space() -> None:
    global _id_prefix, _id_counter
    _id_prefix = uuid.uuid4().hex[:20]
    _id_counter = itertools.count()


_id_prefix, _id_counter = "", itertools.count()
_new_id_space()
os.register_at_fork(after_in_child=_new_id_space)  # a forked worker must not repeat ids


def request_body(environ: dict, limit: int) -> tuple[BodyReader | None, int | None]:
    """The body to forward and its length (None: unknown, it goes chunked). The framing
    is kproxy's own, from what the server decoded, never a header copied from the client:
    the upstream sees the same body boundary kproxy saw."""
    length = environ.get("CONTENT_LENGTH", "")
    coding = environ.get("HTTP_TRANSFER_ENCODING", "")
    if length and coding:  # gunicorn refuses these; other servers in middleware mode may not
        raise BadRequest("bad_request", "both Content-Length and Transfer-Encoding")
    if length:
        if not (length.isdigit() and length.isascii()):
            raise BadRequest("bad_request", "invalid Content-Length")
        n = int(length)
        if limit and n > limit:
            raise BodyTooLarge(limit)
        return (BodyReader(environ["wsgi.input"], n) if n else None), n
    if coding:
        if coding.strip().lower() != "chunked":
            raise BadRequest("bad_request", "Transfer-Encoding other than chunked")
        return BodyReader(environ["wsgi.input"], None, limit), None
    return None, 0 if environ["REQUEST_METHOD"] in _METHODS_WITH_BODY else None


def forward_target(target: Target, strip: str) -> str:
    """The request-target to send upstream: the client's bytes (percent-encoding and query
    kept exactly), minus the stripped prefix. Raises BadRequest where the client encoded
    the prefix so that no segment boundary is left to cut at."""
    path = target.raw_path
    if strip:
        path = strip_prefix(path, strip)
        rest = target.path[len(strip):] or "/"
        if path == target.raw_path or _decode(path) != rest:
            raise BadRequest("bad_path", "the path prefix is percent-encoded across a segment boundary")
    return path + target.query


def strip_prefix(path: str, prefix: str) -> str:
    if path.startswith(prefix) and path[len(prefix):len(prefix) + 1] in ("", "/"):
        return path[len(prefix):] or "/"
    # the client percent-encoded part of the prefix; find where the decoded prefix ends
    for end in range(len(prefix), len(path) + 1):
        if _decode(path[:end]) == prefix and (end == len(path) or path[end] == "/"):
            return path[end:] or "/"
    return path
