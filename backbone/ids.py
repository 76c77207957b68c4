"""Message IDs and client-ID validation.  Pure."""

from __future__ import annotations

import itertools
import os
import time
import unicodedata

MAX_CLIENT_ID_BYTES = 256


class MsgIdGenerator:
    """16-byte MsgIDs unique across restarts: 6 bytes of start time (ms since the epoch),
    4 random bytes, then a 6-byte counter.  Cheap to make (one int op) and increasing
    within a process."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self, prefix: bytes | None = None) -> None:
        if prefix is None:
            prefix = int(time.time() * 1000).to_bytes(6, "big") + os.urandom(4)
        if len(prefix) != 10:
            raise ValueError("prefix must be 10 bytes")
        self._prefix = int.from_bytes(prefix, "big") << 48
        self._counter = itertools.count(1)

    def next(self) -> bytes:
        return (self._prefix | next(self._counter)).to_bytes(16, "big")


def msg_id_str(raw: bytes) -> str:
    return raw.hex()


def msg_id_bytes(text: str) -> bytes:
    raw = bytes.fromhex(text)
    if len(raw) != 16:
        raise ValueError("a MsgID is 32 hex digits")
    return raw


def client_id_problem(client_id: object) -> str | None:
    """Why ``client_id`` is not acceptable, or None if it is."""
    if not isinstance(client_id, str):
        return "client id must be a string"
    if not client_id:
        return "client id is empty"
    if len(client_id.encode("utf-8", "surrogatepass")) > MAX_CLIENT_ID_BYTES:
        return f"client id is longer than {MAX_CLIENT_ID_BYTES} bytes"
    for ch in client_id:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cs", "Cf", "Zl", "Zp"):
            return f"client id contains a control character (U+{ord(ch):04X})"
    if client_id != client_id.strip():
        return "client id has leading or trailing whitespace"
    return None
