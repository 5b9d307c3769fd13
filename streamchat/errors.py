"""Every error a client can see, as one tree with stable wire codes.

::

    StreamchatError                     internal_error (base; never leaks details)
    ├── ProtocolError                   the client broke the protocol
    │   ├── BadMessage                  bad_message: not valid msgpack/JSON, or not a map
    │   ├── UnknownType                 unknown_type
    │   ├── InvalidField                invalid_field: a field missing, mistyped or out of range
    │   ├── MessageTooLarge             message_too_large
    │   ├── HelloRequired               hello_required: anything before ``hello``
    │   ├── DuplicateHello              duplicate_hello
    │   └── RateLimited                 rate_limited: messages or video bytes too fast
    │       └── Flooding                    rate_limited (fatal): went on after being told
    ├── AccessError                     the session may not go on
    │   ├── Unauthorized                unauthorized: no API key, or a wrong one
    │   ├── OriginNotAllowed            origin_not_allowed: a browser page from elsewhere
    │   ├── ServerBusy                  server_busy: too many sessions (server or client)
    │   └── IdleTimeout                 idle_timeout: nothing from the client for too long
    ├── AskError                        a question that cannot be answered now
    │   ├── NoFrames                    no_frames: nothing decoded (yet) in the asked range
    │   ├── UnknownId                   unknown_id: ``cancel`` of an answer not in flight
    │   ├── DuplicateId                 duplicate_id: ``ask`` with the id of an answer in flight
    │   ├── TooManyAsks                 too_many_asks
    │   ├── ContextTooLong              context_too_long: the prompt cannot fit the model's context
    │   └── ServerShutdown              server_shutdown: the server is stopping, no new questions
    ├── VideoError                      a video source failed; frames already decoded stay
    │   ├── VideoDecodeError            video_decode_failed: corrupt data
    │   ├── VideoUnsupported            video_unsupported: no video stream, unknown codec/container
    │   ├── VideoTooLarge               video_too_large: frames beyond the decode size limit
    │   ├── VideoTooLong                video_too_long: more video time or frames than allowed
    │   ├── VideoTimeout                video_timeout: no bytes, or no progress, in time
    │   ├── VideoBacklogFull            video_backlog_full: pushed faster than decoded
    │   ├── DecoderBusy                 decoder_busy: the server's decoding memory stayed full
    │   ├── SourceBusy                  source_busy: chunks while a URL source is active
    │   ├── UrlNotAllowed               url_not_allowed: scheme, host, address or path refused
    │   ├── UrlFetchFailed              url_fetch_failed: unreachable, HTTP error, too large
    │   └── MediaInvalid                media_invalid: a ``data:`` URL not base64, or of a
    │                                   media type its bytes belie
    └── EngineFailure                   engine_error: the model failed while answering
        ├── EngineUnavailable           engine_unavailable: a remote engine unreachable, 502/503/
        │                               504, or its answer cut off
        └── EngineTimeout               engine_timeout: a remote engine silent for too long

Each class carries its wire ``code`` and whether the session can go on
(``fatal`` errors close the WebSocket with ``close_code``). The mapping from
exceptions to what the client sees lives in :func:`to_error_fields`.
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar

__all__ = [
    "AccessError",
    "AskError",
    "BadMessage",
    "CloseCode",
    "DecoderBusy",
    "ContextTooLong",
    "DuplicateHello",
    "DuplicateId",
    "EngineFailure",
    "EngineTimeout",
    "EngineUnavailable",
    "Flooding",
    "HelloRequired",
    "IdleTimeout",
    "InvalidField",
    "MediaInvalid",
    "MessageTooLarge",
    "NoFrames",
    "OriginNotAllowed",
    "ProtocolError",
    "RateLimited",
    "ServerBusy",
    "ServerShutdown",
    "SourceBusy",
    "StreamchatError",
    "TooManyAsks",
    "Unauthorized",
    "UnknownId",
    "UnknownType",
    "UrlFetchFailed",
    "UrlNotAllowed",
    "VideoBacklogFull",
    "VideoDecodeError",
    "VideoError",
    "VideoTimeout",
    "VideoTooLarge",
    "VideoTooLong",
    "VideoUnsupported",
    "close_reason",
    "to_error_fields",
]


class CloseCode(IntEnum):
    """WebSocket close codes the server uses (RFC 6455 section 7.4)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    # Application codes (4000-4999), after the HTTP status they resemble.
    UNAUTHORIZED = 4401
    FORBIDDEN = 4403
    IDLE_TIMEOUT = 4408
    RATE_LIMITED = 4429


class StreamchatError(Exception):
    """Base of every error the client may see."""

    code: ClassVar[str] = "internal_error"
    fatal: ClassVar[bool] = False
    close_code: ClassVar[CloseCode] = CloseCode.INTERNAL_ERROR

    def __init__(self, message: str, *, id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.id = id


class ProtocolError(StreamchatError):
    code = "protocol_error"
    close_code = CloseCode.POLICY_VIOLATION


class BadMessage(ProtocolError):
    code = "bad_message"


class UnknownType(ProtocolError):
    code = "unknown_type"


class InvalidField(ProtocolError):
    code = "invalid_field"


class MessageTooLarge(ProtocolError):
    code = "message_too_large"
    close_code = CloseCode.MESSAGE_TOO_BIG


class HelloRequired(ProtocolError):
    code = "hello_required"


class DuplicateHello(ProtocolError):
    code = "duplicate_hello"


class RateLimited(ProtocolError):
    code = "rate_limited"
    close_code = CloseCode.RATE_LIMITED


class Flooding(RateLimited):
    fatal = True


class AccessError(StreamchatError):
    code = "access_error"
    fatal = True
    close_code = CloseCode.POLICY_VIOLATION


class Unauthorized(AccessError):
    code = "unauthorized"
    close_code = CloseCode.UNAUTHORIZED


class OriginNotAllowed(AccessError):
    code = "origin_not_allowed"
    close_code = CloseCode.FORBIDDEN


class ServerBusy(AccessError):
    code = "server_busy"
    close_code = CloseCode.TRY_AGAIN_LATER


class IdleTimeout(AccessError):
    code = "idle_timeout"
    close_code = CloseCode.IDLE_TIMEOUT


class AskError(StreamchatError):
    code = "ask_error"


class NoFrames(AskError):
    code = "no_frames"


class UnknownId(AskError):
    code = "unknown_id"


class DuplicateId(AskError):
    code = "duplicate_id"


class TooManyAsks(AskError):
    code = "too_many_asks"


class ContextTooLong(AskError):
    code = "context_too_long"


class ServerShutdown(AskError):
    code = "server_shutdown"


class VideoError(StreamchatError):
    code = "video_error"


class VideoDecodeError(VideoError):
    code = "video_decode_failed"


class VideoUnsupported(VideoError):
    code = "video_unsupported"


class VideoTooLarge(VideoError):
    code = "video_too_large"


class VideoTooLong(VideoError):
    code = "video_too_long"


class VideoTimeout(VideoError):
    code = "video_timeout"


class VideoBacklogFull(VideoError):
    code = "video_backlog_full"


class DecoderBusy(VideoError):
    """Other sources held the server's decoding memory for as long as this one could wait.

    Not the source's fault: the same video may decode once others end.
    """

    code = "decoder_busy"


class SourceBusy(VideoError):
    code = "source_busy"


class UrlNotAllowed(VideoError):
    code = "url_not_allowed"


class UrlFetchFailed(VideoError):
    code = "url_fetch_failed"


class MediaInvalid(VideoError):
    """A ``data:`` URL that is malformed (not base64, no media type) or whose bytes are not
    what its media type says (``video/mp4`` holding a PNG image)."""

    code = "media_invalid"


class EngineFailure(StreamchatError):
    code = "engine_error"


class EngineUnavailable(EngineFailure):
    """A remote engine (``--engine-url``) could not be reached, said it is down (502, 503,
    504) or went away mid-answer: the answer fails, the session goes on."""

    code = "engine_unavailable"


class EngineTimeout(EngineFailure):
    """A remote engine sent nothing for ``--engine-timeout`` seconds: the answer is given up."""

    code = "engine_timeout"


def close_reason(message: str) -> str:
    """A close frame's reason is limited to 123 bytes of UTF-8."""
    encoded = message.encode()
    if len(encoded) <= 123:
        return message
    return encoded[:120].decode(errors="ignore") + "..."


def to_error_fields(exc: BaseException) -> tuple[str, str, bool]:
    """``(code, message, fatal)`` for the client.

    Our own errors say what went wrong; anything else is an internal error
    whose details stay in the server log.
    """
    if isinstance(exc, StreamchatError):
        return exc.code, exc.message, exc.fatal
    return StreamchatError.code, "internal server error", False
