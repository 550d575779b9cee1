"""Request authentication: bearer tokens (constant-time) and HMAC-SHA256 body signatures."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Sequence

from core.errors import Unauthorized

SIGNATURE_HEADER = "X-ResearchFlow-Signature"
# What a 401 answers a browser with (the status page): it then asks for the token as password.
BASIC_CHALLENGE = 'Basic realm="ResearchFlow", charset="UTF-8"'
# A signature older or newer than this is refused, so a captured request cannot be replayed.
SIGNATURE_WINDOW_SECONDS = 300


def _matches_any(candidate: str, tokens: Sequence[str]) -> int | None:
    """Position of the token `candidate` equals, compared in constant time against every one."""
    found: int | None = None
    given = candidate.encode()
    for position, token in enumerate(tokens):
        # Compare against every token, never stopping early, so timing reveals nothing.
        if hmac.compare_digest(given, token.encode()) and found is None:
            found = position
    return found


def bearer_position(authorization: str | None, tokens: Sequence[str]) -> int | None:
    """Which configured token an `Authorization: Bearer ...` header carries, or None."""
    if not authorization or not tokens:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return _matches_any(value.strip(), tokens)


def basic_position(authorization: str | None, tokens: Sequence[str]) -> int | None:
    """HTTP Basic auth with a token as the password (any user name), for a browser."""
    if not authorization or not tokens:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, _, password = decoded.partition(":")
    return _matches_any(password, tokens) if password else None


def authenticate(
    authorization: str | None,
    tokens: Sequence[str],
    *,
    insecure: bool = False,
    allow_basic: bool = False,
) -> int:
    """Position of the token an Authorization header carries (`Bearer`, or with `allow_basic`
    HTTP Basic with the token as password); -1 when `insecure` and none is given.

    Raises Unauthorized, whose challenge asks for Basic when `allow_basic`, else a bearer token.
    """
    position = bearer_position(authorization, tokens)
    if position is None and allow_basic:
        position = basic_position(authorization, tokens)
    if position is not None:
        return position
    if insecure:
        return -1
    raise Unauthorized(challenge=BASIC_CHALLENGE if allow_basic else "Bearer")


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The signature header value for `body`: `t=<unix seconds>,v1=<hex HMAC-SHA256>`."""
    ts = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


def verify_signature(
    secret: str, header: str | None, body: bytes, now: float | None = None
) -> bool:
    """True when `header` is a valid, fresh signature of `body` under `secret`."""
    if not header:
        return False
    parts = dict(p.strip().partition("=")[::2] for p in header.split(",") if "=" in p)
    try:
        ts = int(parts.get("t", ""))
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - ts) > SIGNATURE_WINDOW_SECONDS:
        return False
    expected = sign(secret, body, ts).split("v1=", 1)[1]
    return hmac.compare_digest(expected.encode(), parts.get("v1", "").encode())
