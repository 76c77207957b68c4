"""Wire frames: encoding and an incremental, bounded decoder.  Pure: no I/O.

Every frame on a backbone stream is::

    length: u32 big-endian   -- number of bytes that follow (type + body)
    type:   u8
    body:   length - 1 bytes

See ``docs/protocol.md`` for every frame type and field.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Any

import orjson

from .errors import ErrorCode, InvalidHeaders, InvalidPayload, ProtocolViolation

PROTOCOL_VERSION = 1
ALPN = "backbone/1"

_LEN = struct.Struct("!I")
_U64 = struct.Struct("!Q")
# flags:u8, msg_id:16s, headers_len:u16
_MSG_HEAD = struct.Struct("!B16sH")
# length:u32, type:u8, flags:u8, msg_id:16s, headers_len:u16 — a data frame's whole head
_DATA_HEAD = struct.Struct("!IBB16sH")
MSG_HEAD_SIZE = _MSG_HEAD.size  # 19
MAX_HEADERS = 8 * 1024
FRAME_OVERHEAD = 4 + 1 + MSG_HEAD_SIZE + MAX_HEADERS


class FrameType(IntEnum):
    HELLO = 0x01
    WELCOME = 0x02
    PING = 0x03
    PONG = 0x04
    GOAWAY = 0x05
    CREDIT = 0x06
    MESSAGE = 0x10
    RESULT = 0x11


_KNOWN_TYPES = frozenset(int(t) for t in FrameType)

# MESSAGE flags
FLAG_WAIT_ACK = 0x01
FLAG_RAW = 0x02  # payload is raw bytes, not orjson
# RESULT flags
FLAG_ERROR = 0x04  # body is {"type": ..., "message": ...}


class DataFrame:
    """A decoded MESSAGE or RESULT frame (read-only by convention; a plain slotted class
    because a frozen dataclass costs a microsecond per message to build)."""

    __slots__ = ("body", "flags", "headers", "msg_id", "type")

    def __init__(
        self, type: int, flags: int, msg_id: bytes, headers: dict[str, str] | None, body: bytes
    ) -> None:
        self.type = type
        self.flags = flags
        self.msg_id = msg_id
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return (
            f"DataFrame(type={self.type:#x}, flags={self.flags:#x}, msg_id={self.msg_id.hex()}, "
            f"headers={self.headers!r}, body={len(self.body)} bytes)"
        )


# --- encoding -----------------------------------------------------------------


def _frame(ftype: int, body: bytes) -> bytes:
    return _LEN.pack(len(body) + 1) + bytes((ftype,)) + body


def encode_json_frame(ftype: FrameType, fields: dict[str, Any]) -> bytes:
    """HELLO, WELCOME and GOAWAY carry a JSON object body."""
    return _frame(ftype, orjson.dumps(fields))


def encode_ping(nonce: int) -> bytes:
    return _frame(FrameType.PING, _U64.pack(nonce))


def encode_pong(nonce: int) -> bytes:
    return _frame(FrameType.PONG, _U64.pack(nonce))


def encode_credit(processed: int) -> bytes:
    """CREDIT: how many MESSAGE frames this side has finished handling on the session."""
    return _frame(FrameType.CREDIT, _U64.pack(processed))


def encode_payload(payload: Any) -> tuple[int, bytes]:
    """Return ``(flags, body)`` for an application value: bytes pass through raw.
    :class:`InvalidPayload` (a ``TypeError``) for a value orjson cannot write."""
    if type(payload) is bytes:
        return FLAG_RAW, payload
    if isinstance(payload, (bytearray, memoryview)):
        return FLAG_RAW, bytes(payload)
    try:
        return 0, orjson.dumps(payload)
    except orjson.JSONEncodeError as exc:
        raise InvalidPayload(f"payload cannot be encoded as JSON: {exc}") from None


def decode_payload(flags: int, body: bytes) -> Any:
    if flags & FLAG_RAW:
        return body
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, f"payload is not valid JSON: {exc}")


def encode_data_frame(
    ftype: FrameType,
    flags: int,
    msg_id: bytes,
    body: bytes,
    headers: dict[str, str] | None = None,
) -> bytes:
    """Encode a MESSAGE or RESULT frame (``msg_id`` is 16 bytes)."""
    if not headers:
        return _DATA_HEAD.pack(1 + MSG_HEAD_SIZE + len(body), ftype, flags, msg_id, 0) + body
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise InvalidHeaders("header names and values must be strings")
    hdr = orjson.dumps(headers)
    if len(hdr) > MAX_HEADERS:
        raise InvalidHeaders(f"headers are {len(hdr)} bytes encoded, the limit is {MAX_HEADERS}")
    length = 1 + MSG_HEAD_SIZE + len(hdr) + len(body)
    return b"".join(
        (_LEN.pack(length), bytes((ftype,)), _MSG_HEAD.pack(flags, msg_id, len(hdr)), hdr, body)
    )


# --- decoding -----------------------------------------------------------------


def parse_json_body(ftype: int, body: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolViolation(
            ErrorCode.PROTOCOL_ERROR, f"{FrameType(ftype).name} body is not JSON: {exc}"
        )
    if not isinstance(value, dict):
        raise ProtocolViolation(
            ErrorCode.PROTOCOL_ERROR, f"{FrameType(ftype).name} body must be a JSON object"
        )
    return value


def parse_u64(ftype: int, body: bytes) -> int:
    if len(body) != 8:
        raise ProtocolViolation(
            ErrorCode.PROTOCOL_ERROR, f"{FrameType(ftype).name} body must be 8 bytes"
        )
    return int(_U64.unpack(body)[0])


def parse_data_frame(ftype: int, body: bytes) -> DataFrame:
    if len(body) < MSG_HEAD_SIZE:
        raise ProtocolViolation(
            ErrorCode.PROTOCOL_ERROR, f"{FrameType(ftype).name} frame is truncated"
        )
    flags, msg_id, hlen = _MSG_HEAD.unpack_from(body)
    end = MSG_HEAD_SIZE + hlen
    if end > len(body):
        raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "headers run past the end of the frame")
    headers = None
    if hlen:
        try:
            headers = orjson.loads(body[MSG_HEAD_SIZE:end])
        except orjson.JSONDecodeError:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "headers are not valid JSON")
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise ProtocolViolation(
                ErrorCode.PROTOCOL_ERROR, "headers must be a JSON object of strings"
            )
    return DataFrame(ftype, flags, msg_id, headers, body[end:])


class FrameDecoder:
    """Incremental decoder for one stream.

    ``feed(data)`` returns the complete frames as ``(type, body)`` pairs and keeps the
    rest.  A length over ``max_frame`` or an unknown type raises
    :class:`ProtocolViolation` at once, before the body is buffered, so memory stays
    bounded by ``max_frame`` plus one read.
    """

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        frames: list[tuple[int, bytes]] = []
        pos = 0
        size = len(buf)
        unpack = _LEN.unpack_from
        max_frame = self.max_frame
        while size - pos >= 5:
            (length,) = unpack(buf, pos)
            if length == 0:
                raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "frame of length 0")
            if length > max_frame:
                raise ProtocolViolation(
                    ErrorCode.FRAME_TOO_LARGE,
                    f"frame of {length} bytes exceeds the limit of {max_frame}",
                )
            ftype = buf[pos + 4]
            if ftype not in _KNOWN_TYPES:
                raise ProtocolViolation(
                    ErrorCode.PROTOCOL_ERROR, f"unknown frame type 0x{ftype:02x}"
                )
            end = pos + 4 + length
            if end > size:
                break
            frames.append((ftype, bytes(buf[pos + 5 : end])))
            pos = end
        if pos:
            del buf[:pos]
        return frames
