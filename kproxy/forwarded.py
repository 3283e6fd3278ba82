"""Who the client is, and which ``X-Forwarded-*`` values to believe.

Any client can write ``X-Forwarded-*`` headers, so by default kproxy believes none of
them: the client is the TCP peer (``REMOTE_ADDR``), and ``X-Forwarded-Host``, ``-Proto``
and ``-Port`` are set from what kproxy itself saw. ``X-Forwarded-For`` is a chain that
each hop appends its peer to: kproxy appends the peer and passes the chain on, so an
upstream can trust the entries from the right up to the first hop it does not know.

Behind a load balancer or ingress, list its addresses in ``trusted_proxies``. When the peer
is one of them, the client is the right-most ``X-Forwarded-For`` entry that is not a
trusted proxy (as nginx's realip module finds it), and the ``X-Forwarded-Host``, ``-Proto``
and ``-Port`` it sent are passed on unchanged. That client address is the one
``admin_allow`` checks and the access log shows::

    >>> trusted = parse_networks("10.0.0.0/8")
    >>> client_address({"REMOTE_ADDR": "10.0.0.5", "HTTP_X_FORWARDED_FOR": "1.2.3.4, 10.0.0.9"}, trusted)
    '1.2.3.4'
"""

from __future__ import annotations

import ipaddress
import re
from typing import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(word, strict=False) for word in text.replace(",", " ").split())


def address_in(address: str, networks: Iterable[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]").partition("%")[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def peer_is_trusted(environ: dict, trusted: Sequence[Network]) -> bool:
    return bool(trusted) and address_in(environ.get("REMOTE_ADDR", ""), trusted)


def client_address(environ: dict, trusted: Sequence[Network]) -> str:
    """The client's address: the peer, or, behind trusted proxies, the right-most
    ``X-Forwarded-For`` entry that is not one of them."""
    peer = environ.get("REMOTE_ADDR", "") or "-"
    if not peer_is_trusted(environ, trusted):
        return peer
    chain = [a.strip() for a in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if a.strip()]
    for address in reversed(chain):
        if not address_in(address, trusted):
            return address if _is_ip(address) else peer
    return chain[0] if chain and _is_ip(chain[0]) else peer


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
        return True
    except ValueError:
        return False


def add_forwarded_headers(headers: dict[str, str], environ: dict, trusted: Sequence[Network],
                          host: str | None, client: str) -> None:
    """Set the client-identity headers, as one policy (docs/security.rst):

    - ``X-Forwarded-For``: the peer appended to the chain;
    - ``Forwarded`` (RFC 7239): kproxy's element for this hop (``for`` the peer, ``host``,
      ``proto``) appended to a trusted proxy's value, and replacing anyone else's;
    - ``X-Real-IP``: the client address kproxy believes (``client``);
    - ``X-Forwarded-Host``, ``-Proto``, ``-Port``: what kproxy saw, unless a trusted proxy
      sent them.

    ``host`` is the Host kproxy routed by (None: the request had none)."""
    peer = environ.get("REMOTE_ADDR", "")
    prior = headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    keep_theirs = peer_is_trusted(environ, trusted)
    scheme = environ.get("wsgi.url_scheme", "http")
    element = f"for={_node(peer)};proto={scheme}" + (f";host={_quoted(host)}" if host else "")
    prior = headers.get("Forwarded") if keep_theirs else None
    headers["Forwarded"] = f"{prior}, {element}" if prior else element
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
