"""Client connection states and the transitions allowed between them (data, not code)."""

from __future__ import annotations

from enum import StrEnum


class ClientState(StrEnum):
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    CLOSED = "closed"


TRANSITIONS: dict[ClientState, frozenset[ClientState]] = {
    ClientState.IDLE: frozenset({ClientState.CONNECTING, ClientState.CLOSED}),
    ClientState.CONNECTING: frozenset(
        {ClientState.CONNECTED, ClientState.BACKOFF, ClientState.CLOSED}
    ),
    ClientState.CONNECTED: frozenset({ClientState.BACKOFF, ClientState.CLOSED}),
    ClientState.BACKOFF: frozenset({ClientState.CONNECTING, ClientState.CLOSED}),
    ClientState.CLOSED: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


def check_transition(old: ClientState, new: ClientState) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"client state cannot go from {old.value} to {new.value}")
