"""Session history: an append-only SQLite log of connection, message and result events.

``HistoryPlugin`` listens to the signals of the kinds it records (never to ``on_event``,
so events of other kinds are not even built) with one cheap receiver (filter by kind,
update an in-memory view, ``append`` to a queue).  A
:class:`~backbone.plugins.BoundedWorker` thread writes the queued events in batches, one
transaction per batch, through its own SQLite connection (WAL mode, ``busy_timeout``),
and enforces retention (``max_age``, ``max_rows``) every few seconds by deleting the
oldest rows by rowid range.

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

import dataclasses
import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
from blinker import NamedSignal
from pydantic import TypeAdapter

from backbone import signals
from backbone.events import (
    AckFailed,
    AckReceived,
    AckTimedOut,
    AnyEvent,
    Connected,
    Disconnected,
    Event,
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

SCHEMA_VERSION: Final = 1

#: the kinds written one row per event
RECORDED_KINDS: Final = frozenset(
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
        "message.sent",
        "message.received",
        "message.processed",
        "ack.sent",
        "ack.received",
        "ack.late",
        "ack.timed_out",
        "ack.failed",
        "send.rejected",
        "goaway.received",
    }
)
#: the kinds recorded unless ``kinds=`` says otherwise: all but ``message.received``, since
#: ``message.processed`` records the same message once handled, with its outcome (one row
#: per message received instead of two)
DEFAULT_KINDS: Final = RECORDED_KINDS - {"message.received"}
#: the kinds sampled (see ``heartbeat_every``)
HEARTBEAT_KINDS: Final = frozenset({"heartbeat.received", "heartbeat.acknowledged"})
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
        data TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS events_client_at ON events (client_id, at)",
)
_INSERT = (
    "INSERT INTO events (at, kind, role, client_id, session_id, msg_id, data) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_COLUMNS: Final = 7
#: rows per INSERT statement (7 parameters a row: under SQLite's oldest limit of 999)
ROWS_PER_INSERT: Final = 128


@functools.lru_cache(maxsize=8)
def _insert_rows(n: int) -> str:
    """The INSERT of ``n`` rows."""
    return _INSERT + ", (?, ?, ?, ?, ?, ?, ?)" * (n - 1)
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
  AND EXISTS (SELECT 1 FROM events WHERE client_id = ids.id AND at >= ?)
"""
#: rows deleted per retention transaction, so a large backlog never holds the write
#: lock for long
RETENTION_CHUNK: Final = 50_000

_ADAPTER: TypeAdapter[Event] = TypeAdapter(AnyEvent)


def _json(event: Event) -> str:
    """The event as JSON: ``orjson`` on its fields gives the same text as
    ``model_dump_json()`` for the plain types events hold, at a fifth of the cost."""
    try:
        return orjson.dumps(event.__dict__).decode()
    except TypeError:
        return event.model_dump_json()


def parse_event(data: str | bytes) -> Event:
    """One stored event (its ``model_dump_json``) back into its class."""
    return _ADAPTER.validate_json(data)


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
    at = event.at
    change: dict[str, Any] = {"events": view.events + 1, "last_event_at": at}
    if isinstance(event, MessageSent):
        change["messages_sent"] = view.messages_sent + 1
    elif isinstance(event, AckReceived):
        if event.ok:
            change["acks_ok"] = view.acks_ok + 1
        else:
            change["acks_failed"] = view.acks_failed + 1
    elif isinstance(event, MessageProcessed):
        change["messages_received"] = view.messages_received + 1
    elif isinstance(event, HeartbeatReceived | HeartbeatAcknowledged):
        change["last_heartbeat_at"] = at
    elif isinstance(event, Connected):
        change.update(connected=True, connected_since=at, session_id=event.session_id)
    elif isinstance(event, Disconnected):
        reasons = dict(view.disconnect_reasons)
        reasons[event.reason] = reasons.get(event.reason, 0) + 1
        change.update(disconnects=view.disconnects + 1, disconnect_reasons=reasons)
        if view.session_id is None or event.session_id == view.session_id:
            change.update(connected=False, connected_since=None)
    elif isinstance(event, AckTimedOut):
        change["ack_timeouts"] = view.ack_timeouts + 1
    elif isinstance(event, AckFailed):
        change["ack_gone"] = view.ack_gone + 1
    elif isinstance(event, LateAckDropped):
        change["acks_late"] = view.acks_late + 1
    elif isinstance(event, SendRejected):
        change["sends_rejected"] = view.sends_rejected + 1
    return _evolve(view, change)


def _evolve(view: SessionView, change: dict[str, Any]) -> SessionView:
    # dataclasses.replace() runs __init__ and a frozen __setattr__ per field (~10 µs);
    # this copy runs on the event loop for every recorded event, so it copies __dict__
    new = object.__new__(SessionView)
    state = new.__dict__
    state.update(view.__dict__)
    state.update(change)
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
    :data:`DEFAULT_KINDS`; exact kinds or ``"prefix.*"``, from :data:`RECORDED_KINDS`).
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
        self._worker: BoundedWorker[Event] | None = None
        self._last_worker: BoundedWorker[Event] | None = None
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._rlock = threading.Lock()
        self._schema_lock = threading.Lock()
        self._schema_ready = False
        self._live: dict[str, SessionView] = {}
        self._heartbeats: dict[tuple[str, str], HeartbeatStats] = {}
        # flush accounting: submitted on the loop, done (written or failed) by the writer
        self._submitted = 0
        self._done = 0
        self._drops_base = 0
        self._progress = threading.Condition()
        self._last_retention = float("-inf")
        self.pruned = 0  # rows deleted by retention since start

    # --- plugin hooks --------------------------------------------------------------------------
    def receivers(self) -> dict[NamedSignal, Receiver]:
        wanted = {signals.SIGNAL_OF_KIND[kind] for kind in self.kinds | HEARTBEAT_KINDS}
        return dict.fromkeys(wanted, self._on_event)

    def on_install(self, sender: Any) -> None:
        if self._worker is not None:
            return  # already running for another sender
        self._ensure_schema()
        self._wconn = conn = self._connect()
        self._last_retention = float("-inf")
        self._submitted = self._done = 0
        self._worker = self._last_worker = BoundedWorker(
            self.name,
            functools.partial(self._write, conn),
            maxsize=self.queue_size,
            batch=self.batch,
        )
        self._drops_base = self._worker.dropped

    def on_uninstall(self, sender: Any) -> None:
        if not self.installed:
            self._stop_writer()

    def close(self, timeout: float = 10.0) -> None:
        """Uninstall from every sender, write what is queued and close the connections.
        Queries still work afterwards (they reopen a read connection)."""
        for sender in list(self._senders.values()):
            self.uninstall(sender)
        self._stop_writer(timeout)
        with self._rlock:
            if self._rconn is not None:
                self._rconn.close()
                self._rconn = None

    def _stop_writer(self, timeout: float = 10.0) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
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
        if event.role == "server":
            cid: str | None = event.__dict__.get("client_id")
            if cid is not None:
                live = self._live
                view = live.get(cid)
                live[cid] = apply(view or SessionView(cid), event)
                if view is None and len(live) > self.max_live:
                    self._forget_disconnected()
        worker = self._worker
        if worker is not None:
            self._submitted += 1
            worker.put(event)

    def _forget_disconnected(self) -> None:
        """Drop the live views (and heartbeat figures) of disconnected clients, oldest
        first, down to 90% of ``max_live``: client ids that come and go do not pile up."""
        target = self.max_live * 9 // 10
        for cid in [c for c, v in self._live.items() if not v.connected]:
            if len(self._live) <= target:
                break
            del self._live[cid]
            self._heartbeats.pop(("server", cid), None)

    # --- the writer thread ----------------------------------------------------------------------
    def _write(self, conn: sqlite3.Connection, events: list[Event]) -> None:
        try:
            values: list[Any] = []
            for e in events:
                try:
                    fields = e.__dict__
                    row = (
                        e.at,
                        e.kind,
                        e.role,
                        fields.get("client_id"),
                        fields.get("session_id"),
                        fields.get("msg_id"),
                        _json(e),
                    )
                except Exception:
                    log.exception("history: cannot serialise a %s event; skipped", e.kind)
                else:
                    values.extend(row)
            # ROWS_PER_INSERT rows per statement: the sqlite3 module lets go of the GIL
            # once per statement, not once per row as executemany does, so the event
            # loop's thread is not handed the GIL back and forth a thousand times a batch
            step = ROWS_PER_INSERT * _COLUMNS
            with _immediate(conn):
                for i in range(0, len(values), step):
                    chunk = values[i : i + step]
                    conn.execute(_insert_rows(len(chunk) // _COLUMNS), chunk)
            now = time.monotonic()
            if now - self._last_retention >= self.retention_every:
                self._last_retention = now
                try:
                    self.pruned += self._retain(conn)
                except sqlite3.Error:
                    log.exception("history: retention failed; it is retried later")
        finally:
            with self._progress:
                self._done += len(events)
                self._progress.notify_all()

    def _retain(self, conn: sqlite3.Connection) -> int:
        """Delete the rows past ``max_rows`` and the oldest rows older than ``max_age``,
        oldest first, by rowid range; returns how many were deleted."""
        if self.max_rows is None and self.max_age is None:
            return 0
        lo, hi = conn.execute("SELECT min(seq), max(seq) FROM events").fetchone()
        if lo is None:
            return 0
        bound = lo  # delete every seq < bound
        if self.max_rows is not None:
            # rowids are contiguous (append only, deletes only from the oldest end), so
            # hi - lo + 1 is the row count, or an upper bound of it
            bound = max(bound, hi - self.max_rows + 1)
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
                deleted += conn.execute("DELETE FROM events WHERE seq < ?", (end,)).rowcount
            start = end
        return deleted

    # --- flushing and retention on demand -------------------------------------------------------
    def _is_done(self, worker: BoundedWorker[Event]) -> bool:
        return self._done + (worker.dropped - self._drops_base) >= self._submitted

    def _wait_done(self, worker: BoundedWorker[Event], timeout: float) -> bool:
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
        """Counters of the current (or last) writer: events recorded, written (or failed),
        dropped on a full queue, batches that failed, rows pruned."""
        worker = self._worker or self._last_worker
        return {
            "recorded": self._submitted,
            "written": self._done,
            "dropped": 0 if worker is None else worker.dropped - self._drops_base,
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
        sql = ["SELECT data FROM events WHERE client_id = ?"]
        params: list[Any] = [client_id]
        if since is not None:
            sql.append("AND at >= ?")
            params.append(since)
        if until is not None:
            sql.append("AND at < ?")
            params.append(until)
        if kinds is not None:
            wanted = expand_kinds([kinds] if isinstance(kinds, str) else kinds)
            if not wanted:
                return []
            sql.append(f"AND kind IN ({', '.join('?' * len(wanted))})")
            params.extend(wanted)
        if role is not None:
            sql.append("AND role = ?")
            params.append(role)
        sql.append("ORDER BY at DESC, seq DESC LIMIT ?")
        params.append(-1 if limit is None else limit)
        rows = self._query(" ".join(sql), params)
        return [parse_event(row[0]) for row in reversed(rows)]

    def clients(self, since: float | None = None) -> list[str]:
        """Client ids with stored events (with an event at or after ``since``), sorted."""
        sql, params = (_CLIENTS, ()) if since is None else (_CLIENTS_SINCE, (since,))
        rows = self._query(sql, params)
        return [row[0] for row in rows]

    def session_view(self, client_id: str, role: Role = "server") -> SessionView:
        """:func:`replay` of every stored ``role`` event of ``client_id``, in the order
        they were written.  Only what retention kept counts."""
        rows = self._query(
            "SELECT data FROM events WHERE client_id = ? AND role = ? ORDER BY seq",
            (client_id, role),
        )
        return replay((parse_event(row[0]) for row in rows), client_id, role)

    def count(self) -> int:
        """Rows stored (a full count: slow on a large table)."""
        return int(self._query("SELECT count(*) FROM events", ())[0][0])

    # --- in memory --------------------------------------------------------------------------------
    def live_view(self, client_id: str) -> SessionView | None:
        """The view kept up to date by this plugin instance (server-role events it
        recorded since it was created), or None if it saw none for ``client_id``."""
        return self._live.get(client_id)

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
                if version == 0:
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
