"""Which network addresses a URL fetch may reach, and resolving host names to them.

A client-supplied URL must not make the server talk to itself or to its
neighbours (server-side request forgery): loopback services, the cloud
metadata endpoint at 169.254.169.254, private networks. Three rules close the
usual bypasses:

* **Numeric hosts are judged as the socket layer reads them.** ``inet_aton``
  (and so ``getaddrinfo``) accepts ``2130706433``, ``0x7f.1``, ``0177.0.0.1``
  and ``127.1`` for 127.0.0.1; :func:`numeric_host` parses every such form
  and refuses all but the canonical dotted quad, so no parser disagreement is
  left to exploit.
* **IPv6 forms that carry an IPv4 address are judged by that address**
  (``::ffff:127.0.0.1``, ``64:ff9b::7f00:1``, 6to4 ``2002:7f00:1::``), and
  deprecated or local-only carriers are refused outright.
* **A name is resolved once, here,** and every address it resolves to must be
  allowed; the caller connects to the address returned, never to the name
  again (a second lookup could answer differently: DNS rebinding).

The resolver is injectable, so tests can play any DNS answer without a network.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Sequence

from .errors import UrlFetchFailed, UrlNotAllowed

__all__ = [
    "IPAddress",
    "Resolver",
    "address_refusal",
    "numeric_host",
    "resolve_allowed",
    "system_resolver",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``(host, port) -> addresses``: what ``getaddrinfo`` answers for a TCP connection."""

# Hosts the WHATWG URL standard (and inet_aton) treat as IPv4: the last label is a number.
_NUMBER = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)", re.IGNORECASE)

# Not global, though Python's ``is_global`` (3.11) says otherwise for some of them.
_BLOCKED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "192.0.0.0/24",  # IETF protocol assignments (only parts are in Python's table)
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215)
        "fec0::/10",  # deprecated site-local
    )
)
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


async def system_resolver(host: str, port: int) -> list[str]:
    """Resolve ``host`` for a TCP connection through the event loop's ``getaddrinfo``."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


def numeric_host(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a numeric ``host`` stands for; None for a host name.

    A host whose last label is a number is an IPv4 address to ``inet_aton``
    and to browsers, in any of its forms (decimal, octal, hex, fewer than four
    parts). Only the canonical dotted quad is accepted: other forms are
    refused (``UrlNotAllowed``), as are numbers that are no address at all
    (``1.2.3.4.5``, ``08.0.0.1``), rather than left to a resolver.
    """
    labels = host.split(".")
    if len(labels) > 1 and not labels[-1]:
        labels.pop()  # "127.0.0.1." is still a number to a resolver; refused below
    if not _NUMBER.fullmatch(labels[-1]):
        return None
    address = _inet_aton(labels)
    if address is None or str(address) != host:
        raise UrlNotAllowed(
            "the URL's host is a number in a non-canonical form: write IPv4 addresses as a.b.c.d"
        )
    return address


def _inet_aton(labels: list[str]) -> ipaddress.IPv4Address | None:
    """``inet_aton``'s reading of ``labels``: a.b.c.d, a.b.c (c: 16 bits), a.b (b: 24), a (32)."""
    if len(labels) > 4:
        return None
    numbers: list[int] = []
    for label in labels:
        if not _NUMBER.fullmatch(label):
            return None
        try:
            if label[:2].lower() == "0x":
                numbers.append(int(label[2:] or "0", 16))
            elif len(label) > 1 and label.startswith("0"):
                numbers.append(int(label, 8))
            else:
                numbers.append(int(label, 10))
        except ValueError:  # 08, 09: not octal
            return None
    *leading, last = numbers
    if any(n > 255 for n in leading) or last >= 256 ** (5 - len(numbers)):
        return None
    value = last
    for index, number in enumerate(leading):
        value |= number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def address_refusal(address: IPAddress) -> str | None:
    """Why a fetch may not connect to ``address``, or None if it may (a global unicast address).

    IPv4-mapped and NAT64 addresses reach the IPv4 address inside them and
    are judged by it; 6to4 must pass for both. IPv4-compatible, local-use
    NAT64, Teredo, scoped and site-local addresses are refused outright.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return "a scoped IPv6 address"
        embedded, translated = _embedded_ipv4(address)
        if embedded is not None:
            reason = address_refusal(embedded)
            if reason is not None:
                return f"{reason} (inside {address})"
            if translated:
                return None
        elif address in _IPV4_COMPATIBLE and int(address) > 1:
            return "a deprecated IPv4-compatible address"
        if address.is_site_local:
            return "a site-local address"
    return _category(address)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address | None, bool]:
    """The IPv4 address inside ``address``, and whether connecting reaches exactly that one."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped, True
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), True
    if address.sixtofour is not None:
        return address.sixtofour, False
    return None, False


def _category(address: IPAddress) -> str | None:
    """A name for the non-global range ``address`` is in, or None for a global unicast one."""
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if isinstance(address, ipaddress.IPv4Address) and address in _CGNAT:
        return "a shared (carrier-grade NAT) address"
    if address.is_private:
        return "a private address"
    if address.is_reserved or not address.is_global:
        return "a reserved address"
    if any(address in network for network in _BLOCKED_NETWORKS):
        return "a reserved address"
    return None


async def resolve_allowed(
    host: str, port: int, *, resolver: Resolver, allow_private: bool
) -> list[IPAddress]:
    """The addresses to connect to for ``host``, in order: checked, never looked up again.

    ``host`` is an IP literal (from :func:`numeric_host` or an IPv6 literal)
    or a name. A name is resolved with ``resolver``; if any of its addresses
    is refused the whole name is (a name that answers a public and a private
    address could otherwise pick either). With ``allow_private`` only the
    parsing rules apply.
    """
    literal = _ip_literal(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            answers = await resolver(host, port)
        except OSError:
            raise UrlFetchFailed(f"the host {host} cannot be resolved") from None
        addresses = list(dict.fromkeys(_parse_answer(a) for a in answers))
        if not addresses:
            raise UrlFetchFailed(f"the host {host} has no address")
    if not allow_private:
        for address in addresses:
            reason = address_refusal(address)
            if reason is not None:
                raise UrlNotAllowed(f"the URL's host {host} is {reason}: not fetched")
    return addresses


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _parse_answer(answer: str) -> IPAddress:
    try:
        return ipaddress.ip_address(answer)
    except ValueError:
        raise UrlFetchFailed("the host resolved to something that is not an address") from None
