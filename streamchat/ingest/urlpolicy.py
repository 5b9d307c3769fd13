"""Which URLs a client may make the server fetch: strict parsing, pure functions.

A URL is checked once as a string, the way the HTTP client will read it, and
refused whenever two parsers could read it differently. ``urllib`` and httpx
disagree on backslashes (``http://a\\@127.0.0.1/``: GHSA-v359-jj2v-j536),
on user info, on signs in the port (``:+80``) and on non-ASCII dots
(``127。0。0。1``); so user info, backslashes, whitespace, control and
non-ASCII characters are refused outright, the host and port must match a
strict grammar, and ``urllib``'s and httpx's readings of scheme, host, port
and user info must agree. Numeric hosts go through
:func:`~streamchat.ingest.netguard.numeric_host`.

Every way a URL can fail a check is ``UrlNotAllowed``: the standard
library's and httpx's own parse errors (``urlsplit`` refuses
``http://[::ffff:127.1]/``, httpx a redirect to ``http://0177.0.0.1/``) and a
``file:`` path that cannot be resolved (a symlink loop) included, so a client
hears why and the log gets no traceback.

The domain allowlist names services, not just hosts: an entry is
``host`` or ``host:port`` (``[v6]:port`` for an IPv6 address), and an entry
without a port allows only the scheme's default port (80 for http, 443 for
https). An allowed host usually runs more than its web server, and a client
who may name any port on it could reach those services (an admin page on
8080, a cache on 11211) and probe which ports are open.

Nothing here touches the network: :class:`HttpTarget` says where to go, and
:mod:`streamchat.ingest.fetch` resolves and checks the address before connecting.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

import httpx

from ..errors import UrlNotAllowed
from .netguard import numeric_host

__all__ = [
    "AllowedDomain",
    "HttpTarget",
    "allowed_file",
    "check_http_url",
    "parse_allowed_domain",
    "redirect_target",
    "url_scheme",
]

MAX_URL_CHARS = 8192

_HTTP_SCHEMES = {"http": 80, "https": 443}
# Printable ASCII except space and backslash: what a URL may contain.
_URL_CHARS = re.compile(r"[!-\[\]-~]*")
_NETLOC = re.compile(
    r"(?:\[(?P<ipv6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9._-]+))(?::(?P<port>[0-9]{1,5}))?",
    re.IGNORECASE,
)
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_ALLOWED = re.compile(
    r"(?:\[(?P<ipv6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9._-]+))(?::(?P<port>[0-9]{1,5}))?"
)


@dataclass(frozen=True)
class HttpTarget:
    """An ``http``/``https`` URL that passed the checks, and where it leads."""

    url: httpx.URL
    """What is requested (without a fragment)."""
    host: str
    """The host as the HTTP client connects to it: lower case, IPv6 without brackets."""
    port: int
    """The port, defaults filled in."""


@dataclass(frozen=True)
class AllowedDomain:
    """One ``--fetch-allowed-domain`` entry: a host and its subdomains, on one port."""

    host: str
    """Lower case, no trailing dot, IPv6 without brackets."""
    port: int | None
    """The one port allowed; None: the URL scheme's default port only."""
    ip_literal: bool
    """An IP address, matched only as it is (it has no subdomains)."""

    def allows(self, host: str, port: int, scheme: str) -> bool:
        """Whether ``host`` (checked, lower case) is this domain or below it, on its port."""
        if port != (self.port if self.port is not None else _HTTP_SCHEMES[scheme]):
            return False
        host = host.rstrip(".")
        address = _ip_literal(host)
        if address is not None or self.ip_literal:  # as listed (2001:db8:0::1 is 2001:db8::1)
            return address == _ip_literal(self.host)
        return host == self.host or host.endswith("." + self.host)


def parse_allowed_domain(entry: str) -> AllowedDomain:
    """Read an allowlist entry: ``host``, ``host:port``, ``[ipv6]:port`` or a bare IPv6 address.

    Raises ``ValueError`` saying what is wrong; :func:`check_http_url` skips
    such an entry (it allows nothing), so a server should refuse it at start-up.
    """
    text = entry.strip().lower()
    if text.count(":") > 1 and not text.startswith("["):
        text = f"[{text}]"  # a bare IPv6 address, no port
    match = _ALLOWED.fullmatch(text)
    if match is None:
        raise ValueError(f"not a host or host:port: {entry!r}")
    port = int(match["port"]) if match["port"] is not None else None
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"port out of range: {entry!r}")
    if match["ipv6"] is not None:
        try:
            host = str(ipaddress.IPv6Address(match["ipv6"]))
        except ValueError:
            raise ValueError(f"not an IPv6 address: {entry!r}") from None
        return AllowedDomain(host=host, port=port, ip_literal=True)
    host = match["name"].rstrip(".")
    try:
        ip_literal = _check_name(host)
    except UrlNotAllowed as exc:
        raise ValueError(f"{exc.message}: {entry!r}") from None
    return AllowedDomain(host=host, port=port, ip_literal=ip_literal)


def url_scheme(url: str) -> str:
    """The scheme of ``url`` in lower case ('' for none), after the character checks."""
    _check_characters(url)
    return _split(url).scheme.lower()


def check_http_url(url: str, *, allowed_domains: Sequence[str] = ()) -> HttpTarget:
    """Parse ``url`` strictly; raise ``UrlNotAllowed`` unless it is a plain http(s) URL.

    With ``allowed_domains`` (see :func:`parse_allowed_domain`) the host must
    be one of them or a subdomain, on the entry's port. The address the host
    leads to is not checked here (see :func:`streamchat.ingest.netguard.resolve_allowed`).
    """
    _check_characters(url)
    parts = _split(url)
    scheme = parts.scheme.lower()
    if scheme not in _HTTP_SCHEMES:
        raise UrlNotAllowed(f"URL scheme {scheme or '(none)'!r} is not allowed: use http or https")
    if "@" in parts.netloc:
        raise UrlNotAllowed("URLs with a user name or password are not allowed")
    netloc = _NETLOC.fullmatch(parts.netloc)
    if netloc is None:
        raise UrlNotAllowed("the URL's host or port is not valid")
    if netloc["ipv6"] is not None:
        host = netloc["ipv6"].lower()
        _check_ipv6(host)
    else:
        host = netloc["name"].lower()
        _check_name(host)
    port = int(netloc["port"]) if netloc["port"] is not None else _HTTP_SCHEMES[scheme]
    if not 0 < port < 65536:
        raise UrlNotAllowed("the URL's port is out of range")
    parsed = _httpx_url(url)
    if (
        parsed.scheme != scheme
        or parsed.raw_host.decode("ascii") != host
        or (parsed.port or _HTTP_SCHEMES[scheme]) != port
        or parsed.userinfo
    ):
        raise UrlNotAllowed("the URL is ambiguous (parsers disagree about its host)")
    if allowed_domains and not _domain_allowed(host, port, scheme, allowed_domains):
        raise UrlNotAllowed(
            f"the host {host} port {port} is not among the domains this server fetches from"
        )
    return HttpTarget(url=parsed.copy_with(fragment=None), host=host, port=port)


def redirect_target(
    current: HttpTarget, location: str, *, allowed_domains: Sequence[str] = ()
) -> HttpTarget:
    """Where a redirect from ``current`` to ``location`` leads, checked like a client's URL.

    Only http(s) targets are followed: a web server never sends the fetch
    into ``file:`` or any other scheme.
    """
    _check_characters(location)
    try:
        joined = str(current.url.join(location))
    except (httpx.InvalidURL, ValueError):  # httpx's parser, and urllib's below it
        raise UrlNotAllowed("the redirect's URL is not valid") from None
    return check_http_url(joined, allowed_domains=allowed_domains)


def allowed_file(url: str, root: Path | None) -> Path:
    """The path a ``file:`` URL names, if it is below ``root`` once symlinks are resolved.

    ``..`` and percent-encoded ``%2e%2e`` are resolved before the check and
    symlinks are followed, so neither escapes ``root``; NUL bytes, relative
    paths and other hosts are refused.
    """
    if root is None:
        raise UrlNotAllowed("file: URLs are not enabled on this server")
    _check_characters(url)
    parts = _split(url)
    if parts.scheme.lower() != "file":
        raise UrlNotAllowed("not a file: URL")
    if parts.netloc.lower() not in ("", "localhost"):
        raise UrlNotAllowed("file: URLs must name a local path")
    if parts.query or parts.fragment:
        raise UrlNotAllowed("file: URLs take no query or fragment")
    try:
        path = unquote(parts.path, errors="strict")
    except UnicodeDecodeError:
        raise UrlNotAllowed("the file name is not valid UTF-8") from None
    if "\x00" in path or not path.startswith("/"):
        raise UrlNotAllowed("file: URLs must name an absolute path")
    try:
        resolved = Path(path).resolve()
        inside = resolved.is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        raise UrlNotAllowed("the file's path cannot be resolved (a symlink loop?)") from None
    if not inside:
        raise UrlNotAllowed("the file is outside the directory this server serves")
    return resolved


def _split(url: str) -> SplitResult:
    """``urlsplit``, whose own refusals (``[::ffff:127.1]``, an unclosed ``[``) are ours."""
    try:
        return urlsplit(url)
    except ValueError:
        raise UrlNotAllowed("the URL's host is not valid") from None


def _check_characters(url: str) -> None:
    if len(url) > MAX_URL_CHARS:
        raise UrlNotAllowed(f"the URL is longer than {MAX_URL_CHARS} characters")
    if not _URL_CHARS.fullmatch(url):
        raise UrlNotAllowed(
            "the URL contains whitespace, a control, non-ASCII or backslash character"
        )


def _check_ipv6(text: str) -> None:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        raise UrlNotAllowed("the URL's IPv6 address is not valid") from None


def _check_name(name: str) -> bool:
    """Refuse an invalid host name; True if ``name`` is a (canonical) IPv4 address."""
    if numeric_host(name) is not None:
        return True
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise UrlNotAllowed("the URL's host name is not valid")
    return False


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _httpx_url(url: str) -> httpx.URL:
    try:
        return httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        raise UrlNotAllowed("the URL is not valid") from None


def _domain_allowed(host: str, port: int, scheme: str, allowed: Sequence[str]) -> bool:
    """Whether an allowlist entry allows ``host`` on ``port`` (invalid entries allow nothing)."""
    for entry in allowed:
        try:
            domain = parse_allowed_domain(entry)
        except ValueError:
            continue
        if domain.allows(host, port, scheme):
            return True
    return False
