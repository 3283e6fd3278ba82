"""Which headers cross kproxy, in each direction (RFC 9110 §7.6.1), and the headers that
say who the client is.

Hop-by-hop headers and every header named in ``Connection`` are dropped both ways
(``request_headers``, ``response_headers``), except that ``Connection`` cannot make the
framing or the Host hop-by-hop: kproxy writes those itself. ``add_forwarded_headers`` sets
``X-Forwarded-*``, ``Forwarded`` and ``X-Real-IP`` as one policy (docs/security.rst)::

    headers = request_headers(environ)
    headers["Host"] = "sd.httpbin.org"
    add_forwarded_headers(headers, environ, trusted=(), host="sd.httpbin.org", client="10.0.0.9")
"""

from __future__ import annotations

import re
from typing import Sequence

from . import http1
from .client import Network, peer_is_trusted

HOP_BY_HOP = frozenset({"connection", "proxy-connection", "keep-alive", "te", "trailer",
                        "transfer-encoding", "upgrade", "proxy-authenticate", "proxy-authorization"})

# environ keys that never go upstream: hop-by-hop, Expect (the server answered
# 100 Continue itself), and what kproxy writes itself: the framing (from the body it
# read) and the Host (what pass_host says)
_NOT_FORWARDED = frozenset("HTTP_" + name.upper().replace("-", "_")
                           for name in HOP_BY_HOP | {"expect", "host", "content-length"})
# Connection may name any header as hop-by-hop, but not these: dropping the framing would
# send the body unframed (the upstream parses it as requests of its own), and the Host
# is not the client's to take away (RFC 9110 §7.6.1 lets a proxy refuse or ignore them)
_NEVER_HOP_BY_HOP = frozenset({"content-length", "transfer-encoding", "host"})
_header_names: dict[str, str] = {}  # environ key -> header name, as computed once


def connection_tokens(value: str | None) -> frozenset[str]:
    """The header names a ``Connection`` value makes hop-by-hop, lower-case."""
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",")) - _NEVER_HOP_BY_HOP


def upgrade_protocol(environ: dict) -> str | None:
    """The protocol an HTTP/1.1 request asks to switch to: its ``Upgrade`` value, when
    ``Connection`` names ``upgrade``; else None. Only such a request gets ``Upgrade`` and
    ``Connection: upgrade`` forwarded (the caller sets them); an HTTP/1.0 one is a plain
    request (RFC 9110 §7.8)."""
    value = environ.get("HTTP_UPGRADE")
    if not value or environ.get("SERVER_PROTOCOL") != "HTTP/1.1":
        return None
    return value if "upgrade" in connection_tokens(environ.get("HTTP_CONNECTION")) else None


def request_headers(environ: dict) -> dict[str, str]:
    """Upstream request headers from a WSGI environ: end-to-end headers only, without
    Host and the framing, which the caller sets."""
    named = connection_tokens(environ.get("HTTP_CONNECTION"))
    headers: dict[str, str] = {}
    for key, value in environ.items():
        if key.startswith("HTTP_") and key not in _NOT_FORWARDED:
            name = _header_names.get(key)
            if name is None:
                name = key[5:].replace("_", "-").title()
                if len(_header_names) < 1024:  # client-chosen names: bounded
                    _header_names[key] = name
            if not named or name.lower() not in named:
                headers[name] = value
    if environ.get("CONTENT_TYPE") and "content-type" not in named:
        headers["Content-Type"] = environ["CONTENT_TYPE"]
    return headers


def response_headers(response: http1.Response) -> list[tuple[str, str]]:
    """End-to-end response headers in the order received, repeated ones (Set-Cookie)
    kept one per line. ``Content-Length`` goes to the client only as kproxy framed the
    body itself: a length the body was not framed by (one next to Transfer-Encoding) would
    make the client hang or misframe."""
    fields = response.headers
    dropped = HOP_BY_HOP
    for name, value in fields:
        if name.lower() == "connection":
            dropped = dropped | connection_tokens(value)
    if not response.framed_by_length:
        dropped = dropped | {"content-length"}
    return [(name, value) for name, value in fields if name.lower() not in dropped]


def add_forwarded_headers(headers: dict[str, str], environ: dict, trusted: Sequence[Network],
                          host: str | None, client: str) -> None:
    """Set the client-identity headers, as one policy (docs/security.rst):

    - ``X-Forwarded-For``: the peer appended to the chain;
    - ``Forwarded`` (RFC 7239): dropped from anyone but a trusted proxy; a trusted proxy's
      chain gets kproxy's element for this hop (``for`` the peer, ``proto``, ``host``)
      appended. kproxy does not start the header itself: like APISIX and nginx it speaks
      ``X-Forwarded-*``, and the seed's answer shows no ``Forwarded``;
    - ``X-Real-IP``: the client address kproxy believes (``client``);
    - ``X-Forwarded-Host``, ``-Proto``, ``-Port``: what kproxy saw, unless a trusted proxy
      sent them.

    ``host`` is the Host kproxy routed by (None: the request had none)."""
    peer = environ.get("REMOTE_ADDR", "")
    prior = headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    keep_theirs = peer_is_trusted(environ, trusted)
    scheme = environ.get("wsgi.url_scheme", "http")
    prior = headers.pop("Forwarded", None)
    if prior and keep_theirs:
        element = f"for={_node(peer)};proto={scheme}" + (f";host={_quoted(host)}" if host else "")
        headers["Forwarded"] = f"{prior}, {element}"
    headers["X-Real-Ip"] = client
    for name, value in (("X-Forwarded-Host", host),
                        ("X-Forwarded-Proto", scheme),
                        ("X-Forwarded-Port", str(environ.get("SERVER_PORT", "")))):
        if keep_theirs and name in headers:
            continue
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _node(address: str) -> str:
    # RFC 7239 §6: an IPv6 node is bracketed and, with its colons, quoted
    return f'"[{address}]"' if ":" in address else (address or "unknown")


def _quoted(value: str) -> str:
    return value if _TOKEN.fullmatch(value) else '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
