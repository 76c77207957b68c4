"""One connection's protocol state, for each role.  Sans-I/O: bytes, ``now`` and frames in;
frames to send, parsed frames and deadlines out.  No sockets, no event loop.

Streams (both client-initiated, bidirectional, open for the connection's life):

* stream 0 — HELLO/WELCOME, MESSAGE, RESULT, GOAWAY
* stream 4 — PING/PONG only, so a large message never delays a heartbeat

Heartbeat acknowledgement: a client whose HELLO says ``"pong": false`` (backbone's own
client always does) learns that a PING arrived from the QUIC acknowledgement of the
packet that carried it (the asyncio layer adds a QUIC PING frame with the PING's nonce
and feeds aioquic's ``PingAcknowledged`` back through
:meth:`ClientSession.ping_acknowledged`), so the server sends no PONG: one datagram
each way per heartbeat instead of three (PING, PONG, the client's ACK of the PONG).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ErrorCode, ProtocolViolation
from .frames import (
    FRAME_OVERHEAD,
    PROTOCOL_VERSION,
    DataFrame,
    FrameDecoder,
    FrameType,
    encode_json_frame,
    encode_ping,
    encode_pong,
    parse_data_frame,
    parse_json_body,
    parse_u64,
)
from .heartbeat import HeartbeatMonitor, HeartbeatScheduler
from .ids import client_id_problem

MSG_STREAM = 0
HEARTBEAT_STREAM = 4
HANDSHAKE_FRAME_LIMIT = 16 * 1024  # HELLO / WELCOME / GOAWAY are small JSON objects

_MESSAGE = int(FrameType.MESSAGE)
_RESULT = int(FrameType.RESULT)


@dataclass(frozen=True, slots=True)
class Hello:
    client_id: str
    version: int
    max_payload: int
    max_inbound: int | None  # the client's handler window; it promises CREDIT frames
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Welcome:
    session_id: str
    max_payload: int
    max_inbound: int | None
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class GoAway:
    reason: str
    retry_after: float
    window: float


@dataclass(frozen=True, slots=True)
class Credit:
    processed: int


@dataclass(frozen=True, slots=True)
class PingReceived:
    nonce: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    rtt: float


Incoming = Hello | Welcome | GoAway | PingReceived | PongReceived | Credit | DataFrame


def _number(fields: dict[str, Any], name: str, default: float) -> float:
    value = fields.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e6:
        raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, f"{name} must be a number >= 0")
    return float(value)


def _parse_goaway(fields: dict[str, Any]) -> GoAway:
    return GoAway(
        str(fields.get("reason", "")),
        _number(fields, "retry_after", 0.0),
        _number(fields, "window", 0.0),
    )


def _window(fields: dict[str, Any]) -> int | None:
    value = fields.get("max_inbound")
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "max_inbound must be an integer > 0")
    return value


def _max_frame(max_payload: int) -> int:
    return max_payload + FRAME_OVERHEAD


class _Streams:
    def __init__(self) -> None:
        self._decoders = {
            MSG_STREAM: FrameDecoder(HANDSHAKE_FRAME_LIMIT),
            HEARTBEAT_STREAM: FrameDecoder(64),
        }
        self._out: list[tuple[int, bytes]] = []

    def _decoder(self, stream_id: int, end_stream: bool) -> FrameDecoder:
        decoder = self._decoders.get(stream_id)
        if decoder is None:
            raise ProtocolViolation(
                ErrorCode.PROTOCOL_ERROR, f"unexpected stream {stream_id} (only 0 and 4 are used)"
            )
        if end_stream:
            raise ProtocolViolation(
                ErrorCode.PROTOCOL_ERROR, f"peer ended stream {stream_id}, which must stay open"
            )
        return decoder

    def data_to_send(self) -> list[tuple[int, bytes]]:
        out, self._out = self._out, []
        return out


class ServerSession(_Streams):
    """The server's view of one client connection."""

    def __init__(
        self,
        *,
        max_payload: int,
        heartbeat_interval: float,
        heartbeat_misses: int,
        hello_timeout: float,
        now: float,
    ) -> None:
        super().__init__()
        self.state = "awaiting_hello"
        self.client_id: str | None = None
        self.max_payload = max_payload
        self.peer_max_payload = max_payload
        self.hello_deadline = now + hello_timeout
        self.heartbeat = HeartbeatMonitor(heartbeat_interval, heartbeat_misses, now)
        self.answer_pings = True  # PONG for every PING, unless the HELLO says otherwise

    def receive_stream_data(
        self, stream_id: int, data: bytes, end_stream: bool, now: float
    ) -> list[Incoming]:
        decoder = self._decoder(stream_id, end_stream)
        frames = decoder.feed(data)
        if stream_id == HEARTBEAT_STREAM:
            pings: list[Incoming] = []
            for ftype, body in frames:
                if ftype != FrameType.PING:
                    raise ProtocolViolation(
                        ErrorCode.PROTOCOL_ERROR,
                        f"{FrameType(ftype).name} frame on the heartbeat stream",
                    )
                if self.state != "open":
                    raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "PING before HELLO")
                if self.heartbeat.flooding(now):
                    raise ProtocolViolation(
                        ErrorCode.PROTOCOL_ERROR,
                        f"ping flood: more than {self.heartbeat.flood_limit} pings in one "
                        f"heartbeat interval ({self.heartbeat.interval:g} s)",
                    )
                self.heartbeat.record(now)
                nonce = parse_u64(ftype, body)
                if self.answer_pings:
                    self._out.append((HEARTBEAT_STREAM, encode_pong(nonce)))
                pings.append(PingReceived(nonce))
            return pings
        out: list[Incoming] = []
        for ftype, body in frames:
            if ftype in (_MESSAGE, _RESULT):
                # frames after a HELLO in the same read are fine: the caller accepts the
                # HELLO before it handles the frames that follow it
                if self.state == "awaiting_hello":
                    raise ProtocolViolation(
                        ErrorCode.PROTOCOL_ERROR, f"{FrameType(ftype).name} before HELLO"
                    )
                out.append(parse_data_frame(ftype, body))
            elif ftype == FrameType.CREDIT and self.state != "awaiting_hello":
                out.append(Credit(parse_u64(ftype, body)))
            elif ftype == FrameType.HELLO:
                if self.state != "awaiting_hello":
                    raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "second HELLO")
                out.append(self._parse_hello(body))
                self.state = "hello_received"
            else:
                raise ProtocolViolation(
                    ErrorCode.PROTOCOL_ERROR,
                    f"{FrameType(ftype).name} frame is not allowed from a client",
                )
        return out

    def _parse_hello(self, body: bytes) -> Hello:
        fields = parse_json_body(FrameType.HELLO, body)
        version = fields.get("version")
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise ProtocolViolation(
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {version!r} is not supported (server speaks {PROTOCOL_VERSION})",
            )
        client_id = fields.get("client_id")
        problem = client_id_problem(client_id)
        if problem:
            raise ProtocolViolation(ErrorCode.INVALID_CLIENT_ID, problem)
        assert isinstance(client_id, str)
        peer_max = fields.get("max_payload", self.max_payload)
        if not isinstance(peer_max, int) or isinstance(peer_max, bool) or peer_max < 1:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "max_payload must be an integer > 0")
        return Hello(client_id, version, peer_max, _window(fields), fields)

    def accept(self, hello: Hello, session_id: str, extra: dict[str, Any], now: float) -> None:
        """Open the session: queue the WELCOME and start the heartbeat clock."""
        self.client_id = hello.client_id
        self.peer_max_payload = hello.max_payload
        # a client that reads the QUIC acknowledgement of its PINGs needs no PONG
        self.answer_pings = hello.fields.get("pong") is not False
        self.state = "open"
        self._decoders[MSG_STREAM].max_frame = _max_frame(self.max_payload)
        self.heartbeat.last_heartbeat_at = now
        fields = {
            "version": PROTOCOL_VERSION,
            "session_id": session_id,
            "max_payload": self.max_payload,
            "heartbeat_interval": self.heartbeat.interval,
            "heartbeat_misses": self.heartbeat.misses,
            **extra,
        }
        self._out.append((MSG_STREAM, encode_json_frame(FrameType.WELCOME, fields)))

    def get_timer(self) -> float:
        if self.state == "open":
            return self.heartbeat.deadline()
        return self.hello_deadline

    def check_timer(self, now: float) -> ProtocolViolation | None:
        """What the deadline found: a close reason, or None if nothing is due."""
        if self.state == "open":
            if self.heartbeat.is_expired(now):
                return ProtocolViolation(
                    ErrorCode.HEARTBEAT_TIMEOUT,
                    f"no heartbeat for {now - self.heartbeat.last_heartbeat_at:.3f} s "
                    f"({self.heartbeat.misses} × {self.heartbeat.interval:g} s)",
                )
        elif self.state == "awaiting_hello" and now >= self.hello_deadline:
            return ProtocolViolation(ErrorCode.HELLO_TIMEOUT, "no HELLO in time")
        return None


class ClientSession(_Streams):
    """The client's view of its connection to the server."""

    def __init__(
        self,
        *,
        client_id: str,
        max_payload: int,
        heartbeat_interval: float,
        heartbeat_misses: int,
        now: float,
        max_inbound: int | None = None,
        heartbeat_align: float = 0.0,
        wall_offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.state = "awaiting_welcome"
        self.client_id = client_id
        self.max_payload = max_payload
        self.peer_max_payload = max_payload
        self.session_id = ""
        self.heartbeat = HeartbeatScheduler(
            heartbeat_interval,
            heartbeat_misses,
            now,
            align=heartbeat_align,
            wall_offset=wall_offset,
        )
        self._pings: list[int] = []
        self._out.append(
            (
                MSG_STREAM,
                encode_json_frame(
                    FrameType.HELLO,
                    {
                        "version": PROTOCOL_VERSION,
                        "client_id": client_id,
                        "max_payload": max_payload,
                        "heartbeat_interval": heartbeat_interval,
                        # no PONG: the QUIC acknowledgement of a PING answers it
                        "pong": False,
                        **({"max_inbound": max_inbound} if max_inbound else {}),
                    },
                ),
            )
        )

    def receive_stream_data(
        self, stream_id: int, data: bytes, end_stream: bool, now: float
    ) -> list[Incoming]:
        decoder = self._decoder(stream_id, end_stream)
        frames = decoder.feed(data)
        out: list[Incoming] = []
        if stream_id == HEARTBEAT_STREAM:
            for ftype, body in frames:
                if ftype != FrameType.PONG:
                    raise ProtocolViolation(
                        ErrorCode.PROTOCOL_ERROR,
                        f"{FrameType(ftype).name} frame on the heartbeat stream",
                    )
                pong = self.ping_acknowledged(parse_u64(ftype, body), now)
                if pong is not None:
                    out.append(pong)
            return out
        for ftype, body in frames:
            if ftype in (_MESSAGE, _RESULT):
                if self.state != "open":
                    raise ProtocolViolation(
                        ErrorCode.PROTOCOL_ERROR, f"{FrameType(ftype).name} before WELCOME"
                    )
                out.append(parse_data_frame(ftype, body))
            elif ftype == FrameType.CREDIT and self.state == "open":
                out.append(Credit(parse_u64(ftype, body)))
            elif ftype == FrameType.WELCOME:
                if self.state != "awaiting_welcome":
                    raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "second WELCOME")
                out.append(self._open(parse_json_body(ftype, body), now))
            elif ftype == FrameType.GOAWAY:
                out.append(_parse_goaway(parse_json_body(ftype, body)))
            else:
                raise ProtocolViolation(
                    ErrorCode.PROTOCOL_ERROR,
                    f"{FrameType(ftype).name} frame is not allowed from a server",
                )
        return out

    def _open(self, fields: dict[str, Any], now: float) -> Welcome:
        if type(fields.get("version")) is not int or fields.get("version") != PROTOCOL_VERSION:
            raise ProtocolViolation(
                ErrorCode.UNSUPPORTED_VERSION, f"server chose version {fields.get('version')!r}"
            )
        peer_max = fields.get("max_payload")
        if type(peer_max) is not int or peer_max < 1:
            raise ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "WELCOME without max_payload")
        self.state = "open"
        self.session_id = str(fields.get("session_id", ""))
        self.peer_max_payload = peer_max
        self._decoders[MSG_STREAM].max_frame = _max_frame(self.max_payload)
        # the server decides when it evicts, so its heartbeat settings win
        interval = _number(fields, "heartbeat_interval", self.heartbeat.interval)
        misses = fields.get("heartbeat_misses", self.heartbeat.misses)
        if interval > 0 and type(misses) is int and misses >= 1:
            self.heartbeat.interval = interval
            self.heartbeat.misses = misses
        # the heartbeat clock starts now; the first ping goes out at once
        self.heartbeat.started_at = now
        self.heartbeat.next_ping_at = now
        return Welcome(self.session_id, peer_max, _window(fields), fields)

    def get_timer(self) -> float | None:
        if self.state != "open":
            return None
        return self.heartbeat.deadline()

    def handle_timer(self, now: float) -> ProtocolViolation | None:
        """Send a ping if one is due; returns a reason if the server is declared dead."""
        if self.state != "open":
            return None
        hb = self.heartbeat
        if hb.server_dead(now):
            return ProtocolViolation(
                ErrorCode.HEARTBEAT_TIMEOUT,
                f"no pong from the server for {now - hb.silent_since():.3f} s",
            )
        if hb.ping_due(now):
            nonce = hb.ping_sent(now)
            self._out.append((HEARTBEAT_STREAM, encode_ping(nonce)))
            self._pings.append(nonce)
        return None

    def take_pings(self) -> list[int]:
        """The nonces of the PINGs queued since the last call: the caller asks its QUIC
        stack to acknowledge the packet that carries each (aioquic: ``send_ping``)."""
        pings, self._pings = self._pings, []
        return pings

    def ping_acknowledged(self, nonce: int, now: float) -> PongReceived | None:
        """The server's QUIC stack acknowledged the packet that carried PING ``nonce``:
        as good as a PONG (the server's event loop read it).  None for an unknown or
        superseded nonce."""
        rtt = self.heartbeat.pong_received(nonce, now)
        return None if rtt is None else PongReceived(rtt)
