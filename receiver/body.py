"""A delivery's body: its Content-Type checked, read within the size limit, then decoded from its
Content-Encoding."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from starlette.requests import Request

from core.errors import InvalidRequest, Issue

# RFC 9110 §8.4.1: `gzip` (and its old name `x-gzip`) is RFC 1952's format, `deflate` is the
# zlib format of RFC 1950 (a deflate stream with a zlib header and checksum).
WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# What a 415 offers (RFC 9110 §12.5.3: Accept-Encoding in a response lists the codings taken).
ACCEPT_ENCODING = "gzip, deflate"
# Nobody stacks more than two codings; more would only multiply the work a request may cause.
MAX_CODINGS = 2


class BodyTooLarge(InvalidRequest):
    """The body, as sent or once decoded, is larger than the limit (413)."""

    status_code = 413

    def __init__(self, limit: int, decoded: bool = False) -> None:
        what = "the decoded body" if decoded else "the body"
        message = f"{what} is larger than {limit} bytes"
        super().__init__(message, [Issue("too-costly", message)])


class UnsupportedEncoding(InvalidRequest):
    """A Content-Encoding this receiver does not decode (415 with Accept-Encoding)."""

    status_code = 415
    headers = {"Accept-Encoding": ACCEPT_ENCODING}

    def __init__(self, message: str) -> None:
        super().__init__(message, [Issue("not-supported", message)])


class UnsupportedMediaType(InvalidRequest):
    """A body that is not FHIR JSON by its Content-Type (415)."""

    status_code = 415

    def __init__(self, message: str) -> None:
        super().__init__(message, [Issue("not-supported", message)])


def require_json(content_type: str | None, message: str) -> None:
    """UnsupportedMediaType (`message`) unless the Content-Type is a JSON one (or absent)."""
    if content_type is None:
        return  # no content type at all: the body itself is judged
    media = content_type.split(";", 1)[0].strip().lower()
    if media not in {"application/fhir+json", "application/json", "application/json+fhir"}:
        raise UnsupportedMediaType(message)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body as sent, at most `limit` bytes. Raises BodyTooLarge."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def content_codings(header_values: Sequence[str]) -> list[str]:
    """The codings named by the Content-Encoding header lines, in the order they were applied,
    `identity` left out (names are case-insensitive: RFC 9110 §8.4.1). Raises
    UnsupportedEncoding for a coding not in WBITS or more than MAX_CODINGS of them."""
    codings = [
        name
        for value in header_values
        for name in (part.strip().lower() for part in value.split(","))
        if name and name != "identity"
    ]
    for name in codings:
        if name not in WBITS:
            raise UnsupportedEncoding(
                f"Content-Encoding {name[:40]!r} is not taken; send {ACCEPT_ENCODING} or none"
            )
    if len(codings) > MAX_CODINGS:
        raise UnsupportedEncoding(f"at most {MAX_CODINGS} stacked Content-Encodings are taken")
    return codings


def decode_body(body: bytes, codings: Sequence[str], limit: int) -> bytes:
    """`body` with its `codings` undone (the last applied first), at most `limit` bytes.

    Decoding stops as soon as the output passes the limit, so a small bomb never inflates in
    memory. An empty body stays empty (nothing to decode: an empty-payload notification).
    Raises BodyTooLarge, or InvalidRequest (400) when the body is not in the coding it names.
    """
    for coding in reversed(codings):
        if body:
            body = _inflate(body, coding, limit)
    return body


def _inflate(data: bytes, coding: str, limit: int) -> bytes:
    out: list[bytes] = []
    size = 0
    while True:
        decoder = zlib.decompressobj(WBITS[coding])
        try:
            # With max_length, zlib returns fewer bytes only when the input is used up or the
            # stream ended; returning the whole allowance means the output passed the limit.
            chunk = decoder.decompress(data, limit - size + 1)
        except zlib.error as exc:
            raise _mismatch(coding, str(exc)) from exc
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit, decoded=True)
        out.append(chunk)
        if not decoder.eof:
            raise _mismatch(coding, "the data ends before the compressed stream does")
        data = decoder.unused_data
        if not data:
            return b"".join(out)
        if coding == "deflate":
            raise _mismatch(coding, "bytes follow the end of the compressed stream")
        # RFC 1952 §2.2: a gzip file is a series of members; the next one follows.


def _mismatch(coding: str, why: str) -> InvalidRequest:
    message = f"the body is not {coding}-encoded as its Content-Encoding says ({why})"
    return InvalidRequest(message, [Issue("invalid", message, "Content-Encoding")])
