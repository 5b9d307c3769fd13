"""The bundled client and the server agree on the wire, field by field.

The client is standalone (it never imports the server), so the server's
message types are written twice: :mod:`streamchat.messages` builds and
encodes them, ``streamchat_client.messages`` parses them; and the client
builds its requests as maps the server decodes. Only this test imports both.

**Server to client**: every message type (and every type nested in one) has
a client type with the same field names, and the client's type of each field
accepts every value the server's may hold. The rule: the two are equal, or
the client's adds ``None`` (for an older server that did not send the
field), or the server's is a ``Literal`` of strings and the client's ``str``;
a nested dataclass is compared the same way, through the field that holds it.
A client type is a dataclass, or (the client's ``error`` is an exception) a
class whose constructor's parameters are its fields. Each type of the server
is paired with the return type of the client's parser for its ``type``.

**Client to server**: every map the client builds names only fields the
server's decoder knows (else the server would ignore them without a word),
and decodes to what the client meant.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
import types
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import pytest

import streamchat_client.messages as client
from streamchat import messages as server
from streamchat.messages import ClientMessage, ServerMessage, decode_client, encode_server

SERVER_TYPES: dict[str, type] = {cls.type: cls for cls in get_args(ServerMessage)}
CLIENT_MESSAGE_TYPES: dict[str, type] = {cls.type: cls for cls in get_args(ClientMessage)}


# --- the comparison ----------------------------------------------------------


def field_types(cls: type) -> dict[str, Any]:
    """A message type's fields and their (resolved) types, in order."""
    if dataclasses.is_dataclass(cls):
        hints = get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls.__init__)
    parameters = inspect.signature(cls.__init__).parameters
    return {name: hints[name] for name in parameters if name != "self"}


def _members(annotation: Any) -> tuple[list[Any], bool]:
    """The types a field may hold besides None, and whether it may hold None."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = get_args(annotation)
        return [a for a in args if a is not type(None)], type(None) in args
    return [annotation], False


def _type_disagreements(ours: Any, theirs: Any, where: str) -> list[str]:
    """Why the client's type ``ours`` does not take every value of the server's ``theirs``."""
    our_members, our_none = _members(ours)
    their_members, their_none = _members(theirs)
    problems = []
    if their_none and not our_none:
        problems.append(f"{where}: the server may send null, the client takes {ours}")
    for sent in their_members:
        if sent in our_members:
            continue
        nested = [t for t in our_members if dataclasses.is_dataclass(t)]
        if dataclasses.is_dataclass(sent) and nested:
            problems += disagreements(nested[0], sent, where)
        elif get_origin(sent) is Literal and str in our_members:
            if not all(isinstance(value, str) for value in get_args(sent)):
                problems.append(f"{where}: the server sends {sent}, the client takes str")
        else:
            problems.append(f"{where}: the server sends {sent}, the client takes {ours}")
    return problems


def disagreements(ours: type, theirs: type, where: str) -> list[str]:
    """Every field the client's type ``ours`` and the server's ``theirs`` disagree on."""
    client_fields, server_fields = field_types(ours), field_types(theirs)
    problems = [
        f"{where}.{name}: the server sends it, the client does not read it"
        for name in server_fields.keys() - client_fields.keys()
    ]
    problems += [
        f"{where}.{name}: the client reads it, the server never sends it"
        for name in client_fields.keys() - server_fields.keys()
    ]
    for name in server_fields.keys() & client_fields.keys():
        problems += _type_disagreements(client_fields[name], server_fields[name], f"{where}.{name}")
    return sorted(problems)


def client_type(kind: str) -> type:
    """What the client parses a server message of type ``kind`` into."""
    parsed: type = get_type_hints(client.PARSERS[kind])["return"]
    return parsed


def unknown_fields(raw: Mapping[str, Any], cls: type, where: str) -> list[str]:
    """The fields of a client-built map that the server's type ``cls`` does not have."""
    known = field_types(cls)
    problems = []
    for name, value in raw.items():
        if name == "type":
            continue
        if name not in known:
            problems.append(f"{where}.{name}")
            continue
        nested = [t for t in _members(known[name])[0] if dataclasses.is_dataclass(t)]
        if nested and isinstance(value, Mapping):
            problems += unknown_fields(value, nested[0], f"{where}.{name}")
    return problems


def _with_field(cls: type, name: str, annotation: Any) -> type:
    """A copy of ``cls`` under the same name with one more field (or one field retyped)."""
    fields = {**field_types(cls), name: annotation}
    return dataclasses.make_dataclass(cls.__name__, list(fields.items()), kw_only=True)


# --- server -> client --------------------------------------------------------


def test_the_client_parses_every_message_type_the_server_sends() -> None:
    """The client has a parser for each server message type, and for nothing else."""
    assert client.PARSERS.keys() == SERVER_TYPES.keys()


@pytest.mark.parametrize("kind", sorted(SERVER_TYPES))
def test_each_server_message_and_the_clients_type_agree_field_by_field(kind: str) -> None:
    """Same field names, and the client takes every value the server may send (nested too)."""
    assert disagreements(client_type(kind), SERVER_TYPES[kind], kind) == []


def test_a_field_added_or_retyped_on_one_side_only_is_reported() -> None:
    """The comparison is not vacuous: a field the server adds, one the client adds, one in a
    nested type, a null the client does not take and a changed type are each reported."""
    more_limits = _with_field(server.Limits, "max_sources", int)
    assert disagreements(client.Limits, more_limits, "limits") == [
        "limits.max_sources: the server sends it, the client does not read it"
    ]
    more_usage = _with_field(client.Usage, "reasoning_tokens", int)
    assert disagreements(more_usage, server.Usage, "usage") == [
        "usage.reasoning_tokens: the client reads it, the server never sends it"
    ]
    ready = _with_field(server.Ready, "limits", more_limits)
    assert disagreements(client.Ready, ready, "ready") == [
        "ready.limits.max_sources: the server sends it, the client does not read it"
    ]
    strict = _with_field(client.VideoStatus, "first_pts", float)
    assert disagreements(strict, server.VideoStatus, "video.status") == [
        "video.status.first_pts: the server may send null, the client takes <class 'float'>"
    ]
    fractional = _with_field(server.Usage, "frames", float)
    assert disagreements(client.Usage, fractional, "usage") == [
        "usage.frames: the server sends <class 'float'>, the client takes <class 'int'>"
    ]
    assert disagreements(client.VideoStatus, server.VideoStatus, "video.status") == []


LIMITS = server.Limits(
    fps=2.5, window_frames=32, window_bytes=1 << 26, min_pixels=3136, max_pixels=200704,
    frame_factor=28, max_message_bytes=1 << 22, video_buffer_bytes=1 << 24,
    max_concurrent_asks=4, max_question_chars=4000, max_tokens=256, max_tokens_limit=2048,
    tokens_per_frame=66, max_ask_frames=24, keyframes_only=True, messages_per_second=200.0,
    message_burst=400, video_bytes_per_second=1 << 25, idle_timeout=300.0,
    context="timeline", context_frames=40,
)  # fmt: skip
"""Every value different, so that a field read into another's place shows."""

SAMPLES: list[ServerMessage] = [
    server.Ready(session="s1", model="m", protocol=1, limits=LIMITS),
    server.VideoStatus(
        source=2,
        state="decoding",
        frames=4,
        span=1.5,
        first_pts=0.25,
        last_pts=1.75,
        decode_lag=0.125,
        backlog_bytes=2048,
        frames_decoded=9,
        frames_dropped=5,
        bytes_received=4096,
        width=168,
        height=308,
    ),  # fmt: skip
    server.VideoStatus(
        source=0,
        state="ended",
        frames=0,
        span=0.0,
        first_pts=None,
        last_pts=None,
        decode_lag=0.0,
        backlog_bytes=0,
        frames_decoded=0,
        frames_dropped=0,
        bytes_received=0,
    ),  # fmt: skip
    server.AnswerDelta(id="q1", text="Hello, wörld"),
    server.AnswerDone(
        id="q1",
        finish_reason="length",
        usage=server.Usage(
            prompt_tokens=212,
            completion_tokens=3,
            video_tokens=160,
            frames=4,
            time_to_first_token=0.081,
            cached_tokens=128,
        ),  # fmt: skip
    ),
    server.AnswerDone(
        id="q2",
        finish_reason="error",
        usage=server.Usage(
            prompt_tokens=0,
            completion_tokens=0,
            video_tokens=0,
            frames=0,
            time_to_first_token=None,
            cached_tokens=0,
        ),  # fmt: skip
    ),
    server.Error(code="no_frames", message="no video frames yet", id="q3", fatal=False),
    server.Error(code="idle_timeout", message="closing", id=None, fatal=True),
    server.GoingAway(reason="the server is shutting down", timeout=10.0),
]


def values(message: object) -> dict[str, Any]:
    """A message's field values by name, nested messages as maps."""
    found = {}
    for name in field_types(type(message)):
        value = getattr(message, name)
        found[name] = values(value) if dataclasses.is_dataclass(value) else value
    return found


def test_the_samples_cover_every_server_message_type() -> None:
    """The round trip below leaves no server message type out."""
    assert {type(sample) for sample in SAMPLES} == set(SERVER_TYPES.values())


@pytest.mark.parametrize("binary", [True, False], ids=["msgpack", "json"])
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda m: m.type)
def test_what_the_server_encodes_the_client_parses_to_the_same_values(
    sample: ServerMessage, binary: bool
) -> None:
    """Encoded by the server's codec and parsed by the client's, a message keeps its values."""
    raw = client.decode(encode_server(sample, binary=binary))
    parsed = client.PARSERS[raw["type"]](raw)
    assert raw["type"] == sample.type
    assert values(parsed) == values(sample)


# --- client -> server --------------------------------------------------------

BUILT: list[dict[str, Any]] = [
    client.hello_message(
        fps=2.5,
        window_frames=16,
        max_pixels=200704,
        keyframes_only=True,
        generation={"max_tokens": 64, "temperature": 0.5, "top_p": 0.9, "seed": 7},
        context="timeline",
    ),
    client.chunk_message(b"\x1aE\xdf\xa3", format="webm"),
    client.end_message(),
    client.url_message("https://video.example/clip.mp4", format="mp4"),
    client.image_message(b"\x89PNG\r\n", pts=1.5),
    client.ask_message(
        "q1",
        "What is moving?",
        max_tokens=32,
        temperature=0.7,
        top_p=0.95,
        seed=3,
        choices=("yes", "no"),
        last_seconds=4.0,
        start=1.0,
        end=5.0,
        max_frames=8,
    ),  # fmt: skip
    client.cancel_message("q1"),
]
"""One map from each of the client's builders, with every option given."""


def test_the_client_builds_every_message_the_server_takes_with_one_builder_each() -> None:
    """Each builder the client has is sampled above, and each server message type has one."""
    builders = {name for name in client.__all__ if name.endswith("_message")}
    assert len(builders) == len(BUILT) == len(CLIENT_MESSAGE_TYPES)
    assert sorted(message["type"] for message in BUILT) == sorted(CLIENT_MESSAGE_TYPES)


@pytest.mark.parametrize("message", BUILT, ids=lambda m: m["type"])
def test_the_client_writes_only_fields_the_server_reads(message: dict[str, Any]) -> None:
    """No field the client writes would be ignored by the server (nested maps included)."""
    kind = message["type"]
    assert unknown_fields(message, CLIENT_MESSAGE_TYPES[kind], kind) == []


def test_a_field_only_the_client_writes_is_reported() -> None:
    """The check is not vacuous: an extra field, at the top or in a nested map, is named."""
    ask = {**BUILT[5], "priority": 1, "generation": {**BUILT[5]["generation"], "top_k": 5}}
    assert sorted(unknown_fields(ask, server.Ask, "ask")) == [
        "ask.generation.top_k",
        "ask.priority",
    ]


def written(raw: Mapping[str, Any], decoded: object) -> dict[str, Any]:
    """What ``decoded`` holds in each field the client wrote in ``raw`` (a wire list is
    held as a tuple)."""
    held = {name: getattr(decoded, name) for name in raw if name != "type"}
    return {
        name: written(raw[name], value)
        if isinstance(raw[name], Mapping)
        else list(value)
        if isinstance(value, tuple)
        else value
        for name, value in held.items()
    }


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
@pytest.mark.parametrize("message", BUILT, ids=lambda m: m["type"])
def test_what_the_client_encodes_the_server_decodes_to_the_same_values(
    message: dict[str, Any], encoding: client.Encoding
) -> None:
    """Encoded by the client and decoded by the server, every field keeps its value."""
    decoded = decode_client(client.encode(message, encoding))
    assert decoded.type == message["type"]
    assert written(message, decoded) == {k: v for k, v in message.items() if k != "type"}


def test_the_client_imports_nothing_of_the_server() -> None:
    """The client stays standalone: importing every module of it loads no streamchat module."""
    script = (
        "import importlib, pkgutil, sys, streamchat_client\n"
        "for m in pkgutil.iter_modules(streamchat_client.__path__):\n"
        "    if m.name != '__main__':\n"
        "        importlib.import_module('streamchat_client.' + m.name)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'streamchat'))\n"
    )
    clients = os.path.join(os.path.dirname(__file__), "..", "..", "clients")
    env = {**os.environ, "PYTHONPATH": os.path.abspath(clients)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
