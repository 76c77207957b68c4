"""The backbone server: accepts clients, sends to one or all, collects results."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Iterable
from typing import Any

from . import propagation, signals
from ._link import (
    HandlerOwner,
    Link,
    LinkHolder,
    PendingOwner,
    internal_error,
    report_dropped,
    report_transport_violation,
    report_violation,
    stop_sending_violation,
)
from ._quic import (
    QuicEndpoint,
    Refusal,
    ResetHooks,
    SocketReader,
    peer_certificates,
    private_key_material,
    request_client_certificate,
    server_configuration,
    server_connections,
    start_server,
)
from .admission import HandshakeGate, TokenBucket, refusal_phrase
from .config import ServerConfig
from .errors import (
    BackboneError,
    ClientGone,
    ClientNotConnected,
    ErrorCode,
    InvalidHeaders,
    InvalidPayload,
    ProtocolViolation,
)
from .events import (
    AuthenticationFailed,
    Connected,
    Disconnected,
    GoAwaySent,
    HeartbeatReceived,
    HeartbeatTimedOut,
    Role,
    ServerStarted,
    ServerStopped,
    SessionRefused,
)
from .frames import (
    FLAG_WAIT_ACK,
    DataFrame,
    FrameType,
    encode_data_frame,
    encode_json_frame,
    encode_payload,
)
from .gc_freeze import ConnectionFreezer
from .heartbeat import round_up, timer_slot
from .identity import (
    AuthFailure,
    ClientIdentity,
    check_client_id,
    load_ca_certificates,
    verify_client_certificate,
)
from .ids import MsgIdGenerator
from .message import BroadcastReport, ClientInfo, Outcome
from .pending import PendingTable, check_timeout
from .plugins import Plugin, install_plugin, resolve_plugins, uninstall_plugin
from .reset import StatelessResetter, derive_reset_key, key_material
from .session import HEARTBEAT_STREAM, MSG_STREAM, Credit, Hello, ServerSession
from .stats import Figures, Stats

log = logging.getLogger("backbone.server")


class _ServerConnection(LinkHolder, QuicEndpoint):
    """One client connection on the server."""

    def __init__(self, quic: Any, server: Server, **_: Any) -> None:
        super().__init__(quic)
        self.server = server
        cfg = server.config
        now = self._loop.time()
        self.session = ServerSession(
            max_payload=cfg.max_payload,
            heartbeat_interval=cfg.heartbeat_interval,
            heartbeat_misses=cfg.heartbeat_misses,
            hello_timeout=cfg.hello_timeout,
            now=now,
        )
        self.link: Link | None = None
        self.identity: ClientIdentity | None = None
        if cfg.require_client_cert:
            request_client_certificate(quic)
        self.session_id = ""
        self.connected_at_wall = 0.0
        self._hb_timer: asyncio.TimerHandle | None = None
        self._arm(self.session.get_timer())
        # admitted by the server's HandshakeGate: in flight until its session opens
        self._in_flight = True
        server._gate.opened()

    def handshake_finished(self) -> None:
        """The session opened, or the connection ended before it did: no longer counted
        against ``max_handshakes_in_flight``."""
        if self._in_flight:
            self._in_flight = False
            self.server._gate.finished()

    # --- timers -------------------------------------------------------------------------
    def _arm(self, when: float) -> None:
        if self.session.state == "open":  # heartbeat deadlines; the HELLO's stays exact
            when = round_up(when, timer_slot(self.session.heartbeat.interval))
        self._hb_timer = self._loop.call_at(when, self._on_timer)

    def rearm(self) -> None:
        if self._hb_timer is not None:
            self._hb_timer.cancel()
        self._arm(self.session.get_timer())

    def _on_timer(self) -> None:
        timer, self._hb_timer = self._hb_timer, None
        if self.terminated_reported:
            return
        now = self._loop.time()
        if timer is not None:
            self.server._timer_fired(timer.when(), now)
        verdict = self.session.check_timer(now)
        if verdict is None:
            self._arm(self.session.get_timer())
            return
        if verdict.code == ErrorCode.HEARTBEAT_TIMEOUT and self.link is not None:
            hb = self.session.heartbeat
            evict_at = hb.evict_at(self.server.behind_at())
            if now < evict_at:
                # the server was behind during the silence: the pings may be waiting in
                # its socket, or have been dropped there
                log.debug("holding the eviction of %r until %.3f", self.link.client_id, evict_at)
                self._arm(evict_at)
                return
            if signals.wants(signals.on_timeout):
                signals.emit(
                    signals.on_timeout,
                    self.server,
                    HeartbeatTimedOut(
                        role="server",
                        client_id=self.link.client_id,
                        session_id=self.session_id,
                        silent_for=self._loop.time() - hb.last_heartbeat_at,
                        last_heartbeat_at=self.server._wall(hb.last_heartbeat_at),
                    ),
                )
            log.warning("evicting %r: %s", self.link.client_id, verdict.reason)
            self.shut("heartbeat_timeout", verdict.code, verdict.reason)
        else:
            self.violation(verdict)

    def handshake_done(self) -> None:
        server = self.server
        if not server.config.require_client_cert:
            return
        leaf, chain = peer_certificates(self._quic)
        try:
            self.identity = verify_client_certificate(leaf, chain, server._client_cas)
        except AuthFailure as failure:
            server._auth_failed(self, None, failure)

    # --- input ----------------------------------------------------------------------------
    def stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        now = self._loop.time()
        session = self.session
        try:
            items = session.receive_stream_data(stream_id, data, end_stream, now)
            link = self.link
            for item in items:
                if type(item) is DataFrame:
                    assert link is not None
                    link.on_frame(item, now)
                elif type(item) is Credit:
                    assert link is not None
                    link.on_credit(item.processed)
                elif type(item) is Hello:
                    self.server._accept(self, item, now)
                    if self.terminated_reported:  # refused
                        return
                    link = self.link
        except ProtocolViolation as pv:
            self.violation(pv)
            return
        except Exception as exc:  # a bug, or input no check foresaw: close this one only
            log.exception("handling stream %d data of %s failed", stream_id, self.peer_address())
            self.violation(internal_error(stream_id, exc))
            return
        if stream_id == HEARTBEAT_STREAM and items:  # PINGs
            # the PING's ACK goes with this read batch's transmit, not 1 ms later: with
            # the PONG (one datagram back instead of two), or alone as the answer a
            # client reads when its HELLO said "pong": false
            self.ack_now()
            for sid, out in session.data_to_send():
                self.queue(sid, out)
            if self.link is not None and signals.wants(signals.on_heartbeat):
                signals.emit(
                    signals.on_heartbeat,
                    self.server,
                    HeartbeatReceived(
                        role="server", client_id=self.link.client_id, session_id=self.session_id
                    ),
                )

    def violation(self, pv: ProtocolViolation) -> None:
        report_violation(self.server, self, self.link.client_id if self.link else None, pv)

    def stop_sending_received(self, stream_id: int, error_code: int) -> None:
        self.violation(stop_sending_violation(stream_id, error_code))

    def transport_violation(self, error_code: int, reason: str) -> None:
        super().transport_violation(error_code, reason)
        client_id = self.link.client_id if self.link else None
        report_transport_violation(self.server, self, client_id, error_code, reason)

    # --- teardown ----------------------------------------------------------------------------

    def terminated(self, error_code: int, reason: str, by_peer: bool) -> None:
        self.handshake_finished()
        if self._hb_timer is not None:
            self._hb_timer.cancel()
            self._hb_timer = None
        if by_peer:
            why = "closed_by_client" if error_code == 0 else "connection_lost"
            if reason == "Idle timeout":
                why = "idle_timeout"
        else:
            why = self.reason or "closed"
        self.server._forget(self, why, error_code, reason)


class Server(HandlerOwner, PendingOwner):
    """A backbone server.  ``async with Server(...)`` listens and, on exit, stops gracefully.

    Configuration comes as keywords or as ``config=ServerConfig(...)``.
    """

    role: Role = "server"
    config: ServerConfig

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        *,
        certfile: str | None = None,
        keyfile: str | None = None,
        config: ServerConfig | None = None,
        plugins: Iterable[Plugin | str] | None = None,
        **settings: Any,
    ) -> None:
        base = config.model_dump() if config is not None else {}
        for key, value in (
            ("host", host),
            ("port", port),
            ("certfile", certfile),
            ("keyfile", keyfile),
        ):
            if value is not None:
                base[key] = value
        base.update(settings)
        self.config = ServerConfig(**base)
        if not self.config.certfile:
            raise BackboneError("a server needs certfile (and keyfile) for TLS")
        self._sessions: dict[str, _ServerConnection] = {}
        self._ids = MsgIdGenerator()
        self._session_seq = 0
        self._server_id = os.urandom(4).hex()
        self._quic_server: Any = None
        self._port = self.config.port
        self._closing = False
        self._wall_offset = 0.0
        self.plugins: list[Plugin] = resolve_plugins(plugins)
        self.figures = Figures()
        self._sampler: asyncio.TimerHandle | None = None
        self._reader: SocketReader | None = None
        self._timers_late_at = -math.inf
        self.refused_handshakes = 0
        #: new connections answered with a QUIC Retry (address validation under load)
        self.retries_sent = 0
        self._refusals_logged_at = -math.inf
        self._refusals_unlogged = 0
        self._dropped_reported = 0
        self._resetter: StatelessResetter | None = None
        self._resets_reported = (0, 0)
        self._lag_limit = self.config.behind_after / 2
        self._freezer = ConnectionFreezer() if self.config.gc_freeze else None

    # --- lifecycle -----------------------------------------------------------------------------
    @property
    def draining(self) -> bool:
        return self._closing

    @property
    def listening(self) -> bool:
        return self._quic_server is not None and not self._closing

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return self.config.host, self._port

    def _wall(self, loop_time: float) -> float:
        return loop_time + self._wall_offset

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.pending = PendingTable(
            self.config.max_pending_per_client, self.config.max_pending_total
        )
        self._client_cas = (
            load_ca_certificates(self.config.client_cafile) if self.config.client_cafile else []
        )
        self._admission = TokenBucket(
            self.config.max_new_sessions_per_second,
            self.config.admission_burst,
            self._loop.time(),
        )
        cfg = self.config
        self._gate = HandshakeGate(
            self._admission, cfg.behind_after, cfg.max_handshakes_in_flight, cfg.retry_above
        )
        self._wall_offset = time.time() - self._loop.time()
        for plugin in self.plugins:
            install_plugin(plugin, self)
        cfg = self.config
        qconf = server_configuration(cfg.certfile or "", cfg.keyfile, cfg.quic_idle_timeout)
        reset_material = self._reset_material(qconf)

        def resets(bound_port: int) -> ResetHooks:
            self._resetter = resetter = StatelessResetter(
                derive_reset_key(reset_material, bound_port),
                cfg.stateless_reset_rate,
                cfg.stateless_reset_burst,
                self._loop.time(),
            )
            return ResetHooks(resetter.token, self._answer_unknown if resetter.enabled else None)

        self._quic_server, self._reader, self._port = await start_server(
            cfg.host,
            cfg.port,
            qconf,
            lambda quic, **kw: _ServerConnection(quic, self, **kw),
            gate=self._admit_handshake,
            resets=resets,
            max_wait=cfg.receive_delay_limit,
            late_after=cfg.behind_after,
        )
        if self._freezer is not None:  # listening: from here on stop() undoes it
            self._freezer.start()
        self._sample()
        log.info("listening on %s:%d (QUIC, ALPN backbone/1)", cfg.host, self._port)
        if signals.wants(signals.on_server_started):
            signals.emit(
                signals.on_server_started,
                self,
                ServerStarted(role="server", host=cfg.host, port=self._port),
            )

    def _reset_material(self, qconf: Any) -> bytes:
        """What the stateless reset key is derived from (with the port): the
        ``stateless_reset_key`` setting, else the TLS private key, so a server restarted
        with the same certificate on the same port has the same key."""
        setting = self.config.stateless_reset_key
        if setting is None:
            return private_key_material(qconf)
        try:
            return key_material(setting.get_secret_value())
        except (OSError, ValueError) as exc:
            raise BackboneError(f"stateless_reset_key: {exc}") from None

    def _answer_unknown(self, cid: bytes, size: int, peer: str) -> bytes | None:
        """A packet for a connection this server does not know (its predecessor's, one
        already closed, or garbage): the stateless reset to send back, or None (too small,
        or over the rate limit).  Counted in ``stats().stateless_resets`` and summed up in
        the log once a second (:meth:`_sample`)."""
        resetter = self._resetter
        assert resetter is not None
        packet = resetter.answer(cid, size, self._loop.time())
        if packet is not None:
            self.figures.stateless_resets += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("stateless reset to %s for unknown connection %s", peer, cid.hex())
        return packet

    def _report_resets(self) -> None:
        resetter = self._resetter
        if resetter is None:
            return
        sent, limited = resetter.sent, resetter.limited
        last_sent, last_limited = self._resets_reported
        if limited > last_limited:
            log.warning(
                "sent %d stateless reset(s) to packets of unknown connections, and %d more "
                "were over the limit of %g/s",
                sent - last_sent,
                limited - last_limited,
                self.config.stateless_reset_rate,
            )
        elif sent > last_sent:
            log.info(
                "sent %d stateless reset(s) to packets of unknown connections "
                "(clients of a previous run of this server, or of closed connections)",
                sent - last_sent,
            )
        self._resets_reported = (sent, limited)

    def _sample(self) -> None:
        now = self._loop.time()
        if self._sampler is not None:
            self._timer_fired(self._sampler.when(), now)
        self._report_resets()
        reader = self._reader
        if reader is not None and reader.dropped > self._dropped_reported:
            log.warning(
                "behind: dropped %d datagram(s) that waited more than %.2f s in the socket",
                reader.dropped - self._dropped_reported,
                reader.max_wait,
            )
            self._dropped_reported = reader.dropped
        self.figures.sample(now)
        if self._freezer is not None:
            self._freezer.tick(len(self._sessions))
        self._sampler = self._loop.call_later(1.0, self._sample)

    # --- overload -------------------------------------------------------------------------
    def _timer_fired(self, due: float, now: float) -> None:
        """A timer that fires late means the loop is behind."""
        if now - due > self.config.behind_after:
            self._timers_late_at = now

    def _reading_first(self) -> bool:
        """Results are awaited, or the socket reader's last batch left datagrams that had
        waited more than half of ``behind_after``: the Flusher writes in short
        slices, so the server reads its answers and catches up with its socket."""
        if super()._reading_first():
            return True
        reader = self._reader
        return reader is not None and reader.lag > self._lag_limit

    def behind_at(self) -> float:
        """The last time (loop clock) the server was behind its input: a datagram waited
        too long in its socket, or was dropped there, or a timer fired late.  Heartbeat
        evictions are held after it (:meth:`HeartbeatMonitor.evict_at`)."""
        late_read = self._reader.late_at if self._reader is not None else -math.inf
        return max(late_read, self._timers_late_at)

    def _admit_handshake(self, peer: str, validated: bool = False) -> Refusal | None:
        """The gate before the TLS handshake of a new connection: None to admit it.
        ``overloaded`` (the session budget is spent) and ``handshakes_in_flight`` are
        answered with CONNECTION_REFUSED, whose reason phrase tells the client when to come
        back (its slot in the gate's return schedule): refused clients return at about the
        rate the server admits them.  ``retry`` (``retry_above`` of the places taken, no
        token) is answered with a QUIC Retry: a real client comes back at once with a
        token.  ``server_behind`` is dropped: the client retransmits its
        Initial after its own timeout, by when the server may have caught up — a burst of
        handshakes that queues behind itself is slowed down, not failed."""
        now = self._loop.time()
        waited = self._reader.waited if self._reader is not None else 0.0
        reason = self._gate.check(now, waited, validated)
        if reason is None:
            return None
        if reason == "retry":
            self.retries_sent += 1
            return Refusal(reason, close=False, retry=True)
        self.refused_handshakes += 1
        answered = reason != "server_behind"  # else dropped unanswered: nothing to tell
        retry_after = self._gate.come_back_in(now, reason) if answered else 0.0
        self._refusals_unlogged += 1
        if now - self._refusals_logged_at >= 1.0:  # one line per second at most
            log.warning(
                "refused %d new connection(s) before the TLS handshake (latest from %s: %s)",
                self._refusals_unlogged,
                peer,
                reason,
            )
            self._refusals_logged_at = now
            self._refusals_unlogged = 0
        if signals.wants(signals.on_session_refused):
            signals.emit(
                signals.on_session_refused,
                self,
                SessionRefused(
                    role="server",
                    client_id=None,  # not known before the handshake
                    peer=peer,
                    reason=reason,
                    retry_after=retry_after,
                    window=self.config.overload_window,
                ),
            )
        if not answered:
            return Refusal(reason, close=False)
        phrase = refusal_phrase(reason, retry_after, self.config.overload_window)
        return Refusal(reason, close=True, phrase=phrase)

    def stats(self) -> Stats:
        """Live figures (SC-010): connections, msgs/s in and out over the last ~10 s,
        average and p99 ack latency over the last 10,000 results."""
        return self.figures.snapshot(self._loop.time(), len(self._sessions), len(self.pending))

    async def stop(self, grace: float | None = None) -> None:
        """Stop: refuse new sessions, tell clients to go away, give pending results up to
        ``grace`` seconds (default ``close_grace``), then close every connection.

        If the wait is cancelled (an outer timeout, Ctrl-C), the rest still happens
        before the cancellation goes on: pending results fail with ``ClientGone``
        ("server closing"), every connection is closed, the socket released."""
        if self._closing or self._quic_server is None:
            return
        self._closing = True
        try:
            await self._say_goodbye(grace)
        finally:
            # even when the above was cancelled or failed: stop() is not run twice, so
            # what it promises happens now
            try:
                self._close_now()
            finally:
                if self._freezer is not None:
                    self._freezer.stop()
                self._stopped()
        # the socket is closed on the next loop pass: let it go, so the port is free again
        # when stop() returns
        await asyncio.sleep(0)

    async def _say_goodbye(self, grace: float | None) -> None:
        """GOAWAY to every client, then up to ``grace`` seconds for pending results."""
        grace = self.config.close_grace if grace is None else grace
        retry_after, window = self.config.drain_retry_after, self.config.drain_window
        goaway = encode_json_frame(
            FrameType.GOAWAY,
            {"reason": "server shutting down", "retry_after": retry_after, "window": window},
        )
        want = signals.wants(signals.on_goaway)
        for conn in list(self._sessions.values()):
            link = conn.link
            if link is None or link.closed:
                continue
            link.send_control(goaway)  # a write that fails closes that connection only
            if link.closed:
                continue
            if want:
                signals.emit(
                    signals.on_goaway,
                    self,
                    GoAwaySent(
                        role="server",
                        client_id=link.client_id,
                        reason="server shutting down",
                        retry_after=retry_after,
                        window=window,
                    ),
                )
        waiting = [
            entry.token.future
            for peer in list(self.pending._by_peer.values())
            for entry in peer.values()
        ]
        if waiting and grace > 0:
            await asyncio.wait(waiting, timeout=grace)

    def _close_now(self) -> None:
        """Fail what is still pending, close every connection, release the socket."""
        self._fail_entries(
            self.pending.drop_all(),
            lambda msg_id, cid: ClientGone(msg_id, cid, "server closing"),
            "server_closing",
        )
        quic_server = self._quic_server
        if quic_server is not None:
            for proto in server_connections(quic_server):
                if isinstance(proto, _ServerConnection) and not proto.terminated_reported:
                    proto.shut("server_closing", ErrorCode.GOING_AWAY, "server shutting down")
            quic_server.close()
            self._quic_server = None
        if self._pending_timer is not None:
            self._pending_timer.cancel()
        if self._sampler is not None:
            self._sampler.cancel()

    def _stopped(self) -> None:
        log.info("stopped")
        if signals.wants(signals.on_server_stopped):
            signals.emit(
                signals.on_server_stopped,
                self,
                ServerStopped(
                    role="server", host=self.config.host, port=self._port, reason="stopped"
                ),
            )
        signals.flush_steps()  # the last pass's per-message steps, before the loop may stop
        for plugin in reversed(self.plugins):
            uninstall_plugin(plugin, self)

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- handler -------------------------------------------------------------------------------
    # --- sessions ------------------------------------------------------------------------------
    def _auth_failed(
        self, conn: _ServerConnection, client_id: str | None, failure: AuthFailure
    ) -> None:
        log.warning("refusing client %r from %s: %s", client_id, conn.peer_address(), failure)
        if signals.wants(signals.on_auth_failed):
            signals.emit(
                signals.on_auth_failed,
                self,
                AuthenticationFailed(
                    role="server",
                    client_id=client_id,
                    peer=conn.peer_address(),
                    reason=failure.reason,
                    detail=failure.detail,
                ),
            )
        conn.shut("auth_failed", ErrorCode.AUTH_FAILED, f"{failure.reason}: {failure.detail}")

    def _refuse(
        self, conn: _ServerConnection, hello: Hello, reason: str, code: ErrorCode, window: float
    ) -> None:
        """Tell a new client to come back later (GOAWAY with a spread window), then close.
        Only when shutting down: admission control refuses before the handshake."""
        retry_after = self.config.drain_retry_after
        conn.write_now(
            MSG_STREAM,
            encode_json_frame(
                FrameType.GOAWAY,
                {"reason": reason, "retry_after": retry_after, "window": window},
            ),
        )
        log.info("refusing a session for %r (%s)", hello.client_id, reason)
        if signals.wants(signals.on_session_refused):
            signals.emit(
                signals.on_session_refused,
                self,
                SessionRefused(
                    role="server",
                    client_id=hello.client_id,
                    peer=conn.peer_address(),
                    reason=reason,
                    retry_after=retry_after,
                    window=window,
                ),
            )
        conn.shut(reason, code, "come back later")

    def _accept(self, conn: _ServerConnection, hello: Hello, now: float) -> None:
        if self._closing:
            self._refuse(
                conn, hello, "shutting_down", ErrorCode.GOING_AWAY, self.config.drain_window
            )
            return
        if self.config.require_client_cert:
            try:
                if conn.identity is None:
                    raise AuthFailure("no_certificate", "no verified client certificate")
                check_client_id(conn.identity, hello.client_id)
            except AuthFailure as failure:
                self._auth_failed(conn, hello.client_id, failure)
                return
        # admission control (the token bucket) acted before the handshake: _admit_handshake
        self._session_seq += 1
        session_id = f"{self._server_id}-{self._session_seq}"
        conn.session_id = session_id
        conn.connected_at_wall = self._wall(now)
        conn.session.accept(
            hello,
            session_id,
            {"server_id": self._server_id, "max_inbound": self.config.max_inbound_queue},
            now,
        )
        conn.rearm()
        conn.handshake_finished()
        for sid, out in conn.session.data_to_send():
            conn.queue(sid, out)  # the WELCOME, with the ACK of the HELLO
        conn.link = Link(
            self,
            conn,
            self.config,
            hello.client_id,
            session_id,
            hello.max_payload,
            now,
            peer_window=hello.max_inbound,
        )
        old = self._sessions.get(hello.client_id)
        self._sessions[hello.client_id] = conn
        if old is not None and not old.terminated_reported:
            log.info("client %r reconnected; closing its previous session", hello.client_id)
            old.shut("replaced", ErrorCode.REPLACED, "a newer connection took over this client id")
        log.info("client %r connected from %s", hello.client_id, conn.peer_address())
        if self._freezer is not None:
            self._freezer.connected()
        if signals.wants(signals.on_connected):
            signals.emit(
                signals.on_connected,
                self,
                Connected(
                    role="server",
                    client_id=hello.client_id,
                    session_id=session_id,
                    peer=conn.peer_address(),
                ),
            )

    def _forget(self, conn: _ServerConnection, reason: str, code: int, detail: str) -> None:
        link = conn.link
        if link is None:
            return
        unhandled, unsent = link.shutdown()
        if self._sessions.get(link.client_id) is conn:
            del self._sessions[link.client_id]
        self._fail_entries(
            self.pending.drop_peer(conn.session_id),
            lambda msg_id, cid: ClientGone(msg_id, cid, reason),
            reason,
        )
        log.info("client %r disconnected: %s", link.client_id, reason)
        report_dropped(link.client_id, unhandled, unsent)
        if signals.wants(signals.on_disconnected):
            signals.emit(
                signals.on_disconnected,
                self,
                Disconnected(
                    role="server",
                    client_id=link.client_id,
                    session_id=conn.session_id,
                    reason=reason,
                    code=code,
                    detail=detail,
                    duration=self._loop.time() - link.opened_at,
                    unhandled=unhandled,
                    unsent=unsent,
                ),
            )
        conn.release_link()

    # --- sending -------------------------------------------------------------------------------
    async def send_to(
        self,
        client_id: str,
        payload: Any,
        *,
        wait_ack: bool = False,
        timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """Send to one client.  Without ``wait_ack`` returns the MsgID once the message is
        queued; with it, returns the client's result or raises ``AckTimeout``,
        ``ClientGone`` or ``RemoteError``.  Raises ``ClientNotConnected``,
        ``PayloadTooLarge``, ``Backpressure`` or ``TooManyPending`` at once."""
        conn = self._sessions.get(client_id)
        link = conn.link if conn is not None else None
        msg_id, fut = self._queue_message(link, client_id, payload, wait_ack, timeout, headers)
        if fut is None:
            return msg_id.hex()
        assert link is not None  # a future means the message was queued on it
        return await self._await_result(link.session_id, msg_id, fut)

    def _not_connected(self, client_id: str) -> BackboneError:
        return ClientNotConnected(client_id)

    async def broadcast(
        self,
        payload: Any,
        *,
        wait_ack: bool = False,
        timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> BroadcastReport:
        """Send one message to every connected client: encoded once, the same bytes to
        each.  Never raises for one bad client: each client's outcome is in the report.

        The message is queued on every connection at once; the writes are spread over
        event-loop passes (a few ms of them per pass, :class:`~backbone._link.Flusher`)
        so that the server keeps reading its socket, the recipients' answers included.
        Without ``wait_ack`` it returns once every copy has been handed to QUIC."""
        check_timeout(timeout)
        msg_id: bytes | None = None
        try:
            flags, body = encode_payload(payload)
            if wait_ack:
                flags |= FLAG_WAIT_ACK
            msg_id = self._ids.next()
            headers = propagation.outgoing(self, "broadcast", msg_id, "*", headers)
            frame = encode_data_frame(FrameType.MESSAGE, flags, msg_id, body, headers)
        except (InvalidPayload, InvalidHeaders) as exc:  # refused for every client at once
            self._rejected("*", exc, msg_id)  # with its MsgID once it had one (the trace)
            raise
        timeout = self.config.ack_timeout if timeout is None else timeout
        outcomes: dict[str, Outcome] = {}
        futures: dict[str, tuple[str, asyncio.Future[Any]]] = {}
        for client_id, conn in list(self._sessions.items()):
            link = conn.link
            try:
                if link is None or link.closed:
                    raise ClientNotConnected(client_id)
                link.check_payload(len(body))
                fut = link.send_frame(
                    frame, msg_id, len(body), wait_ack, timeout, headers, broadcast=True
                )
            except BackboneError as exc:
                self._rejected(client_id, exc, msg_id)
                outcomes[client_id] = Outcome(client_id, error=exc)
                continue
            if fut is None:
                outcomes[client_id] = Outcome(client_id)
            else:
                futures[client_id] = (link.session_id, fut)
        if not wait_ack:
            await self._flushed()
        if futures:
            try:
                await asyncio.wait([f for _, f in futures.values()])
            except asyncio.CancelledError:
                for _sid, f in futures.values():
                    f.cancel()
                for sid, _f in futures.values():
                    self._abandon(sid, msg_id)
                raise
            for client_id, (_sid, fut) in futures.items():
                failure = fut.exception()
                if failure is None:
                    outcomes[client_id] = Outcome(client_id, result=fut.result())
                else:
                    assert isinstance(failure, BackboneError)
                    outcomes[client_id] = Outcome(client_id, error=failure)
        return BroadcastReport(msg_id.hex(), wait_ack, outcomes)

    # --- monitoring ------------------------------------------------------------------------------
    def _info(self, conn: _ServerConnection) -> ClientInfo:
        assert conn.link is not None
        hb = conn.session.heartbeat
        return ClientInfo(
            client_id=conn.link.client_id,
            session_id=conn.session_id,
            remote_address=conn.peer_address(),
            connected_at=conn.connected_at_wall,
            last_heartbeat_at=self._wall(hb.last_heartbeat_at) if hb.count else None,
            heartbeats=hb.count,
            rtt=conn.smoothed_rtt(),
            pending_acks=self.pending.count(conn.session_id),
            outbound_buffered=conn.link.buffered(),
            messages_sent=conn.link.messages_sent,
            messages_received=conn.link.messages_received,
        )

    def clients(self) -> list[ClientInfo]:
        return [self._info(c) for c in list(self._sessions.values()) if c.link is not None]

    def client(self, client_id: str) -> ClientInfo | None:
        conn = self._sessions.get(client_id)
        return self._info(conn) if conn is not None and conn.link is not None else None

    def client_ids(self) -> list[str]:
        return list(self._sessions)

    def __len__(self) -> int:
        return len(self._sessions)

    def evict(self, client_id: str, reason: str = "evicted") -> bool:
        conn = self._sessions.get(client_id)
        if conn is None:
            return False
        conn.shut(reason, ErrorCode.NO_ERROR, "evicted by the operator")
        return True
