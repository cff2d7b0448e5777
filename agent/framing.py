"""Binary payloads framed as log lines, so a collector can rebuild them from Fly's log stream.

Fly's logs API may split, lag, duplicate or reorder delivery and prefixes lines with its own
metadata, so every line is self-describing:

    SORTIE/1 BEGIN <kind> <total_bytes> <sha256hex> <nchunks>
    SORTIE/1 DATA <kind> <seq> <base64>      (seq from 0, at most CHUNK_BYTES raw bytes each)
    SORTIE/1 END <kind>

Standard library only: this module also runs inside the minimal machine image.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field

MAGIC = "SORTIE/1"
CHUNK_BYTES = 3072

_KIND = re.compile(r"[a-z]+")
_LINE = re.compile(
    r"SORTIE/1 (?:"
    r"BEGIN (?P<bkind>[a-z]+) (?P<total>\d+) (?P<sha>[0-9a-f]{64}) (?P<n>\d+)"
    r"|DATA (?P<dkind>[a-z]+) (?P<seq>\d+) (?P<data>[A-Za-z0-9+/=]*)"
    r"|END (?P<ekind>[a-z]+)"
    r")\s*$"
)


class FramingError(ValueError):
    """A framed payload arrived whole but does not match its announced size or digest."""


def encode(kind: str, payload: bytes) -> list[str]:
    """The log lines (without newlines) that carry `payload` under `kind`."""
    if not _KIND.fullmatch(kind):
        raise ValueError(f"frame kind must match [a-z]+, got {kind!r}")
    chunks = [payload[i : i + CHUNK_BYTES] for i in range(0, len(payload), CHUNK_BYTES)]
    digest = hashlib.sha256(payload).hexdigest()
    lines = [f"{MAGIC} BEGIN {kind} {len(payload)} {digest} {len(chunks)}"]
    lines.extend(
        f"{MAGIC} DATA {kind} {seq} {base64.b64encode(chunk).decode('ascii')}"
        for seq, chunk in enumerate(chunks)
    )
    lines.append(f"{MAGIC} END {kind}")
    return lines


@dataclass
class _Frame:
    """What has arrived so far for one kind."""

    header: tuple[int, str, int] | None = None
    chunks: dict[int, bytes] = field(default_factory=dict)
    ended: bool = False


class Decoder:
    """Reassembles framed payloads from log lines delivered in any order, with noise between."""

    def __init__(self) -> None:
        self._frames: dict[str, _Frame] = {}

    def feed(self, line: str) -> None:
        """Take one log line; lines that are not well-formed frame lines are ignored."""
        match = _LINE.search(line)
        if match is None:
            return
        if kind := match["bkind"]:
            header = (int(match["total"]), match["sha"], int(match["n"]))
            frame = self._frames.setdefault(kind, _Frame())
            if frame.header is not None and frame.header != header:
                # A different payload under the same kind (e.g. a restarted machine): newest wins.
                frame.chunks.clear()
                frame.ended = False
            frame.header = header
        elif kind := match["dkind"]:
            try:
                chunk = base64.b64decode(match["data"], validate=True)
            except binascii.Error:
                return  # A damaged line: a duplicate delivery may still bring it intact.
            self._frames.setdefault(kind, _Frame()).chunks.setdefault(int(match["seq"]), chunk)
        else:
            self._frames.setdefault(match["ekind"], _Frame()).ended = True

    def complete(self, kind: str) -> bool:
        """Whether BEGIN, every announced chunk and END have all arrived for `kind`."""
        frame = self._frames.get(kind)
        if frame is None or frame.header is None or not frame.ended:
            return False
        return all(seq in frame.chunks for seq in range(frame.header[2]))

    def payload(self, kind: str) -> bytes | None:
        """The payload once complete, None before; raises FramingError if it fails its checks."""
        if not self.complete(kind):
            return None
        frame = self._frames[kind]
        assert frame.header is not None
        total, digest, count = frame.header
        data = b"".join(frame.chunks[seq] for seq in range(count))
        if len(data) != total:
            raise FramingError(f"frame {kind!r}: expected {total} bytes, got {len(data)}")
        if hashlib.sha256(data).hexdigest() != digest:
            raise FramingError(f"frame {kind!r}: sha256 mismatch")
        return data

    def kinds_seen(self) -> set[str]:
        """Every kind any frame line has mentioned so far."""
        return set(self._frames)
