"""The event catalogue: one frozen pydantic model per fact, named in the past tense.

Every event has a ``kind`` (dotted, lower case), a per-process monotonic ``seq``, a
wall-clock timestamp ``at`` (Unix seconds), the ``role`` that emitted it ("server" or
"client") and the ids involved.  ``docs/events.md`` lists every kind with its fields.
Events are only built when somebody listens (see :mod:`backbone.signals`).
"""

from __future__ import annotations

import itertools
import time
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticUndefined

_seq = itertools.count(1)

Role = Literal["server", "client"]


def _next_seq() -> int:
    return next(_seq)


_new = object.__new__
_set = object.__setattr__
_REQUIRED: Any = object()  # marks a field without a default in a template


class Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str
    seq: int = Field(default_factory=_next_seq)
    at: float = Field(default_factory=time.time)
    role: Role

    #: every field in declaration order with its default (``_REQUIRED`` if none); built
    #: once per class, for :meth:`unchecked`
    _template: ClassVar[dict[str, Any]] = {}
    #: the fields without a default
    _required: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._template = {
            name: _REQUIRED if f.default is PydanticUndefined else f.default
            for name, f in cls.model_fields.items()
        }
        cls._required = frozenset(k for k, f in cls.model_fields.items() if f.is_required())

    @classmethod
    def unchecked(cls, **fields: Any) -> Self:
        """The event, built without validation: for the core's once-per-message events,
        whose values are already of the declared types (``tests/test_events.py`` checks
        that what the core builds equals the validated event, field for field).
        ``seq`` and ``at`` are set as ``__init__`` sets them; an unknown or missing
        field raises ``TypeError``.  Saves about a microsecond per event."""
        data = cls._template.copy()
        data["seq"] = next(_seq)
        data["at"] = time.time()
        data.update(fields)
        if len(data) != len(cls._template) or not cls._required <= fields.keys():
            unknown = sorted(set(fields) - set(cls._template))
            missing = [k for k, v in data.items() if v is _REQUIRED]
            raise TypeError(f"{cls.__name__}: unknown fields {unknown}, missing {missing}")
        event = _new(cls)
        _set(event, "__dict__", data)
        _set(event, "__pydantic_fields_set__", set(fields))
        _set(event, "__pydantic_extra__", None)
        _set(event, "__pydantic_private__", None)
        return event


# --- server lifecycle -------------------------------------------------------------


class ServerStarted(Event):
    kind: Literal["server.started"] = "server.started"
    host: str
    port: int


class ServerStopped(Event):
    kind: Literal["server.stopped"] = "server.stopped"
    host: str
    port: int
    reason: str


# --- connections --------------------------------------------------------------------


class Connected(Event):
    """A session is open: the server accepted a HELLO, or the client got its WELCOME."""

    kind: Literal["connected"] = "connected"
    client_id: str
    session_id: str
    peer: str
    setup_time: float | None = None  # client side: seconds from connect() to WELCOME


class Disconnected(Event):
    kind: Literal["disconnected"] = "disconnected"
    client_id: str
    session_id: str
    reason: str  # closed | replaced | heartbeat_timeout | slow_consumer | protocol_error | ...
    code: int | None = None
    detail: str = ""
    duration: float = 0.0  # how long the session was open, seconds


class HeartbeatTimedOut(Event):
    """Server: a client was silent for interval × misses and is evicted.
    Client: the server stopped answering pings and is declared dead."""

    kind: Literal["heartbeat.timed_out"] = "heartbeat.timed_out"
    client_id: str
    session_id: str
    silent_for: float
    last_heartbeat_at: float | None = None


class StateChanged(Event):
    kind: Literal["state.changed"] = "state.changed"
    client_id: str
    old: str
    new: str
    reason: str = ""


class ConnectFailed(Event):
    kind: Literal["connect.failed"] = "connect.failed"
    client_id: str
    reason: str  # refused | timeout | tls | protocol | rejected | error
    detail: str = ""
    attempt: int


class ReconnectScheduled(Event):
    kind: Literal["reconnect.scheduled"] = "reconnect.scheduled"
    client_id: str
    attempt: int
    delay: float
    reason: str


class ProtocolViolated(Event):
    """The peer broke the protocol; its connection is closed with ``code``."""

    kind: Literal["protocol.violated"] = "protocol.violated"
    client_id: str | None
    peer: str
    code: int
    code_name: str
    reason: str


# --- heartbeats ----------------------------------------------------------------------


class HeartbeatReceived(Event):
    """Server: a ping arrived and was answered."""

    kind: Literal["heartbeat.received"] = "heartbeat.received"
    client_id: str
    session_id: str


class HeartbeatAcknowledged(Event):
    """Client: a pong arrived."""

    kind: Literal["heartbeat.acknowledged"] = "heartbeat.acknowledged"
    client_id: str
    session_id: str
    rtt: float


# --- messages and results -------------------------------------------------------------


class MessageSent(Event):
    kind: Literal["message.sent"] = "message.sent"
    msg_id: str
    client_id: str  # the client the message went to (server) or came from (client)
    size: int
    wait_ack: bool
    broadcast: bool = False
    headers: dict[str, str] | None = None


class MessageReceived(Event):
    kind: Literal["message.received"] = "message.received"
    msg_id: str
    client_id: str
    size: int
    wait_ack: bool
    headers: dict[str, str] | None = None


class MessageProcessed(Event):
    """The handler finished with a message (with or without a result asked for).
    ``started_at`` is when the handler began (Unix seconds)."""

    kind: Literal["message.processed"] = "message.processed"
    msg_id: str
    client_id: str
    wait_ack: bool
    ok: bool
    error_type: str | None = None
    started_at: float
    processing_time: float
    headers: dict[str, str] | None = None


class AckSent(Event):
    """The handler finished and its result (or error) went back to the sender."""

    kind: Literal["ack.sent"] = "ack.sent"
    msg_id: str
    client_id: str
    ok: bool
    error_type: str | None = None
    size: int
    processing_time: float


class AckReceived(Event):
    """A result arrived for a pending message and resolved it."""

    kind: Literal["ack.received"] = "ack.received"
    msg_id: str
    client_id: str
    ok: bool
    error_type: str | None = None
    latency: float
    headers: dict[str, str] | None = None


class AckTimedOut(Event):
    kind: Literal["ack.timed_out"] = "ack.timed_out"
    msg_id: str
    client_id: str
    timeout: float


class AckFailed(Event):
    """A pending result was failed because the peer went away or we are closing."""

    kind: Literal["ack.failed"] = "ack.failed"
    msg_id: str
    client_id: str
    reason: str
    latency: float


class LateAckDropped(Event):
    """A result arrived after its message had already timed out; it is dropped."""

    kind: Literal["ack.late"] = "ack.late"
    msg_id: str
    client_id: str


class SendRejected(Event):
    """A send was refused before anything went on the wire."""

    kind: Literal["send.rejected"] = "send.rejected"
    client_id: str
    reason: str  # not_connected | payload_too_large | backpressure | too_many_pending
    detail: str
    msg_id: str | None = None  # set when the MsgID was already assigned


class AuthenticationFailed(Event):
    """Mutual TLS: a client's certificate was refused; its connection is closed with
    AUTH_FAILED.  ``reason``: no_certificate | unknown_ca | expired | not_yet_valid |
    id_mismatch | invalid."""

    kind: Literal["auth.failed"] = "auth.failed"
    client_id: str | None
    peer: str
    reason: str
    detail: str


class SessionRefused(Event):
    """The server refused a new session.  Admission control refuses a new connection at
    its first packet, before the TLS handshake (``overloaded``: answered with QUIC
    CONNECTION_REFUSED; ``server_behind``: dropped, the client retransmits), so
    ``client_id`` is None then.  While shutting down the server refuses a HELLO with
    GOAWAY (``shutting_down``), telling the client when to come back."""

    kind: Literal["session.refused"] = "session.refused"
    client_id: str | None  # None when refused before the handshake (not known yet)
    peer: str
    reason: str  # overloaded | server_behind (both before the handshake) | shutting_down
    retry_after: float
    window: float


class GoAwaySent(Event):
    """The server told a connected client to go away (drain on stop)."""

    kind: Literal["goaway.sent"] = "goaway.sent"
    client_id: str
    reason: str
    retry_after: float
    window: float


class GoAwayReceived(Event):
    kind: Literal["goaway.received"] = "goaway.received"
    client_id: str
    reason: str
    retry_after: float
    window: float


AnyEvent = Annotated[
    ServerStarted
    | ServerStopped
    | Connected
    | Disconnected
    | HeartbeatTimedOut
    | StateChanged
    | ConnectFailed
    | ReconnectScheduled
    | ProtocolViolated
    | HeartbeatReceived
    | HeartbeatAcknowledged
    | MessageSent
    | MessageReceived
    | MessageProcessed
    | AckSent
    | AckReceived
    | AckTimedOut
    | AckFailed
    | LateAckDropped
    | SendRejected
    | AuthenticationFailed
    | SessionRefused
    | GoAwaySent
    | GoAwayReceived,
    Field(discriminator="kind"),
]

EVENT_TYPES: tuple[type[Event], ...] = (
    ServerStarted,
    ServerStopped,
    Connected,
    Disconnected,
    HeartbeatTimedOut,
    StateChanged,
    ConnectFailed,
    ReconnectScheduled,
    ProtocolViolated,
    HeartbeatReceived,
    HeartbeatAcknowledged,
    MessageSent,
    MessageReceived,
    MessageProcessed,
    AckSent,
    AckReceived,
    AckTimedOut,
    AckFailed,
    LateAckDropped,
    SendRejected,
    AuthenticationFailed,
    SessionRefused,
    GoAwaySent,
    GoAwayReceived,
)
