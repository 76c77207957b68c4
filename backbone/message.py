"""What the application sees: received messages, per-client outcomes, client listings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict

from .errors import (
    BackboneError,
    Backpressure,
    ClientNotConnected,
    PayloadTooLarge,
    TooManyPending,
)

# errors that mean the message never went on the wire
_NOT_SENT = (Backpressure, ClientNotConnected, PayloadTooLarge, TooManyPending)


class Message(NamedTuple):
    """A message handed to a handler (immutable).  ``client_id`` is the client it came
    from (server side) or this client's own id (client side)."""

    msg_id: str
    client_id: str
    payload: Any
    wait_ack: bool
    received_at: float
    headers: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """One client's outcome of a broadcast: ``result`` if ``ok``, else ``error``."""

    client_id: str
    result: Any = None
    error: BackboneError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class BroadcastReport:
    """Which clients a broadcast went to and, with ``wait_ack``, what each answered."""

    msg_id: str
    wait_ack: bool
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    @property
    def sent_to(self) -> list[str]:
        """Clients the message was written to (a WaitAck broadcast: also those whose
        result then failed)."""
        return [
            cid for cid, o in self.outcomes.items() if o.ok or not isinstance(o.error, _NOT_SENT)
        ]

    @property
    def results(self) -> dict[str, Any]:
        return {cid: o.result for cid, o in self.outcomes.items() if o.ok}

    @property
    def errors(self) -> dict[str, BackboneError]:
        return {cid: o.error for cid, o in self.outcomes.items() if o.error is not None}

    def __len__(self) -> int:
        return len(self.outcomes)


class ClientInfo(BaseModel):
    """A snapshot of one connected client (times are Unix seconds)."""

    model_config = ConfigDict(frozen=True)

    client_id: str
    session_id: str
    remote_address: str
    connected_at: float
    last_heartbeat_at: float | None
    heartbeats: int
    rtt: float | None
    pending_acks: int
    outbound_buffered: int
    messages_sent: int
    messages_received: int
