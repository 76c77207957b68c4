"""Session history: an append-only SQLite log of connection, message and result events.

``HistoryPlugin`` listens to the signals of the kinds it records (never to ``on_event``,
so events of other kinds are not even built) with one cheap receiver (filter by kind,
update an in-memory view, add to a list); the per-message steps it records come in
batches (``signals.on_events_batched``, one event per client, kind and loop pass,
folded and queued as they are).  Every ``pack_delay`` seconds (or every
``batch`` events) the recorded events are packed into rows (:func:`rows_of`, which
also serialises them) on the emitting thread, and the rows go to a
:class:`~backbone.plugins.BoundedWorker` thread that only runs SQLite: one transaction
per batch through its own connection (WAL mode, ``busy_timeout``), and retention
(``max_age``, ``max_rows``) every few seconds by deleting the oldest rows by rowid range.

Why the packing is not the writer's: SQLite lets go of the GIL while it works, Python
code does not.  A writer thread busy in ``pack_rows`` and ``orjson`` held the GIL for
milliseconds at a time, and the event loop, which gives the GIL up on every socket call,
waited for it each time (up to the 5 ms switch interval): in the two-process benchmark
history alone cost 38 % of the throughput for 12 µs of CPU per message
(docs/benchmarks.md).

Queries (:meth:`HistoryPlugin.history`, :meth:`~HistoryPlugin.clients`,
:meth:`~HistoryPlugin.session_view`) are synchronous, may be called from any thread
and use a separate read connection; WAL lets them run while the writer writes.

Heartbeats are not stored one row per ping: the plugin keeps, per client, the time and
count of heartbeats in memory (:meth:`~HistoryPlugin.heartbeat_stats`) and stores a
heartbeat event at most once every ``heartbeat_every`` seconds per client and session
(the first one of each session included), plus the last one of each session, written
just before the event that ends it (``heartbeat.timed_out`` or ``disconnected``).

:class:`SessionView` is what one client's session looks like from the server: a pure
reducer (:func:`apply`, :func:`replay`) folds events into it.  The plugin keeps a live
view per client, updated in the receiver with the same reducer from the events it
records, so ``replay(stored events) == live view`` as long as nothing was dropped or
pruned.  See ``docs/history.md``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import operator
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeAlias

import orjson
from blinker import NamedSignal
from pydantic import TypeAdapter

from backbone import signals
from backbone.events import (
    BATCHED_KINDS,
    STEP_FIELDS,
    AckFailed,
    AckReceived,
    AckTimedOut,
    AnyEvent,
    Connected,
    Disconnected,
    Event,
    EventsBatched,
    HeartbeatAcknowledged,
    HeartbeatReceived,
    LateAckDropped,
    MessageProcessed,
    MessageSent,
    Role,
    SendRejected,
)
from backbone.plugins import BoundedWorker, Plugin, Receiver

log = logging.getLogger("backbone.plugins.history")

#: 3: packs of one kind may hold columns (:func:`pack_columns`), which schema-2 code
#: cannot read; the table is the same, so a schema-2 file is taken over as it is
SCHEMA_VERSION: Final = 3

#: the per-message kinds: a run of them for one client (and role) within one writer batch
#: is stored as one row, a *pack* (see :func:`pack_rows`)
PACKED_KINDS: Final = frozenset(
    {
        "message.sent",
        "message.received",
        "message.processed",
        "ack.sent",
        "ack.received",
        "ack.late",
        "ack.timed_out",
        "ack.failed",
        "send.rejected",
    }
)
#: the kinds recorded: connection events one row per event, per-message ones in packs
RECORDED_KINDS: Final = PACKED_KINDS | frozenset(
    {
        "server.started",
        "server.stopped",
        "connected",
        "disconnected",
        "heartbeat.timed_out",
        "state.changed",
        "connect.failed",
        "reconnect.scheduled",
        "protocol.violated",
        "goaway.received",
    }
)
#: the kinds recorded unless ``kinds=`` says otherwise: all but ``message.received``, since
#: ``message.processed`` records the same message once handled, with its outcome (one row
#: per message received instead of two)
DEFAULT_KINDS: Final = RECORDED_KINDS - {"message.received"}
#: the kinds sampled (see ``heartbeat_every``)
HEARTBEAT_KINDS: Final = frozenset({"heartbeat.received", "heartbeat.acknowledged"})
#: the ``kind`` of a pack that holds more than one kind
MIXED: Final = "*"
#: a pack spans at most this many seconds (first to last event); queries by time read
#: this much further back, then keep exactly the events in range
PACK_SPAN: Final = 1.0
#: events per pack at most
PACK_MAX: Final = 1000
#: events that end a session: the last heartbeat held back is written before them
_SESSION_END: Final = frozenset({"disconnected", "heartbeat.timed_out"})
ALL_KINDS: Final = RECORDED_KINDS | HEARTBEAT_KINDS

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        role TEXT NOT NULL,
        client_id TEXT,
        session_id TEXT,
        msg_id TEXT,
        data TEXT NOT NULL,
        n INTEGER NOT NULL DEFAULT 1,
        at_last REAL
    )""",
    "CREATE INDEX IF NOT EXISTS events_client_at ON events (client_id, at)",
)
#: schema 1 had no ``n`` nor ``at_last``: every row was one event
_MIGRATE_1_TO_2 = (
    "ALTER TABLE events ADD COLUMN n INTEGER NOT NULL DEFAULT 1",
    "ALTER TABLE events ADD COLUMN at_last REAL",
)
#: one event per row (the layout of schema 1, still valid)
_INSERT = (
    "INSERT INTO events (at, kind, role, client_id, session_id, msg_id, data) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_SEQ = (
    "INSERT INTO events (seq, at, kind, role, client_id, session_id, msg_id, data, n, "
    "at_last) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_COLUMNS: Final = 10
#: rows per INSERT statement (10 parameters a row: under SQLite's oldest limit of 999)
ROWS_PER_INSERT: Final = 99


@functools.lru_cache(maxsize=8)
def _insert_rows(n: int) -> str:
    """The INSERT of ``n`` rows, ``seq`` and ``n`` given."""
    return _INSERT_SEQ + ", (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)" * (n - 1)


_CLIENTS = """
WITH RECURSIVE ids(id) AS (
    SELECT (SELECT min(client_id) FROM events)
    UNION ALL
    SELECT (SELECT min(client_id) FROM events WHERE client_id > ids.id)
    FROM ids WHERE ids.id IS NOT NULL
)
SELECT id FROM ids WHERE id IS NOT NULL
"""
_CLIENTS_SINCE = """
WITH RECURSIVE ids(id) AS (
    SELECT (SELECT min(client_id) FROM events)
    UNION ALL
    SELECT (SELECT min(client_id) FROM events WHERE client_id > ids.id)
    FROM ids WHERE ids.id IS NOT NULL
)
SELECT id FROM ids
WHERE id IS NOT NULL
  AND EXISTS (
    SELECT 1 FROM events
    WHERE client_id = ids.id AND at >= ? AND coalesce(at_last, at) >= ?
  )
"""
#: rows deleted per retention transaction, so a large backlog never holds the write
#: lock for long
RETENTION_CHUNK: Final = 50_000

_ADAPTER: TypeAdapter[Event] = TypeAdapter(AnyEvent)


def _json(fields: Any) -> bytes:
    """Events' fields (one ``__dict__``, or a list of them) as JSON: ``orjson`` gives the
    same text as ``model_dump_json()`` for the plain types events hold, at a fraction of
    the cost; anything else becomes its ``str``."""
    return orjson.dumps(fields, default=str)


#: what the receiver queues for the writer: the event's fields (its ``__dict__``; events
#: are immutable, so nobody changes it).  The event object itself is freed at once, and
#: the writer thread serialises a whole pack with one ``orjson`` call.
Record = dict[str, Any]


def record_of(event: Event) -> Record:
    return event.__dict__


#: what goes to the writer thread: ``(n, rows, records)``, ``n`` events either packed
#: and serialised into ``rows`` (on the event loop) or, if recorded outside any event
#: loop, as ``records`` that the writer packs itself
Chunk = tuple[int, "list[Row]", "list[Item]"]


def _events_in(chunk: Chunk) -> int:
    return chunk[0]


def parse_event(data: str | bytes) -> Event:
    """One stored event (its ``model_dump_json``) back into its class."""
    return _ADAPTER.validate_json(data)


def parse_row(data: str | bytes, n: int) -> list[Event]:
    """The events of one row: one event (``n == 1``), or a pack: its columns (see
    :func:`pack_columns`) or, as packs of mixed kinds and older rows hold them, an
    array of the events."""
    if n == 1:
        return [_ADAPTER.validate_json(data)]
    packed = orjson.loads(data)
    if isinstance(packed, dict):
        packed = unpack_columns(packed, n)
    return [_ADAPTER.validate_python(item) for item in packed]


_KIND = operator.itemgetter("kind")
_SEQ = operator.itemgetter("seq")
_AT = operator.itemgetter("at")


def pack_columns(run: Sequence[Record]) -> dict[str, Any]:
    """Records of ONE kind (so with the same fields) as columns: ``{"same": {field:
    value}, "cols": {field: [value, ...]}}``, a field whose value is the same (equal and
    of one type) in every record stored once.  For a run of one client's sends that is
    the kind, the role, the client and the flags once, and per message only what
    differs (``seq``, ``at``, ``msg_id``, ...): about a third of the bytes of an array of
    the events, so a third of what the writer hands to SQLite.  Raises ``ValueError``
    (or ``KeyError``) if the records do not share their fields."""
    if len(set(map(len, run))) != 1:
        raise ValueError("records of one pack differ in their fields")
    # KeyError: a field is missing
    columns = ((name, list(map(operator.itemgetter(name), run))) for name in run[0])
    return _columns({}, columns, len(run))


def _columns(
    same: dict[str, Any], columns: Iterable[tuple[str, Sequence[Any]]], n: int
) -> dict[str, Any]:
    """:func:`pack_columns`'s layout for ``n`` records given as ``(field, values)``
    columns: a field whose ``n`` values are the same goes to ``same`` (which may hold
    the fields known to be common already), the others to ``cols``."""
    cols: dict[str, list[Any]] = {}
    for name, col in columns:
        first = col[0]
        # equal (count() uses ==; NaN is never the same) and of one type (1 == True == 1.0)
        if col.count(first) == n and first == first and len(set(map(type, col))) == 1:
            same[name] = first
        else:
            cols[name] = list(col)
    return {"same": same, "cols": cols}


def unpack_columns(packed: dict[str, Any], n: int) -> list[Record]:
    """:func:`pack_columns`, undone (``n``: how many records; every field may be the
    same in all of them)."""
    same: dict[str, Any] = packed["same"]
    cols: dict[str, list[Any]] = packed["cols"]
    if not cols:
        return [dict(same) for _ in range(n)]
    names = list(cols)
    out: list[Record] = []
    for values in zip(*cols.values(), strict=True):
        record = dict(same)
        record.update(zip(names, values, strict=True))
        out.append(record)
    return out


Row = tuple[float, str, str, "str | None", "str | None", "str | None", str, int, "float | None"]


def pack_rows(records: Iterable[Record]) -> list[Row]:
    """Rows for ``records`` (events' fields, in order): ``(at, kind, role, client_id,
    session_id, msg_id, data, n, at_last)``.

    Consecutive records of :data:`PACKED_KINDS` for one ``(client_id, role)`` become one
    row, a *pack*, while they span at most :data:`PACK_SPAN` seconds and number at most
    :data:`PACK_MAX`: its ``data`` holds their fields (:func:`pack_columns` if they share
    one kind, else a JSON array), ``n`` their number, ``at`` and ``at_last`` the first and
    the latest time, ``kind`` theirs if they share one (else :data:`MIXED`), ``msg_id``
    NULL.  Any other record of that client and role ends the open pack first, so the
    rows of one client and role, in row order, hold its events in the order given.  A
    pack costs SQLite one row and one index entry instead of one per message.
    """
    items: list[Item] = []
    runs: dict[tuple[str, str], list[Record | EventsBatched]] = {}
    for r in records:
        add_item(items, runs, r, r["kind"] in PACKED_KINDS)
    return rows_of(items)


#: what is recorded and not yet packed: a record, or a *run* (a list of the consecutive
#: per-message records of one client and role, in order, and batches of them as the core
#: emits them, :class:`~backbone.events.EventsBatched`), each at the place of its first
Item: TypeAlias = "Record | list[Record | EventsBatched]"


def add_item(
    items: list[Item],
    runs: dict[tuple[str, str], list[Record | EventsBatched]],
    r: Record,
    packed: bool,
) -> None:
    """Add ``r`` to ``items``: to its client and role's open run if ``packed`` (opening
    one if there is none), else on its own, ending that open run.  ``runs`` holds the
    open runs by ``(client_id, role)``."""
    cid = r.get("client_id")
    if cid is None:
        items.append(r)
        return
    key = (cid, r["role"])
    if packed:
        _open_run(items, runs, key).append(r)
        return
    if runs:
        runs.pop(key, None)
    items.append(r)


def add_batch(
    items: list[Item], runs: dict[tuple[str, str], list[Record | EventsBatched]], b: EventsBatched
) -> None:
    """:func:`add_item` for a batch of steps: to its client and role's open run."""
    _open_run(items, runs, (b.client_id, b.role)).append(b)


def _open_run(
    items: list[Item], runs: dict[tuple[str, str], list[Record | EventsBatched]], key: Any
) -> list[Record | EventsBatched]:
    """The open run of ``key`` (client id, role), opened at the end of ``items`` if
    there is none."""
    run = runs.get(key)
    if run is None:
        runs[key] = run = []
        items.append(run)
    return run


def rows_of(items: Iterable[Item]) -> list[Row]:
    """The rows of :func:`add_item`'s ``items``: a run becomes packs of at most
    :data:`PACK_MAX` records spanning at most :data:`PACK_SPAN` seconds.  A run made of
    batches of one kind is packed from the batches' rows (:func:`_batch_rows`), without
    a dict per step; a run that mixes kinds, or batches and records, is packed from its
    records."""
    rows: list[Row] = []
    for entry in items:
        if type(entry) is not list:
            rows.append(_single(entry))  # type: ignore[arg-type]
            continue
        first_entry = entry[0]
        if type(first_entry) is EventsBatched and all(
            type(x) is EventsBatched and x.step == first_entry.step  # type: ignore[union-attr]
            for x in entry
        ):
            rows.extend(_batch_rows(entry))  # type: ignore[arg-type]
            continue
        item = _run_records(entry)
        ats = list(map(_AT, item))
        for start, end in _spans(ats):
            rows.append(_pack_row(item[start:end], max(ats[start:end])))
    return rows


def _spans(ats: list[float]) -> list[tuple[int, int]]:
    """Where a run whose events happened at ``ats`` is cut into packs: ``(start, end)``
    ranges of at most :data:`PACK_MAX` events spanning at most :data:`PACK_SPAN`
    seconds from their first."""
    if len(ats) <= PACK_MAX and max(ats) - ats[0] <= PACK_SPAN:
        return [(0, len(ats))]
    spans: list[tuple[int, int]] = []
    start, first_at = 0, ats[0]
    for i, at in enumerate(ats):
        if i - start >= PACK_MAX or at - first_at > PACK_SPAN:
            spans.append((start, i))
            start, first_at = i, at
    spans.append((start, len(ats)))
    return spans


def _pack_row(run: list[Record], last_at: float) -> Row:
    """One row for a run of one client and role (``last_at``: its latest ``at``)."""
    first = run[0]
    n = len(run)
    if n == 1:
        return _single(first)
    kind = first["kind"]
    data: str | None = None
    if list(map(_KIND, run)).count(kind) == n:
        try:
            data = _json(pack_columns(run)).decode()
        except Exception:  # fields that do not line up, an __eq__ that raises: an array
            data = None
    else:
        kind = MIXED
    if data is None:
        data = _json(run).decode()
    return (
        first["at"],
        kind,
        first["role"],
        first["client_id"],
        first.get("session_id"),
        None,
        data,
        n,
        last_at,
    )


def _flat(items: Iterable[Item]) -> list[Record]:
    """The records of ``items`` (each client and role's in the order they happened)."""
    out: list[Record] = []
    for item in items:
        if type(item) is list:
            out.extend(_run_records(item))
        else:
            out.append(item)  # type: ignore[arg-type]
    return out


def _run_records(run: list[Record | EventsBatched]) -> list[Record]:
    """A run's records in the order they happened.  A loop pass's batches come one kind
    after another (all of a client's ``message.processed``, then its ``ack.sent``), so a
    run holding batches is put back in ``seq`` order: a pack's events, and the ``at``
    its splitting relies on, then go forward in time."""
    out: list[Record] = []
    batches = False
    for x in run:
        if type(x) is EventsBatched:
            out.extend(x.records())
            batches = True
        else:
            out.append(x)  # type: ignore[arg-type]
    if batches:
        out.sort(key=_SEQ)
    return out


#: a batched step's ``at`` is the second value of its row (``STEP_FIELDS``: seq, at, ...)
_ROW_AT: Final = 1


def _batch_rows(batches: list[EventsBatched]) -> list[Row]:
    """The packs of a run of batches of one kind (one client and role): their rows
    split as :func:`rows_of` splits a run, each pack stored as columns."""
    b = batches[0]
    steps = b.rows if len(batches) == 1 else [row for x in batches for row in x.rows]
    ats = [row[_ROW_AT] for row in steps]
    return [_batch_pack(b, steps[start:end], ats[start:end]) for start, end in _spans(ats)]


def _batch_pack(b: EventsBatched, steps: Sequence[tuple[Any, ...]], ats: list[float]) -> Row:
    """One row for steps of ``b``'s kind, role and client: a pack of columns, as
    :func:`pack_columns` makes from their records (or a single event's row)."""
    n = len(steps)
    if n == 1:
        record = dict(zip(b.fields, steps[0], strict=True))
        record.update(kind=b.step, role=b.role, client_id=b.client_id)
        return _single(record)
    same: dict[str, Any] = {"kind": b.step, "role": b.role, "client_id": b.client_id}
    packed = _columns(same, zip(b.fields, zip(*steps, strict=True), strict=True), n)
    return (
        ats[0],
        b.step,
        b.role,
        b.client_id,
        None,
        None,
        _json(packed).decode(),
        n,
        max(ats),
    )


def _newest_first(item: tuple[float, int, int, Event]) -> tuple[float, int, int]:
    return (-item[0], -item[1], -item[2])


def _single(r: Record) -> Row:
    return (
        r["at"],
        r["kind"],
        r["role"],
        r.get("client_id"),
        r.get("session_id"),
        r.get("msg_id"),
        _json(r).decode(),
        1,
        None,
    )


# --- the session view: a pure reducer -------------------------------------------------------


@dataclass(frozen=True)
class SessionView:
    """One client as seen from ``role`` (by default the server): folded from its events
    by :func:`apply`.  Treat it as immutable, ``disconnect_reasons`` included."""

    client_id: str
    role: Role = "server"
    connected: bool = False
    connected_since: float | None = None  # ``at`` of the current session's ``connected``
    session_id: str | None = None  # the current session, or the last one once closed
    last_heartbeat_at: float | None = None  # ``at`` of the last heartbeat event applied
    disconnects: int = 0
    disconnect_reasons: dict[str, int] = field(default_factory=dict)
    messages_sent: int = 0
    messages_received: int = 0
    acks_ok: int = 0  # results received that were successes
    acks_failed: int = 0  # results received that were errors (RemoteError)
    ack_timeouts: int = 0  # AckTimeout
    ack_gone: int = 0  # pending results failed because the peer went (ClientGone)
    acks_late: int = 0
    sends_rejected: int = 0
    events: int = 0  # events applied
    last_event_at: float | None = None


def apply(view: SessionView, event: Event) -> SessionView:
    """The view after ``event``.  Pure: ``view`` is not changed.  Events of another
    client or role, and kinds the view does not track, leave it as is."""
    # event.__dict__.get, not getattr(event, name, None): a field the event's class lacks
    # costs pydantic's __getattr__ an exception, about 5 µs, on every event
    if event.role != view.role or event.__dict__.get("client_id") != view.client_id:
        return view
    state = dict(view.__dict__)
    fold(state, event)
    return _view(state)


def fold(state: dict[str, Any], event: Event) -> None:
    """:func:`apply`'s step, in place on a view's fields (``SessionView.__dict__``), for
    an event already known to be of that view's client and role.  The plugin's live
    views use it directly: no copy per event."""
    at = event.at
    state["events"] += 1
    _saw(state, at)
    t = type(event)
    if t is MessageSent:
        state["messages_sent"] += 1
    elif t is MessageProcessed:
        state["messages_received"] += 1
    elif t is AckReceived:
        if event.ok:  # type: ignore[attr-defined]
            state["acks_ok"] += 1
        else:
            state["acks_failed"] += 1
    elif t is HeartbeatReceived or t is HeartbeatAcknowledged:
        state["last_heartbeat_at"] = at
    elif t is Connected:
        state.update(connected=True, connected_since=at, session_id=event.session_id)  # type: ignore[attr-defined]
    elif t is Disconnected:
        reasons = dict(state["disconnect_reasons"])  # views share nothing mutable
        reason: str = event.reason  # type: ignore[attr-defined]
        reasons[reason] = reasons.get(reason, 0) + 1
        state["disconnect_reasons"] = reasons
        state["disconnects"] += 1
        if state["session_id"] is None or event.session_id == state["session_id"]:  # type: ignore[attr-defined]
            state.update(connected=False, connected_since=None)
    elif t is AckTimedOut:
        state["ack_timeouts"] += 1
    elif t is AckFailed:
        if event.reason != "cancelled":  # type: ignore[attr-defined]  # the caller gave up
            state["ack_gone"] += 1
    elif t is LateAckDropped:
        state["acks_late"] += 1
    elif t is SendRejected:
        state["sends_rejected"] += 1


def _saw(state: dict[str, Any], at: float) -> None:
    """``last_event_at``: the latest ``at`` folded, not the last one (a loop pass's
    batches of two kinds may come in either order)."""
    last = state["last_event_at"]
    if last is None or at > last:
        state["last_event_at"] = at


_ACK_OK: Final = STEP_FIELDS["ack.received"].index("ok")


def fold_batch(state: dict[str, Any], batch: EventsBatched) -> None:
    """:func:`fold` for a batch of steps of the view's client and role (what folding
    each of ``batch.events()`` would do, without building them)."""
    rows = batch.rows
    n = len(rows)
    state["events"] += n
    _saw(state, max(row[_ROW_AT] for row in rows))
    step = batch.step
    if step == "message.sent":
        state["messages_sent"] += n
    elif step == "message.processed":
        state["messages_received"] += n
    elif step == "ack.received":
        ok = sum(1 for row in rows if row[_ACK_OK])
        state["acks_ok"] += ok
        state["acks_failed"] += n - ok


def _view(state: dict[str, Any]) -> SessionView:
    # dataclasses.replace() runs __init__ and a frozen __setattr__ per field (~10 µs)
    new = object.__new__(SessionView)
    new.__dict__.update(state)
    return new


def replay(
    events: Iterable[Event], client_id: str | None = None, role: Role = "server"
) -> SessionView:
    """Fold ``events`` (oldest first) into a view.  ``client_id`` defaults to the first
    event's that has one."""
    view: SessionView | None = None if client_id is None else SessionView(client_id, role)
    for event in events:
        if view is None:
            cid = event.__dict__.get("client_id")
            if cid is None:
                continue
            view = SessionView(cid, role)
        view = apply(view, event)
    if view is None:
        raise ValueError("replay() needs a client_id when no event carries one")
    return view


@dataclass(slots=True)
class HeartbeatStats:
    """Every heartbeat seen for one client (and role) since the plugin started,
    recorded or not."""

    count: int = 0
    last_at: float | None = None
    recorded_at: float | None = None  # the last heartbeat written, this session
    held: Event | None = None  # the last heartbeat not written (yet)


# --- the plugin ------------------------------------------------------------------------------


class HistoryPlugin(Plugin):
    """Records events to SQLite and answers questions about a client's sessions.

    ``max_age`` (seconds) and ``max_rows`` bound what is kept (``None``: no bound);
    ``batch`` and ``queue_size`` size the writer; ``heartbeat_every`` is the minimum
    spacing of stored heartbeats per client and session (``0``: store them all;
    ``None``: only the last one of each session); ``clock`` gives "now" for ``max_age``;
    retention runs at most every ``retention_every`` seconds (``0``: after each batch);
    past ``max_live`` live views, those of disconnected clients are forgotten;
    ``kinds`` are the event kinds stored one row per event (default
    :data:`DEFAULT_KINDS`; exact kinds or ``"prefix.*"``, from :data:`RECORDED_KINDS`);
    what is recorded on an event loop is packed and handed to the writer ``pack_delay``
    seconds after the first event (``0``: at the end of that loop pass).  A longer
    delay makes longer packs (fewer, smaller rows) and costs the loop less per event:
    handing over every pass cost about a third of the throughput of one busy
    connection (``docs/benchmarks.md``).
    """

    name = "history"

    def __init__(
        self,
        path: str | Path = "backbone-history.sqlite3",
        max_age: float | None = 7 * 86400.0,
        max_rows: int | None = 10_000_000,
        batch: int = 1000,
        queue_size: int = 100_000,
        *,
        heartbeat_every: float | None = 300.0,
        clock: Callable[[], float] = time.time,
        retention_every: float = 5.0,
        busy_timeout: float = 30.0,
        max_live: int = 100_000,
        kinds: Iterable[str] | None = None,
        pack_delay: float = 0.05,
    ) -> None:
        super().__init__()
        if kinds is None:
            self.kinds = DEFAULT_KINDS
        else:
            if isinstance(kinds, str):  # BACKBONE_PLUGINS=history:kinds=a;b
                kinds = [k for k in kinds.replace(";", ",").split(",") if k.strip()]
            self.kinds = frozenset(expand_kinds(k.strip() for k in kinds))
            unknown = self.kinds - RECORDED_KINDS
            if unknown:
                raise ValueError(f"history cannot record {sorted(unknown)}")
        if max_rows is not None and max_rows < 1:
            raise ValueError("max_rows must be at least 1 (or None)")
        if not pack_delay >= 0:
            raise ValueError("pack_delay must be at least 0")
        self._per_message = self.kinds & PACKED_KINDS
        self.batched_steps = self.kinds & BATCHED_KINDS
        self.path = str(path)
        self.max_age = max_age
        self.max_rows = max_rows
        self.batch = batch
        self.queue_size = queue_size
        self.heartbeat_every = heartbeat_every
        self.clock = clock
        self.retention_every = retention_every
        self.busy_timeout = busy_timeout
        self.max_live = max_live
        self.pack_delay = pack_delay
        self._worker: BoundedWorker[Chunk] | None = None
        self._last_worker: BoundedWorker[Chunk] | None = None
        # recorded, not yet packed (added by the receiver, taken by _pack): the items,
        # the open run of each client and role among them, how many records they hold
        self._unpacked: list[Item] = []
        self._runs: dict[tuple[str, str], list[Record | EventsBatched]] = {}
        self._unpacked_n = 0
        # the loop a _pack is scheduled on (None: none is); a different running loop
        # schedules its own, so a loop that stopped first cannot leave events unpacked
        self._pack_due_on: asyncio.AbstractEventLoop | None = None
        # the loop the last batch came from (flush() from another thread asks it for
        # the steps it still holds)
        self._batch_loop: asyncio.AbstractEventLoop | None = None
        self._pack_lock = threading.Lock()  # packs go to the writer in recording order
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._rlock = threading.Lock()
        self._schema_lock = threading.Lock()
        self._schema_ready = False
        self._live: dict[str, dict[str, Any]] = {}  # client id: its view's fields
        self._heartbeats: dict[tuple[str, str], HeartbeatStats] = {}
        # flush accounting: submitted on the loop, done (written or failed) by the writer
        self._submitted = 0
        self._done = 0
        self._failed = 0  # of those done, events whose write failed (counted as dropped)
        self._drops_base = 0
        self._progress = threading.Condition()
        self._last_retention = float("-inf")
        self.pruned = 0  # rows deleted by retention since start

    # --- plugin hooks --------------------------------------------------------------------------
    def receivers(self) -> dict[NamedSignal, Receiver]:
        wanted = {
            signals.SIGNAL_OF_KIND[kind]
            for kind in self.kinds | HEARTBEAT_KINDS
            if kind not in BATCHED_KINDS
        }
        out: dict[NamedSignal, Receiver] = dict.fromkeys(wanted, self._on_event)
        if self.kinds & BATCHED_KINDS:
            out[signals.on_events_batched] = self._on_batch
        return out

    def on_install(self, sender: Any) -> None:
        if self._worker is not None:
            return  # already running for another sender
        self._pack_due_on = None  # a pack scheduled on a loop that has since gone
        self._ensure_schema()
        self._wconn = conn = self._connect()
        self._last_retention = float("-inf")
        self._submitted = self._done = self._failed = 0
        self._worker = self._last_worker = BoundedWorker(
            self.name,
            functools.partial(self._write, conn),
            maxsize=self.queue_size,
            batch=self.batch,
            weigh=_events_in,
        )
        self._drops_base = self._worker.dropped

    def on_uninstall(self, sender: Any) -> None:
        if not self.installed:
            self._stop_writer()

    def close(self, timeout: float = 10.0) -> None:
        """Uninstall from every sender, write what is queued and close the connections.
        Queries still work afterwards (they reopen a read connection)."""
        self._flush_steps(timeout)
        for sender in list(self._senders.values()):
            self.uninstall(sender)
        self._stop_writer(timeout)
        with self._rlock:
            if self._rconn is not None:
                self._rconn.close()
                self._rconn = None

    def _flush_steps(self, timeout: float) -> None:
        """Have the per-message steps recorded so far reach the receiver: this thread's
        (:func:`signals.flush_steps`), and, called from another thread, those still
        waiting on the event loop the batches came from (delivered there, at most
        ``timeout`` seconds waited)."""
        signals.flush_steps()
        loop = self._batch_loop
        if loop is None or loop.is_closed() or not loop.is_running():
            return
        if asyncio._get_running_loop() is loop:
            return  # on that loop's thread: done above
        done = threading.Event()

        def flush_there() -> None:
            try:
                signals.flush_steps()
            finally:
                done.set()

        try:
            loop.call_soon_threadsafe(flush_there)
        except RuntimeError:  # closed meanwhile
            return
        done.wait(timeout)

    def _stop_writer(self, timeout: float = 10.0) -> None:
        with self._pack_lock:  # no record is taken after this without a writer
            worker, self._worker = self._worker, None
            if worker is None:
                return
            self._hand_over(worker)
        deadline = time.monotonic() + timeout
        self._wait_done(worker, timeout)
        worker.close(max(0.1, deadline - time.monotonic()))
        conn, self._wconn = self._wconn, None
        if conn is None:
            return
        if self._is_done(worker):
            conn.close()
        else:  # the thread is still writing; it keeps the connection
            log.warning("history: writer did not finish within %.1f s at close", timeout)

    # --- the receiver (on the event loop: keep it cheap) ---------------------------------------
    def _on_event(self, sender: Any, event: Event) -> None:
        kind = event.kind
        if kind in self._per_message:  # the per-message kinds: straight to _record
            self._record(event)
            return
        if kind in HEARTBEAT_KINDS:
            self._heartbeat(event)
            return
        if kind not in self.kinds:
            return
        if kind in _SESSION_END:
            hb = self._heartbeats.get((event.role, event.__dict__.get("client_id", "")))
            if hb is not None:
                held, hb.held, hb.recorded_at = hb.held, None, None
                if held is not None:
                    self._record(held)
        self._record(event)

    def _heartbeat(self, event: Event) -> None:
        key = (event.role, event.__dict__.get("client_id", ""))
        hb = self._heartbeats.get(key)
        if hb is None:
            hb = self._heartbeats[key] = HeartbeatStats()
        hb.count += 1
        hb.last_at = event.at
        every = self.heartbeat_every
        if every is not None and (hb.recorded_at is None or event.at - hb.recorded_at >= every):
            hb.recorded_at = event.at
            hb.held = None
            self._record(event)
        else:
            hb.held = event

    def _record(self, event: Event) -> None:
        fields = event.__dict__
        if event.role == "server":
            cid: str | None = fields.get("client_id")
            if cid is not None:
                self._fold_live(cid, fold, event)
        # under the lock: the writer may be stopped from another thread (close()), and a
        # record must either reach it or not be counted at all
        with self._pack_lock:
            if self._worker is None:
                return
            self._submitted += 1
            self._unpacked_n += 1
            add_item(self._unpacked, self._runs, fields, event.kind in PACKED_KINDS)
        self._added()

    def _on_batch(self, sender: Any, event: EventsBatched) -> None:
        """The per-message steps (:data:`~backbone.events.BATCHED_KINDS`), a batch per
        client, kind and loop pass: into the live view and the client's open run as
        they are; they are only turned into columns when packed."""
        if event.step not in self.kinds:
            return
        self._batch_loop = asyncio._get_running_loop()
        if event.role == "server":
            self._fold_live(event.client_id, fold_batch, event)
        n = len(event.rows)
        with self._pack_lock:
            if self._worker is None:
                return
            self._submitted += n
            self._unpacked_n += n
            add_batch(self._unpacked, self._runs, event)
        self._added()

    def _fold_live(
        self, cid: str, fold_with: Callable[[dict[str, Any], Any], None], event: Event
    ) -> None:
        """Fold ``event`` (a batch with :func:`fold_batch`) into ``cid``'s live view,
        starting one if there is none (and forgetting departed clients' views past
        ``max_live``)."""
        state = self._live.get(cid)
        if state is not None:
            fold_with(state, event)
            return
        self._live[cid] = state = dict(SessionView(cid).__dict__)
        fold_with(state, event)
        if len(self._live) > self.max_live:
            self._forget_disconnected()

    def _added(self) -> None:
        """After recording: pack now if a batch is full, else schedule the pack."""
        if self._unpacked_n >= self.batch:
            self._pack()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # emitted outside any event loop: the writer packs
            self._pack(raw=True)
            return
        if self._pack_due_on is not loop:
            if self.pack_delay > 0:
                loop.call_later(self.pack_delay, self._pack_when_due)
            else:  # at the end of this loop pass
                loop.call_soon(self._pack_when_due)
            self._pack_due_on = loop

    def _pack_when_due(self) -> None:
        """The scheduled pack.  Only this clears ``_pack_due_on``: a pack that a full
        batch or flush() made early leaves the timer to run, and no second one is
        scheduled meanwhile (each would have split the packs again)."""
        self._pack_due_on = None
        self._pack()

    def _pack(self, raw: bool = False) -> None:
        """Pack what was recorded into rows and hand them to the writer (on the loop,
        ``pack_delay`` after the first event; see the module's docstring for why not in
        the writer).  ``raw``: hand the records over as they are, for the writer to
        pack."""
        with self._pack_lock:
            # no writer: nothing is recorded then, and _stop_writer handed the rest over
            if self._worker is not None:
                self._hand_over(self._worker, raw)

    def _hand_over(self, worker: BoundedWorker[Chunk], raw: bool = False) -> None:
        """What :meth:`_pack` does, with ``_pack_lock`` held."""
        n = self._unpacked_n
        if not n:
            return
        items = self._unpacked
        self._unpacked, self._runs, self._unpacked_n = [], {}, 0
        chunk: Chunk = (n, [], items)
        if not raw:
            try:
                chunk = (n, rows_of(items), [])
            except Exception:  # e.g. a value orjson cannot serialise: the writer tries
                # again and, failing, logs and counts the batch; nothing goes unaccounted
                log.exception("history: packing %d events failed on the loop", n)
        worker.put(chunk)

    def _forget_disconnected(self) -> None:
        """Drop the live views (and heartbeat figures) of disconnected clients, oldest
        first, down to 90% of ``max_live``: client ids that come and go do not pile up."""
        target = self.max_live * 9 // 10
        for cid in [c for c, v in self._live.items() if not v["connected"]]:
            if len(self._live) <= target:
                break
            del self._live[cid]
            self._heartbeats.pop(("server", cid), None)

    # --- the writer thread ----------------------------------------------------------------------
    def _write(self, conn: sqlite3.Connection, chunks: list[Chunk]) -> None:
        events = sum(chunk[0] for chunk in chunks)  # all of them, whatever fails below
        written = False
        try:
            rows: list[Row] = []
            raw: list[Record] = []  # consecutive unpacked records, packed here in order
            for _n, packed, records in chunks:
                if records:
                    raw.extend(_flat(records))
                    continue
                if raw:
                    rows.extend(pack_rows(raw))
                    raw = []
                rows.extend(packed)
            if raw:
                rows.extend(pack_rows(raw))
            with _immediate(conn):
                # seq numbers events, not rows: a pack of n takes n of them, so
                # max(seq) + n - min(seq) counts the events kept (see _retain)
                last = conn.execute(
                    "SELECT seq + n FROM events ORDER BY seq DESC LIMIT 1"
                ).fetchone()
                seq = 1 if last is None else last[0]
                values: list[Any] = []
                for row in rows:
                    values.append(seq)
                    values.extend(row)
                    seq += row[7]
                # ROWS_PER_INSERT rows per statement: the sqlite3 module lets go of the
                # GIL once per statement, not once per row as executemany does
                step = ROWS_PER_INSERT * _COLUMNS
                for i in range(0, len(values), step):
                    chunk = values[i : i + step]
                    conn.execute(_insert_rows(len(chunk) // _COLUMNS), chunk)
            written = True  # committed
            now = time.monotonic()
            if now - self._last_retention >= self.retention_every:
                self._last_retention = now
                try:
                    self.pruned += self._retain(conn)
                except Exception:  # the batch is written: its failure must not count it lost
                    log.exception("history: retention failed; it is retried later")
        finally:
            # a failure: the worker logs its exception and counts the batch's events in
            # plugin_drops
            with self._progress:
                self._done += events
                if not written:
                    self._failed += events
                self._progress.notify_all()

    def _retain(self, conn: sqlite3.Connection) -> int:
        """Delete the rows past ``max_rows`` and the oldest rows older than ``max_age``,
        oldest first, by rowid range; returns how many were deleted."""
        if self.max_rows is None and self.max_age is None:
            return 0
        lo = conn.execute("SELECT min(seq) FROM events").fetchone()[0]
        if lo is None:
            return 0
        end_seq, hi = conn.execute(
            "SELECT seq + n, seq FROM events ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        bound = lo  # delete every seq < bound
        if self.max_rows is not None:
            # seq numbers events and is contiguous (append only, deletes only from the
            # oldest end), so end_seq - lo is the event count, or an upper bound of it;
            # a pack that straddles the bound goes whole
            bound = max(bound, end_seq - self.max_rows)
        if self.max_age is not None:
            cutoff = self.clock() - self.max_age
            # scans the expired rows only (insertion order), then stops
            row = conn.execute(
                "SELECT seq FROM events WHERE seq >= ? AND at >= ? ORDER BY seq LIMIT 1",
                (bound, cutoff),
            ).fetchone()
            bound = hi + 1 if row is None else max(bound, row[0])
        deleted = 0
        start = lo
        while start < bound:
            end = min(bound, start + RETENTION_CHUNK)
            with _immediate(conn):
                deleted += conn.execute(
                    "SELECT coalesce(sum(n), 0) FROM events WHERE seq < ?", (end,)
                ).fetchone()[0]
                conn.execute("DELETE FROM events WHERE seq < ?", (end,))
            start = end
        return deleted

    # --- flushing and retention on demand -------------------------------------------------------
    def _is_done(self, worker: BoundedWorker[Chunk]) -> bool:
        return self._done + (worker.dropped - self._drops_base) >= self._submitted

    def _wait_done(self, worker: BoundedWorker[Chunk], timeout: float) -> bool:
        self._pack()
        target = self._submitted
        deadline = time.monotonic() + timeout
        with self._progress:
            while self._done + (worker.dropped - self._drops_base) < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._progress.wait(min(left, 0.05))
        return True

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every event recorded so far is written (or dropped); False on
        timeout.  Do not call it on the event loop with a long timeout."""
        deadline = time.monotonic() + timeout
        self._flush_steps(timeout)
        timeout = max(0.0, deadline - time.monotonic())
        worker = self._worker
        return True if worker is None else self._wait_done(worker, timeout)

    def prune(self) -> int:
        """Enforce retention now, from the calling thread; returns the rows deleted."""
        self._ensure_schema()
        conn = self._connect()
        try:
            deleted = self._retain(conn)
        finally:
            conn.close()
        self.pruned += deleted
        return deleted

    def stats(self) -> dict[str, int]:
        """Counters of the current (or last) writer: events recorded, written, dropped on a
        full queue, lost in batches whose write failed (also in ``plugin_drops``), batches
        that failed, rows pruned.  ``written + dropped + failed`` is ``recorded`` once
        flushed."""
        worker = self._worker or self._last_worker
        return {
            "recorded": self._submitted,
            "written": self._done - self._failed,
            "dropped": 0 if worker is None else worker.dropped - self._drops_base,
            "failed": self._failed,
            "failed_batches": 0 if worker is None else worker.failed_batches,
            "pruned": self.pruned,
        }

    # --- connections ----------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints
        # a batch of events from many clients dirties one index page per client: a
        # larger cache and fewer, larger checkpoints (fsyncs) make that cheaper
        conn.execute("PRAGMA cache_size = -65536")  # 64 MiB
        conn.execute("PRAGMA wal_autocheckpoint = 10000")  # pages: ~40 MiB of WAL
        conn.execute("PRAGMA journal_size_limit = 67108864")  # WAL file trimmed to 64 MiB
        return conn

    def _ensure_schema(self) -> None:
        with self._schema_lock:
            if self._schema_ready:
                return
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = self._connect()
            try:
                init_schema(conn)
            finally:
                conn.close()
            self._schema_ready = True

    def _reader(self) -> sqlite3.Connection:
        if self._rconn is None:
            self._ensure_schema()
            conn = self._connect()
            conn.execute("PRAGMA query_only = 1")
            self._rconn = conn
        return self._rconn

    def _query(self, sql: str, params: Sequence[Any]) -> list[Any]:
        with self._rlock:
            return self._reader().execute(sql, params).fetchall()

    # --- queries (any thread) -------------------------------------------------------------------
    def history(
        self,
        client_id: str,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = 1000,
        kinds: Iterable[str] | None = None,
        role: Role | None = None,
    ) -> list[Event]:
        """The stored events of ``client_id`` with ``since <= at < until``, the most
        recent ``limit`` of them (``None``: all), oldest first.  ``kinds`` keeps only
        those kinds; ``"ack.*"`` stands for every ``ack.`` kind.  ``role`` keeps one
        side's events (both by default)."""
        if limit is not None and limit <= 0:
            return []
        sql = ["SELECT at, seq, data, n FROM events WHERE client_id = ?"]
        params: list[Any] = [client_id]
        if since is not None:  # a pack that starts up to PACK_SPAN earlier may hold some
            sql.append("AND at >= ? AND coalesce(at_last, at) >= ?")
            params.extend((since - PACK_SPAN, since))
        if until is not None:
            sql.append("AND at < ?")
            params.append(until)
        wanted: set[str] | None = None
        if kinds is not None:
            wanted = set(expand_kinds([kinds] if isinstance(kinds, str) else kinds))
            if not wanted:
                return []
            sql.append(f"AND kind IN ({', '.join('?' * (len(wanted) + 1))})")
            params.extend(sorted(wanted))
            params.append(MIXED)
        if role is not None:
            sql.append("AND role = ?")
            params.append(role)
        sql.append("ORDER BY at DESC, seq DESC")
        # rows newest first; a row's events lie in [at, at + PACK_SPAN]: once ``limit``
        # events are held and the oldest of them is later than what any further row can
        # hold, stop
        found: list[tuple[float, int, int, Event]] = []
        with self._rlock:
            cursor = self._reader().execute(" ".join(sql), params)
            for at, seq, data, n in cursor:
                if limit is not None and len(found) >= limit:
                    found.sort(key=_newest_first)
                    del found[limit:]
                    if found[-1][0] > at + PACK_SPAN:
                        break
                for i, event in enumerate(parse_row(data, n)):
                    e_at = event.at
                    if since is not None and e_at < since:
                        continue
                    if until is not None and e_at >= until:
                        continue
                    if wanted is not None and event.kind not in wanted:
                        continue
                    found.append((e_at, seq, i, event))
            cursor.close()
        found.sort(key=_newest_first)
        if limit is not None:
            del found[limit:]
        return [item[3] for item in reversed(found)]

    def clients(self, since: float | None = None) -> list[str]:
        """Client ids with stored events (with an event at or after ``since``), sorted."""
        if since is None:
            rows = self._query(_CLIENTS, ())
        else:
            rows = self._query(_CLIENTS_SINCE, (since - PACK_SPAN, since))
        return [row[0] for row in rows]

    def session_view(self, client_id: str, role: Role = "server") -> SessionView:
        """:func:`replay` of every stored ``role`` event of ``client_id``, in the order
        they were written.  Only what retention kept counts."""
        rows = self._query(
            "SELECT data, n FROM events WHERE client_id = ? AND role = ? ORDER BY seq",
            (client_id, role),
        )
        events = (event for data, n in rows for event in parse_row(data, n))
        return replay(events, client_id, role)

    def count(self) -> int:
        """Events stored (a full scan: slow on a large table)."""
        return int(self._query("SELECT coalesce(sum(n), 0) FROM events", ())[0][0])

    def row_count(self) -> int:
        """Rows stored: a pack of messages is one row (a full count: slow)."""
        return int(self._query("SELECT count(*) FROM events", ())[0][0])

    # --- in memory --------------------------------------------------------------------------------
    def live_view(self, client_id: str) -> SessionView | None:
        """The view kept up to date by this plugin instance (server-role events it
        recorded since it was created), or None if it saw none for ``client_id``."""
        state = self._live.get(client_id)
        return None if state is None else _view(state)

    def live_clients(self) -> list[str]:
        return list(self._live)

    def heartbeat_stats(self, client_id: str, role: Role = "server") -> HeartbeatStats | None:
        """Count and time of every heartbeat seen (stored or not) for ``client_id``."""
        hb = self._heartbeats.get((role, client_id))
        return None if hb is None else dataclasses.replace(hb)


class _immediate:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on error): takes the write lock up
    front, so ``busy_timeout`` applies instead of a mid-transaction SQLITE_BUSY."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        elif self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


def init_schema(conn: sqlite3.Connection) -> None:
    """WAL mode, the ``events`` table and its ``(client_id, at)`` index (idempotent)."""
    deadline = time.monotonic() + 30.0
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("history: journal_mode is %s, not wal", mode)
            with _immediate(conn):
                for statement in _SCHEMA:
                    conn.execute(statement)
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version == 1:  # the table exists without ``n``, ``at_last``: add them
                    for statement in _MIGRATE_1_TO_2:
                        conn.execute(statement)
                    version = 0
                if version in (0, 2):  # 2 -> 3: same table, newer packs
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                elif version != SCHEMA_VERSION:
                    raise RuntimeError(f"history database has schema {version}")
            return
        except sqlite3.OperationalError as e:  # another process creating it at the same time
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def expand_kinds(kinds: Iterable[str]) -> list[str]:
    """Exact kinds, and ``"prefix.*"`` patterns expanded against the known kinds."""
    out: set[str] = set()
    for k in kinds:
        if k.endswith(".*"):
            out.update(x for x in ALL_KINDS if x.startswith(k[:-1]))
        else:
            out.add(k)
    return sorted(out)
