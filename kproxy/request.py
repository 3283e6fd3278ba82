"""What kproxy reads from a WSGI request: the path to route, the request-target to forward,
the body and its framing, the request id.

The path is routed as decoded (``routing_path``) and forwarded as the client sent it
(``forward_target``); ``unsafe_path`` refuses the paths on which the two could disagree
about which resource is meant (docs/security.rst).
"""

from __future__ import annotations

import itertools
import os
import re
import uuid
from urllib.parse import quote, unquote

from .forward import BodyReader, BodyTooLarge

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_PATH_SEGMENT = re.compile(r"[/\\]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]").search


class BadRequest(ValueError):
    pass


def routing_path(environ: dict) -> str:
    # WSGI gives PATH_INFO as latin-1 text of the percent-decoded bytes; route on real text
    raw = environ.get("PATH_INFO", "") or "/"
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return raw


def unsafe_path(path: str) -> bool:
    """Dot-segments, or control characters, in the decoded path. The path is routed as
    decoded, and upstreams that decode %2F and resolve '..' would see another path than
    the one routed: refusing these keeps routes from being bypassed."""
    if _CONTROL(path):
        return True
    return "." in path and any(segment in (".", "..") for segment in _PATH_SEGMENT.split(path))


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


def request_body(environ: dict, limit: int) -> tuple[BodyReader | None, bool]:
    """The body to forward and whether it goes chunked. The framing is kproxy's own, from
    what the server decoded: the upstream sees the same body boundary kproxy saw."""
    length = environ.get("CONTENT_LENGTH", "")
    if length:
        if not length.isdigit():
            raise BadRequest("invalid Content-Length")
        n = int(length)
        if limit and n > limit:
            raise BodyTooLarge(limit)
        return (BodyReader(environ["wsgi.input"], n), False) if n else (None, False)
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return BodyReader(environ["wsgi.input"], None, limit), True
    return None, False


def forward_target(environ: dict, strip: str) -> str:
    """The request-target to send upstream: the client's bytes (percent-encoding and query
    kept exactly), minus the stripped prefix."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw and not environ.get("SCRIPT_NAME"):
        if raw.startswith(("http://", "https://")):  # absolute-form request-target
            raw = "/" + raw.split("/", 3)[3] if raw.count("/") >= 3 else "/"
        path, sep, query = raw.partition("?")
    else:
        path = quote(environ.get("PATH_INFO", "") or "/", safe="/;=,:@!$&'()*+~")
        query = environ.get("QUERY_STRING", "")
        sep = "?" if query else ""
    if strip:
        path = strip_prefix(path, strip)
    return path + sep + query


def strip_prefix(path: str, prefix: str) -> str:
    if path.startswith(prefix):
        return path[len(prefix):] or "/"
    # the client percent-encoded part of the prefix; find where the decoded prefix ends
    for end in range(len(prefix), len(path) + 1):
        if unquote(path[:end]) == prefix and (end == len(path) or path[end] == "/"):
            return path[end:] or "/"
    return path
