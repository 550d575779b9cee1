"""A redis-py asyncio connection that packs commands with hiredis.

redis-py's synchronous client packs with `hiredis.pack_command` when hiredis is installed; its
asyncio `Connection.pack_command` always packs in Python (~10 us for the receiver's 12-argument
EVALSHA, against ~2 us in hiredis, on the ingest benchmark's resources). This connection
hands hiredis only what both pack alike, and everything else to redis-py's own packer, so the
bytes sent and the errors raised stay redis-py's (tests/test_redis_connection.py compares them).
"""

from __future__ import annotations

import codecs
from typing import Any

import hiredis
import redis.asyncio as aioredis


class HiredisPackedConnection(aioredis.Connection):
    """`redis.asyncio.Connection` with `pack_command` in hiredis where the bytes are the same:
    a connection whose encoding is not strict UTF-8 packs in redis-py throughout."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        encoder = self.encoder
        self._hiredis_packs = (
            codecs.lookup(encoder.encoding).name == "utf-8" and encoder.encoding_errors == "strict"
        )

    def pack_command(self, *args: Any) -> list[bytes]:
        """The command in RESP, as one buffer (redis-py may split a large one in several)."""
        if not self._hiredis_packs or not args:
            return super().pack_command(*args)
        first = args[0]
        # redis-py sends the words of a multi-word command name ("CONFIG GET") apart.
        # (str.split() splits at every ASCII white space bytes.split() does, and at more.)
        if type(first) is str:
            if not first.isascii() or first.split() != [first]:
                return super().pack_command(*args)
        elif type(first) is not bytes or b" " in first:
            return super().pack_command(*args)
        try:
            # hiredis 3 packs bytes, memoryview, str (UTF-8), int and float (their repr) as
            # redis-py does, and refuses every other type, a subclass (bool, an IntEnum) too.
            return [hiredis.pack_command(args)]
        except Exception:  # redis-py's packer then writes it, or raises its own error
            return super().pack_command(*args)
