"""Which URLs a client may make the server fetch: strict parsing, pure functions.

A URL is checked once as a string, the way the HTTP client will read it, and
refused whenever two parsers could read it differently. ``urllib`` and httpx
disagree on backslashes (``http://a\\@127.0.0.1/``: GHSA-v359-jj2v-j536),
on user info, on signs in the port (``:+80``) and on non-ASCII dots
(``127。0。0。1``); so user info, backslashes, whitespace, control and
non-ASCII characters are refused outright, the host and port must match a
strict grammar, and ``urllib``'s and httpx's readings of scheme, host, port
and user info must agree. Numeric hosts go through
:func:`~streamchat.netguard.numeric_host`.

Nothing here touches the network: :class:`HttpTarget` says where to go, and
:mod:`streamchat.fetch` resolves and checks the address before connecting.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from .errors import UrlNotAllowed
from .netguard import numeric_host

__all__ = ["HttpTarget", "allowed_file", "check_http_url", "redirect_target", "url_scheme"]

MAX_URL_CHARS = 8192

_HTTP_SCHEMES = {"http": 80, "https": 443}
# Printable ASCII except space and backslash: what a URL may contain.
_URL_CHARS = re.compile(r"[!-\[\]-~]*")
_NETLOC = re.compile(
    r"(?:\[(?P<ipv6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9._-]+))(?::(?P<port>[0-9]{1,5}))?",
    re.IGNORECASE,
)
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")


@dataclass(frozen=True)
class HttpTarget:
    """An ``http``/``https`` URL that passed the checks, and where it leads."""

    url: httpx.URL
    """What is requested (without a fragment)."""
    host: str
    """The host as the HTTP client connects to it: lower case, IPv6 without brackets."""
    port: int
    """The port, defaults filled in."""


def url_scheme(url: str) -> str:
    """The scheme of ``url`` in lower case ('' for none), after the character checks."""
    _check_characters(url)
    return urlsplit(url).scheme.lower()


def check_http_url(url: str, *, allowed_domains: Sequence[str] = ()) -> HttpTarget:
    """Parse ``url`` strictly; raise ``UrlNotAllowed`` unless it is a plain http(s) URL.

    With ``allowed_domains`` the host must be one of them or a subdomain.
    The address the host leads to is not checked here (see
    :func:`streamchat.netguard.resolve_allowed`).
    """
    _check_characters(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _HTTP_SCHEMES:
        raise UrlNotAllowed(f"URL scheme {scheme or '(none)'!r} is not allowed: use http or https")
    if "@" in parts.netloc:
        raise UrlNotAllowed("URLs with a user name or password are not allowed")
    netloc = _NETLOC.fullmatch(parts.netloc)
    if netloc is None:
        raise UrlNotAllowed("the URL's host or port is not valid")
    ip_literal = netloc["ipv6"] is not None
    if ip_literal:
        host = netloc["ipv6"].lower()
        _check_ipv6(host)
    else:
        host = netloc["name"].lower()
        ip_literal = _check_name(host)
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
    if allowed_domains and not _domain_allowed(host, allowed_domains, ip_literal=ip_literal):
        raise UrlNotAllowed(f"the host {host} is not among the domains this server fetches from")
    return HttpTarget(url=parsed.copy_with(fragment=None), host=host, port=port)


def redirect_target(
    current: HttpTarget, location: str, *, allowed_domains: Sequence[str] = ()
) -> HttpTarget:
    """Where a redirect from ``current`` to ``location`` leads, checked like a client's URL.

    Only http(s) targets are followed: a web server never sends the fetch
    into ``file:`` or any other scheme.
    """
    _check_characters(location)
    joined = str(current.url.join(location))
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
    parts = urlsplit(url)
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
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise UrlNotAllowed("the file is outside the directory this server serves")
    return resolved


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


def _httpx_url(url: str) -> httpx.URL:
    try:
        return httpx.URL(url)
    except httpx.InvalidURL:
        raise UrlNotAllowed("the URL is not valid") from None


def _domain_allowed(host: str, allowed: Sequence[str], *, ip_literal: bool) -> bool:
    """Whether ``host`` is an allowed domain or below one (trailing dots ignored).

    An IP address is allowed only when listed as it is: it has no subdomains.
    """
    host = host.rstrip(".")
    for entry in allowed:
        domain = entry.strip().lower().rstrip(".")
        if domain == host or (domain and not ip_literal and host.endswith("." + domain)):
            return True
    return False
