"""Errors: the public exception hierarchy and the wire-level close codes."""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """QUIC application close codes (``CONNECTION_CLOSE`` type 0x1d).  See docs/protocol.md."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    FRAME_TOO_LARGE = 0x2
    INVALID_CLIENT_ID = 0x3
    UNKNOWN_MESSAGE_ID = 0x4
    REPLACED = 0x5
    HEARTBEAT_TIMEOUT = 0x6
    SLOW_CONSUMER = 0x7
    GOING_AWAY = 0x8
    UNSUPPORTED_VERSION = 0x9
    AUTH_FAILED = 0xA
    HELLO_TIMEOUT = 0xB
    INTERNAL_ERROR = 0xC
    OVERLOADED = 0xD
    INBOUND_OVERFLOW = 0xE

    @property
    def reason_name(self) -> str:
        return self.name.lower()


class ProtocolViolation(Exception):
    """The peer broke the protocol; the connection must be closed with ``code``."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"{code.name}: {reason}")
        self.code = code
        self.reason = reason


class BackboneError(Exception):
    """Base of every error backbone raises to the application."""


class NotConnected(BackboneError):
    """There is no connection to send on (client side: not connected to the server)."""


class ClientNotConnected(NotConnected):
    """The target client is not connected.  Raised at once, never after a timeout."""

    def __init__(self, client_id: str) -> None:
        super().__init__(f"client {client_id!r} is not connected")
        self.client_id = client_id


class AckTimeout(BackboneError):
    """No result arrived within the timeout."""

    def __init__(self, msg_id: str, peer: str, timeout: float) -> None:
        super().__init__(f"no result for message {msg_id} from {peer!r} within {timeout:g} s")
        self.msg_id = msg_id
        self.peer = peer
        self.timeout = timeout


class PeerGone(BackboneError):
    """The connection went away while a result was pending."""

    def __init__(self, msg_id: str, peer: str, reason: str) -> None:
        super().__init__(f"{peer!r} went away ({reason}) before answering message {msg_id}")
        self.msg_id = msg_id
        self.peer = peer
        self.reason = reason


class ClientGone(PeerGone):
    """Server side: the client disconnected, was evicted or replaced, or the server closed."""


class ServerGone(PeerGone):
    """Client side: the connection to the server was lost while a result was pending."""


class RemoteError(BackboneError):
    """The peer's handler raised; carries the remote error type and message."""

    def __init__(self, msg_id: str, peer: str, error_type: str, message: str) -> None:
        super().__init__(f"handler on {peer!r} raised {error_type}: {message}")
        self.msg_id = msg_id
        self.peer = peer
        self.error_type = error_type
        self.message = message


class PayloadTooLarge(BackboneError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"payload of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class Backpressure(BackboneError):
    """The outbound buffer for this peer is full (slow consumer, policy ``reject``)."""

    def __init__(self, peer: str, buffered: int, limit: int, unhandled: int | None = None) -> None:
        if unhandled is not None:
            why = f"{unhandled} messages are waiting for its handler"
        else:
            why = f"outbound buffer is full ({buffered} of {limit} bytes)"
        super().__init__(f"{peer!r} is not keeping up: {why}")
        self.peer = peer
        self.buffered = buffered
        self.limit = limit
        self.unhandled = unhandled


class TooManyPending(BackboneError):
    def __init__(self, scope: str, limit: int) -> None:
        super().__init__(f"too many results pending ({scope} limit {limit})")
        self.scope = scope
        self.limit = limit


def reject_reason(exc: BackboneError) -> str:
    """The ``SendRejected.reason`` for a send refused with ``exc``."""
    if isinstance(exc, NotConnected):
        return "not_connected"
    if isinstance(exc, PayloadTooLarge):
        return "payload_too_large"
    if isinstance(exc, Backpressure):
        return "backpressure"
    if isinstance(exc, TooManyPending):
        return "too_many_pending"
    if isinstance(exc, InvalidHeaders):
        return "invalid_headers"
    if isinstance(exc, InvalidPayload):
        return "invalid_payload"
    return "error"


class InvalidHeaders(BackboneError, ValueError):
    """Message headers that cannot be sent (not strings, or over 8 KiB encoded)."""


class InvalidPayload(BackboneError, TypeError):
    """A payload that cannot be encoded: not serializable by orjson (an object of an
    unknown type, a non-string key), or nested deeper than it writes (254 levels)."""


class ConfigError(BackboneError, ValueError):
    """A configuration value was refused."""
