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

**Lookups are bounded** (:class:`Lookups`). ``getaddrinfo`` blocks a thread
and cannot be cancelled: a name whose DNS never answers holds its thread until
the system resolver gives up (10-30 s with glibc's defaults). In the event
loop's default executor, shared with everything else, four sessions fetching
such names held every worker and another session's lookup waited 17-20 s.
Each lookup now runs in a thread of its own, at most one per owner (a session)
at a time, and at most ``limit`` in the server.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import threading
import weakref
from collections.abc import Awaitable, Callable, Hashable, Sequence

from ..config import DEFAULT_MAX_DNS_LOOKUPS
from ..errors import UrlFetchFailed, UrlNotAllowed

__all__ = [
    "IPAddress",
    "Lookups",
    "Resolver",
    "address_refusal",
    "numeric_host",
    "getaddrinfo",
    "resolve_allowed",
    "shared_lookups",
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


def getaddrinfo(host: str, port: int) -> list[str]:
    """The system resolver's addresses for a TCP connection to ``host`` (blocking)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


class Lookups:
    """Blocking DNS lookups in threads of their own: one per owner at a time, ``limit`` in all.

    A lookup holds its place from the moment its thread starts until the
    thread returns, not until its caller stops waiting: a caller that gives up
    (its fetch's deadline, a cancelled source) abandons the lookup, but a
    thread stuck in ``getaddrinfo`` is not free, so it still counts. Hence:

    * **An owner stalls only itself.** Its next lookup waits for its previous
      thread, abandoned or not; with one owner per session a session holds at
      most one thread, and one client (``max_sessions_per_client`` sessions)
      at most that many places.
    * **The threads are bounded**: at most ``limit`` (64 by default, as many as
      sessions), whatever clients do. A lookup that finds them all taken waits
      for the first to end, in order, within its caller's deadline.

    With one place per session the live sessions alone never fill the
    places, so a lookup starts at once unless lookups of sessions since closed
    still hang (their threads end when the system resolver gives up), a
    backlog :meth:`wait_idle` slows: a closing session waits for its own
    lookup first (the session keeps its place meanwhile).

    ``lookup`` is the blocking call (:func:`getaddrinfo`); bound to one
    event loop, the first that uses it.
    """

    def __init__(
        self, limit: int, lookup: Callable[[str, int], Sequence[str]] = getaddrinfo
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be positive")
        self.limit = limit
        self._lookup = lookup
        self._owners: set[Hashable] = set()  # owners with a thread alive
        self._waiters: list[asyncio.Future[None]] = []  # woken, in order, when a thread ends

    @property
    def running(self) -> int:
        """Lookup threads alive, abandoned ones included."""
        return len(self._owners)

    def resolver(self, owner: Hashable) -> Resolver:
        """A :data:`Resolver` whose lookups are ``owner``'s."""

        async def resolve(host: str, port: int) -> Sequence[str]:
            return await self.resolve(owner, host, port)

        return resolve

    async def resolve(self, owner: Hashable, host: str, port: int) -> Sequence[str]:
        """``lookup(host, port)`` in a thread, once ``owner`` has none and a place is free.

        Cancelling the caller abandons the lookup: its thread keeps its place
        until it returns.
        """
        loop = asyncio.get_running_loop()
        await self._wait(lambda: owner not in self._owners and self.running < self.limit)
        self._owners.add(owner)
        answer: asyncio.Future[Sequence[str]] = loop.create_future()

        def settle(result: Sequence[str] | None, error: BaseException | None) -> None:
            self._owners.discard(owner)
            self._wake()
            if answer.done():  # abandoned
                return
            if error is not None:
                answer.set_exception(error)
            else:
                assert result is not None
                answer.set_result(result)

        def run() -> None:  # the lookup's thread
            result: Sequence[str] | None = None
            error: BaseException | None = None
            try:
                result = self._lookup(host, port)
            except BaseException as exc:
                error = exc
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:  # the loop is closed: nobody is waiting
                pass

        try:
            threading.Thread(target=run, name="dns-lookup", daemon=True).start()
        except BaseException:
            self._owners.discard(owner)
            self._wake()
            raise
        return await answer

    async def wait_idle(self, owner: Hashable) -> None:
        """Return once ``owner`` has no lookup running (cancel to stop waiting)."""
        await self._wait(lambda: owner not in self._owners)

    async def _wait(self, ready: Callable[[], bool]) -> None:
        while not ready():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


_SHARED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Lookups] = weakref.WeakKeyDictionary()


def shared_lookups(limit: int) -> Lookups:
    """The running event loop's :class:`Lookups`, made with ``limit`` places on first use.

    One per loop, as the loop's default executor is; a server passes its own
    to its sessions instead when it has one.
    """
    loop = asyncio.get_running_loop()
    lookups = _SHARED.get(loop)
    if lookups is None:
        lookups = _SHARED[loop] = Lookups(limit)
    return lookups


async def system_resolver(host: str, port: int) -> Sequence[str]:
    """Resolve ``host`` for a TCP connection in the running loop's shared :class:`Lookups`.

    Each call is an owner of its own, so only the server-wide bound applies;
    a session resolves as itself (:meth:`Lookups.resolver`), one at a time.
    """
    return await shared_lookups(DEFAULT_MAX_DNS_LOOKUPS).resolve(object(), host, port)


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
