"""The signal bus: blinker signals, one per group of events, plus ``on_event`` for all.

Receivers are called as ``receiver(sender, event=...)`` where ``sender`` is the
:class:`~backbone.Server` or :class:`~backbone.Client` that emitted the event::

    from backbone import signals

    @signals.on_connected.connect
    def hello(sender, event):
        print(event.client_id, "connected")

A receiver that raises is logged (with its traceback, rate-limited) and counted in
:data:`receiver_failures`; the data path never sees the exception.  Receivers run
synchronously on the event loop and must be cheap: slow work belongs on a queue of
the receiver's own.  Blinker holds receivers weakly by default: connect closures,
lambdas and bound methods of temporary objects with ``weak=False``.

The per-message steps (``message.sent``, ``message.received``, ``message.processed``,
``ack.sent``, ``ack.received``) also come in batches on :data:`on_events_batched`: one
:class:`~backbone.events.EventsBatched` per client, kind and event-loop pass, far
cheaper per step than an event each (see ``docs/events.md``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from blinker import NamedSignal, Namespace

from .events import BATCHED_KINDS, STEP_FIELDS, Event, EventsBatched

Receiver = Callable[..., Any]

log = logging.getLogger("backbone.signals")

_ns = Namespace()

on_event = _ns.signal("event", doc="every event, whatever its kind")
on_server_started = _ns.signal("server.started")
on_server_stopped = _ns.signal("server.stopped")
on_connected = _ns.signal("connected")
on_disconnected = _ns.signal("disconnected")
on_timeout = _ns.signal("heartbeat.timed_out", doc="heartbeat eviction / dead server")
on_state_changed = _ns.signal("state.changed")
on_connect_failed = _ns.signal("connect.failed")
on_reconnect_scheduled = _ns.signal("reconnect.scheduled")
on_protocol_error = _ns.signal("protocol.violated")
on_heartbeat = _ns.signal("heartbeat", doc="heartbeat.received and heartbeat.acknowledged")
on_message_sent = _ns.signal("message.sent")
on_message_received = _ns.signal("message.received")
on_message_processed = _ns.signal("message.processed")
on_ack = _ns.signal("ack", doc="ack.sent and ack.received")
on_ack_late = _ns.signal("ack.late", doc="results that came after their timeout")
on_ack_timeout = _ns.signal("ack.timed_out")
on_ack_failed = _ns.signal("ack.failed")
on_send_rejected = _ns.signal("send.rejected")
on_goaway = _ns.signal("goaway", doc="goaway.sent (server) and goaway.received (client)")
on_session_refused = _ns.signal("session.refused")
on_auth_failed = _ns.signal("auth.failed")
on_events_batched = _ns.signal(
    "events.batched",
    doc="per-message steps in batches (EventsBatched); never on on_event",
)

ALL_SIGNALS: tuple[NamedSignal, ...] = (
    on_event,
    on_server_started,
    on_server_stopped,
    on_connected,
    on_disconnected,
    on_timeout,
    on_state_changed,
    on_connect_failed,
    on_reconnect_scheduled,
    on_protocol_error,
    on_heartbeat,
    on_message_sent,
    on_message_received,
    on_message_processed,
    on_ack,
    on_ack_late,
    on_ack_timeout,
    on_ack_failed,
    on_send_rejected,
    on_goaway,
    on_session_refused,
    on_auth_failed,
    on_events_batched,
)

#: the signal each event kind is emitted on (every event also goes to ``on_event``).
#: A plugin that wants a few kinds connects to their signals rather than to
#: ``on_event``: events nobody listens to are then never built.
SIGNAL_OF_KIND: dict[str, NamedSignal] = {
    "server.started": on_server_started,
    "server.stopped": on_server_stopped,
    "connected": on_connected,
    "disconnected": on_disconnected,
    "heartbeat.timed_out": on_timeout,
    "state.changed": on_state_changed,
    "connect.failed": on_connect_failed,
    "reconnect.scheduled": on_reconnect_scheduled,
    "protocol.violated": on_protocol_error,
    "heartbeat.received": on_heartbeat,
    "heartbeat.acknowledged": on_heartbeat,
    "message.sent": on_message_sent,
    "message.received": on_message_received,
    "message.processed": on_message_processed,
    "ack.sent": on_ack,
    "ack.received": on_ack,
    "ack.late": on_ack_late,
    "ack.timed_out": on_ack_timeout,
    "ack.failed": on_ack_failed,
    "send.rejected": on_send_rejected,
    "goaway.sent": on_goaway,
    "goaway.received": on_goaway,
    "session.refused": on_session_refused,
    "auth.failed": on_auth_failed,
    "events.batched": on_events_batched,
}

#: failures per receiver name since start; a plugin's health figure
receiver_failures: Counter[str] = Counter()
#: a receiver that failed this many times is disconnected from the signal
MAX_RECEIVER_FAILURES = 100
_last_logged: dict[str, float] = {}
_LOG_EVERY = 10.0


def receiver_name(receiver: Any) -> str:
    """The key of a receiver in :data:`receiver_failures`: its qualified name, plus the
    instance for bound methods (one count per plugin instance, not per class)."""
    name = getattr(receiver, "__qualname__", repr(receiver))
    owner = getattr(receiver, "__self__", None)
    return f"{name}@{id(owner):x}" if owner is not None else str(name)


def wants(signal: NamedSignal) -> bool:
    """True if building an event for ``signal`` is worth it (someone listens)."""
    return bool(signal.receivers) or bool(on_event.receivers)


def _failed(signal: NamedSignal, receiver: Any, event: Event) -> None:
    name = receiver_name(receiver)
    receiver_failures[name] += 1
    if receiver_failures[name] >= MAX_RECEIVER_FAILURES:
        signal.disconnect(receiver)
        log.error(
            "event receiver %s failed %d times and was disconnected from %s",
            name,
            receiver_failures[name],
            signal.name,
        )
        return
    now = time.monotonic()
    if now - _last_logged.get(name, -_LOG_EVERY) >= _LOG_EVERY:
        _last_logged[name] = now
        log.exception(
            "event receiver %s raised on %s (failure #%d); the data path is unaffected",
            name,
            event.kind,
            receiver_failures[name],
        )


# --- routes: who receives what a sender emits on a signal ------------------------------------
#
# blinker works out a signal's receivers for a sender on every send (set union, weakref
# checks, a generator): several µs, once per event, on the data path.  A route caches that
# tuple per (signal, sender).  Any connect or disconnect on any signal of the bus clears
# every route; a route is kept only when all of the signal's receivers are held strongly
# (a weakly held one can vanish without a disconnect notice) and the sender can be weakly
# referenced (its route goes when it does, and is never mistaken for a new object's).

_routes: dict[tuple[int, int], tuple[weakref.ref[Any], tuple[Receiver, ...]]] = {}


def _clear_routes(*_args: Any, **_kwargs: Any) -> None:
    global _wanted_steps
    _routes.clear()
    _wanted_steps = None


def _route(signal: NamedSignal, sender: Any) -> tuple[Receiver, ...]:
    key = (id(signal), id(sender))
    hit = _routes.get(key)
    if hit is not None and hit[0]() is sender:
        return hit[1]
    receivers = tuple(signal.receivers_for(sender))
    if not any(isinstance(r, weakref.ref) for r in signal.receivers.values()):
        try:
            ref = weakref.ref(sender, functools.partial(_drop_route, key))
        except TypeError:
            return receivers
        _routes[key] = (ref, receivers)
    return receivers


def _drop_route(key: tuple[int, int], ref: weakref.ref[Any]) -> None:
    hit = _routes.get(key)
    if hit is not None and hit[0] is ref:
        del _routes[key]


for _signal in ALL_SIGNALS:
    _signal.receiver_connected.connect(_clear_routes, weak=False)
    _signal.receiver_disconnected.connect(_clear_routes, weak=False)


#: what a receiver may raise without harm to the data path: any error, and also a
#: CancelledError (a BaseException) - receivers are plain functions, so one that raises it
#: did so itself (say, ``result()`` of a cancelled future), never because the core's task
#: is being cancelled.  It once escaped into the handler worker and the pending-result
#: expiry and stopped them.  KeyboardInterrupt and SystemExit still go through.
RECEIVER_FAILURES = (Exception, asyncio.CancelledError)


def _deliver(signal: NamedSignal, sender: Any, event: Event) -> None:
    if not signal.receivers:
        return
    for receiver in _route(signal, sender):
        try:
            receiver(sender, event=event)
        except RECEIVER_FAILURES:
            _failed(signal, receiver, event)


def emit(signal: NamedSignal, sender: Any, event: Event) -> None:
    """Deliver ``event`` to ``signal``'s receivers and to ``on_event``'s, isolated.
    Steps batched so far on this thread are delivered first (:func:`flush_steps`), so a
    batch receiver sees a client's steps before, say, its ``disconnected``."""
    if _steps.sources:
        flush_steps()
    emit_step(signal, sender, event)


def emit_step(signal: NamedSignal, sender: Any, event: Event) -> None:
    """:func:`emit` for the core's per-message steps: without delivering the pending
    batches first (each step would end the batch it belongs to).
    (``_deliver`` inlined for ``signal``: this runs once per message.)"""
    if signal.receivers:
        hit = _routes.get((id(signal), id(sender)))
        route = hit[1] if hit is not None and hit[0]() is sender else _route(signal, sender)
        for receiver in route:
            try:
                receiver(sender, event=event)
            except RECEIVER_FAILURES:
                _failed(signal, receiver, event)
    if on_event.receivers and signal is not on_event and signal is not on_events_batched:
        _deliver(on_event, sender, event)


# --- batches of per-message steps ------------------------------------------------------------
#
# For the kinds of events.BATCHED_KINDS the core adds each step as a row (a tuple of its
# fields) to its *step source* - the Link of one connection: a dict of rows by kind, in
# ``pending_steps`` - and registers the source with this thread's table at its first step
# of a loop pass.  At the end of the pass (one call_soon per pass) each source's rows of
# each kind become one EventsBatched, delivered on on_events_batched.  Building a row
# costs a tuple; building and delivering an event per step cost several microseconds
# between a real connection's messages.


class StepSource(Protocol):
    """What gathers the steps of one sender for one client (the core's ``Link``)."""

    pending_steps: dict[str, list[tuple[Any, ...]]] | None

    @property
    def owner(self) -> Any: ...  # the sender of the batches

    @property
    def role(self) -> str: ...

    @property
    def client_id(self) -> str: ...


class _AdHocSource:
    """A step source for :func:`add_step` callers that have none of their own."""

    __slots__ = ("client_id", "owner", "pending_steps", "role")

    def __init__(self, owner: Any, role: str, client_id: str) -> None:
        self.owner = owner
        self.role = role
        self.client_id = client_id
        self.pending_steps: dict[str, list[tuple[Any, ...]]] | None = None


class _Steps(threading.local):
    def __init__(self) -> None:
        #: sources with steps not yet delivered, in the order of their first step
        self.sources: list[StepSource] = []
        self.adhoc: dict[tuple[Any, str, str], _AdHocSource] = {}
        self.scheduled_on: asyncio.AbstractEventLoop | None = None


_steps = _Steps()
#: the running loop or None, without raising (``asyncio.get_running_loop`` raises)
_running_loop = asyncio._get_running_loop


#: the kinds some receiver of on_events_batched wants (None: not worked out since the
#: last connect or disconnect on the bus)
_wanted_steps: frozenset[str] | None = None


def batching(kind: str | None = None) -> bool:
    """True if the core should add its per-message steps (of ``kind``) to batches:
    someone listens to :data:`on_events_batched` (and wants that kind, see
    :func:`steps_wanted_by`)."""
    if not on_events_batched.receivers:
        return False
    if kind is None:
        return True
    wanted = _wanted_steps
    if wanted is None:
        wanted = _work_out_wanted_steps()
    return kind in wanted


def steps_wanted_by(receiver: Any) -> frozenset[str]:
    """The batched kinds a receiver of :data:`on_events_batched` wants: the
    ``batched_steps`` of the object a bound method belongs to (a plugin's), else of
    the callable itself; all of them if neither says.  Rows of kinds nobody wants are
    never built."""
    declared = getattr(getattr(receiver, "__self__", None), "batched_steps", None)
    if declared is None:
        declared = getattr(receiver, "batched_steps", None)
    return BATCHED_KINDS if declared is None else frozenset(declared)


def _work_out_wanted_steps() -> frozenset[str]:
    global _wanted_steps
    kinds: set[str] = set()
    for held in list(on_events_batched.receivers.values()):
        receiver = held() if isinstance(held, weakref.ref) else held
        if receiver is not None:
            kinds |= steps_wanted_by(receiver)
    wanted = frozenset(kinds)
    _wanted_steps = wanted
    return wanted


def steps_from(source: StepSource) -> None:
    """``source`` has its first pending step (its ``pending_steps`` was None): deliver
    its batches at the end of this loop pass (at once outside a running loop).  Called
    by :func:`add_row` once per source and pass."""
    _steps.sources.append(source)
    _flush_at_end_of_pass()


def _flush_at_end_of_pass() -> None:
    """Have this thread's pending batches delivered after the running loop's pass: one
    callback per pass (scheduled again if the loop it was on stopped first); outside a
    running loop, now."""
    loop = _running_loop()
    if loop is None:
        flush_steps()
    elif _steps.scheduled_on is not loop:
        _steps.scheduled_on = loop
        loop.call_soon(_flush_when_due)


def add_step(sender: Any, role: str, client_id: str, kind: str, row: tuple[Any, ...]) -> None:
    """Add one step (``row``: its values of :data:`~backbone.events.STEP_FIELDS`
    ``[kind]``) to the batch of ``sender``, ``role``, ``client_id`` and ``kind``; the
    batches go out at the end of this event-loop pass, or at once outside a running
    loop.  (The core's links do the same with less work per step.)"""
    key = (sender, role, client_id)
    source = _steps.adhoc.get(key)
    if source is None:
        source = _steps.adhoc[key] = _AdHocSource(sender, role, client_id)
    had_steps = source.pending_steps is not None
    add_row(source, kind, row)
    if had_steps:  # registered already, perhaps by a loop that has stopped since
        _flush_at_end_of_pass()


def add_row(source: StepSource, kind: str, row: tuple[Any, ...]) -> None:
    """Add a step's row to ``source``'s pending batch of ``kind``, registering the
    source at its first step of a pass (:func:`steps_from`).  The core's ``Link._step``
    is this function."""
    pending = source.pending_steps
    if pending is None:
        source.pending_steps = {kind: [row]}
        steps_from(source)
        return
    rows = pending.get(kind)
    if rows is None:
        pending[kind] = [row]
    else:
        rows.append(row)


def _flush_when_due() -> None:
    _steps.scheduled_on = None
    flush_steps()


def emit_event(sender: Any, event: Event) -> None:
    """Emit ``event`` as the core does: on its kind's signal, and for a per-message kind
    (:data:`~backbone.events.BATCHED_KINDS`) also into the batch of its client (for
    tests, and for replaying or forwarding events into plugins)."""
    kind = event.kind
    signal = SIGNAL_OF_KIND[kind]
    if kind not in BATCHED_KINDS:
        emit(signal, sender, event)
        return
    if wants(signal):
        emit_step(signal, sender, event)
    if on_events_batched.receivers:
        add_step(sender, event.role, event.__dict__["client_id"], kind, row_of(event))


def row_of(event: Event) -> tuple[Any, ...]:
    """A step's row, from its event (when the core built the event anyway)."""
    values = event.__dict__
    return tuple(values[name] for name in STEP_FIELDS[event.kind])


def flush_steps() -> None:
    """Deliver this thread's pending batches now (plugins' ``flush`` call it; so does
    :func:`emit` before any other event)."""
    sources = _steps.sources
    if not sources:
        return
    _steps.sources = []
    adhoc = _steps.adhoc  # kept while delivering: a step added meanwhile joins its source
    deliver = bool(on_events_batched.receivers)
    done = 0
    try:
        for source in sources:
            pending = source.pending_steps
            source.pending_steps = None  # taken off before delivery: in order if re-entered
            done += 1
            if not deliver or not pending:
                continue
            owner, role, client_id = source.owner, source.role, source.client_id
            for kind, rows in pending.items():
                batch = EventsBatched.unchecked(
                    role=role,
                    step=kind,
                    client_id=client_id,
                    fields=STEP_FIELDS[kind],
                    rows=tuple(rows),
                )
                _deliver(on_events_batched, owner, batch)
    finally:
        # what escaped the receivers' isolation (KeyboardInterrupt): the sources not
        # delivered yet register again (their rows go with their next step or flush)
        for source in sources[done:]:
            if source.pending_steps is not None:
                _steps.sources.append(source)
        if _steps.adhoc is adhoc:
            # those with steps added while delivering stay (registered again); the rest go
            _steps.adhoc = {k: v for k, v in adhoc.items() if v.pending_steps is not None}
