"""backbone — a QUIC command backbone: unicast, broadcast, WaitAck results, heartbeats,
reconnects, and an event bus that plugins turn into logs, traces, metrics and history."""

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
