"""The backbone client: keeps one connection to the server, reconnecting with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import traceback
from collections.abc import Iterable
from typing import Any

from . import signals
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
    CONNECTION_REFUSED,
    CRYPTO_ERROR_BASE,
    CRYPTO_ERROR_MAX,
    QuicEndpoint,
    client_configuration,
    close_transport,
    describe_close,
    discard_connection,
    handshake_progress,
    open_connection,
)
from .admission import MIN_RETRY_AFTER, parse_refusal_hint
from .backoff import Backoff
from .config import ClientConfig
from .errors import (
    BackboneError,
    ErrorCode,
    NotConnected,
    ProtocolViolation,
    ServerGone,
)
from .events import (
    Connected,
    ConnectFailed,
    Disconnected,
    GoAwayReceived,
    HeartbeatAcknowledged,
    HeartbeatTimedOut,
    ReconnectScheduled,
    Role,
    StateChanged,
)
from .frames import DataFrame
from .gc_freeze import freeze_setup
from .ids import MsgIdGenerator
from .pending import PendingTable
from .plugins import Plugin, install_plugin, resolve_plugins, uninstall_plugin
from .session import ClientSession, Credit, GoAway, PongReceived, Welcome
from .state import ClientState, check_transition
from .stats import Figures

log = logging.getLogger("backbone.client")


class ConnectError(Exception):
    def __init__(self, reason: str, detail: str, goaway: GoAway | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.goaway = goaway  # the server said when to come back


class _ClientConnection(LinkHolder, QuicEndpoint):
    def __init__(self, quic: Any, client: Client, **_: Any) -> None:
        super().__init__(quic)
        self.client = client
        cfg = client.config
        self.session = ClientSession(
            client_id=cfg.client_id,
            max_payload=cfg.max_payload,
            heartbeat_interval=cfg.heartbeat_interval,
            heartbeat_misses=cfg.heartbeat_misses,
            now=self._loop.time(),
            max_inbound=cfg.max_inbound_queue,
            heartbeat_align=cfg.heartbeat_align,
            wall_offset=time.time() - self._loop.time(),
        )
        self.link: Link | None = None
        self.welcomed: asyncio.Future[Welcome] = self._loop.create_future()
        self.lost: asyncio.Future[str] = self._loop.create_future()
        self.goaway: GoAway | None = None
        self._hb_timer: asyncio.TimerHandle | None = None

    def handshake_done(self) -> None:
        self._send_session_output()

    def _send_session_output(self) -> None:
        session = self.session
        for sid, out in session.data_to_send():
            self.queue(sid, out)  # with any ACK that is pending
        for nonce in session.take_pings():
            self.request_ack(nonce)  # the server's ACK of this packet answers the PING
        self.transmit()

    def _arm(self) -> None:
        when = self.session.get_timer()
        if when is not None and not self.terminated_reported:
            self._hb_timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._hb_timer = None
        if self.terminated_reported:
            return
        now = self._loop.time()
        verdict = self.session.handle_timer(now)
        if verdict is not None and self.read_waiting():
            # the answers may be waiting in the socket, unread by a loop that fell behind
            if self.terminated_reported:
                return
            verdict = self.session.handle_timer(now)
        if verdict is not None:
            hb = self.session.heartbeat
            log.warning(
                "server %s stopped answering heartbeats: %s", self.peer_address(), verdict.reason
            )
            if signals.wants(signals.on_timeout):
                signals.emit(
                    signals.on_timeout,
                    self.client,
                    HeartbeatTimedOut(
                        role="client",
                        client_id=self.client.client_id,
                        session_id=self.session.session_id,
                        silent_for=now - hb.silent_since(),
                    ),
                )
            self.shut("heartbeat_timeout", verdict.code, verdict.reason)
            return
        self._send_session_output()
        self._arm()

    def abandon(self) -> None:
        """This connect attempt failed after all: stop the link a WELCOME may already have
        opened (its handler task would otherwise stay pending until the garbage collector
        destroyed it; seen in a restart storm, where a WELCOME and the connect timeout
        came in the same loop pass)."""
        if self.link is not None:
            # no session was reported, so no disconnected: the log line says what went
            report_dropped("the server", *self.link.shutdown())
        self.release_link()

    def ping_acknowledged(self, uid: int) -> None:
        pong = self.session.ping_acknowledged(uid, self._loop.time())
        if pong is not None:
            self._heartbeat_acknowledged(pong)

    def _heartbeat_acknowledged(self, pong: PongReceived) -> None:
        if signals.wants(signals.on_heartbeat):
            signals.emit(
                signals.on_heartbeat,
                self.client,
                HeartbeatAcknowledged(
                    role="client",
                    client_id=self.client.client_id,
                    session_id=self.session.session_id,
                    rtt=pong.rtt,
                ),
            )

    def stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        now = self._loop.time()
        try:
            for item in self.session.receive_stream_data(stream_id, data, end_stream, now):
                if type(item) is DataFrame:
                    assert self.link is not None
                    self.link.on_frame(item, now)
                elif type(item) is PongReceived:  # a server that answers PINGs
                    self._heartbeat_acknowledged(item)
                elif type(item) is Welcome:
                    self.link = Link(
                        self.client,
                        self,
                        self.client.config,
                        self.client.client_id,
                        item.session_id,
                        item.max_payload,
                        now,
                        peer_window=item.max_inbound,
                    )
                    if not self.welcomed.done():
                        self.welcomed.set_result(item)
                    self._send_session_output()  # first ping at once
                    self._arm()
                elif type(item) is Credit:
                    assert self.link is not None
                    self.link.on_credit(item.processed)
                elif type(item) is GoAway:
                    self.goaway = item
                    log.info("server asked us to go away: %s", item.reason)
                    if signals.wants(signals.on_goaway):
                        signals.emit(
                            signals.on_goaway,
                            self.client,
                            GoAwayReceived(
                                role="client",
                                client_id=self.client.client_id,
                                reason=item.reason,
                                retry_after=item.retry_after,
                                window=item.window,
                            ),
                        )
        except ProtocolViolation as pv:
            report_violation(self.client, self, self.client.client_id, pv)
        except Exception as exc:  # a bug, or input no check foresaw: close, reconnect
            log.exception("handling stream %d data from the server failed", stream_id)
            report_violation(
                self.client, self, self.client.client_id, internal_error(stream_id, exc)
            )

    def transport_violation(self, error_code: int, reason: str) -> None:
        super().transport_violation(error_code, reason)
        report_transport_violation(self.client, self, self.client.client_id, error_code, reason)

    def stop_sending_received(self, stream_id: int, error_code: int) -> None:
        report_violation(
            self.client, self, self.client.client_id, stop_sending_violation(stream_id, error_code)
        )

    def terminated(self, error_code: int, reason: str, by_peer: bool) -> None:
        if self._hb_timer is not None:
            self._hb_timer.cancel()
            self._hb_timer = None
        if self.stateless_reset:
            why = "stateless_reset"
            log.warning(
                "server %s answered with a stateless reset: it no longer knows this "
                "connection (restarted, or lost it); reconnecting",
                self.peer_address(),
            )
        elif by_peer:
            if error_code == ErrorCode.GOING_AWAY:
                why = "server_going_away"
            elif error_code == ErrorCode.REPLACED:
                why = "replaced"
            elif reason == "Idle timeout":
                why = "idle_timeout"
            else:
                why = "closed_by_server"
        else:
            why = self.reason or "closed"
        if not self.lost.done():
            self.lost.set_result(why)
        if not self.welcomed.done():
            self.welcomed.set_exception(
                ConnectError(
                    _close_category(self.close_code, self.close_by_transport, self.stateless_reset),
                    describe_close(self.close_code, reason),
                )
            )
            self.welcomed.exception()


def _forget_frames(exc: BaseException | None) -> None:
    """Clear the local variables of the finished frames a failed attempt's exceptions (and
    the ones they replaced) still hold.  The connection's ``ready`` future holds the error
    it raised, whose traceback holds the frames that hold the connection: a reference
    cycle of a whole QUIC connection (about 140 objects) per failed attempt, which only
    the cyclic collector frees: in a restart storm a process hosting thousands of
    clients makes tens of thousands of them."""
    for _ in range(4):  # the error, its __context__ (the attempt's), and so on
        if exc is None:
            return
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__context__


def _come_back_hint(
    conn: _ClientConnection | None, category: str, at_least: float
) -> GoAway | None:
    """When a refusal before the handshake says to come back (protocol.md §14), never
    sooner than ``at_least``: the refusal is a stateless Initial packet that nothing
    authenticates, and ``retry_after=0`` from a forger must not make the client reconnect
    in a tight loop."""
    if conn is None or category != "rejected":
        return None
    hint = parse_refusal_hint(conn.close_reason)
    if hint is None:
        return None
    return GoAway(conn.close_reason.split(" ", 1)[0], max(hint[0], at_least), hint[1])


class _ConnectPlaces:
    """The places shared by the clients of one event loop that connect to one server
    with the same ``max_connects_per_loop``; forgotten once none is taken or awaited."""

    __slots__ = ("_key", "_semaphore", "_users")

    def __init__(self, key: tuple[Any, ...], size: int) -> None:
        self._key = key
        self._semaphore = asyncio.Semaphore(size)
        self._users = 0  # holding a place or waiting for one

    async def __aenter__(self) -> None:
        self._users += 1
        try:
            await self._semaphore.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._semaphore.release()
        self._leave()

    def _leave(self) -> None:
        self._users -= 1
        if not self._users:  # the semaphore holds its loop: do not keep either alive
            _connect_places.pop(self._key, None)


#: (event loop, host, port, size) → the places of the clients in a connect attempt
_connect_places: dict[tuple[Any, ...], _ConnectPlaces] = {}


def connect_places(
    loop: asyncio.AbstractEventLoop, host: str, port: int, size: int
) -> contextlib.AbstractAsyncContextManager[Any]:
    """A place for one connect attempt among the ``size`` shared by the clients of
    ``loop`` that connect to ``host``:``port`` with that size (``max_connects_per_loop``;
    0: no limit).

    A connect attempt is CPU work on the client's side too (aioquic's QUIC connection,
    the ClientHello, the certificate chain: about 5 ms here).  A process that hosts
    thousands of clients — a gateway, a load generator — and starts all their attempts
    together (a server restart) runs them in the same few event-loop passes: each pass
    takes seconds, every attempt progresses one step per pass, and all of them reach
    their connect timeout together, their work wasted, again and again (2,000 clients
    on one loop: none connected in 92 s).  With a bounded number in flight each attempt
    completes in about the time it needs, and the rest wait their turn.  Per server, so
    that attempts waiting on an unreachable one do not hold up the others."""
    if size <= 0:
        return contextlib.nullcontext()
    key = (loop, host, port, size)
    places = _connect_places.get(key)
    if places is None:
        places = _connect_places[key] = _ConnectPlaces(key, size)
    return places


def _answer_before_timeout(conn: _ClientConnection) -> ConnectError | None:
    """The server's answer to a connect attempt that arrived in the loop pass its connect
    timeout fired in: a loop that fell far behind (a process hosting thousands of clients
    in a restart storm) runs its socket's reader and the expired timeout in one pass, and
    the timeout then cancels the attempt before it sees the answer.  A refusal, a close or
    a stateless reset decides the attempt's outcome, so that the client follows the
    server's ``retry_after`` instead of backing off as for a silent server."""
    ready = conn.ready
    if ready.done() and not ready.cancelled() and ready.exception() is None:
        # the QUIC handshake was done: closed after it (client id, version, …)?
        welcomed = conn.welcomed
        if welcomed.done() and not welcomed.cancelled():
            exc = welcomed.exception()
            if isinstance(exc, ConnectError):
                exc.goaway = conn.goaway
                return exc
        return None
    if conn.close_reason == "Idle timeout":  # aioquic's own timer, not an answer
        return None
    if conn.terminated_reported and conn.closed_by_peer:  # refused, closed or reset
        return _ended_before_handshake(conn, describe_close(conn.close_code, conn.close_reason))
    return None


def _ended_before_handshake(conn: _ClientConnection, detail: str) -> ConnectError:
    """The failure of an attempt whose connection ended before its QUIC handshake: the
    category of its close, and a refusal's hint of when to come back."""
    category = _close_category(conn.close_code, conn.close_by_transport, conn.stateless_reset)
    return ConnectError(category, detail, _come_back_hint(conn, category, MIN_RETRY_AFTER))


def _close_category(
    code: int | None, by_transport: bool = False, stateless_reset: bool = False
) -> str:
    """The ``connect.failed`` reason of a connection that ended before WELCOME."""
    if stateless_reset:
        # the server answered with a stateless reset: it does not know this connection
        return "stateless_reset"
    if code is None:
        return "error"
    if CRYPTO_ERROR_BASE <= code <= CRYPTO_ERROR_MAX:
        return "tls"
    if by_transport:
        # the server's admission gate refuses before the handshake with CONNECTION_REFUSED
        return "rejected" if code == CONNECTION_REFUSED else "protocol"
    if code in (ErrorCode.AUTH_FAILED,):
        return "auth"
    if code in (ErrorCode.OVERLOADED, ErrorCode.GOING_AWAY):
        return "rejected"
    return "protocol"


class Client(HandlerOwner, PendingOwner):
    """A backbone client.  ``async with Client(...)`` runs the connection manager:
    it connects, and reconnects with jittered exponential backoff until closed."""

    role: Role = "client"
    config: ClientConfig

    def __init__(
        self,
        client_id: str | None = None,
        host: str | None = None,
        port: int | None = None,
        *,
        cafile: str | None = None,
        config: ClientConfig | None = None,
        plugins: Iterable[Plugin | str] | None = None,
        rng: random.Random | None = None,
        **settings: Any,
    ) -> None:
        base = config.model_dump() if config is not None else {}
        for key, value in (
            ("client_id", client_id),
            ("host", host),
            ("port", port),
            ("cafile", cafile),
        ):
            if value is not None:
                base[key] = value
        base.update(settings)
        self.config = ClientConfig(**base)
        self.client_id = self.config.client_id
        self._state = ClientState.IDLE
        self._conn: _ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._ids = MsgIdGenerator()
        self._rng = rng or random.Random()
        self._closing = False
        #: why the client stopped for good (for wait_connected), when it has
        self._stopped_why = "it was closed"
        self._connected_event: asyncio.Event | None = None
        self.plugins: list[Plugin] = resolve_plugins(plugins)
        self.figures = Figures()
        self.connects = 0
        self.backoff = Backoff(
            self.config.backoff_initial,
            self.config.backoff_max,
            self.config.backoff_factor,
            self.config.backoff_jitter,
            self._rng.random,
        )
        if not self.config.verify:
            log.warning(
                "client %r: TLS certificate verification is OFF — the server is not "
                "authenticated; never use this outside development",
                self.client_id,
            )

    # --- state -----------------------------------------------------------------------------
    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def connected(self) -> bool:
        return self._state is ClientState.CONNECTED

    def _set_state(self, new: ClientState, reason: str = "") -> None:
        old = self._state
        if old is new:
            return
        check_transition(old, new)
        self._state = new
        assert self._connected_event is not None
        if new is ClientState.CONNECTED:
            self._connected_event.set()
        else:
            self._connected_event.clear()
        log.debug("client %r: %s -> %s %s", self.client_id, old.value, new.value, reason)
        if signals.wants(signals.on_state_changed):
            signals.emit(
                signals.on_state_changed,
                self,
                StateChanged(
                    role="client",
                    client_id=self.client_id,
                    old=old.value,
                    new=new.value,
                    reason=reason,
                ),
            )

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Until the client is connected; ``TimeoutError`` after ``timeout`` seconds, and
        :class:`NotConnected` at once if the client stops for good meanwhile (closed, or
        ``stop_on_auth_failure``) instead of waiting for ever."""
        event, task = self._connected_event, self._task
        if event is None or task is None:
            raise NotConnected("the client is not started (use `async with client`)")
        if event.is_set():
            return
        if not (self._state is ClientState.CLOSED or task.done()):
            connected = asyncio.ensure_future(event.wait())
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.wait({connected, task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                connected.cancel()
            # it was connected at that moment, even if that connection has ended since
            if connected.done() and not connected.cancelled():
                return
        why = self._stopped_why
        if task.done() and not task.cancelled() and task.exception() is not None:
            why = f"its connection task failed: {task.exception()!r}"
        raise NotConnected(f"the client {self.client_id!r} has stopped: {why}")

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self.pending = PendingTable(self.config.max_pending, self.config.max_pending)
        self._connected_event = asyncio.Event()
        for plugin in self.plugins:
            install_plugin(plugin, self)
        if self.config.gc_freeze:
            freeze_setup()
        self._task = self._loop.create_task(self._run(), name=f"backbone-client-{self.client_id}")

    async def close(self) -> None:
        if self._task is None or self._closing:
            return
        self._closing = True
        conn = self._conn
        if conn is not None and not conn.terminated_reported:
            conn.shut("closed", ErrorCode.NO_ERROR, "client closing")
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._state is not ClientState.CLOSED:  # cancelled before its first step
            self._set_state(ClientState.CLOSED, "closed")
        signals.flush_steps()  # the last pass's per-message steps, before the loop may stop
        for plugin in reversed(self.plugins):
            uninstall_plugin(plugin, self)

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- connection manager ---------------------------------------------------------------------
    def _qconf(self) -> Any:
        cfg = self.config
        return client_configuration(
            server_name=cfg.server_name or cfg.host,
            cafile=cfg.cafile,
            verify=cfg.verify,
            idle_timeout=cfg.quic_idle_timeout,
            certfile=cfg.certfile,
            keyfile=cfg.keyfile,
        )

    async def _connect_once(self) -> _ClientConnection:
        cfg = self.config
        holder: list[_ClientConnection] = []

        def factory(quic: Any, **kw: Any) -> _ClientConnection:
            conn = _ClientConnection(quic, self, **kw)
            holder.append(conn)
            return conn

        try:
            async with asyncio.timeout(cfg.connect_timeout):
                try:
                    await open_connection(cfg.host, cfg.port, self._qconf(), factory)
                except ConnectionError as exc:
                    conn = holder[0] if holder else None
                    if conn is not None and conn.refused:
                        raise ConnectError("refused", f"nothing listens on {cfg.host}:{cfg.port}")
                    if conn is None:
                        raise ConnectError("error", str(exc)) from None
                    raise _ended_before_handshake(conn, str(exc)) from None
                conn = holder[0]
                self._conn = conn
                try:
                    await conn.welcomed
                except ConnectError as exc:
                    discard_connection(conn)  # refused after the handshake (id, version, …)
                    conn.abandon()
                    exc.goaway = conn.goaway
                    raise
                return conn
        except TimeoutError:
            conn = holder[0] if holder else None
            stalled = ""
            answer = None
            if conn is not None:
                stalled = f" ({conn.abandoned_at or handshake_progress(conn._quic)})"
                answer = _answer_before_timeout(conn)
                conn.shut("timeout", ErrorCode.NO_ERROR, "connect timeout")
                discard_connection(conn)
                # the WELCOME may have come in the very loop pass the timeout fired in
                conn.abandon()
            if conn is not None and conn.refused:
                raise ConnectError("refused", f"nothing listens on {cfg.host}:{cfg.port}")
            if answer is not None:
                raise answer from None
            raise ConnectError("timeout", f"no session within {cfg.connect_timeout:g} s{stalled}")
        except OSError as exc:
            raise ConnectError("error", str(exc)) from None
        except BaseException:
            if holder:
                holder[0].shut("closed", ErrorCode.NO_ERROR, "connect abandoned")
                discard_connection(holder[0])
                if self._conn is not holder[0]:  # else _run's cleanup ends its link
                    holder[0].abandon()
            raise

    async def _run(self) -> None:
        attempt = 0
        try:
            while not self._closing:
                self._set_state(ClientState.CONNECTING, f"attempt {attempt + 1}")
                cfg = self.config
                try:
                    async with connect_places(
                        self._loop, cfg.host, cfg.port, cfg.max_connects_per_loop
                    ):
                        started = self._loop.time()  # setup_time: not the wait for a place
                        conn = await self._connect_once()
                except ConnectError as exc:
                    attempt += 1
                    log.info(
                        "client %r: connect failed (%s): %s", self.client_id, exc.reason, exc.detail
                    )
                    if signals.wants(signals.on_connect_failed):
                        signals.emit(
                            signals.on_connect_failed,
                            self,
                            ConnectFailed(
                                role="client",
                                client_id=self.client_id,
                                reason=exc.reason,
                                detail=exc.detail,
                                attempt=attempt,
                            ),
                        )
                    self._conn = None
                    _forget_frames(exc)
                    if exc.reason == "auth" and self.config.stop_on_auth_failure:
                        log.error(
                            "client %r: the server refused our certificate (%s); "
                            "stopping as configured",
                            self.client_id,
                            exc.detail,
                        )
                        self._stopped_why = (
                            f"the server refused our certificate ({exc.detail}); "
                            "stop_on_auth_failure is set"
                        )
                        break
                    await self._back_off(attempt, exc.reason, exc.goaway)
                    continue
                attempt = 0
                self.connects += 1
                assert conn.link is not None
                self._set_state(ClientState.CONNECTED, "welcomed")
                log.info("client %r connected to %s", self.client_id, conn.peer_address())
                if signals.wants(signals.on_connected):
                    signals.emit(
                        signals.on_connected,
                        self,
                        Connected(
                            role="client",
                            client_id=self.client_id,
                            session_id=conn.link.session_id,
                            peer=conn.peer_address(),
                            setup_time=self._loop.time() - started,
                        ),
                    )
                reason = await asyncio.shield(conn.lost)
                up_for = self._loop.time() - conn.link.opened_at
                self._connection_ended(conn, reason, up_for)
                conn.release_link()
                if up_for >= self.config.backoff_reset_after:
                    self.backoff.reset()
                if self._closing:
                    break
                await self._back_off(1, reason, conn.goaway)
        except asyncio.CancelledError:
            pass
        finally:
            last = self._conn
            if last is not None:
                if not last.terminated_reported:
                    last.shut("closed", ErrorCode.NO_ERROR, "client closing")
                if last.link is not None and not last.link.closed:
                    if self._state is ClientState.CONNECTED:
                        up_for = self._loop.time() - last.link.opened_at
                        self._connection_ended(last, "closed", up_for)
                    else:  # closed in the pass its WELCOME came: never reported connected
                        last.abandon()
                close_transport(last)
                last.release_link()
                self._conn = None
            self._fail_entries(
                self.pending.drop_all(),
                lambda msg_id, peer: ServerGone(msg_id, "server", "client closed"),
                "client_closed",
            )
            if self._state is not ClientState.CLOSED:
                self._set_state(ClientState.CLOSED, "closed")

    def _connection_ended(self, conn: _ClientConnection, reason: str, up_for: float) -> None:
        link = conn.link
        assert link is not None
        unhandled, unsent = link.shutdown()
        self._fail_entries(
            self.pending.drop_peer(link.session_id),
            lambda msg_id, peer: ServerGone(msg_id, "server", reason),
            reason,
        )
        close_transport(conn)
        log.info("client %r disconnected: %s", self.client_id, reason)
        report_dropped("the server", unhandled, unsent)
        if signals.wants(signals.on_disconnected):
            signals.emit(
                signals.on_disconnected,
                self,
                Disconnected(
                    role="client",
                    client_id=self.client_id,
                    session_id=link.session_id,
                    reason=reason,
                    code=conn.close_code,
                    detail=conn.close_reason,
                    duration=up_for,
                    unhandled=unhandled,
                    unsent=unsent,
                ),
            )

    async def _back_off(self, attempt: int, reason: str, goaway: GoAway | None) -> None:
        if self._closing:
            return
        if goaway is not None:
            # the server said when (a GOAWAY, or a refusal's hint); never later than our
            # own backoff's cap
            delay = min(
                goaway.retry_after + self._rng.random() * goaway.window, self.backoff.maximum
            )
        else:
            delay = self.backoff.next_delay()
        self._set_state(ClientState.BACKOFF, reason)
        log.info("client %r: reconnecting in %.2f s (%s)", self.client_id, delay, reason)
        if signals.wants(signals.on_reconnect_scheduled):
            signals.emit(
                signals.on_reconnect_scheduled,
                self,
                ReconnectScheduled(
                    role="client",
                    client_id=self.client_id,
                    attempt=self.backoff.attempt,
                    delay=delay,
                    reason=reason,
                ),
            )
        await asyncio.sleep(delay)

    # --- sending -----------------------------------------------------------------------------
    async def send(
        self,
        payload: Any,
        *,
        wait_ack: bool = False,
        timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """Send to the server.  Without ``wait_ack`` returns the MsgID; with it, the server
        handler's result (or ``AckTimeout`` / ``ServerGone`` / ``RemoteError``)."""
        conn = self._conn
        link = None
        # a connection that just ended is not connected, although _run has not yet moved
        # the state on: a message queued on it would be lost without a word
        connected = self._state is ClientState.CONNECTED
        if conn is not None and connected and not conn.terminated_reported:
            link = conn.link
        msg_id, fut = self._queue_message(link, self.client_id, payload, wait_ack, timeout, headers)
        if fut is None:
            return msg_id.hex()
        assert link is not None  # a future means the message was queued on it
        return await self._await_result(link.session_id, msg_id, fut)

    def _not_connected(self, client_id: str) -> BackboneError:
        return NotConnected(f"client {client_id!r} is not connected to the server")
