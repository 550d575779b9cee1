"""The speed layer's record codec: zstd with a dictionary trained on the official R4 examples.

A record's payload is one frame, `body \\0 rows \\0 lastUpdated`, where rows are
`view \\x01 rows-json (\\x02 view \\x01 rows-json)*` (the deriver's bytes, verbatim). NUL, \\x01
and \\x02 never occur raw in JSON text, a view name or a FHIR instant, so splitting from the
right finds the sections whatever the body holds, and the body comes back byte for byte.

The dictionary (`fhir-r4.zstd-dict`, 16 KiB, built by scripts/build_zstd_dict.py from HL7's
official FHIR R4 examples, Apache-2.0) lets a ~600 B resource compress to ~40 % of its compact
JSON (benchmarks/README.md). Codec ids are stored with each record so a later dictionary (say,
trained on a deployment's own traffic) can be added beside this one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import zstandard

DICTIONARY_PATH = Path(__file__).resolve().parent / "fhir-r4.zstd-dict"
RAW = "0"  # stored as is
ZSTD_R4 = "1"  # zstd level 3 with the R4 dictionary
LEVEL = 3


class CorruptRecord(ValueError):
    """A stored payload that does not decode (unknown codec id, or a damaged frame)."""


class RecordCodec:
    """Pack and unpack record frames. One per store: zstandard's (de)compressors are not safe
    to share between threads, and each gets its own dictionary object (zstandard 0.25 frees a
    precomputed dictionary under a compressor that shares it: a crash, not an error)."""

    def __init__(self, dictionary: bytes | None = None) -> None:
        data = DICTIONARY_PATH.read_bytes() if dictionary is None else dictionary
        # The content size lets the decompressor allocate exactly (without it each call
        # allocates the maximum: 15x slower); no checksum (Redis keeps the bytes) and no
        # dictionary id (the record's codec id names the dictionary).
        params = zstandard.ZstdCompressionParameters.from_level(
            LEVEL, write_checksum=False, write_content_size=True, write_dict_id=False
        )
        cdict = zstandard.ZstdCompressionDict(data)
        cdict.precompute_compress(compression_params=params)
        self._compressor = zstandard.ZstdCompressor(dict_data=cdict, compression_params=params)
        self._decompressor = zstandard.ZstdDecompressor(
            dict_data=zstandard.ZstdCompressionDict(data)
        )

    def pack(self, body: bytes, rows: Mapping[str, bytes], last_updated: str) -> bytes:
        """The compressed frame of a present entry (codec ZSTD_R4)."""
        section = b"\x02".join(view.encode() + b"\x01" + data for view, data in rows.items())
        return self._compressor.compress(body + b"\0" + section + b"\0" + last_updated.encode())

    def unpack(self, codec: str, payload: bytes) -> tuple[bytes, dict[str, bytes], str]:
        """(body, rows per view, lastUpdated) of a present entry's payload; CorruptRecord when
        it does not decode."""
        if codec == ZSTD_R4:
            try:
                frame = self._decompressor.decompress(payload)
            except zstandard.ZstdError as exc:
                raise CorruptRecord(f"a speed-layer record does not decompress: {exc}") from exc
        elif codec == RAW:
            frame = payload
        else:
            raise CorruptRecord(f"a speed-layer record has the unknown codec id {codec!r}")
        parts = frame.rsplit(b"\0", 2)
        if len(parts) != 3:
            raise CorruptRecord("a speed-layer record frame lacks its sections")
        body, section, last_updated = parts
        rows: dict[str, bytes] = {}
        if section:
            for part in section.split(b"\x02"):
                view, _, data = part.partition(b"\x01")
                rows[view.decode()] = data
        return body, rows, last_updated.decode()
