"""Server-side request forgery: a corpus of URLs that must not be fetched, and what must be.

Every corpus URL goes through the real :func:`streamchat.ingest.fetch.fetch_into`
with private addresses refused (the default). DNS is scripted and every TCP
connection the fetcher asks for is recorded and delivered to a loopback
"canary" server (``ssrf_net``), so a URL counts as blocked only if the fetch
raised ``UrlNotAllowed``, dialled nothing it should not have (only the
pretend public first hop of a redirect), and the canary's ``/secret`` saw no
request. The count is printed: ``SSRF corpus: N of N blocked``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgpack
import pytest
from starlette.testclient import TestClient
from websockets.asyncio.client import connect

from streamchat.app import SESSION_PATH, create_app
from streamchat.config import Settings
from streamchat.engine.fake import FakeEngine
from streamchat.errors import UrlFetchFailed, UrlNotAllowed
from streamchat.ingest.feed import ByteFeed
from streamchat.ingest.fetch import fetch_into
from streamchat.ingest.netguard import address_refusal, resolve_allowed, system_resolver
from streamchat.ingest.urlpolicy import AllowedDomain, parse_allowed_domain
from tests.support.live import live_server, serve
from tests.support.media import encode_video
from tests.support.ssrf_net import PUBLIC, PUBLIC_2, SECRET_PATH, Canary, FakeDns, FakeInternet

DNS = {
    "video.example": [[PUBLIC]],
    "cdn.example": [[PUBLIC_2]],
    "flip.example": [[PUBLIC], ["127.0.0.1"]],  # rebinding: public once, then loopback
    "localhost": [["127.0.0.1", "::1"]],
    "rebind.example": [["127.0.0.1"]],
    "metadata.example": [["169.254.169.254"]],
    "internal.example": [["10.0.0.5"]],
    "v6loop.example": [["::1"]],
    "mapped.example": [["::ffff:127.0.0.1"]],
    "nat64.example": [["64:ff9b::a9fe:a9fe"]],
    "mixed.example": [[PUBLIC, "127.0.0.1"]],
    "zero.example": [["0.0.0.0"]],
    "cgnat.example": [["100.100.100.200"]],
    "ula.example": [["fd12:3456::1"]],
    "scoped.example": [["fe80::1%eth0"]],
    "sixtofour.example": [["2002:a00:1::1"]],
}


def direct_cases(port: int, media: Path) -> list[tuple[str, str]]:
    """``(what, url)``: URLs refused before anything is dialled."""
    p = port
    ipv4 = [
        ("loopback", f"http://127.0.0.1:{p}/secret"),
        ("loopback, decimal", f"http://2130706433:{p}/secret"),
        ("loopback, hex", f"http://0x7f000001:{p}/secret"),
        ("loopback, hex short", f"http://0x7f.1:{p}/secret"),
        ("loopback, hex dotted", f"http://0x7f.0x0.0x0.0x1:{p}/secret"),
        ("loopback, octal", f"http://0177.0.0.1:{p}/secret"),
        ("loopback, octal short", f"http://0177.1:{p}/secret"),
        ("loopback, octal whole", f"http://017700000001:{p}/secret"),
        ("loopback, short", f"http://127.1:{p}/secret"),
        ("loopback, three parts", f"http://127.0.1:{p}/secret"),
        ("loopback, zero padded", f"http://127.000.000.001:{p}/secret"),
        ("loopback, trailing dot", f"http://127.0.0.1.:{p}/secret"),
        ("loopback, other", f"http://127.127.127.127:{p}/secret"),
        ("unspecified", f"http://0.0.0.0:{p}/secret"),
        ("unspecified, short", f"http://0:{p}/secret"),
        ("this network", "http://0.1.2.3/"),
        ("private 10/8", "http://10.0.0.1/"),
        ("private 10/8, octal", "http://012.0.0.1/"),
        ("private 10/8, decimal", "http://167772161/"),
        ("private 172.16/12", "http://172.16.0.1/"),
        ("private 172.16/12, top", "http://172.31.255.255/"),
        ("private 192.168/16", "http://192.168.0.1/"),
        ("private 192.168/16, hex", "http://0xc0.0xa8.0.1/"),
        ("private 192.168/16, decimal", "http://3232235521/"),
        ("metadata", "http://169.254.169.254/latest/meta-data/"),
        ("metadata, hex", "http://0xa9.0xfe.0xa9.0xfe/latest/meta-data/"),
        ("metadata, hex whole", "http://0xa9fea9fe/latest/meta-data/"),
        ("metadata, decimal", "http://2852039166/latest/meta-data/"),
        ("metadata, octal", "http://0251.0376.0251.0376/latest/meta-data/"),
        ("metadata, three parts", "http://169.254.43518/latest/meta-data/"),
        ("CGNAT", "http://100.64.0.1/"),
        ("CGNAT, Alibaba metadata", "http://100.100.100.200/latest/meta-data/"),
        ("benchmarking", "http://198.18.0.1/"),
        ("IETF protocol assignments", "http://192.0.0.8/"),
        ("documentation", "http://192.0.2.1/"),
        ("multicast", "http://224.0.0.1/"),
        ("multicast, SSDP", "http://239.255.255.250:1900/"),
        ("reserved", "http://240.0.0.1/"),
        ("broadcast", "http://255.255.255.255/"),
        ("not an address: five parts", "http://127.0.0.0.1/"),
        ("not an address: 08", "http://08.0.0.1/"),
        ("not an address: too big", "http://4294967296/"),
    ]
    ipv6 = [
        ("IPv6 loopback", f"http://[::1]:{p}/secret"),
        ("IPv6 loopback, long", f"http://[0:0:0:0:0:0:0:1]:{p}/secret"),
        ("IPv6 unspecified", f"http://[::]:{p}/secret"),
        ("IPv6 link-local", "http://[fe80::1]/"),
        ("IPv6 link-local, zone", "http://[fe80::1%25eth0]/"),
        ("IPv6 unique local", "http://[fc00::1]/"),
        ("IPv6 AWS metadata", "http://[fd00:ec2::254]/latest/meta-data/"),
        ("IPv6 site-local", "http://[fec0::1]/"),
        ("IPv6 multicast", "http://[ff02::1]/"),
        ("IPv6 documentation", "http://[2001:db8::1]/"),
        ("IPv6 discard-only", "http://[100::1]/"),
        ("IPv4-mapped loopback", f"http://[::ffff:127.0.0.1]:{p}/secret"),
        ("IPv4-mapped loopback, hex", f"http://[::ffff:7f00:1]:{p}/secret"),
        ("IPv4-mapped loopback, short", "http://[::ffff:127.1]/"),
        ("IPv4-mapped loopback, short, port", f"http://[::ffff:127.1]:{p}/secret"),
        ("IPv4-mapped metadata", "http://[::ffff:a9fe:a9fe]/latest/meta-data/"),
        ("IPv4-mapped private", "http://[::ffff:10.0.0.1]/"),
        ("IPv4-translated loopback", "http://[::ffff:0:7f00:1]/"),
        ("IPv4-compatible loopback", "http://[::127.0.0.1]/"),
        ("IPv4-compatible loopback, hex", "http://[::7f00:1]/"),
        ("IPv4-compatible public", "http://[::808:808]/"),
        ("NAT64 loopback", "http://[64:ff9b::7f00:1]/"),
        ("NAT64 loopback, dotted", "http://[64:ff9b::127.0.0.1]/"),
        ("NAT64 metadata", "http://[64:ff9b::a9fe:a9fe]/"),
        ("NAT64 local-use", "http://[64:ff9b:1::a00:1]/"),
        ("6to4 loopback", "http://[2002:7f00:1::1]/"),
        ("6to4 metadata", "http://[2002:a9fe:a9fe::1]/"),
        ("Teredo", "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/"),
    ]
    syntax = [
        (
            "backslash before @ (GHSA-v359-jj2v-j536)",
            f"http://video.example\\@127.0.0.1:{p}/secret",
        ),
        ("backslash after port", f"http://127.0.0.1:{p}\\@video.example/secret"),
        ("backslash as slash", "http:\\\\127.0.0.1/secret"),
        ("backslash, mixed", "http:/\\127.0.0.1/secret"),
        ("user info", f"http://video.example@127.0.0.1:{p}/secret"),
        ("user info with port", f"http://video.example:80@127.0.0.1:{p}/secret"),
        ("user info and password", "http://user:pass@video.example/clip"),
        ("user info, two @", f"http://a@video.example@127.0.0.1:{p}/secret"),
        ("user info, encoded slash", f"http://127.0.0.1:{p}%2f@video.example/secret"),
        ("IPv6 then user info", f"http://[::1]:{p}@video.example/secret"),
        ("fragment before @", f"http://127.0.0.1:{p}#@video.example/secret"),
        ("query before @", f"http://127.0.0.1:{p}?@video.example/secret"),
        ("tab in host", f"http://127.0.0.1\t:{p}/secret"),
        ("newline in host", "http://video.example\n@127.0.0.1/secret"),
        ("CRLF in host", "http://video.example\r\n.127.0.0.1/secret"),
        ("space in host", "http://127.0.0.1 /secret"),
        ("leading space", " http://127.0.0.1/secret"),
        ("NUL in path", "http://video.example/clip\x00"),
        ("ideographic full stops", "http://127\u30020\u30020\u30021/secret"),
        ("fullwidth digit", "http://127.0.0.\uff11/secret"),
        ("enclosed digits", "http://\u2460\u2461\u2466.0.0.1/secret"),
        ("enclosed letters", "http://\u24db\u24de\u24d2\u24d0\u24db\u24d7\u24de\u24e2\u24e3/"),
        ("percent-encoded host", "http://%31%32%37.0.0.1/secret"),
        ("percent-encoded dots", "http://127%2e0%2e0%2e1/secret"),
        ("sign in port", f"http://127.0.0.1:+{p}/secret"),
        ("two ports", f"http://video.example:80:{p}/secret"),
        ("port out of range", "http://video.example:65536/"),
        ("no host, three slashes", "http:///127.0.0.1/secret"),
        ("no host, no slashes", "http:127.0.0.1/secret"),
        ("no host, one slash", "http:/127.0.0.1/secret"),
        ("upper-case scheme", f"HTTP://127.0.0.1:{p}/secret"),
    ]
    names = [
        ("localhost", f"http://localhost:{p}/secret"),
        ("localhost, upper case", f"http://LOCALHOST:{p}/secret"),
        ("localhost, trailing dot", f"http://localhost.:{p}/secret"),
        ("name -> loopback", f"http://rebind.example:{p}/secret"),
        ("name -> loopback, trailing dot", f"http://rebind.example.:{p}/secret"),
        ("name -> metadata", "http://metadata.example/latest/meta-data/"),
        ("name -> private", "http://internal.example/"),
        ("name -> IPv6 loopback", "http://v6loop.example/"),
        ("name -> IPv4-mapped loopback", "http://mapped.example/"),
        ("name -> NAT64 metadata", "http://nat64.example/"),
        ("name -> public and loopback", "http://mixed.example/"),
        ("name -> unspecified", "http://zero.example/"),
        ("name -> CGNAT", "http://cgnat.example/"),
        ("name -> unique local", "http://ula.example/"),
        ("name -> scoped link-local", "http://scoped.example/"),
        ("name -> 6to4 private", "http://sixtofour.example/"),
    ]
    schemes = [
        ("file outside", "file:///etc/passwd"),
        ("gopher", f"gopher://127.0.0.1:{p}/_GET%20/secret"),
        ("ftp", "ftp://127.0.0.1/clip.ts"),
        ("data", "data:video/webm;base64,GkXfow=="),
        ("jar", "jar:http://video.example/a.jar!/clip"),
        ("dict", "dict://127.0.0.1:11211/stat"),
        ("ldap", "ldap://127.0.0.1/"),
        ("tftp", "tftp://127.0.0.1/clip"),
        ("sftp", "sftp://127.0.0.1/clip"),
        ("ws", f"ws://127.0.0.1:{p}/secret"),
        ("wss", "wss://video.example/"),
        ("netdoc", "netdoc:///etc/passwd"),
        ("rtsp", "rtsp://127.0.0.1/stream"),
        ("rtmp", "rtmp://127.0.0.1/live"),
        ("udp", "udp://127.0.0.1:1234"),
        ("tcp", f"tcp://127.0.0.1:{p}"),
        ("http+unix", "http+unix://%2Frun%2Fdocker.sock/info"),
        ("FFmpeg concat", "concat:http://video.example/a|http://video.example/b"),
        ("FFmpeg pipe", "pipe:0"),
        ("unix", "unix:/run/docker.sock"),
        ("javascript", "javascript:alert(1)"),
        ("blob", "blob:http://video.example/x"),
        ("view-source", "view-source:http://127.0.0.1/"),
        ("scheme-relative", f"//127.0.0.1:{p}/secret"),
        ("no scheme", f"127.0.0.1:{p}/secret"),
        ("bare path", "/etc/passwd"),
    ]
    m = media.as_uri()
    files = [
        ("file: ..", f"{m}/../secret.ts"),
        ("file: %2e%2e", f"{m}/%2e%2e/secret.ts"),
        ("file: %2E%2E%2F", f"{m}/%2E%2E%2Fsecret.ts"),
        ("file: ..%2f", f"{m}/..%2fsecret.ts"),
        ("file: deep ..", f"{m}/a/b/../../../secret.ts"),
        ("file: symlink to a file outside", f"{m}/escape.ts"),
        ("file: symlink to a directory outside", f"{m}/outside/secret.ts"),
        ("file: symlink to /etc/passwd", f"{m}/passwd"),
        ("file: sibling with the same prefix", f"{m}-private/secret.ts"),
        ("file: localhost and ..", f"file://localhost{media}/../secret.ts"),
        ("file: another host", f"file://otherhost{media}/clip.ts"),
        ("file: no slashes and ..", f"file:{media}/../secret.ts"),
        ("file: relative path", "file:clip.ts"),
        ("file: NUL", f"{m}/clip.ts%00.txt"),
        ("file: backslash", f"{m}/..\\secret.ts"),
        ("file: upper-case scheme and ..", f"FILE://{media}/../secret.ts"),
        ("file: a FIFO inside", f"{m}/fifo"),
        ("file: query", f"{m}/clip.ts?x=1"),
        ("file: symlink to itself", f"{m}/loop"),
        ("file: symlink cycle", f"{m}/cycle-a"),
        ("file: below a symlink cycle", f"{m}/cycle-a/clip.ts"),
    ]
    return ipv4 + ipv6 + syntax + names + schemes + files


def redirect_cases(port: int, media: Path) -> list[tuple[str, str, int]]:
    """``(what, url, dials)``: an allowed public first hop that redirects inward."""
    p = port
    targets = [
        ("to loopback", f"http://127.0.0.1:{p}/secret"),
        ("to localhost", f"http://localhost:{p}/secret"),
        ("to IPv6 loopback", f"http://[::1]:{p}/secret"),
        ("to decimal loopback", f"http://2130706433:{p}/secret"),
        ("to hex short loopback", f"http://0x7f.1:{p}/secret"),
        ("to octal loopback", "http://0177.0.0.1/"),
        ("to octal loopback, port", f"http://0177.0.0.1:{p}/secret"),
        ("to IPv4-mapped short loopback", "http://[::ffff:127.1]/"),
        ("to an unclosed IPv6 bracket", f"http://[::1:{p}/secret"),
        ("to metadata", "http://169.254.169.254/latest/meta-data/"),
        ("to IPv4-mapped loopback", f"http://[::ffff:127.0.0.1]:{p}/secret"),
        ("to a name -> loopback", f"http://rebind.example:{p}/secret"),
        ("to a name -> metadata", "http://metadata.example/secret"),
        ("scheme-relative to loopback", f"//127.0.0.1:{p}/secret"),
        ("backslashes to loopback", "/\\127.0.0.1/secret"),
        ("to user info @ loopback", f"http://video.example:80@127.0.0.1:{p}/secret"),
        ("backslash @ loopback", f"http://video.example\\@127.0.0.1:{p}/secret"),
        ("to file outside", "file:///etc/passwd"),
        ("to file inside the allowed directory", f"{media.as_uri()}/clip.ts"),
        ("to gopher", f"gopher://127.0.0.1:{p}/_GET%20/secret"),
        ("to data", "data:text/plain,secret"),
    ]
    cases = [
        (f"redirect {what}", f"http://video.example/redirect?to={quote(to, safe='')}", 1)
        for what, to in targets
    ]
    inner = f"http://video.example/redirect?to={quote(f'http://127.0.0.1:{p}/secret', safe='')}"
    cases.append(
        ("second redirect to loopback", f"http://video.example/redirect?to={quote(inner)}", 2)
    )
    flip = f"http://flip.example/redirect?to={quote('http://flip.example/secret', safe='')}"
    cases.append(("redirect to a name that now resolves to loopback", flip, 1))
    return cases


@pytest.fixture
async def canary() -> AsyncIterator[tuple[Canary, int]]:
    app = Canary()
    async with serve(app, lifespan="off") as base:
        yield app, int(base.rsplit(":", 1)[1])


@pytest.fixture
def media(tmp_path: Path) -> Path:
    """The allowed directory, with escape hatches planted in it."""
    root = tmp_path / "media"
    root.mkdir()
    (root / "clip.ts").write_bytes(b"inside")
    (tmp_path / "secret.ts").write_bytes(b"outside")
    (tmp_path / "media-private").mkdir()
    (tmp_path / "media-private" / "secret.ts").write_bytes(b"outside")
    (root / "escape.ts").symlink_to(tmp_path / "secret.ts")
    (root / "outside").symlink_to(tmp_path)
    (root / "passwd").symlink_to("/etc/passwd")
    (root / "loop").symlink_to(root / "loop")
    (root / "cycle-a").symlink_to(root / "cycle-b")
    (root / "cycle-b").symlink_to(root / "cycle-a")
    os.mkfifo(root / "fifo")
    return root


def new_feed() -> ByteFeed:
    return ByteFeed(max_bytes=16 * 1024 * 1024, read_timeout=5.0)


async def test_ssrf_corpus_is_blocked(
    canary: tuple[Canary, int], media: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every corpus URL is refused with url_not_allowed before it reaches anything inward."""
    server, port = canary
    settings = Settings(allowed_file_dir=media, fetch_timeout=5.0)
    cases = [(what, url, 0) for what, url in direct_cases(port, media)]
    cases += redirect_cases(port, media)
    escaped = []
    for what, url, dials in cases:
        internet = FakeInternet(port)
        feed = new_feed()
        try:
            await fetch_into(url, feed, settings, resolver=FakeDns(DNS), network=internet)
            outcome = "fetched"
        except UrlNotAllowed:
            outcome = "blocked"
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        public = [d for d in internet.dials if d[0] == PUBLIC]
        leaked = feed.bytes_received
        if outcome != "blocked" or internet.dials != public or len(public) != dials or leaked:
            escaped.append(f"{what}: {url!r} -> {outcome}, dialled {internet.dials}, {leaked} B")
    blocked = len(cases) - len(escaped)
    with capsys.disabled():
        print(f"\nSSRF corpus: {blocked} of {len(cases)} blocked")
    assert not escaped, "\n".join(escaped)
    assert server.hits(SECRET_PATH) == 0
    assert len(cases) >= 150


def test_endpoint_refuses_and_the_session_goes_on(tmp_path: Path) -> None:
    """``video.url`` to an inward URL is a non-fatal url_not_allowed; then a file still plays."""
    media = tmp_path / "media"
    media.mkdir()
    clip = media / "clip.ts"
    clip.write_bytes(encode_video(container="mpegts", codec="h264", seconds=2.0))
    settings = Settings(allowed_file_dir=media)
    with (
        TestClient(create_app(settings, engine=FakeEngine())) as client,
        client.websocket_connect(SESSION_PATH) as ws,
    ):
        ws.send_bytes(msgpack.packb({"type": "hello"}))
        assert msgpack.unpackb(ws.receive_bytes())["type"] == "ready"
        for url in ("http://127.0.0.1:9/x", "http://0x7f.1/", "http://[::ffff:7f00:1]/"):
            errors, status = _play_url(ws, url)
            assert [(e["code"], e["fatal"]) for e in errors] == [("url_not_allowed", False)]
            assert (status["state"], status["bytes_received"]) == ("failed", 0)
        errors, status = _play_url(ws, clip.as_uri())
    assert errors == []
    assert (status["state"], status["frames"]) == ("ended", 4)


def _play_url(ws: Any, url: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Send ``video.url``; the errors until the source ended, and the status that ended it."""
    ws.send_bytes(msgpack.packb({"type": "video.url", "url": url}))
    errors = []
    while True:
        message: dict[str, Any] = msgpack.unpackb(ws.receive_bytes())
        if message["type"] == "error":
            errors.append(message)
        elif message.get("state") in ("ended", "failed"):
            return errors, message


async def test_the_checked_address_is_the_one_connected(canary: tuple[Canary, int]) -> None:
    """DNS answering public, then loopback: the fetch connects to the public answer only, once
    resolved, keeping the URL's host name in the Host header."""
    server, port = canary
    dns = FakeDns({"video.example": [[PUBLIC], ["127.0.0.1"], ["127.0.0.1"]]})
    internet = FakeInternet(port)
    feed = new_feed()
    await fetch_into("http://video.example/clip", feed, Settings(), resolver=dns, network=internet)
    assert feed.read() == server.body
    assert internet.dials == [(PUBLIC, 80)]
    assert dns.queries == ["video.example"]
    assert server.requests == [("video.example", "/clip")]


async def test_the_next_checked_address_when_the_first_is_down(
    canary: tuple[Canary, int],
) -> None:
    """A name with two public addresses: the second is tried when the first refuses."""
    server, port = canary
    dns = FakeDns({"video.example": [[PUBLIC_2, PUBLIC]]})
    internet = FakeInternet(port, down=[PUBLIC_2])
    feed = new_feed()
    await fetch_into("http://video.example/clip", feed, Settings(), resolver=dns, network=internet)
    assert feed.read() == server.body
    assert internet.dials == [(PUBLIC_2, 80), (PUBLIC, 80)]
    with pytest.raises(UrlFetchFailed, match="connection failed"):
        await fetch_into(
            "http://video.example/clip",
            new_feed(),
            Settings(),
            resolver=dns,
            network=FakeInternet(port, down=[PUBLIC, PUBLIC_2]),
        )


async def test_allowed_redirects_are_followed_and_each_hop_pinned(
    canary: tuple[Canary, int],
) -> None:
    """A redirect to another public name is followed; each hop goes to its own checked address."""
    server, port = canary
    internet = FakeInternet(port)
    feed = new_feed()
    url = f"http://video.example/redirect?to={quote('http://cdn.example/clip', safe='')}"
    await fetch_into(url, feed, Settings(), resolver=FakeDns(DNS), network=internet)
    assert feed.read() == server.body
    assert internet.dials == [(PUBLIC, 80), (PUBLIC_2, 80)]
    assert server.requests == [("video.example", "/redirect"), ("cdn.example", "/clip")]


async def test_redirect_limit(canary: tuple[Canary, int]) -> None:
    """A redirect loop stops after ``fetch_max_redirects`` hops with url_fetch_failed."""
    _, port = canary
    internet = FakeInternet(port)
    loop_url = "http://video.example/redirect?to=%2Fredirect%3Fto%3D%252Fclip"
    settings = Settings(fetch_max_redirects=1)
    with pytest.raises(UrlFetchFailed, match="more than 1 redirect"):
        await fetch_into(loop_url, new_feed(), settings, resolver=FakeDns(DNS), network=internet)
    assert len(internet.dials) == 2
    feed = new_feed()
    await fetch_into(
        loop_url, feed, Settings(fetch_max_redirects=2), resolver=FakeDns(DNS), network=internet
    )
    assert feed.read()


async def test_domain_allowlist(canary: tuple[Canary, int]) -> None:
    """Only listed domains and their subdomains are fetched, at every hop."""
    server, port = canary
    settings = Settings(fetch_allowed_domains=("Example.",))
    dns = FakeDns({"video.example": [[PUBLIC]], "example": [[PUBLIC]], "notexample": [[PUBLIC]]})
    for url in ("http://video.example/clip", "http://example/clip"):
        feed = new_feed()
        await fetch_into(url, feed, settings, resolver=dns, network=FakeInternet(port))
        assert feed.read() == server.body
    only_cdn = Settings(fetch_allowed_domains=("cdn.example",))
    hop = f"http://cdn.example/redirect?to={quote('http://video.example/clip', safe='')}"
    for url, rules in [
        ("http://notexample/clip", settings),
        ("http://video.example.evil/clip", settings),
        ("http://93.184.215.14/clip", settings),
        (hop, only_cdn),
    ]:
        internet = FakeInternet(port)
        with pytest.raises(UrlNotAllowed):
            await fetch_into(url, new_feed(), rules, resolver=FakeDns(DNS), network=internet)
        assert internet.dials == ([(PUBLIC_2, 80)] if url == hop else [])


async def test_private_addresses_when_allowed(canary: tuple[Canary, int]) -> None:
    """With ``fetch_allow_private`` a loopback URL is fetched over the real network."""
    server, port = canary
    feed = new_feed()
    await fetch_into(f"http://127.0.0.1:{port}/clip", feed, Settings(fetch_allow_private=True))
    assert feed.read() == server.body
    with pytest.raises(UrlNotAllowed):
        await fetch_into(
            f"http://0x7f.1:{port}/clip", new_feed(), Settings(fetch_allow_private=True)
        )


async def test_system_resolver_and_localhost() -> None:
    """The default resolver's answer for localhost is refused (and allowed when private is)."""
    with pytest.raises(UrlNotAllowed, match="loopback"):
        await resolve_allowed("localhost", 80, resolver=system_resolver, allow_private=False)
    addresses = await resolve_allowed("localhost", 80, resolver=system_resolver, allow_private=True)
    assert addresses and all(a.is_loopback for a in addresses)


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "93.184.215.14", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"],
)
def test_global_addresses_pass(address: str) -> None:
    """The policy is not 'refuse everything': global unicast addresses and their carriers pass."""
    assert address_refusal(ipaddress.ip_address(address)) is None


async def test_slow_drip_hits_the_total_deadline(canary: tuple[Canary, int]) -> None:
    """A byte every 50 ms never trips a per-read timeout, but the total budget ends the fetch."""
    _, port = canary
    settings = Settings(fetch_timeout=0.5)
    with pytest.raises(UrlFetchFailed, match="in total"):
        await fetch_into(
            "http://video.example/drip?n=200&every=0.05",
            new_feed(),
            settings,
            resolver=FakeDns(DNS),
            network=FakeInternet(port),
        )


async def test_waiting_for_the_decoder_is_not_the_servers_time(canary: tuple[Canary, int]) -> None:
    """A feed kept full for longer than ``fetch_timeout`` does not fail a fast server's fetch."""
    server, port = canary
    server.body = os.urandom(1024 * 1024)
    feed = ByteFeed(max_bytes=64 * 1024, read_timeout=5.0)
    fetching = asyncio.create_task(
        fetch_into(
            "http://video.example/clip",
            feed,
            Settings(fetch_timeout=0.3),
            resolver=FakeDns(DNS),
            network=FakeInternet(port),
        )
    )
    await asyncio.sleep(0.8)  # the decoder is "behind": this time must not count
    assert feed.backlog_bytes == feed.max_bytes and not fetching.done()  # blocked on the feed
    received = bytearray()
    while chunk := await asyncio.to_thread(feed.read):
        received += chunk
    await fetching
    assert bytes(received) == server.body


async def test_size_limit_and_compressed_bodies(canary: tuple[Canary, int]) -> None:
    """Bodies over ``fetch_max_bytes`` and compressed bodies are url_fetch_failed."""
    _, port = canary
    for path, settings in [("/clip", Settings(fetch_max_bytes=1000)), ("/gzip", Settings())]:
        with pytest.raises(UrlFetchFailed):
            await fetch_into(
                f"http://video.example{path}",
                new_feed(),
                settings,
                resolver=FakeDns(DNS),
                network=FakeInternet(port),
            )


async def test_a_range_answer_with_an_absurd_size_is_url_fetch_failed() -> None:
    """A 206 whose Content-Range claims a 5,000-digit size (past what int() reads) ends the
    fetch of an MP4 with its index at the end as url_fetch_failed, not an untyped error."""
    clip = encode_video(container="mp4-plain", codec="h264", seconds=1.0)
    index = clip.index(b"moov") - 4
    # A free box between media and index makes the file longer than the fetcher's first read.
    padding = 512 * 1024
    body = clip[:index] + padding.to_bytes(4, "big") + b"free" + bytes(padding - 8) + clip[index:]
    ranges: list[str] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        asked = [line for line in head.split("\r\n") if line.startswith("range:")]
        status, chunk = "200 OK", body
        if asked:
            ranges.append(asked[0])
            start = int(asked[0].split("=")[1].split("-")[0])
            size = "9" * 5000
            status = f"206 Partial Content\r\nContent-Range: bytes {start}-{len(body) - 1}/{size}"
            chunk = body[start:]
        writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {len(chunk)}\r\n\r\n".encode() + chunk)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(UrlFetchFailed, match="range request"):
            await fetch_into(
                f"http://127.0.0.1:{port}/clip.mp4",
                new_feed(),
                Settings(fetch_allow_private=True, fetch_timeout=10.0),
            )
    assert ranges  # the index was asked for by range


async def test_tls_names_the_url_host_while_connecting_to_the_pinned_address() -> None:
    """The TLS ClientHello sent to the checked address carries the URL's host name (SNI)."""
    hello = bytearray()

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello.extend(await reader.read(4096))
        writer.close()

    tls = await asyncio.start_server(record, "127.0.0.1", 0)
    internet = FakeInternet(tls.sockets[0].getsockname()[1])
    async with tls:
        with pytest.raises(UrlFetchFailed):
            await fetch_into(
                "https://video.example/clip",
                new_feed(),
                Settings(),
                resolver=FakeDns(DNS),
                network=internet,
            )
    assert internet.dials == [(PUBLIC, 443)]
    assert hello[:1] == b"\x16" and b"video.example" in hello  # a handshake record, SNI inside


async def test_logs_name_the_host_not_the_query(
    canary: tuple[Canary, int], caplog: pytest.LogCaptureFixture
) -> None:
    """A token in the query string never reaches the logs, at any level, from any logger."""
    _, port = canary
    caplog.set_level(logging.DEBUG)
    hop = quote("http://cdn.example/clip?token=SECRET-2", safe="")
    for url in (
        "http://video.example/clip?token=SECRET-1",
        f"http://video.example/redirect?to={hop}&token=SECRET-3",
    ):
        await fetch_into(
            url, new_feed(), Settings(), resolver=FakeDns(DNS), network=FakeInternet(port)
        )
    with pytest.raises(UrlNotAllowed):
        await fetch_into("http://127.0.0.1/?token=SECRET-4", new_feed(), Settings())
    with pytest.raises(UrlFetchFailed):
        await fetch_into(
            "http://nowhere.example/?token=SECRET-5", new_feed(), Settings(), resolver=FakeDns(DNS)
        )
    assert "video.example" in caplog.text and "cdn.example" in caplog.text
    assert "SECRET" not in caplog.text


async def _refusals(url: str, urls: list[str]) -> list[tuple[list[tuple[str, bool]], str]]:
    """Each of ``urls`` as ``video.url`` in one session: ``(errors, final state)`` for each."""
    outcomes = []
    async with asyncio.timeout(60), connect(url, compression=None) as ws:  # a hang, not a timing
        await ws.send(msgpack.packb({"type": "hello"}))
        assert msgpack.unpackb(await ws.recv())["type"] == "ready"
        for video in urls:
            await ws.send(msgpack.packb({"type": "video.url", "url": video}))
            errors = []
            while True:
                message: dict[str, Any] = msgpack.unpackb(await ws.recv())
                if message["type"] == "error":
                    errors.append((message["code"], message["fatal"]))
                elif message.get("state") in ("ended", "failed"):
                    outcomes.append((errors, message["state"]))
                    break
    return outcomes


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Records at ERROR or above, or carrying a traceback, from any logger."""
    return [
        f"{r.name} {r.levelname}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR or r.exc_info or r.exc_text
    ]


async def test_every_refusal_reaches_the_client_typed_without_a_traceback(
    canary: tuple[Canary, int], media: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Refusals by parser, redirect target, symlink loop, address and failed opens are
    url_not_allowed or url_fetch_failed to the client, with no ERROR or traceback logged."""
    _, port = canary
    caplog.set_level(logging.INFO)
    (media / "dangling").symlink_to(media / "missing")
    octal = quote("http://0177.0.0.1/", safe="")
    redirect = f"http://127.0.0.1:{port}/redirect?to="
    cases = [
        ("http://[::ffff:127.1]/", "url_not_allowed"),
        (f"{redirect}{octal}", "url_not_allowed"),
        (f"{redirect}{quote('http://[::ffff:127.1]/', safe='')}", "url_not_allowed"),
        (f"{media.as_uri()}/loop", "url_not_allowed"),
        (f"{media.as_uri()}/cycle-a", "url_not_allowed"),
        (f"{media.as_uri()}/dangling", "url_fetch_failed"),
        (f"{media.as_uri()}/{'n' * 300}.ts", "url_fetch_failed"),  # ENAMETOOLONG
        (f"{media.as_uri()}/outside", "url_not_allowed"),  # a directory
    ]
    settings = Settings(allowed_file_dir=media, fetch_allow_private=True, fetch_timeout=5.0)
    async with live_server(settings) as live:
        outcomes = await _refusals(live.url, [url for url, _ in cases])
    strict = Settings()  # the default policy: loopback is refused by address
    async with live_server(strict) as live:
        outcomes += await _refusals(live.url, [f"http://127.0.0.1:{port}/secret"])
    cases.append((f"http://127.0.0.1:{port}/secret", "url_not_allowed"))
    assert outcomes == [([(code, False)], "failed") for _, code in cases]
    assert _tracebacks(caplog) == []


async def test_an_unforeseen_fetch_failure_is_typed_and_logged_without_the_url(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in the fetcher still reaches the client as url_fetch_failed, and the log gets one
    WARNING naming the exception's class: no traceback, nothing of the URL."""

    async def broken(url: str, *args: object, **kwargs: object) -> None:
        raise KeyError(url)  # a message quoting the URL, token and all

    monkeypatch.setattr("streamchat.session.fetch_into", broken)
    caplog.set_level(logging.DEBUG)
    async with live_server(Settings()) as live:
        outcomes = await _refusals(live.url, ["http://video.example/clip?token=SECRET"])
    assert outcomes == [([("url_fetch_failed", False)], "failed")]
    assert _tracebacks(caplog) == []
    assert "KeyError" in caplog.text and "SECRET" not in caplog.text


async def test_allowed_domains_name_their_ports(canary: tuple[Canary, int]) -> None:
    """An entry without a port allows only the scheme's default port; ``host:port`` only that
    port; subdomains and IP entries alike, at every hop."""
    server, port = canary
    public_v6 = "2606:4700::1111"
    dns = {"video.example": [[PUBLIC]], "cdn.video.example": [[PUBLIC_2]]}
    to_cache = quote("http://video.example:11211/stats", safe="")
    cases: list[tuple[tuple[str, ...], str, list[tuple[str, int]] | None]] = [
        # (allowlist, URL, the dials of a fetch that succeeds; None: refused before dialling)
        (("video.example",), "http://video.example/clip", [(PUBLIC, 80)]),
        (("video.example",), "http://video.example:8080/clip", None),
        (("video.example",), "http://video.example:443/clip", None),
        (("video.example",), "https://video.example:80/clip", None),
        (("video.example",), "http://video.example:11211/stats", None),
        (("video.example:8080",), "http://video.example:8080/clip", [(PUBLIC, 8080)]),
        (("video.example:8080",), "http://video.example/clip", None),
        (("VIDEO.example.:8080",), "http://cdn.video.example:8080/clip", [(PUBLIC_2, 8080)]),
        (
            ("video.example", "video.example:8080"),
            "http://video.example:8080/clip",
            [(PUBLIC, 8080)],
        ),
        ((f"{PUBLIC}:8080",), f"http://{PUBLIC}:8080/clip", [(PUBLIC, 8080)]),
        ((f"{PUBLIC}:8080",), f"http://{PUBLIC}/clip", None),
        ((f"[{public_v6}]:8080",), "http://[2606:4700:0::1111]:8080/clip", [(public_v6, 8080)]),
        ((public_v6,), f"http://[{public_v6}]/clip", [(public_v6, 80)]),
        ((public_v6,), f"http://[{public_v6}]:8080/clip", None),
        (("video.example:http",), "http://video.example/clip", None),  # invalid: allows nothing
    ]
    for allowed, url, dials in cases:
        settings = Settings(fetch_allowed_domains=allowed)
        internet = FakeInternet(port)
        feed = new_feed()
        fetch = fetch_into(url, feed, settings, resolver=FakeDns(dns), network=internet)
        if dials is None:
            with pytest.raises(UrlNotAllowed, match="not among the domains"):
                await fetch
        else:
            await fetch
            assert feed.read() == server.body, url
        assert internet.dials == (dials or []), (allowed, url)
    # Every hop: an allowed first hop redirecting to another port of the same host.
    internet = FakeInternet(port)
    with pytest.raises(UrlNotAllowed, match="port 11211"):
        await fetch_into(
            f"http://video.example/redirect?to={to_cache}",
            new_feed(),
            Settings(fetch_allowed_domains=("video.example",)),
            resolver=FakeDns(dns),
            network=internet,
        )
    assert internet.dials == [(PUBLIC, 80)]
    assert server.hits("/stats") == 0


@pytest.mark.parametrize(
    ("entry", "parsed"),
    [
        ("Example.COM.", AllowedDomain(host="example.com", port=None, ip_literal=False)),
        ("example.com:443", AllowedDomain(host="example.com", port=443, ip_literal=False)),
        ("93.184.215.14:8080", AllowedDomain(host="93.184.215.14", port=8080, ip_literal=True)),
        ("2001:DB8:0::1", AllowedDomain(host="2001:db8::1", port=None, ip_literal=True)),
        ("[2001:db8::1]:8443", AllowedDomain(host="2001:db8::1", port=8443, ip_literal=True)),
    ],
)
def test_allowlist_entries_parse(entry: str, parsed: AllowedDomain) -> None:
    """Entries are ``host``, ``host:port``, ``[ipv6]:port`` or a bare IPv6 address."""
    assert parse_allowed_domain(entry) == parsed


@pytest.mark.parametrize(
    "entry",
    [
        "example.com:http",
        "example.com:0",
        "example.com:65536",
        "example.com:",
        "example.com:80:80",
        "[2001:db8::1",
        "[example.com]:80",
        "0x7f.1",
        "exa mple.com",
        "user@example.com",
        "http://example.com",
        "",
    ],
)
def test_invalid_allowlist_entries_are_refused(entry: str) -> None:
    """An entry that is no host or host:port is a ValueError (and allows nothing when used)."""
    with pytest.raises(ValueError):
        parse_allowed_domain(entry)
