"""``data:`` URLs: strict base64, bounds checked before decoding, digests, media types checked.

Pure: :func:`streamchat.ingest.dataurl.parse_data_url` on strings, no media decoded.
"""

from __future__ import annotations

import base64
import hashlib

import pytest

from streamchat.errors import MediaInvalid, VideoTooLarge, VideoTooLong
from streamchat.ingest.dataurl import image_format, is_data_url, parse_data_url

PNG = b"\x89PNG\r\n\x1a\n" + bytes(20)
JPEG = b"\xff\xd8\xff\xe0" + bytes(20)
WEBP = b"RIFF\x10\x00\x00\x00WEBPVP8 " + bytes(8)
GIF = b"GIF89a" + bytes(10)
WEBM = b"\x1a\x45\xdf\xa3" + bytes(20)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def parse(url: str, *, max_bytes: int = 1 << 20, max_frames: int = 8):  # type: ignore[no-untyped-def]
    return parse_data_url(url, max_bytes=max_bytes, max_frames=max_frames)


def test_a_video_url_is_decoded_and_digested() -> None:
    """The media type is read in lower case without parameters; the digest is of the bytes."""
    url = f"DATA:Video/MP4;codecs=avc1;base64,{b64(WEBM)}"
    assert is_data_url(url)
    data = parse(url)
    assert data.media_type == "video/mp4"
    assert data.payloads == (WEBM,)
    assert not data.jpeg_frames
    expected = hashlib.sha256(len(WEBM).to_bytes(8, "big") + WEBM).hexdigest()
    assert data.digest == expected
    data.check_video()


def test_the_same_bytes_have_the_same_digest_however_written() -> None:
    """Another media type or non-canonical padding bits do not change the identity."""
    one = parse("data:image/png;base64,QQ==")
    other = parse("data:application/octet-stream;base64,QR==")  # the same byte, "A"
    assert one.payloads == other.payloads == (b"A",)
    assert one.digest == other.digest
    assert parse("data:image/png;base64,Qg==").digest != one.digest


def test_multi_frame_jpeg_url_gives_one_payload_per_frame() -> None:
    """vLLM's ``data:video/jpeg;base64,f1,f2,...``: each frame its own base64 JPEG."""
    frames = [JPEG + bytes([i]) for i in range(3)]
    data = parse("data:video/jpeg;base64," + ",".join(b64(f) for f in frames))
    assert data.jpeg_frames
    assert data.payloads == tuple(frames)
    data.check_video()


@pytest.mark.parametrize(
    "url",
    [
        "data:video/mp4;base64",  # no comma
        "data:video/mp4," + b64(WEBM),  # not base64
        "data:video/mp4;charset=utf-8," + b64(WEBM),
        "data:;base64," + b64(WEBM),  # no media type
        "data:video;base64," + b64(WEBM),
        "data:video/mp4;base64,",  # empty
        "data:video/mp4;base64," + b64(WEBM)[:-1],  # bad padding
        "data:video/mp4;base64," + b64(WEBM)[:8] + "\n" + b64(WEBM)[8:],  # whitespace
        "data:video/mp4;base64," + b64(WEBM).replace("+", "-").replace("/", "_") + "-_",  # url-safe
        "data:video/mp4;base64,QQ==QQ==",  # data after padding
        "data:video/mp4;base64,QQ==é",  # beyond ASCII
        "data:video/mp4;base64,QQ==,QQ==",  # two payloads for a type of one
        "data:video/jpeg;base64," + b64(JPEG) + ",,",  # an empty frame
        "http://example.com/clip.mp4",
    ],
)
def test_malformed_urls_are_media_invalid(url: str) -> None:
    """Whatever cannot be read strictly as a base64 ``data:`` URL is ``media_invalid``."""
    with pytest.raises(MediaInvalid) as caught:
        parse(url)
    assert caught.value.code == "media_invalid"


def test_size_is_refused_from_the_length_before_decoding() -> None:
    """More than ``max_bytes`` decoded is ``video_too_large``, even if it is not valid base64."""
    assert parse("data:video/mp4;base64," + b64(bytes(300)), max_bytes=300).payloads[0] == bytes(
        300
    )
    with pytest.raises(VideoTooLarge):
        parse("data:video/mp4;base64," + b64(bytes(303)), max_bytes=300)
    with pytest.raises(VideoTooLarge):
        parse("data:video/mp4;base64," + "!" * 1000, max_bytes=300)


def test_frames_are_counted_before_decoding() -> None:
    """A ``video/jpeg`` URL of more frames than allowed is ``video_too_long``, unread."""
    assert len(parse("data:video/jpeg;base64," + ",".join([b64(JPEG)] * 4), max_frames=4).payloads)
    with pytest.raises(VideoTooLong):
        parse("data:video/jpeg;base64," + ",".join(["!!"] * 5), max_frames=4)


@pytest.mark.parametrize(
    ("data", "found"),
    [(PNG, "png"), (JPEG, "jpeg"), (WEBP, "webp"), (GIF, "gif"), (WEBM, None), (b"", None)],
)
def test_image_formats_from_signatures(data: bytes, found: str | None) -> None:
    """Images are told by their first bytes."""
    assert image_format(data) == found


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:video/mp4;base64," + b64(PNG), "says video/mp4 but holds a PNG image"),
        ("data:video/webm;base64," + b64(JPEG), "holds a JPEG image"),
        ("data:application/octet-stream;base64," + b64(GIF), "holds a GIF image"),
        ("data:image/png;base64," + b64(WEBM), "is not a video"),
        ("data:text/plain;base64," + b64(WEBM), "is not a video"),
        ("data:video/jpeg;base64," + b64(JPEG) + "," + b64(PNG), "frame 2 of the data:video/jpeg"),
    ],
)
def test_a_video_url_that_lies_is_refused(url: str, message: str) -> None:
    """A video URL whose type or bytes are not a video's is ``media_invalid``, saying why."""
    with pytest.raises(MediaInvalid, match=message):
        parse(url).check_video()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:image/png;base64," + b64(WEBM), "says image/png but holds no image"),
        ("data:video/mp4;base64," + b64(PNG), "is not an image"),
    ],
)
def test_an_image_url_that_lies_is_refused(url: str, message: str) -> None:
    """An image URL whose type or bytes are not an image's is ``media_invalid``."""
    with pytest.raises(MediaInvalid, match=message):
        parse(url).check_image()


@pytest.mark.parametrize("data", [PNG, JPEG, WEBP])
def test_image_subtypes_are_not_held_against_the_bytes(data: bytes) -> None:
    """``image/jpeg`` holding a PNG passes, as vLLM and browsers read by content."""
    parse("data:image/jpeg;base64," + b64(data)).check_image()
    parse("data:application/octet-stream;base64," + b64(data)).check_image()
