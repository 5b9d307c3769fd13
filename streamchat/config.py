"""Server settings: one frozen dataclass; the CLI only maps flags onto it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["CONTEXT_CHOICES", "DEFAULT_MODEL", "ContextChoice", "Settings", "timeline_slack"]

DEFAULT_MODEL = "Qwen/Qwen2-VL-2B-Instruct"

DEFAULT_FPS = 2.0
DEFAULT_MAX_FPS = 8.0
DEFAULT_WINDOW_FRAMES = 32
DEFAULT_MAX_WINDOW_FRAMES = 128
DEFAULT_WINDOW_BYTES = 64 * 1024 * 1024
DEFAULT_MIN_PIXELS = 28 * 28 * 4
DEFAULT_MAX_PIXELS = 448 * 448
DEFAULT_FRAME_FACTOR = 28
DEFAULT_MAX_DECODE_PIXELS = 4096 * 2304
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DEFAULT_FEED_BYTES = 16 * 1024 * 1024
DEFAULT_VIDEO_READ_TIMEOUT = 60.0
DEFAULT_MAX_CONCURRENT_ASKS = 4
DEFAULT_MAX_QUESTION_CHARS = 4000
DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_TOKENS_LIMIT = 2048
DEFAULT_HISTORY_TURNS = 8
DEFAULT_CONTEXT_RESERVE = 1024
MIN_TIMELINE_SLACK = 4
DEFAULT_STATUS_INTERVAL = 0.5
DEFAULT_OUTBOX_MESSAGES = 256
DEFAULT_FETCH_MAX_BYTES = 2 * 1024 * 1024 * 1024
DEFAULT_FETCH_TIMEOUT = 30.0
DEFAULT_FETCH_MAX_REDIRECTS = 5
DEFAULT_VIDEO_CACHE_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_MEDIA_DECODES = 4
DEFAULT_MAX_DATA_URL_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_DATA_URL_FRAMES = 256
DEFAULT_MAX_IMAGE_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_SOURCE_SECONDS = 4 * 3600.0
DEFAULT_MAX_SOURCE_FRAMES = 1_000_000
DEFAULT_MAX_INDEX_SAMPLES = 500_000
DEFAULT_MAX_HEADER_BYTES = 8 << 20
"""The largest MP4 index (``moov``) read whole, by the decoder or rewritten by a fetch."""
DEFAULT_DECODER_THREADS = 2
DEFAULT_DECODE_MEMORY_WAIT = 10.0
DEFAULT_MAX_DNS_LOOKUPS = 64
DEFAULT_MAX_SESSIONS = 64
DEFAULT_MAX_SESSIONS_PER_CLIENT = 8
DEFAULT_MAX_PENDING_SESSIONS = 16
DEFAULT_MAX_PENDING_PER_ADDRESS = 4
DEFAULT_HELLO_TIMEOUT = 10.0
DEFAULT_MESSAGES_PER_SECOND = 200.0
DEFAULT_MESSAGE_BURST = 400
DEFAULT_VIDEO_BYTES_PER_SECOND = 32 * 1024 * 1024
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_SEND_TIMEOUT = 10.0
DEFAULT_PING_INTERVAL = 20.0
DEFAULT_PING_TIMEOUT = 20.0
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_REQUEST_VIDEOS = 4
DEFAULT_MAX_REQUEST_IMAGES = 4
DEFAULT_REQUESTS_PER_SECOND = 10.0
DEFAULT_REQUEST_BURST = 20

ContextChoice = Literal["auto", "window", "timeline"]
"""The server's default context for sessions: ``auto`` is the engine's own choice."""
CONTEXT_CHOICES: tuple[ContextChoice, ...] = ("auto", "window", "timeline")
DEFAULT_CONTEXT: ContextChoice = "auto"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a server needs besides its engine.

    Per-session values a client may choose in ``hello`` (fps, window frames,
    pixel budget, generation defaults) are capped by the ``max_*`` fields here.
    """

    model: str = DEFAULT_MODEL
    """Model path or name; reported to clients in ``ready``."""

    fps: float = DEFAULT_FPS
    max_fps: float = DEFAULT_MAX_FPS
    window_frames: int = DEFAULT_WINDOW_FRAMES
    max_window_frames: int = DEFAULT_MAX_WINDOW_FRAMES
    window_bytes: int = DEFAULT_WINDOW_BYTES
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    frame_factor: int | None = None
    """Frame sides are multiples of this; None: the model's own (patch x merge:
    28 for Qwen2-VL and Qwen2.5-VL, 32 for Qwen3-VL), else 28."""
    max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS
    """Source frames larger than this are refused by FFmpeg before it allocates."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    feed_bytes: int = DEFAULT_FEED_BYTES
    """Undecoded bytes buffered per video source."""
    video_read_timeout: float = DEFAULT_VIDEO_READ_TIMEOUT
    """A source that sends no bytes for this long ends with ``video_timeout``."""

    max_concurrent_asks: int = DEFAULT_MAX_CONCURRENT_ASKS
    max_question_chars: int = DEFAULT_MAX_QUESTION_CHARS
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT
    history_turns: int = DEFAULT_HISTORY_TURNS
    context_reserve: int = DEFAULT_CONTEXT_RESERVE
    """Tokens of the model's context kept for the chat template, the question and the
    history, besides the video and the longest answer (:mod:`streamchat.budget`)."""
    max_ask_frames: int | None = None
    """Most frames one question carries; None: no limit. Set by the app from the
    model's context (:func:`streamchat.budget.plan`), not by hand."""
    tokens_per_frame: int | None = None
    """Most context tokens one frame costs (set by the app with ``max_ask_frames``)."""
    context: ContextChoice = DEFAULT_CONTEXT
    """How a session's asks reach the engine unless its ``hello`` chooses: ``window`` (the
    window as one new video per ask), ``timeline`` (appended to the session's timeline, so
    an ask costs what is new) or ``auto``, which the app resolves to the engine's
    ``default_context`` (the timeline for Qwen3-VL, the window for Qwen2/2.5-VL)."""
    timeline_slack: int | None = None
    """Frames a session's timeline may hold beyond its window before it is rebased
    (the oldest segments and turns dropped); None: :func:`timeline_slack`'s default.
    0 rebases whenever the window moved: every ask on a live stream."""
    status_interval: float = DEFAULT_STATUS_INTERVAL
    outbox_messages: int = DEFAULT_OUTBOX_MESSAGES

    allowed_file_dir: Path | None = None
    """``file:`` URLs are served only from below this directory (off when None)."""
    fetch_max_bytes: int = DEFAULT_FETCH_MAX_BYTES
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT
    fetch_max_redirects: int = DEFAULT_FETCH_MAX_REDIRECTS
    fetch_allow_private: bool = False
    """Let URLs reach loopback, private, link-local and other non-global addresses."""
    fetch_allowed_domains: tuple[str, ...] = ()
    """When not empty, URLs may only name these hosts (or their subdomains)."""
    video_cache_bytes: int = DEFAULT_VIDEO_CACHE_BYTES
    """Decoded frames the server keeps for requests that name a video or image by URL
    (:mod:`streamchat.videocache`), in bytes of pixels; least recently used go first."""
    max_media_decodes: int = DEFAULT_MAX_MEDIA_DECODES
    """Videos and images of such requests decoded at once (each in a thread of its own,
    with ``decoder_threads`` FFmpeg threads); more wait for a place."""
    max_data_url_bytes: int = DEFAULT_MAX_DATA_URL_BYTES
    """Largest ``data:`` URL, in decoded bytes (checked from its length, before decoding)."""
    max_data_url_frames: int = DEFAULT_MAX_DATA_URL_FRAMES
    """Most JPEG frames in one multi-frame ``data:video/jpeg;base64,f1,f2,...`` URL."""
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    """Largest image file (compressed) fetched by URL or given as a ``data:`` URL."""
    max_source_seconds: float = DEFAULT_MAX_SOURCE_SECONDS
    """A source (URL or pushed stream) longer than this, in video time, ends with an error."""
    max_source_frames: int = DEFAULT_MAX_SOURCE_FRAMES
    """A source with more frames than this ends with an error."""
    max_index_samples: int = DEFAULT_MAX_INDEX_SAMPLES
    """Most entries FFmpeg's MP4 demuxer may index per source: the samples every track
    declares (times the edits that replay them) and every fragment's, added up. Each costs
    memory whether or not it is ever decoded (about 70 bytes at peak), so an MP4 declaring
    more is refused before FFmpeg reads the count."""
    decoder_threads: int = DEFAULT_DECODER_THREADS
    """FFmpeg threads per video decoder. Frame threads each hold frames in flight, so memory
    per session grows with them; a fixed count keeps the bound the same on any machine."""
    decode_memory_bytes: int | None = None
    """Decoder memory all decoders of the server may hold at once (sessions' sources, the
    video cache's): each reserves its estimated peak from its frame size before decoding at
    that size (:mod:`streamchat.media.memory`). None: a quarter of the machine's memory."""
    decode_memory_wait: float = DEFAULT_DECODE_MEMORY_WAIT
    """Seconds a decoder waits for room in that memory before its source fails with
    ``decoder_busy`` (the session goes on)."""
    max_dns_lookups: int = DEFAULT_MAX_DNS_LOOKUPS
    """DNS lookups running at once in the server, each in a thread of its own, at most one
    per session (:class:`~streamchat.ingest.netguard.Lookups`)."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    """The largest body of an OpenAI-compatible request (its ``data:`` URLs included): HTTP 413."""
    max_request_videos: int = DEFAULT_MAX_REQUEST_VIDEOS
    """Videos in one OpenAI-compatible request, over all its messages (vLLM's
    ``limit_mm_per_prompt`` is set to match)."""
    max_request_images: int = DEFAULT_MAX_REQUEST_IMAGES
    """Images in one OpenAI-compatible request, over all its messages."""
    requests_per_second: float = DEFAULT_REQUESTS_PER_SECOND
    """OpenAI-compatible requests per second per client identity (API key, else address),
    sustained; more get HTTP 429 ``rate_limited``."""
    request_burst: int = DEFAULT_REQUEST_BURST
    """Of those, how many a client may send at once."""

    max_sessions: int = DEFAULT_MAX_SESSIONS
    """Sessions open at once; more are refused at the handshake (HTTP 503)."""
    max_sessions_per_client: int = DEFAULT_MAX_SESSIONS_PER_CLIENT
    """Sessions open at once per client identity (API key, else address)."""
    max_pending_sessions: int = DEFAULT_MAX_PENDING_SESSIONS
    """Connections open at once that have not authenticated yet (no valid key, or, with auth
    off, no ``hello`` yet). Counted apart from ``max_sessions``, so they never take a place a
    key holder could have; when all are held, the address holding the most gives up its oldest."""
    max_pending_per_address: int = DEFAULT_MAX_PENDING_PER_ADDRESS
    """Of those, how many one address may hold; more are refused (HTTP 503)."""
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT
    """Seconds an unauthenticated connection has to send a valid ``hello`` (with a key when auth
    is on). Only that ends the wait: other messages, valid or not, do not extend it."""
    messages_per_second: float = DEFAULT_MESSAGES_PER_SECOND
    message_burst: int = DEFAULT_MESSAGE_BURST
    """Messages a session may send at once; the allowance refills at ``messages_per_second``."""
    video_bytes_per_second: int = DEFAULT_VIDEO_BYTES_PER_SECOND
    """Pushed video bytes per second per session (a burst of ``feed_bytes`` is allowed)."""
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    """A session with no message from its client and nothing in flight is closed after this."""
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    """A client that reads nothing for this long while messages wait for it is disconnected."""
    ping_interval: float = DEFAULT_PING_INTERVAL
    ping_timeout: float = DEFAULT_PING_TIMEOUT
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    """On SIGTERM, answers in flight get this long to finish before they are aborted."""

    api_keys: frozenset[str] = frozenset()
    """Keys accepted from clients; with none (and no file) auth is off."""
    api_keys_file: Path | None = None
    """One key per line; re-read when it changes, so keys are revoked without a restart."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins allowed to open sessions; empty: same origin only; ``*``: any."""
    metrics_auth: bool = False
    """``GET /metrics`` needs one of the API keys as a Bearer token (else it is open)."""

    @property
    def factor(self) -> int:
        """The frame factor in force (after the app resolved it from the model)."""
        return self.frame_factor or DEFAULT_FRAME_FACTOR

    @property
    def transport_max_bytes(self) -> int:
        """Largest message the WebSocket layer accepts before closing with 1009.

        Messages between ``max_message_bytes`` and this size are refused with
        an ``error`` and the session goes on; only far larger ones close it.
        """
        return self.max_message_bytes * 4


def timeline_slack(settings: Settings, window_frames: int) -> int:
    """The slack of a session whose window holds ``window_frames``.

    By default half the window, rounded up to an even count (segments are cut
    in even counts of frames), and at least :data:`MIN_TIMELINE_SLACK`: a
    timeline that dropped a segment at every ask would rebase at every ask and
    lose the prefix cache's reuse, so it holds some frames more and rebases
    once in a while instead.
    """
    if settings.timeline_slack is not None:
        return settings.timeline_slack
    half = -(-window_frames // 2)
    return max(MIN_TIMELINE_SLACK, half + half % 2)
