"""Configuration models.  Defaults follow the spec (15 s heartbeat, 3 misses, 1 MiB payload,
backoff 1 s → 60 s)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from .reset import is_hex_key

MiB = 1024 * 1024


class _Common(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    heartbeat_interval: float = Field(15.0, gt=0, description="seconds between client pings")
    heartbeat_misses: int = Field(
        3,
        ge=2,
        description="silent intervals before the peer is declared dead (at least 2: with "
        "1, a ping a moment late, as timers and the ping grid allow, evicts a live client)",
    )
    ack_timeout: float = Field(
        30.0, gt=0, allow_inf_nan=False, description="default WaitAck timeout, seconds"
    )
    max_payload: int = Field(MiB, ge=1, description="largest payload accepted, bytes")
    outbound_buffer_limit: int = Field(
        4 * MiB, ge=1, description="bytes queued but not yet acknowledged by a peer's QUIC stack"
    )
    slow_consumer_policy: Literal["reject", "disconnect"] = Field(
        "reject", description="what happens when outbound_buffer_limit is reached"
    )
    max_inbound_queue: int = Field(
        10_000, ge=1, description="messages waiting for the handler before the peer is closed"
    )
    sync_handler_in_thread: bool = Field(
        True, description="run plain (non-async) handlers in a worker thread"
    )
    quic_idle_timeout: float = Field(60.0, gt=0, description="QUIC idle timeout, seconds")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.outbound_buffer_limit < self.max_payload:
            raise ValueError(
                f"outbound_buffer_limit ({self.outbound_buffer_limit}) must be at least "
                f"max_payload ({self.max_payload})"
            )
        return self

    @property
    def heartbeat_timeout(self) -> float:
        return self.heartbeat_interval * self.heartbeat_misses


class ServerConfig(_Common):
    host: str = "127.0.0.1"
    port: int = Field(4433, ge=0, le=65535)
    certfile: str | None = None
    keyfile: str | None = None
    max_pending_per_client: int = Field(1000, ge=1)
    max_pending_total: int = Field(100_000, ge=1)
    hello_timeout: float = Field(10.0, gt=0, description="time from the first packet to the HELLO")
    close_grace: float = Field(
        2.0, ge=0, description="on stop, seconds to let pending results arrive before closing"
    )
    require_client_cert: bool = Field(
        False, description="mutual TLS: clients must present a certificate from client_cafile"
    )
    client_cafile: str | None = Field(
        None, description="CA bundle that client certificates must chain to (mutual TLS)"
    )
    drain_retry_after: float = Field(
        1.0, ge=0, description="on stop, GOAWAY tells clients to wait this long at least"
    )
    drain_window: float = Field(
        10.0, ge=0, description="on stop, clients spread their reconnects over this window"
    )
    max_new_sessions_per_second: float = Field(
        300.0, ge=0, description="admission control: new sessions per second (0: unlimited)"
    )
    admission_burst: int = Field(
        100, ge=1, description="admission control: new sessions allowed in one burst"
    )
    max_handshakes_in_flight: int = Field(
        256,
        ge=0,
        description="admission control: connections between their first packet and their "
        "HELLO at most; more are refused before the TLS handshake and back off, so a storm "
        "is admitted as fast as handshakes complete; from retry_above of it on, a new "
        "connection first proves its address with a QUIC Retry (0: no limit, no Retry)",
    )
    retry_above: float = Field(
        0.5,
        ge=0,
        le=1,
        description="the share of max_handshakes_in_flight taken from which a new "
        "connection must first prove its address with a QUIC Retry, so spoofed Initials "
        "cannot hold the places (0: always; 1: never)",
    )
    overload_window: float = Field(
        1.0,
        ge=0,
        description="a connection refused before its handshake is told to come back at "
        "its place in the server's return schedule plus up to this many seconds at random "
        "(the reason phrase's window, and session.refused's)",
    )
    max_receive_delay: float = Field(
        2.0,
        ge=0,
        description="datagrams that waited longer in the server's socket are dropped unread; "
        "at most heartbeat_interval × (heartbeat_misses - 1) (0: never dropped)",
    )
    stateless_reset_key: SecretStr | None = Field(
        None,
        description="stateless reset key material: at least 32 hex digits, or the path of a "
        "file of at least 16 bytes (not set: derived from the TLS private key, so a restarted "
        "server resets its predecessor's connections without any setup)",
    )
    stateless_reset_rate: float = Field(
        500.0,
        ge=0,
        description="stateless resets sent per second at most, in answer to packets of "
        "connections the server does not know (0: never send one)",
    )
    stateless_reset_burst: int = Field(
        1000, ge=1, description="stateless resets allowed in one burst"
    )
    gc_freeze: bool = Field(
        False,
        description="move live connections out of the cyclic garbage collector's reach "
        "(gc.freeze) as clients connect, and raise its thresholds to 50,000/20/100 while the "
        "server runs; needed for thousands of clients, but process-wide: on for "
        "`backbone serve`, off for an embedded Server (see docs/scaling.md)",
    )

    @field_validator("stateless_reset_key")
    @classmethod
    def _reset_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value() == "":
            return None
        text = value.get_secret_value()
        if all(c in "0123456789abcdefABCDEF" for c in text) and not is_hex_key(text):
            raise ValueError("a hex key needs an even number of hex digits, at least 32 (16 bytes)")
        return value

    @property
    def receive_delay_limit(self) -> float:
        """Datagrams that waited longer in the socket are dropped (0: never).  At most
        ``interval × (misses - 1)``: a steady queueing delay shorter than that only
        delays the PONGs, a client still gets one per interval; a longer one costs the
        clients their heartbeat budget anyway."""
        if not self.max_receive_delay:
            return 0.0
        return min(self.max_receive_delay, self._stale_after)

    @property
    def _stale_after(self) -> float:
        return self.heartbeat_interval * max(1, self.heartbeat_misses - 1)

    @property
    def behind_after(self) -> float:
        """A datagram that waited longer than this in the socket, or a timer that fired
        this late, means the server is behind: new handshakes are refused and heartbeat
        evictions held.  Half the drop limit."""
        return (self.receive_delay_limit or self._stale_after) / 2

    @model_validator(mode="after")
    def _check_server(self) -> Self:
        if self.max_pending_per_client > self.max_pending_total:
            raise ValueError("max_pending_per_client cannot exceed max_pending_total")
        if self.require_client_cert and not self.client_cafile:
            raise ValueError("require_client_cert needs client_cafile")
        return self


class ClientConfig(_Common):
    client_id: str
    host: str = "127.0.0.1"
    port: int = Field(4433, ge=1, le=65535)
    server_name: str | None = Field(None, description="TLS server name; defaults to host")
    cafile: str | None = None
    verify: bool = Field(True, description="verify the server certificate and host name")
    certfile: str | None = Field(
        None, description="client certificate, presented if the server asks for one"
    )
    keyfile: str | None = None
    max_pending: int = Field(1000, ge=1, description="results pending from the server")
    connect_timeout: float = Field(20.0, gt=0, description="handshake + HELLO/WELCOME, seconds")
    max_connects_per_loop: int = Field(
        64,
        ge=0,
        description=(
            "at most this many clients of one event loop (those with the same value) are "
            "in a connect attempt at once; the others wait for a place before theirs "
            "starts, and connect_timeout counts from then (0: no limit)"
        ),
    )
    gc_freeze: bool = Field(
        False,
        description="when the client starts, collect once and move every object the "
        "process has then (its imports, its setup) out of the cyclic garbage collector's "
        "reach (gc.freeze): a full collection then takes well under 1 ms instead of about "
        "14 ms, a pause every message handled meanwhile waits for; process-wide and never "
        "undone, so on for `backbone client`, off for an embedded Client",
    )
    heartbeat_align: float = Field(
        0.1,
        ge=0,
        description="pings go out on multiples of this many seconds of the wall clock (at "
        "most heartbeat_interval / 8), so clients with synchronised clocks reach the server "
        "in bunches it reads in one go (0: not aligned)",
    )
    backoff_initial: float = Field(1.0, gt=0)
    backoff_max: float = Field(60.0, gt=0)
    backoff_factor: float = Field(2.0, ge=1)
    backoff_jitter: float = Field(0.2, ge=0, lt=1)
    stop_on_auth_failure: bool = Field(
        False, description="stop reconnecting when the server refuses our certificate"
    )
    backoff_reset_after: float = Field(
        30.0, ge=0, description="a connection up this long resets the backoff"
    )

    @model_validator(mode="after")
    def _check_client(self) -> Self:
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max must be at least backoff_initial")
        from .ids import client_id_problem

        problem = client_id_problem(self.client_id)
        if problem:
            raise ValueError(problem)
        return self
