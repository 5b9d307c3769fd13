"""Handshake admission: origins, API keys by each route, the key file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from starlette.datastructures import Headers

from streamchat.access import (
    KEY_SUBPROTOCOL_PREFIX,
    SUBPROTOCOL,
    KeyStore,
    admit,
    check_token,
    key_identity,
)
from streamchat.errors import OriginNotAllowed, Unauthorized

KEYS = KeyStore(["alpha-key", "beta-key"])
OPEN = KeyStore()


def _admit(
    headers: dict[str, str],
    subprotocols: tuple[str, ...] = (),
    *,
    keys: KeyStore = KEYS,
    origins: tuple[str, ...] = (),
):  # type: ignore[no-untyped-def]
    return admit(Headers(headers), subprotocols, "10.0.0.7", keys=keys, allowed_origins=origins)


def test_no_keys_configured_admits_by_address() -> None:
    grant = _admit({"host": "h:1", "authorization": "Basic cHJveHk6dXNlcg=="}, keys=OPEN)
    assert grant.identity == "addr:10.0.0.7"
    assert not grant.needs_token


def test_bearer_key_admits_with_a_hashed_identity() -> None:
    grant = _admit({"authorization": "Bearer beta-key"})
    assert grant.identity == key_identity("beta-key")
    assert "beta" not in grant.identity
    assert not grant.needs_token


def test_subprotocol_key_admits_and_only_the_protocol_is_echoed() -> None:
    offered = (SUBPROTOCOL, KEY_SUBPROTOCOL_PREFIX + "alpha-key")
    grant = _admit({}, offered)
    assert grant.subprotocol == SUBPROTOCOL
    assert grant.identity == key_identity("alpha-key")


@pytest.mark.parametrize(
    ("headers", "subprotocols"),
    [
        ({"authorization": "Bearer wrong"}, ()),
        ({"authorization": "Basic YWxwaGEta2V5"}, ()),
        ({"authorization": "Bearer "}, ()),
        ({}, (SUBPROTOCOL, KEY_SUBPROTOCOL_PREFIX + "alpha-keyX")),
        ({}, (KEY_SUBPROTOCOL_PREFIX + "ALPHA-KEY",)),
    ],
)
def test_wrong_keys_are_refused(headers: dict[str, str], subprotocols: tuple[str, ...]) -> None:
    with pytest.raises(Unauthorized):
        _admit(headers, subprotocols)


def test_no_key_at_the_handshake_defers_to_hello() -> None:
    grant = _admit({})
    assert grant.needs_token
    assert check_token("alpha-key", KEYS) == key_identity("alpha-key")
    for token in (None, "", "nope"):
        with pytest.raises(Unauthorized):
            check_token(token, KEYS)


@pytest.mark.parametrize(
    ("origin", "allowed", "ok"),
    [
        (None, (), True),  # not a browser
        ("http://h:1", (), True),  # same origin as Host
        ("http://H:1/", (), True),
        ("http://evil.example", (), False),
        ("http://h:2", (), False),
        ("https://app.example", ("https://app.example",), True),
        ("https://APP.example", ("https://app.example/",), True),
        ("http://h:1", ("https://app.example",), False),  # an allowlist replaces same-origin
        ("https://evil.example", ("https://app.example",), False),
        ("https://app.example.evil.example", ("https://app.example",), False),
        ("null", ("https://app.example",), False),
        ("https://anything.example", ("*",), True),
    ],
)
def test_origins(origin: str | None, allowed: tuple[str, ...], ok: bool) -> None:
    headers = {"host": "h:1", "authorization": "Bearer alpha-key"}
    if origin is not None:
        headers["origin"] = origin
    if ok:
        _admit(headers, origins=allowed)
    else:
        with pytest.raises(OriginNotAllowed):
            _admit(headers, origins=allowed)


def test_key_file_is_reread_so_keys_are_revoked_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# comment\nfirst\n\n  second  \n")
    store = KeyStore(["fixed"], path)
    assert store.enabled
    assert store.keys() == {"fixed", "first", "second"}
    path.write_text("second\n")
    os.utime(path, ns=(1, 1))  # a new stamp even within the clock's resolution
    assert not store.check("first")
    assert store.check("second") and store.check("fixed")
    path.unlink()
    assert store.keys() == {"fixed"}


def test_an_empty_or_missing_key_file_still_means_auth_is_on(tmp_path: Path) -> None:
    store = KeyStore(file=tmp_path / "absent")
    assert store.enabled
    assert not store.check("")
    with pytest.raises(Unauthorized):
        admit(Headers({"authorization": "Bearer x"}), (), None, keys=store, allowed_origins=())
