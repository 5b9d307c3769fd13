"""Who may open a session: API keys, browser origins and client identities.

Checked once, at the WebSocket handshake, before anything is accepted:

* **Origin**: a browser always sends ``Origin``; a page from another site must
  not be able to drive a user's session (cross-site WebSocket hijacking). With
  no allowlist only the server's own origin passes (``Origin`` naming ``Host``);
  ``*`` lets any through. With auth off that is not enough: a page whose name
  is made to resolve to this server (DNS rebinding) is its own origin there, so
  only hosts no DNS answer can stand for pass (an IP address, ``localhost``);
  a named host must be listed. Clients that are not browsers send no
  ``Origin`` and are judged by key alone.
* **API key**, when keys are configured, given one of three ways: an
  ``Authorization: Bearer <key>`` header; the WebSocket subprotocol
  ``streamchat.key.<key>`` offered beside ``streamchat.v1`` (browsers cannot
  set headers); or the ``token`` field of ``hello`` (any client). A key given
  at the handshake is checked there (HTTP 401 when wrong); otherwise the
  session must start with a ``hello`` carrying one.

Keys are compared in constant time, and never logged: a session is known by a
short hash of its key (its *identity*, also what per-client session limits
count), or by its address when it has none. Refused handshakes are logged by
:class:`RefusalLog`, which no rate of refusals can make flood the log.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .config import Settings
from .errors import AccessError, OriginNotAllowed, Unauthorized

__all__ = [
    "KEY_SUBPROTOCOL_PREFIX",
    "SUBPROTOCOL",
    "Grant",
    "KeyStore",
    "RefusalLog",
    "admit",
    "check_token",
    "key_identity",
]

SUBPROTOCOL = "streamchat.v1"
KEY_SUBPROTOCOL_PREFIX = "streamchat.key."

logger = logging.getLogger("streamchat.access")


def key_identity(key: str) -> str:
    """A stable name for a key that reveals nothing about it (for logs and limits)."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:12]


class KeyStore:
    """The accepted API keys: fixed ones plus a file, re-read when it changes.

    Re-reading on change (checked by modification time and size at each
    handshake, a single ``stat``) revokes a key without a restart. If the
    file disappears or cannot be read, its keys are dropped: failing closed.
    """

    def __init__(self, keys: Iterable[str] = (), file: Path | None = None) -> None:
        self._fixed = frozenset(k for k in keys if k)
        self._file = file
        self._stamp: tuple[int, int] | None = None
        self._from_file: frozenset[str] = frozenset()
        if file is not None:
            self._reload()

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyStore:
        return cls(settings.api_keys, settings.api_keys_file)

    @property
    def enabled(self) -> bool:
        """Auth is on when any key is configured, or a key file is named (even empty)."""
        return bool(self._fixed) or self._file is not None

    def keys(self) -> frozenset[str]:
        self._reload()
        return self._fixed | self._from_file

    def check(self, candidate: str) -> bool:
        """Whether ``candidate`` is an accepted key (constant time per key)."""
        given = candidate.encode()
        found = False
        for key in self.keys():
            found |= hmac.compare_digest(given, key.encode())
        return found

    def _reload(self) -> None:
        if self._file is None:
            return
        try:
            info = os.stat(self._file)
        except OSError:
            if self._stamp is not None:
                logger.warning("API key file %s is gone: its keys are revoked", self._file)
            self._stamp, self._from_file = None, frozenset()
            return
        stamp = (info.st_mtime_ns, info.st_size)
        if stamp == self._stamp:
            return
        try:
            text = self._file.read_text("utf-8")
        except (OSError, UnicodeDecodeError):
            logger.warning("API key file %s cannot be read: its keys are revoked", self._file)
            self._stamp, self._from_file = None, frozenset()
            return
        self._stamp = stamp
        self._from_file = frozenset(
            line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
        )
        logger.info("API key file %s: %d key(s)", self._file, len(self._from_file))


@dataclass(frozen=True, slots=True)
class Grant:
    """What the handshake established about a new session."""

    identity: str
    """The client's key hash, else its address: what per-client limits count."""
    subprotocol: str | None
    """The subprotocol to accept with (``streamchat.v1`` when offered)."""
    needs_token: bool
    """Auth is on but no key came with the handshake: ``hello`` must carry one."""


def admit(
    headers: Mapping[str, str],
    subprotocols: Iterable[str],
    client_host: str | None,
    *,
    keys: KeyStore,
    allowed_origins: Iterable[str],
) -> Grant:
    """Check a handshake's origin and key; raise the typed refusal, else grant.

    ``headers`` must be case-insensitive (Starlette's ``Headers``).
    """
    _check_origin(
        headers.get("origin"), headers.get("host"), allowed_origins, rebindable=not keys.enabled
    )
    offered = list(subprotocols)
    subprotocol = SUBPROTOCOL if SUBPROTOCOL in offered else None
    address = f"addr:{client_host or 'unknown'}"
    if not keys.enabled:  # an Authorization header is then a proxy's business, not ours
        return Grant(address, subprotocol, needs_token=False)
    key = _bearer(headers.get("authorization")) or _key_subprotocol(offered)
    if key is None:
        return Grant(address, subprotocol, needs_token=True)
    if not keys.check(key):
        raise Unauthorized("the API key is not valid")
    return Grant(key_identity(key), subprotocol, needs_token=False)


def check_token(token: str | None, keys: KeyStore) -> str:
    """The identity for a ``hello`` token, or :class:`Unauthorized`."""
    if not token:
        raise Unauthorized(
            "this server needs an API key (a bearer token, a streamchat.key subprotocol, "
            "or 'token' in 'hello')"
        )
    if not keys.check(token):
        raise Unauthorized("the API key is not valid")
    return key_identity(token)


def _bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, credentials = value.partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <key>'")
    return credentials.strip()


def _key_subprotocol(offered: list[str]) -> str | None:
    for item in offered:
        if item.startswith(KEY_SUBPROTOCOL_PREFIX):
            return item[len(KEY_SUBPROTOCOL_PREFIX) :] or None
    return None


def _normalise_origin(origin: str) -> str:
    parts = urlsplit(origin.strip().lower())
    return f"{parts.scheme}://{parts.netloc}"


def _check_origin(
    origin: str | None, host: str | None, allowed: Iterable[str], *, rebindable: bool
) -> None:
    """Refuse a browser page from elsewhere.

    ``rebindable``: nothing else stands between a page and the server (auth
    off), so a page on a name an attacker's DNS points here (DNS rebinding)
    must not pass as the server's own: the same-origin rule then only holds
    for hosts a DNS answer cannot stand for.
    """
    if origin is None:
        return  # not a browser: the key (if any) decides
    allowed = [a for a in allowed if a]
    if "*" in allowed:
        return
    if allowed:
        if _normalise_origin(origin) in {_normalise_origin(a) for a in allowed}:
            return
    elif host is not None and urlsplit(origin.strip().lower()).netloc == host.strip().lower():
        if not rebindable or _unrebindable(host):
            return  # same origin: the server's own page
        raise OriginNotAllowed(
            f"pages from {origin[:100]!r} may open sessions only with an API key, or when "
            "the server lists their origin (--allow-origin): a page on a host name could be "
            "another site's, its name pointed here (DNS rebinding)"
        )
    raise OriginNotAllowed(f"pages from {origin[:100]!r} may not open sessions on this server")


def _unrebindable(host: str) -> bool:
    """Whether ``host`` (a ``Host`` header) names this server by no DNS answer.

    An IP address is taken as it is, and browsers resolve ``localhost`` and
    its subdomains to loopback themselves (RFC 6761), so no other site's page
    can be served under these names.
    """
    try:
        name = urlsplit("//" + host.strip().lower()).hostname
    except ValueError:
        return False
    if not name:
        return False
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class RefusalLog:
    """Logs refused handshakes at a rate no client can raise.

    Anyone can be refused as often as they can connect, so each refusal is
    logged at DEBUG only. The first after a quiet spell is also logged at INFO
    with its reason; the ones that follow within ``interval`` seconds are
    counted, and :meth:`flush` (called at the end of each interval) says how
    many in one WARNING. At most two lines an interval, whatever the rate.
    Pure: the caller gives the time and calls :meth:`flush` on time.
    """

    MAX_ADDRESSES = 64
    """Addresses counted per interval, to name the busiest; the rest are only counted."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._since: float | None = None
        self._codes: Counter[str] = Counter()
        self._addresses: Counter[str] = Counter()

    @property
    def counting(self) -> bool:
        """An interval is running: :meth:`flush` is due at its end."""
        return self._since is not None

    def refused(self, exc: AccessError, address: str, now: float) -> bool:
        """Log or count one refusal; True if it began an interval (then flush in ``interval``)."""
        logger.debug("handshake from %s refused (%s): %s", address, exc.code, exc.message)
        if self._since is None:
            self._since = now
            logger.info("handshake from %s refused (%s): %s", address, exc.code, exc.message)
            return True
        self._codes[exc.code] += 1
        if address in self._addresses or len(self._addresses) < self.MAX_ADDRESSES:
            self._addresses[address] += 1
        return False

    def flush(self, now: float) -> bool:
        """End the interval, saying what it counted; True if a new one began (refusals went on)."""
        if self._since is None:
            return False
        total = self._codes.total()
        if not total:
            self._since = None
            return False
        codes = ", ".join(f"{code} {n}" for code, n in self._codes.most_common())
        busiest, most = self._addresses.most_common(1)[0]
        logger.warning(
            "%d more handshake(s) refused in the last %.1f s (%s); most from %s (%d)",
            total,
            now - self._since,
            codes,
            busiest,
            most,
        )
        self._since = now
        self._codes.clear()
        self._addresses.clear()
        return True
