"""backbone — a QUIC command backbone: unicast, broadcast, WaitAck results, heartbeats,
reconnects, and an event bus that plugins turn into logs, traces, metrics and history."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import signals
    from .client import Client
    from .config import ClientConfig, ServerConfig
    from .errors import (
        AckTimeout,
        BackboneError,
        Backpressure,
        ClientGone,
        ClientNotConnected,
        ConfigError,
        ErrorCode,
        InvalidHeaders,
        InvalidPayload,
        NotConnected,
        PayloadTooLarge,
        PeerGone,
        RemoteError,
        ServerGone,
        TooManyPending,
    )
    from .message import BroadcastReport, ClientInfo, Message, Outcome
    from .server import Server
    from .state import ClientState

#: where each public name lives: imported on first use (PEP 562), so ``python -m
#: backbone clients`` and the other operator commands do not load aioquic, pydantic's
#: event catalogue and the rest just to talk to the admin API
_WHERE: dict[str, str] = {
    "signals": "",
    "Client": "client",
    "ClientConfig": "config",
    "ServerConfig": "config",
    **dict.fromkeys(
        (
            "AckTimeout",
            "BackboneError",
            "Backpressure",
            "ClientGone",
            "ClientNotConnected",
            "ConfigError",
            "ErrorCode",
            "InvalidHeaders",
            "InvalidPayload",
            "NotConnected",
            "PayloadTooLarge",
            "PeerGone",
            "RemoteError",
            "ServerGone",
            "TooManyPending",
        ),
        "errors",
    ),
    **dict.fromkeys(("BroadcastReport", "ClientInfo", "Message", "Outcome"), "message"),
    "Server": "server",
    "ClientState": "state",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if where == "":
        value: Any = importlib.import_module(f"{__name__}.{name}")
    else:
        value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__version__ = "0.1.0"

__all__ = [
    "AckTimeout",
    "BackboneError",
    "Backpressure",
    "BroadcastReport",
    "Client",
    "ClientConfig",
    "ClientGone",
    "ClientInfo",
    "ClientNotConnected",
    "ClientState",
    "ConfigError",
    "ErrorCode",
    "InvalidHeaders",
    "InvalidPayload",
    "Message",
    "NotConnected",
    "Outcome",
    "PayloadTooLarge",
    "PeerGone",
    "RemoteError",
    "Server",
    "ServerConfig",
    "ServerGone",
    "TooManyPending",
    "signals",
]
