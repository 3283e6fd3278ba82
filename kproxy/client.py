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
