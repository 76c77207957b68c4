"""The messaging engine shared by both ends of one connection (asyncio side).

A :class:`Link` owns the outbound buffer of one connection (frames coalesced into one
stream write per event-loop pass), the inbound queue feeding the handler in order, and
the bridge between RESULT frames and the owner's :class:`~backbone.pending.PendingTable`.
The owner's :class:`Flusher` writes the links that have frames queued, a time budget's
worth per loop pass.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import orjson
from blinker import NamedSignal

from . import propagation, signals
from .config import _Common
from .errors import (
    AckTimeout,
    BackboneError,
    Backpressure,
    ErrorCode,
    InvalidHeaders,
    PayloadTooLarge,
    ProtocolViolation,
    RemoteError,
    reject_reason,
)
from .events import (
    SEQUENCE,
    STEP_EVENT,
    AckFailed,
    AckTimedOut,
    LateAckDropped,
    ProtocolViolated,
    Role,
    SendRejected,
)
from .frames import (
    FLAG_ERROR,
    FLAG_WAIT_ACK,
    DataFrame,
    FrameType,
    decode_payload,
    encode_credit,
    encode_data_frame,
    encode_payload,
)
from .ids import MsgIdGenerator
from .message import Message
from .pending import PendingEntry, PendingTable, check_timeout
from .session import MSG_STREAM
from .stats import Figures

if TYPE_CHECKING:
    from ._quic import QuicEndpoint

log = logging.getLogger("backbone")

Handler = Callable[[Message], Any]

_MESSAGE = int(FrameType.MESSAGE)

#: seconds of link flushes per event-loop pass, at most (:class:`Flusher`), while results
#: are awaited or the server is behind its socket
FLUSH_BUDGET = 0.005
#: ... and otherwise: half of ``behind_after`` at the defaults, so the socket is never left
#: unread long enough for the server to count as behind
FLUSH_BUDGET_ONE_WAY = 0.5


class Flusher:
    """Writes the links that have frames queued: one stream write and one transmit per
    link, in the order the links were first queued, and at most a time budget's worth per
    event-loop pass.  What is left waits for the next pass, after the loop has read its
    sockets and run its timers.

    A broadcast queues a frame on every link in one go.  Written in one pass, 2,000
    recipients kept a server from its socket for over a second: the answers to the first
    messages (their ACKs and RESULTs) waited there, the server's retransmission timers
    for those messages fired before the ACKs were read, the clients' timers fired for
    their unacknowledged RESULTs, and answers that waited past ``max_receive_delay``
    were dropped unread — each retransmitted in turn.  Spread over passes, the answers
    are read while the broadcast goes on.

    How much per pass depends on ``reading_first()``: when true — results are awaited,
    or the server's socket reader is falling behind — ``budget`` (5 ms), so RESULTs are
    read and acknowledged before the clients' own timers resend them; otherwise
    ``one_way_budget`` (0.5 s): a one-way broadcast to a few thousand clients goes out
    in one pass and its ACKs are read afterwards, as reading each ACK as it comes puts it
    on the broadcast's critical path; a larger one still lets the socket be read twice a
    second.  Measured with 2,000 clients (``bench/wire_census.py --no-probe --rounds 3``,
    run twice, 2026-11-28): WaitAck all results 1.53–2.18 s (mean 1.79) at 5 ms against
    1.49–2.80 s (mean 2.14) in one pass, with up to 50 % more datagrams (resent
    RESULTs); one-way all received 0.97–1.12 s with 50 ms or 250 ms slices, 0.65–0.79 s
    in one pass, 0.71–0.76 s at 0.5 s.
    """

    __slots__ = (
        "_handle",
        "_links",
        "_loop",
        "_waiters",
        "budget",
        "flushed",
        "one_way_budget",
        "passes",
        "queued",
        "reading_first",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        budget: float = FLUSH_BUDGET,
        one_way_budget: float = FLUSH_BUDGET_ONE_WAY,
        reading_first: Callable[[], bool] | None = None,
    ) -> None:
        self._loop = loop
        self.budget = budget
        self.one_way_budget = one_way_budget
        self.reading_first = reading_first
        self._links: deque[Link] = deque()
        self._handle: asyncio.Handle | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.queued = 0  # links queued so far
        self.flushed = 0  # links flushed so far (FIFO: the first `flushed` of `queued`)
        self.passes = 0

    def add(self, link: Link) -> None:
        self._links.append(link)
        self.queued += 1
        if self._handle is None:
            self._handle = self._loop.call_soon(self._run)

    def wait_flushed(self) -> asyncio.Future[None]:
        """A future done once every link queued so far has been flushed."""
        fut: asyncio.Future[None] = self._loop.create_future()
        if self.flushed >= self.queued:
            fut.set_result(None)
        else:
            self._waiters.append((self.queued, fut))
        return fut

    def _run(self) -> None:
        self._handle = None
        self.passes += 1
        links = self._links
        clock = time.perf_counter
        first = self.reading_first
        budget = self.budget if first is None or first() else self.one_way_budget
        stop_at = clock() + budget
        done = 0
        try:
            while links:
                link = links.popleft()
                done += 1
                link._flush()
                if clock() > stop_at:
                    break
        finally:
            self.flushed += done
            if links and self._handle is None:
                self._handle = self._loop.call_soon(self._run)
            if self._waiters:
                self._wake()

    def _wake(self) -> None:
        flushed = self.flushed
        waiting = []
        for target, fut in self._waiters:
            if target <= flushed:
                if not fut.done():
                    fut.set_result(None)
            else:
                waiting.append((target, fut))
        self._waiters = waiting


class Waiter:
    """What a pending entry holds: the future the sender awaits."""

    __slots__ = ("client_id", "future", "seq")

    def __init__(self, future: asyncio.Future[Any], client_id: str, seq: int) -> None:
        self.future = future
        self.client_id = client_id
        self.seq = seq  # the message's number on its link: a result credits up to it


class PendingOwner:
    """Mixin for Server and Client: the pending-result table and its single timer."""

    role: Role
    config: _Common
    pending: PendingTable[Waiter]
    figures: Figures
    _ids: MsgIdGenerator
    _loop: asyncio.AbstractEventLoop
    _pending_timer: asyncio.TimerHandle | None = None
    _pending_timer_at: float | None = None
    _flusher: Flusher | None = None

    def flusher(self) -> Flusher:
        """The flusher of this owner's links (made on first use, on the running loop)."""
        loop = asyncio.get_running_loop()
        flusher = self._flusher
        if flusher is None or flusher._loop is not loop:
            flusher = self._flusher = Flusher(loop, reading_first=self._reading_first)
        return flusher

    def _reading_first(self) -> bool:
        """Whether reading should come before writing much more (the Flusher's short
        budget): results are awaited, whose answers must be read promptly."""
        return len(self.pending) > 0

    def _flushed(self) -> asyncio.Future[None]:
        """Done once every frame queued so far has been handed to QUIC."""
        return self.flusher().wait_flushed()

    def _queue_message(
        self,
        link: Link | None,
        client_id: str,
        payload: Any,
        wait_ack: bool,
        timeout: float | None,
        headers: dict[str, str] | None,
    ) -> tuple[bytes, asyncio.Future[Any] | None]:
        """Queue one message on one link (``None``: not connected): its MsgID and, with
        ``wait_ack``, the future of the peer's result.  A refusal is raised at once and
        reported as ``send.rejected``.  Not a coroutine: ``send_to`` and ``send`` await
        only the result, so a one-way send costs one coroutine, not two."""
        check_timeout(timeout)
        msg_id: bytes | None = None
        try:
            if link is None or link.closed:
                raise self._not_connected(client_id)
            flags, body = encode_payload(payload)
            link.check_payload(len(body))
            if wait_ack:
                flags |= FLAG_WAIT_ACK
            msg_id = self._ids.next()
            headers = propagation.outgoing(self, "message", msg_id, client_id, headers)
            frame = encode_data_frame(FrameType.MESSAGE, flags, msg_id, body, headers)
            fut = link.send_frame(
                frame,
                msg_id,
                len(body),
                wait_ack,
                self.config.ack_timeout if timeout is None else timeout,
                headers,
            )
        except BackboneError as exc:
            self._rejected(client_id, exc, msg_id)
            raise
        return msg_id, fut

    def _not_connected(self, client_id: str) -> BackboneError:
        raise NotImplementedError

    def _rejected(self, client_id: str, exc: BackboneError, msg_id: bytes | None) -> None:
        self.figures.rejected += 1
        if signals.wants(signals.on_send_rejected):
            signals.emit(
                signals.on_send_rejected,
                self,
                SendRejected(
                    role=self.role,
                    client_id=client_id,
                    reason=reject_reason(exc),
                    detail=str(exc),
                    msg_id=msg_id.hex() if msg_id is not None else None,
                ),
            )

    def _arm_pending_timer(self, deadline: float) -> None:
        at = self._pending_timer_at
        if at is not None and at <= deadline:
            return
        if self._pending_timer is not None:
            self._pending_timer.cancel()
        self._pending_timer_at = deadline
        self._pending_timer = self._loop.call_at(deadline, self._expire_pending)

    def _expire_pending(self) -> None:
        self._pending_timer = None
        self._pending_timer_at = None
        now = self._loop.time()
        for entry in self.pending.expire(now):
            self.figures.ack_timeouts += 1
            waiter = entry.token
            msg_id = entry.msg_id.hex()
            if not waiter.future.done():
                waiter.future.set_exception(AckTimeout(msg_id, waiter.client_id, entry.timeout))
            if signals.wants(signals.on_ack_timeout):
                signals.emit(
                    signals.on_ack_timeout,
                    self,
                    AckTimedOut(
                        role=self.role,
                        msg_id=msg_id,
                        client_id=waiter.client_id,
                        timeout=entry.timeout,
                    ),
                )
        nxt = self.pending.next_deadline()
        if nxt is not None:
            self._arm_pending_timer(nxt)

    def _fail_entries(
        self,
        entries: list[PendingEntry[Waiter]],
        make_error: Callable[[str, str], BackboneError],
        reason: str,
    ) -> None:
        now = self._loop.time()
        want = signals.wants(signals.on_ack_failed)
        for entry in entries:
            waiter = entry.token
            msg_id = entry.msg_id.hex()
            if not waiter.future.done():
                waiter.future.set_exception(make_error(msg_id, waiter.client_id))
            if want:
                signals.emit(
                    signals.on_ack_failed,
                    self,
                    AckFailed(
                        role=self.role,
                        msg_id=msg_id,
                        client_id=waiter.client_id,
                        reason=reason,
                        latency=now - entry.created_at,
                    ),
                )

    async def _await_result(self, session_id: str, msg_id: bytes, fut: asyncio.Future[Any]) -> Any:
        try:
            return await fut
        except asyncio.CancelledError:
            # the caller gave up: forget the entry, and treat a later result as late
            self._abandon(session_id, msg_id)
            raise

    def _abandon(self, session_id: str, msg_id: bytes) -> None:
        entry = self.pending.abandon(session_id, msg_id)
        if entry is not None and signals.wants(signals.on_ack_failed):
            signals.emit(
                signals.on_ack_failed,
                self,
                AckFailed(
                    role=self.role,
                    msg_id=msg_id.hex(),
                    client_id=entry.token.client_id,
                    reason="cancelled",
                    latency=self._loop.time() - entry.created_at,
                ),
            )


def report_violation(
    owner: Any, endpoint: QuicEndpoint, client_id: str | None, pv: ProtocolViolation
) -> None:
    """The peer broke the protocol: log it, emit ``protocol.violated`` and close the
    connection with the violation's code.  Only that connection is affected."""
    _violated(owner, endpoint, client_id, int(pv.code), pv.code.name, pv.reason, "closing")
    endpoint.shut(pv.code.reason_name, pv.code, pv.reason)


def report_transport_violation(
    owner: Any, endpoint: QuicEndpoint, client_id: str | None, code: int, reason: str
) -> None:
    """aioquic closed the connection because the peer broke QUIC itself: log it and emit
    ``protocol.violated`` with the QUIC transport code (the close is already under way)."""
    from ._quic import quic_error_name  # _quic imports aioquic: only when it happens

    _violated(owner, endpoint, client_id, code, quic_error_name(code), reason, "QUIC closed")


def _violated(
    owner: Any,
    endpoint: QuicEndpoint,
    client_id: str | None,
    code: int,
    code_name: str,
    reason: str,
    who_closes: str,
) -> None:
    """The log line and the ``protocol.violated`` event of a peer's violation."""
    peer = endpoint.peer_address()
    logging.getLogger(f"backbone.{owner.role}").warning(
        "%s the connection with %s (client %r): %s %s",
        who_closes,
        peer,
        client_id,
        code_name,
        reason,
    )
    if signals.wants(signals.on_protocol_error):
        signals.emit(
            signals.on_protocol_error,
            owner,
            ProtocolViolated(
                role=owner.role,
                client_id=client_id,
                peer=peer,
                code=code,
                code_name=code_name,
                reason=reason,
            ),
        )


def report_dropped(peer: str, unhandled: int, unsent: int) -> None:
    """The log line for what a connection's end dropped (the ``disconnected`` event
    carries the same counts)."""
    if unhandled or unsent:
        log.warning(
            "connection to %s ended with %d received message(s) not yet handled and %d "
            "frame(s) not yet sent: dropped (WaitAck senders get a failed result)",
            peer,
            unhandled,
            unsent,
        )


def internal_error(stream_id: int, exc: Exception) -> ProtocolViolation:
    """The close reason for an exception no check foresaw while handling a peer's data."""
    return ProtocolViolation(
        ErrorCode.INTERNAL_ERROR,
        f"internal error handling stream {stream_id}: {type(exc).__name__}: {exc}",
    )


def stop_sending_violation(stream_id: int, error_code: int) -> ProtocolViolation:
    """STOP_SENDING on one of backbone's streams, which stay open for the connection's
    life: nothing more could be written there (aioquic resets our side of it)."""
    return ProtocolViolation(
        ErrorCode.PROTOCOL_ERROR,
        f"peer sent STOP_SENDING (code {error_code}) on stream {stream_id}, which must stay open",
    )


class LinkOwner(Protocol):
    @property
    def role(self) -> Role: ...

    pending: PendingTable[Waiter]
    figures: Figures
    _handler: Handler | None
    _handler_is_async: bool

    def _arm_pending_timer(self, deadline: float) -> None: ...

    def flusher(self) -> Flusher: ...


class LinkHolder:
    """Mixin for the server's and the client's connection classes: their :class:`Link`,
    let go of once both are done with it — aioquic (:meth:`ended`, called by
    ``_quic.release_connection``) and the owner's bookkeeping of the end, which shuts
    the link down and then calls :meth:`release_link`.  Whichever comes last releases
    it, so the connection and its link are freed by reference counting."""

    link: Link | None = None
    quic_ended: bool = False

    def ended(self) -> None:
        self.quic_ended = True
        self.release_link()

    def release_link(self) -> None:
        link = self.link
        if link is not None and link.closed and self.quic_ended:
            self.link = None
            link.release()


class HandlerOwner:
    """Mixin: the registered handler, with its kind worked out once."""

    _handler: Handler | None = None
    _handler_is_async: bool = False

    def handler(self, fn: Handler) -> Handler:
        """Register the handler for incoming messages (usable as a decorator).  Its return
        value is the WaitAck result; an exception becomes a ``RemoteError`` at the sender.
        ``async def`` handlers run on the event loop; plain functions run in a worker
        thread (``sync_handler_in_thread``).  Messages reach it one at a time, in order."""
        self._handler_is_async = inspect.iscoroutinefunction(fn)
        self._handler = fn
        return fn


def _error_body(error_type: str, message: str) -> bytes:
    """An error RESULT's body.  Text that is not valid UTF-8 (a lone surrogate, say from
    a file name decoded with ``surrogateescape``) is written with backslash escapes:
    orjson refuses it, and the peer must get its answer anyway."""
    fields = {"type": error_type, "message": message[:4000]}
    try:
        return orjson.dumps(fields)
    except orjson.JSONEncodeError:
        return orjson.dumps({k: _utf8(v) for k, v in fields.items()})


def _utf8(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class Link:
    """Messaging over one open connection."""

    def __init__(
        self,
        owner: LinkOwner,
        endpoint: QuicEndpoint,
        config: _Common,
        client_id: str,
        session_id: str,
        peer_max_payload: int,
        now: float,
        peer_window: int | None = None,
    ) -> None:
        self.owner = owner
        self.role = owner.role
        self.endpoint = endpoint
        self.config = config
        self.client_id = client_id
        self.session_id = session_id
        #: per-message steps of this loop pass, by kind, not yet delivered (see _step)
        self.pending_steps: dict[str, list[tuple[Any, ...]]] | None = None
        self.opened_at = now
        self.max_payload_in = config.max_payload
        self.max_payload_out = min(config.max_payload, peer_max_payload)
        self.closed = False
        self.messages_sent = 0
        self.messages_received = 0
        # handler-level flow control: the peer handles at most ``peer_window`` of our
        # messages at a time and tells us with CREDIT (or a RESULT) how far it got
        self.peer_window = peer_window
        self.peer_processed = 0
        self.processed = 0
        self.credit_sent = 0
        self._credit_step = max(1, config.max_inbound_queue // 4)
        self._max_inbox = config.max_inbound_queue
        self._figures = owner.figures
        self._loop = asyncio.get_running_loop()
        self._outbox: list[bytes] = []
        self._outbox_bytes = 0
        # unacknowledged stream bytes: at most what aioquic held after our last write
        self._unacked_bound = endpoint.unacked_bytes(MSG_STREAM)
        self._flusher = owner.flusher()
        self._flush_queued = False
        self._inbox: deque[Message] = deque()
        self._in_handler = False  # the worker is in the handler with a message
        self._wakeup: asyncio.Future[None] | None = None
        self._worker: asyncio.Task[None] | None = self._loop.create_task(
            self._work(), name=f"backbone-handler-{client_id}"
        )

    # --- outgoing ---------------------------------------------------------------------
    def buffered(self) -> int:
        return self._outbox_bytes + self.endpoint.unacked_bytes(MSG_STREAM)

    def check_room(self, size: int) -> None:
        """Raise :class:`Backpressure` if ``size`` more bytes would pass the limit.
        Under the ``disconnect`` policy the slow peer is closed as well."""
        limit = self.config.outbound_buffer_limit
        # QUIC's unacknowledged bytes only shrink between our writes, so the figure read
        # at the last flush bounds them: aioquic's stream state is read again only when
        # that bound says the limit may be near (not once per message)
        buffered = self._outbox_bytes + self._unacked_bound
        if buffered + size > limit:
            self._unacked_bound = self.endpoint.unacked_bytes(MSG_STREAM)
            buffered = self._outbox_bytes + self._unacked_bound
        window = self.peer_window
        if window is not None and self.messages_sent - self.peer_processed >= window:
            self._slow(
                Backpressure(self.client_id, buffered, limit, unhandled=window),
                f"{window} messages waiting for the peer's handler",
            )
        if buffered and buffered + size > limit:
            self._slow(
                Backpressure(self.client_id, buffered, limit),
                f"{buffered} bytes unacknowledged (limit {limit})",
            )

    def _slow(self, refusal: Backpressure, detail: str) -> NoReturn:
        """The peer is not keeping up: under ``disconnect`` close it, and refuse the send."""
        if self.config.slow_consumer_policy == "disconnect":
            self.endpoint.shut("slow_consumer", ErrorCode.SLOW_CONSUMER, detail)
        raise refusal

    def check_payload(self, size: int) -> None:
        if size > self.max_payload_out:
            raise PayloadTooLarge(size, self.max_payload_out)

    def send_frame(
        self,
        frame: bytes,
        msg_id: bytes,
        size: int,
        wait_ack: bool,
        timeout: float,
        headers: dict[str, str] | None = None,
        broadcast: bool = False,
    ) -> asyncio.Future[Any] | None:
        """Queue an encoded MESSAGE frame; with ``wait_ack`` register and return the future."""
        self.check_room(len(frame))
        fut: asyncio.Future[Any] | None = None
        if wait_ack:
            fut = self._loop.create_future()
            owner = self.owner
            seq = self.messages_sent + 1
            entry = owner.pending.add(
                self.session_id,
                msg_id,
                timeout,
                self._loop.time(),
                Waiter(fut, self.client_id, seq),
                order=seq,
            )
            owner._arm_pending_timer(entry.deadline)
        self._queue(frame)
        self.messages_sent += 1
        self._figures.messages_out += 1
        want = signals.wants(signals.on_message_sent)
        if want or signals.batching("message.sent"):
            self._report(
                want,
                signals.on_message_sent,
                "message.sent",
                (next(SEQUENCE), time.time(), msg_id.hex(), size, wait_ack, broadcast, headers),
            )
        return fut

    def _report(
        self, want_event: bool, signal: NamedSignal, kind: str, row: tuple[Any, ...]
    ) -> None:
        """A per-message step (``row``: its values of ``STEP_FIELDS[kind]``, in order):
        its event on ``signal`` if ``want_event`` (someone listens there), and the row
        for the batches if someone wants ``kind`` there.  One row serves both, so the
        two views of a step have the same ``seq`` and ``at``.  The caller checked that
        one of them is wanted (and built the row only then)."""
        if want_event:
            event = STEP_EVENT[kind](self.role, self.client_id, row)
            signals.emit_step(signal, self.owner, event)
            if not signals.batching(kind):
                return
        self._step(kind, row)

    #: a per-message step's row for :data:`signals.on_events_batched` (``row``: its
    #: values of ``STEP_FIELDS[kind]``, in order); the link is its own step source
    #: (:class:`signals.StepSource`), so no lookup per step
    _step = signals.add_row

    def send_control(self, frame: bytes) -> None:
        """Queue a control frame (GOAWAY) behind what is queued, and transmit now."""
        self._queue(frame)
        self._flush()

    def _queue(self, frame: bytes) -> None:
        self._outbox.append(frame)
        self._outbox_bytes += len(frame)
        if not self._flush_queued:
            self._flush_queued = True
            self._flusher.add(self)

    def _flush(self) -> None:
        self._flush_queued = False
        outbox = self._outbox
        endpoint = self.endpoint
        # a connection that has ended (its link is shut down a moment later on a client)
        if self.closed or not outbox or endpoint.terminated_reported:
            return
        data = outbox[0] if len(outbox) == 1 else b"".join(outbox)
        try:
            endpoint.queue(MSG_STREAM, data)
        except Exception as exc:  # the stream cannot take it: this connection is done
            log.exception("writing to %r failed", self.client_id)
            report_violation(self.owner, endpoint, self.client_id, internal_error(0, exc))
            return  # the frames stay in the outbox, counted as unsent at shutdown
        outbox.clear()
        self._outbox_bytes = 0
        endpoint.transmit()
        self._unacked_bound = endpoint.unacked_bytes(MSG_STREAM)

    # --- incoming ---------------------------------------------------------------------
    def on_frame(self, df: DataFrame, now: float) -> None:
        """Handle a MESSAGE or RESULT; raises :class:`ProtocolViolation` on bad input."""
        if len(df.body) > self.max_payload_in:
            raise ProtocolViolation(
                ErrorCode.FRAME_TOO_LARGE,
                f"payload of {len(df.body)} bytes exceeds max_payload {self.max_payload_in}",
            )
        if df.type == _MESSAGE:
            self._on_message(df)
        else:
            self._on_result(df, now)

    def _on_message(self, df: DataFrame) -> None:
        inbox = self._inbox
        if len(inbox) >= self._max_inbox:
            raise ProtocolViolation(
                ErrorCode.INBOUND_OVERFLOW,
                f"more than {self._max_inbox} messages waiting for the handler",
            )
        flags = df.flags
        payload = decode_payload(flags, df.body)
        wait_ack = bool(flags & FLAG_WAIT_ACK)
        if wait_ack:
            # the RESULT is due soon: let it carry the ACK of this message
            self.endpoint.hold_ack()
        # tuple.__new__: a NamedTuple's own __new__ is a Python function (about 0.4 µs)
        msg = _new_message(
            Message, (df.msg_id.hex(), self.client_id, payload, wait_ack, time.time(), df.headers)
        )
        self.messages_received += 1
        self._figures.messages_in += 1
        want = signals.wants(signals.on_message_received)
        if want or signals.batching("message.received"):
            self._report(
                want,
                signals.on_message_received,
                "message.received",
                (next(SEQUENCE), time.time(), msg.msg_id, len(df.body), wait_ack, df.headers),
            )
        inbox.append(msg)
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def _on_result(self, df: DataFrame, now: float) -> None:
        owner = self.owner
        # parse first: a malformed RESULT closes the connection, and its pending entry
        # must then fail with the others (ClientGone), not vanish unresolved
        error_type: str | None = None
        value: Any = None
        if df.flags & FLAG_ERROR:
            info = decode_payload(0, df.body)
            if not isinstance(info, dict):
                raise ProtocolViolation(
                    ErrorCode.PROTOCOL_ERROR, "error RESULT body is not an object"
                )
            error_type = str(info.get("type", "Error"))
            value = str(info.get("message", ""))
        else:
            value = decode_payload(df.flags, df.body)
        entry = owner.pending.resolve(self.session_id, df.msg_id)
        if entry is None:
            late = owner.pending.late(self.session_id, df.msg_id)
            if late is not None:
                # too late for its sender, but the peer has handled everything up to it:
                # it counts against the handler window (the peer sends no CREDIT for it)
                if late > self.peer_processed:
                    self.peer_processed = late
                if signals.wants(signals.on_ack_late):
                    signals.emit(
                        signals.on_ack_late,
                        owner,
                        LateAckDropped(
                            role=self.role, msg_id=df.msg_id.hex(), client_id=self.client_id
                        ),
                    )
                return
            raise ProtocolViolation(
                ErrorCode.UNKNOWN_MESSAGE_ID,
                f"RESULT for message {df.msg_id.hex()}, which is not awaiting a result",
            )
        if entry.token.seq > self.peer_processed:
            self.peer_processed = entry.token.seq  # handled in order: all before it too
        latency = now - entry.created_at
        owner.figures.ack_latency(latency)
        fut = entry.token.future
        if not fut.done():
            if error_type is not None:
                fut.set_exception(RemoteError(df.msg_id.hex(), self.client_id, error_type, value))
            else:
                fut.set_result(value)
        want = signals.wants(signals.on_ack)
        if want or signals.batching("ack.received"):
            self._report(
                want,
                signals.on_ack,
                "ack.received",
                (
                    next(SEQUENCE),
                    time.time(),
                    df.msg_id.hex(),
                    error_type is None,
                    error_type,
                    latency,
                    df.headers,
                ),
            )

    def on_credit(self, processed: int) -> None:
        if processed > self.messages_sent:
            raise ProtocolViolation(
                ErrorCode.PROTOCOL_ERROR,
                f"CREDIT for {processed} messages, only {self.messages_sent} were sent",
            )
        if processed > self.peer_processed:
            self.peer_processed = processed

    def _credit(self) -> None:
        """After a message was handled: tell the sender in batches of a quarter window.
        That is enough for progress (a blocked sender has a whole window unreported, so
        a CREDIT is always on its way) and costs one small frame per window/4 messages —
        a CREDIT whenever the queue ran empty cost a frame per message."""
        due = self.processed - self.credit_sent
        if due >= self._credit_step:
            self.credit_sent = self.processed
            self._queue(encode_credit(self.processed))

    async def _work(self) -> None:
        """The handler worker: one message at a time, in order.  The handler is awaited
        here, not in a coroutine per message (that cost about a microsecond each)."""
        inbox = self._inbox
        owner = self.owner
        limit = self.config.outbound_buffer_limit
        endpoint = self.endpoint
        while True:
            if not inbox:
                self._wakeup = self._loop.create_future()
                await self._wakeup
                self._wakeup = None
                continue
            held = endpoint.unacked_bytes(MSG_STREAM)
            if held > limit:
                # the peer does not take what we send (its results included): handle
                # nothing more of its until it does, so results cannot pile up without
                # end.  Its further messages wait in the inbox, bounded by our window.
                await self._until_taken(held, limit)
                continue
            msg = inbox.popleft()
            handler = owner._handler
            started_wall = time.time()
            started = time.perf_counter()
            error: tuple[str, str] | None = None
            result: Any = None
            if handler is None:
                error = ("NoHandler", f"no handler is registered on {self.role} {self.client_id!r}")
            else:
                self._in_handler = True
                try:
                    if owner._handler_is_async:
                        result = await handler(msg)
                    else:
                        if self.config.sync_handler_in_thread:
                            result = await self._loop.run_in_executor(None, handler, msg)
                        else:
                            result = handler(msg)
                        if hasattr(result, "__await__"):  # a sync callable returned an awaitable
                            result = await _as_awaitable(result)
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if self.closed or (task is not None and task.cancelling()):
                        raise  # we are being shut down
                    # the handler cancelled something of its own: its failure, not ours
                    error = ("CancelledError", "the handler was cancelled")
                except Exception as exc:
                    error = (type(exc).__name__, str(exc))
                    if not msg.wait_ack:
                        log.warning(
                            "handler raised %s on message %s from %r (no result was asked for)",
                            error[0],
                            msg.msg_id,
                            self.client_id,
                            exc_info=True,
                        )
            self._in_handler = False
            try:
                self._handled(msg, result, error, started_wall, time.perf_counter() - started)
            except Exception:  # never let one message kill the handler worker
                log.exception("internal error while handling message %s", msg.msg_id)
            if not self.closed:
                self._credit()

    async def _until_taken(self, held: int, limit: int) -> None:
        log.info(
            "%s %r does not take what we send (%d bytes waiting, limit %d): its messages "
            "wait until it does",
            "server" if self.role == "client" else "client",
            self.client_id,
            held,
            limit,
        )
        await self.endpoint.wait_unacked_below(MSG_STREAM, limit)

    def _handled(
        self,
        msg: Message,
        result: Any,
        error: tuple[str, str] | None,
        started_wall: float,
        elapsed: float,
    ) -> None:
        """After the handler: count, report, and answer a WaitAck message."""
        self.processed += 1
        want = signals.wants(signals.on_message_processed)
        if want or signals.batching("message.processed"):
            self._report(
                want,
                signals.on_message_processed,
                "message.processed",
                (
                    next(SEQUENCE),
                    time.time(),
                    msg.msg_id,
                    msg.wait_ack,
                    error is None,
                    None if error is None else error[0],
                    started_wall,
                    elapsed,
                    msg.headers,
                ),
            )
        if not msg.wait_ack or self.closed:
            return
        if error is None:
            try:
                flags, body = encode_payload(result)
            except TypeError as exc:
                error = ("TypeError", f"handler result is not serializable: {exc}")
            else:
                if len(body) > self.max_payload_out:
                    error = (
                        "PayloadTooLarge",
                        f"handler result of {len(body)} bytes exceeds {self.max_payload_out}",
                    )
        if error is not None:
            flags, body = FLAG_ERROR, _error_body(*error)
        msg_id = bytes.fromhex(msg.msg_id)
        headers = propagation.inject(self.owner, "result", msg.msg_id, self.client_id, None)
        try:
            frame = encode_data_frame(FrameType.RESULT, flags, msg_id, body, headers)
        except InvalidHeaders as exc:  # a header injector's doing: answer without them
            log.warning("result of %s sent without its headers: %s", msg.msg_id, exc)
            frame = encode_data_frame(FrameType.RESULT, flags, msg_id, body, None)
        # a result is never refused for backpressure: the peer is waiting for it (the
        # worker pauses instead while the peer does not take what we send, see _work).
        # It also tells the peer that everything up to this message was handled (a credit).
        self.credit_sent = self.processed
        self._queue(frame)
        want = signals.wants(signals.on_ack)
        if want or signals.batching("ack.sent"):
            self._report(
                want,
                signals.on_ack,
                "ack.sent",
                (
                    next(SEQUENCE),
                    time.time(),
                    msg.msg_id,
                    error is None,
                    None if error is None else error[0],
                    len(body),
                    elapsed,
                ),
            )

    # --- teardown -----------------------------------------------------------------------
    def shutdown(self) -> tuple[int, int]:
        """Stop the handler worker and drop what is queued either way; returns how many
        received messages were still waiting for the handler, and how many frames were
        still waiting to be handed to QUIC.  The owner reports both (a log line and the
        ``disconnected`` event): a WaitAck sender of either kind learns of it as a failed
        result, a one-way message is lost with the connection."""
        if self.closed:
            return 0, 0
        self.closed = True
        if self._worker is not None:
            self._worker.cancel()
        # the message in the handler, whose answer can no longer be sent, counts too
        unhandled = len(self._inbox) + self._in_handler
        unsent = len(self._outbox)
        self._inbox.clear()
        self._outbox.clear()
        self._outbox_bytes = 0
        return unhandled, unsent

    def release(self) -> None:
        """The connection is gone for good (after :meth:`shutdown`): let go of the handler
        task, whose ``CancelledError`` traceback holds the frame of :meth:`_work`, and so
        this link — a reference cycle the garbage collector would have to find."""
        self.shutdown()
        self._worker = None


_new_message = tuple.__new__


async def _as_awaitable(value: Awaitable[Any]) -> Any:
    return await value
