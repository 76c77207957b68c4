"""The session-history plugin: events recorded from a real server and client over
loopback, retention (rows and age, with an injected clock), replay == live view,
restart survival, concurrent writers on one WAL file, and a slow or broken plugin
never disturbing delivery.  End-to-end tests wait on events, never on bare sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

import plugins.history as history_mod
from backbone import AckTimeout, ClientGone, Message, RemoteError, signals
from backbone.events import (
    AckReceived,
    AckSent,
    AckTimedOut,
    Connected,
    Disconnected,
    Event,
    HeartbeatReceived,
    MessageProcessed,
    MessageReceived,
    MessageSent,
    Role,
    ServerStarted,
)
from backbone.plugins import load_plugin, plugin_drops
from plugins.history import (
    HEARTBEAT_KINDS,
    MIXED,
    PACK_MAX,
    PACK_SPAN,
    HistoryPlugin,
    SessionView,
    apply,
    pack_rows,
    parse_event,
    parse_row,
    record_of,
    replay,
)

MSG = "ab" * 16


def sent(cid: str, at: float, role: Role = "server") -> MessageSent:
    return MessageSent(role=role, msg_id=MSG, client_id=cid, size=1, wait_ack=True, at=at)


def emit(sender: object, event: Event) -> None:
    signals.emit_event(sender, event)  # per-message kinds go in batches, as from the core


@contextlib.asynccontextmanager
async def connected(client: Any):
    async with client:
        await client.wait_connected(5)
        yield client


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "history.sqlite3"


@pytest.fixture
def installed(db: Path):
    """A plugin installed on a stand-in sender, for events emitted by hand."""
    made: list[tuple[HistoryPlugin, object]] = []

    def factory(**kw: Any) -> tuple[HistoryPlugin, object]:
        kw.setdefault("max_age", None)  # hand-made events have small ``at`` values
        plugin = HistoryPlugin(kw.pop("path", db), **kw)
        sender = object()
        plugin.install(sender)
        made.append((plugin, sender))
        return plugin, sender

    yield factory
    for plugin, _sender in made:
        plugin.close()


# --- recorded from a real server and client ---------------------------------------------------


async def test_records_a_real_session(make_server, make_client, events, db):
    plugin = HistoryPlugin(db, heartbeat_every=None)
    async with make_server(plugins=[plugin]) as server:
        client = make_client("dev-1", server.port, plugins=[])
        client.handler(lambda m: {"echo": m.payload})
        server.handler(lambda m: "got it")
        async with connected(client):
            assert await server.send_to("dev-1", {"op": 1}, wait_ack=True) == {"echo": {"op": 1}}
            assert await client.send("hi", wait_ack=True) == "got it"
            await events.wait("heartbeat.received", role="server", client_id="dev-1")
            await events.wait_new("heartbeat.received", role="server", client_id="dev-1")
        await events.wait("disconnected", role="server", client_id="dev-1")
    # leaving the server uninstalled the plugin, which flushed and closed the writer
    stored = plugin.history("dev-1")
    kinds = [e.kind for e in stored]
    for kind in ("connected", "message.sent", "ack.received", "message.processed", "ack.sent"):
        assert kind in kinds
    assert "message.received" not in kinds  # not a default kind: message.processed says it
    assert kinds[0] == "connected" and kinds[-1] == "disconnected"
    assert all(e.role == "server" for e in stored)  # only the server had the plugin
    # events come back as their own classes, equal to what was emitted
    emitted = {e.seq: e for e in events.items}
    assert all(emitted[e.seq] == e for e in stored)
    # heartbeat_every=None: only the last heartbeat of the session, just before its end
    beats = [e for e in stored if e.kind == "heartbeat.received"]
    hb = plugin.heartbeat_stats("dev-1")
    assert hb is not None and hb.count >= 2 and len(beats) == 1
    assert beats[0].at == hb.last_at and kinds[-2] == "heartbeat.received"
    assert plugin.clients() == ["dev-1"]
    assert plugin.clients(since=stored[-1].at + 1) == []
    # server lifecycle events are stored too, without a client id
    assert plugin.count() == len(stored) + 2
    view = plugin.session_view("dev-1")
    assert view.messages_sent == 1 and view.messages_received == 1 and view.acks_ok == 1
    assert view.disconnect_reasons == {"closed_by_client": 1} and not view.connected


async def test_replay_of_stored_events_equals_the_live_view(make_server, make_client, events, db):
    plugin = HistoryPlugin(db, heartbeat_every=0.3)
    release = asyncio.Event()

    async def handle(msg: Message) -> Any:
        op = msg.payload["op"]
        if op == "fail":
            raise ValueError("disk full")
        if op == "slow":
            await release.wait()
        return op

    async with make_server(plugins=[plugin]) as server:
        server.handler(lambda m: m.payload)
        client = make_client("dev-1", server.port, plugins=[])
        client.handler(handle)
        async with connected(client):
            first = await events.wait("connected", role="server", client_id="dev-1")
            assert await server.send_to("dev-1", {"op": "a"}, wait_ack=True) == "a"
            assert await server.send_to("dev-1", {"op": "b"}, wait_ack=True) == "b"
            with pytest.raises(RemoteError):
                await server.send_to("dev-1", {"op": "fail"}, wait_ack=True)
            with pytest.raises(AckTimeout):
                await server.send_to("dev-1", {"op": "slow"}, wait_ack=True, timeout=0.2)
            release.set()
            await events.wait("ack.late", role="server", client_id="dev-1")
            await server.send_to("dev-1", {"op": "fire"})
            assert await client.send({"n": 1}, wait_ack=True) == {"n": 1}
            await events.wait_new("heartbeat.received", role="server", client_id="dev-1")

            # evicted: the client reconnects by itself
            back = events.expect("connected", role="server", client_id="dev-1")
            assert server.evict("dev-1")
            second = await back
            assert second.session_id != first.session_id
            assert plugin.live_view("dev-1").connected  # type: ignore[union-attr]

            # evicted with a result pending: ClientGone
            release.clear()
            pending = asyncio.ensure_future(
                server.send_to("dev-1", {"op": "slow"}, wait_ack=True, timeout=30)
            )
            await events.wait_new("message.received", role="client", client_id="dev-1")
            back = events.expect("connected", role="server", client_id="dev-1")
            server.evict("dev-1")
            with pytest.raises(ClientGone):
                await pending
            await back
            release.set()
            assert await server.send_to("dev-1", {"op": "c"}, wait_ack=True) == "c"
        await events.wait("disconnected", role="server", reason="closed_by_client")
        assert plugin.flush(5)
        live = plugin.live_view("dev-1")
        stored = plugin.session_view("dev-1")
        assert live is not None and stored == live
        # the same reducer over the events as delivered (heartbeats aside) agrees too
        delivered = replay(
            e
            for e in events.items
            if e.role == "server" and getattr(e, "client_id", None) == "dev-1"
            if e.kind not in HEARTBEAT_KINDS
        )
        skip = {"last_heartbeat_at", "events", "last_event_at"}
        for name in SessionView.__dataclass_fields__:
            if name not in skip:
                assert getattr(delivered, name) == getattr(live, name), name
    assert live.acks_ok == 3 and live.acks_failed == 1
    assert live.ack_timeouts == 1 and live.ack_gone == 1 and live.acks_late == 1
    assert live.messages_sent == 7 and live.messages_received == 1
    assert live.disconnects == 3
    assert live.disconnect_reasons == {"evicted": 2, "closed_by_client": 1}
    assert not live.connected and live.connected_since is None
    assert live.last_heartbeat_at is not None
    assert plugin.session_view("dev-1") == live  # still true after the server stopped


async def test_history_survives_a_restart(make_server, make_client, events, db):
    for round_ in (1, 2):
        plugin = HistoryPlugin(db)
        async with make_server(plugins=[plugin]) as server:
            client = make_client("dev-1", server.port, plugins=[])
            client.handler(lambda m: m.payload)
            async with connected(client):
                assert await server.send_to("dev-1", round_, wait_ack=True) == round_
                session = events.of("connected", role="server", client_id="dev-1")[-1]
            await events.wait("disconnected", role="server", session_id=session.session_id)
    # a third instance, never installed, reads what both servers wrote
    reader = HistoryPlugin(db)
    stored = reader.history("dev-1")
    assert [e.kind for e in stored].count("connected") == 2
    view = reader.session_view("dev-1")
    assert view.acks_ok == 2 and view.disconnects == 2 and not view.connected
    assert reader.live_view("dev-1") is None  # live views are per instance
    reader.close()


# --- queries and the reducer, with events emitted by hand -------------------------------------


def test_query_filters_and_order(installed):
    plugin, sender = installed()
    for i in range(10):
        emit(sender, sent("c1", 100.0 + i))
        emit(
            sender,
            AckReceived(
                role="server", msg_id=MSG, client_id="c1", ok=i % 2 == 0, latency=0.01, at=100.5 + i
            ),
        )
        emit(sender, sent("c2", 100.0 + i, role="client"))
    emit(sender, ServerStarted(role="server", host="h", port=1, at=99.0))
    assert plugin.flush(5)
    everything = plugin.history("c1", limit=None)
    assert len(everything) == 20 and [e.at for e in everything] == sorted(e.at for e in everything)
    last = plugin.history("c1", limit=3)  # the most recent three, oldest first
    assert [e.at for e in last] == [108.5, 109.0, 109.5]
    acks = plugin.history("c1", kinds="ack.*")
    assert len(acks) == 10 and all(isinstance(e, AckReceived) for e in acks)
    window = plugin.history("c1", since=103.0, until=105.0)
    assert [e.at for e in window] == [103.0, 103.5, 104.0, 104.5]
    assert plugin.history("c1", kinds=[]) == []
    assert plugin.history("c2", role="server") == []
    assert len(plugin.history("c2", role="client")) == 10
    assert plugin.clients() == ["c1", "c2"]
    assert plugin.clients(since=109.2) == ["c1"]
    assert plugin.count() == 31


# --- packs: a run of per-message events of one client is one row ----------------------------


def ack(cid: str, at: float, role: Role = "server") -> AckReceived:
    return AckReceived(role=role, msg_id=MSG, client_id=cid, ok=True, latency=0.01, at=at)


def test_pack_rows_keep_each_clients_order_and_bounds():
    c1_connected = Connected(role="server", client_id="c1", session_id="s", peer="p", at=0.5)
    c1_gone = Disconnected(
        role="server", client_id="c1", session_id="s", reason="closed", detail="", at=9.0
    )
    events: list[Event] = [c1_connected, ServerStarted(role="server", host="h", port=1, at=0.6)]
    events += [sent("c1", 1.0 + i / 1000) for i in range(PACK_MAX + 5)]  # > PACK_MAX
    events += [ack("c1", 2.5), sent("c2", 2.5), ack("c1", 2.6), sent("c1", 2.7, role="client")]
    events += [sent("c1", 2.7 + PACK_SPAN + 0.01), c1_gone, sent("c1", 9.5)]
    rows = pack_rows([record_of(e) for e in events])
    # per (client, role), the rows in order hold that client's events in the order given
    for key in {("c1", "server"), ("c2", "server"), ("c1", "client")}:
        stored = [e for r in rows if (r[3], r[2]) == key for e in parse_row(r[6], r[7])]
        assert stored == [e for e in events if (e.__dict__.get("client_id"), e.role) == key]
    assert sum(r[7] for r in rows) == len(events)
    packs = [r for r in rows if r[7] > 1]
    assert max(r[7] for r in rows) == PACK_MAX
    assert all(r[5] is None and r[8] is not None and r[8] - r[0] <= PACK_SPAN for r in packs)
    # the PACK_MAX + 5 sends: one full pack, then the rest with the two acks (mixed)
    assert [r[1] for r in packs] == ["message.sent", MIXED]
    assert [r[7] for r in packs] == [PACK_MAX, 7]
    singles = [r for r in rows if r[7] == 1]
    assert all(parse_row(r[6], 1)[0].at == r[0] and r[8] is None for r in singles)


def test_a_pack_of_one_kind_stores_what_its_events_share_once():
    events = [sent("c1", 1.0 + i / 1000) for i in range(50)]
    odd = MessageSent(
        role="server",
        msg_id=MSG,
        client_id="c1",
        size=7,
        wait_ack=False,
        broadcast=False,
        headers={"traceparent": "00-x"},
        at=1.9,
    )
    events.append(odd)  # a field that differs in one event only
    (row,) = pack_rows([record_of(e) for e in events])
    assert row[1] == "message.sent" and row[7] == len(events)
    packed = orjson.loads(row[6])
    assert set(packed) == {"same", "cols"}
    assert packed["same"]["kind"] == "message.sent" and packed["same"]["client_id"] == "c1"
    assert {"seq", "at", "size", "headers"} <= set(packed["cols"])
    assert "kind" not in packed["cols"] and "role" not in packed["cols"]
    assert parse_row(row[6], row[7]) == events
    # a third of the bytes of the same events as an array
    assert len(row[6]) * 2 < len(orjson.dumps([record_of(e) for e in events]))


def test_rows_written_as_an_array_of_events_still_read_back():
    """Packs were arrays of the events before columns: such rows read back alike."""
    events = [sent("c1", 1.0 + i / 1000) for i in range(5)]
    assert parse_row(orjson.dumps([record_of(e) for e in events]), 5) == events


def test_pack_columns_keeps_nan_and_unequal_values_apart():
    from plugins.history import pack_columns, unpack_columns

    run = [{"kind": "k", "x": float("nan"), "y": 1}, {"kind": "k", "x": float("nan"), "y": 1}]
    packed = pack_columns(run)
    assert packed["same"] == {"kind": "k", "y": 1} and "x" in packed["cols"]
    back = unpack_columns(packed, 2)
    assert [r["y"] for r in back] == [1, 1] and all(r["x"] != r["x"] for r in back)


def test_a_pack_of_identical_events_reads_back_all_of_them():
    e = sent("c1", 1.0)
    (row,) = pack_rows([record_of(e)] * 3)  # every field the same: no column left
    assert row[7] == 3 and parse_row(row[6], row[7]) == [e, e, e]


def test_pack_columns_keeps_values_of_different_types_apart_and_falls_back():
    from plugins.history import pack_columns, unpack_columns

    run = [{"kind": "k", "v": 1}, {"kind": "k", "v": True}, {"kind": "k", "v": 1.0}]
    packed = pack_columns(run)
    assert "v" in packed["cols"]
    assert [type(r["v"]) for r in unpack_columns(orjson.loads(orjson.dumps(packed)), 3)] == [
        int,
        bool,
        float,
    ]
    with pytest.raises((ValueError, KeyError)):
        pack_columns([{"kind": "k", "a": 1}, {"kind": "k", "a": 1, "b": 2}])
    # pack_rows stores such a run as an array instead
    odd = [{**record_of(sent("c1", 1.0)), "extra": 1}, record_of(sent("c1", 1.1))]
    (row,) = pack_rows(odd)
    assert isinstance(orjson.loads(row[6]), list)


def test_a_schema_2_database_is_taken_over_and_old_readers_are_refused(db):
    import sqlite3

    from plugins.history import SCHEMA_VERSION, init_schema

    conn = sqlite3.connect(db)
    init_schema(conn)
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    init_schema(conn)  # what a schema-3 plugin does on open
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    conn.close()


async def test_headers_changed_by_the_sender_after_a_send_are_not_stored(
    make_server, make_client, db
):
    """The event holds the message's headers until its pack is written (up to
    ``pack_delay`` later): a caller reusing its headers dict must not rewrite them."""
    plugin = HistoryPlugin(db, max_age=None)
    try:
        async with make_server(plugins=[plugin]) as server:
            client = make_client("dev-1", server.port, plugins=[])
            client.handler(lambda m: None)
            async with connected(client):
                headers = {"i": "0"}
                for i in range(5):
                    headers["i"] = str(i)
                    await server.send_to("dev-1", i, headers=headers)
                    await asyncio.sleep(0.001)
                headers["i"] = "changed"
        assert await asyncio.to_thread(plugin.flush, 10)
        sent_events = plugin.history("dev-1", kinds="message.sent", limit=None)
        assert [e.headers for e in sent_events] == [{"i": str(i)} for i in range(5)]
    finally:
        plugin.close()


async def test_a_full_batch_does_not_multiply_the_scheduled_packs(installed, monkeypatch):
    """A hand-over made early by a full batch leaves the scheduled one in place: no
    second timer, so packs are not split more often than ``pack_delay``."""
    plugin, s = installed(pack_delay=60.0, batch=100)
    loop = asyncio.get_running_loop()
    scheduled: list[float] = []
    real = loop.call_later

    def counting(delay: float, cb: Any, *args: Any) -> Any:
        scheduled.append(delay)
        return real(delay, cb, *args)

    monkeypatch.setattr(loop, "call_later", counting)
    for i in range(450):  # four full batches
        emit(s, sent("c1", 1.0 + i / 1000))
        if i % 10 == 9:
            await asyncio.sleep(0)
    assert scheduled == [60.0]
    assert plugin._unpacked_n == 50 and plugin.stats()["recorded"] == 450
    assert await asyncio.to_thread(plugin.flush, 10) and plugin.count() == 450


async def test_close_from_another_thread_while_the_loop_records_loses_nothing(installed):
    """close() stops the writer from another thread while events keep arriving on the
    loop, with the default pack_delay: every event recorded is written or counted as
    dropped, in order, and close() returns."""
    plugin, s = installed(max_age=None)
    closed = threading.Event()

    async def produce() -> int:
        i = 0
        while not closed.is_set():
            emit(s, sent("c1", 1.0 + i / 10_000))
            i += 1
            if i % 20 == 0:
                await asyncio.sleep(0.001)  # about 10k events/s: the writer keeps up
        return i

    producer = asyncio.create_task(produce())
    await asyncio.sleep(0.12)  # a few hand-overs on their timer

    def close() -> None:
        plugin.close()
        closed.set()

    await asyncio.wait_for(asyncio.to_thread(close), 20)
    emitted = await producer
    stats = plugin.stats()
    assert 0 < stats["recorded"] <= emitted
    assert stats["written"] + stats["dropped"] == stats["recorded"]
    assert plugin.count() == stats["written"] > 0
    stored = [e.at for e in plugin.history("c1", limit=None)]
    assert stored == sorted(set(stored))  # in order, none twice, whatever was dropped
    if not stats["dropped"]:  # then exactly the first events recorded
        assert stored == [1.0 + i / 10_000 for i in range(len(stored))]


async def test_events_of_many_loop_passes_within_pack_delay_are_one_pack(installed):
    plugin, s = installed(pack_delay=60.0)  # only flush() or a full batch hands over
    events = [sent("c1", 1.0 + i / 1000) for i in range(300)]
    for i, e in enumerate(events):
        emit(s, e)
        if i % 10 == 9:
            await asyncio.sleep(0)
    assert plugin._unpacked_n == 300  # nothing handed over in 30 passes
    assert await asyncio.to_thread(plugin.flush, 10)
    assert plugin.row_count() == 1 and plugin.history("c1", limit=None) == events
    with pytest.raises(ValueError, match="pack_delay"):
        HistoryPlugin(plugin.path, pack_delay=-1)


def test_a_flood_of_messages_takes_few_rows_and_reads_back_exactly(installed):
    plugin, s = installed(batch=5000, queue_size=50_000)
    emitted: dict[str, list[Event]] = {"c1": [], "c2": []}
    for i in range(3000):
        for cid in ("c1", "c2"):
            e: Event = sent(cid, 1000.0 + i / 1000) if i % 3 else ack(cid, 1000.0 + i / 1000)
            emitted[cid].append(e)
            emit(s, e)
    assert plugin.flush(10)
    assert plugin.count() == 6000
    assert plugin.row_count() <= 20  # about 1.2 s of messages per client: a few packs
    for cid in ("c1", "c2"):
        assert plugin.history(cid, limit=None) == emitted[cid]
        assert plugin.history(cid, limit=7) == emitted[cid][-7:]
        # a window that starts and ends inside packs
        window = plugin.history(cid, since=1000.5005, until=1002.0, limit=None)
        assert window == [e for e in emitted[cid] if 1000.5005 <= e.at < 1002.0]
        acks = plugin.history(cid, kinds="ack.*", limit=5)
        assert acks == [e for e in emitted[cid] if e.kind == "ack.received"][-5:]
    assert plugin.clients(since=1002.9985) == ["c1", "c2"]
    assert plugin.clients(since=1003.0) == []
    assert plugin.session_view("c1").messages_sent == 2000
    assert plugin.session_view("c1") == plugin.live_view("c1")


def test_retention_counts_events_not_rows(installed):
    plugin, s = installed(max_rows=1000, retention_every=0, batch=4000, queue_size=10_000)
    for i in range(4000):
        emit(s, sent("c1", 10.0 + i / 10_000))
    assert plugin.flush(10)
    kept = plugin.history("c1", limit=None)
    # whole packs go: at most max_rows are kept, and at most one pack fewer
    assert 1000 - PACK_MAX <= plugin.count() == len(kept) <= 1000
    assert [e.at for e in kept] == [10.0 + i / 10_000 for i in range(4000 - len(kept), 4000)]
    assert plugin.stats()["pruned"] == 4000 - len(kept)


def test_a_schema_1_database_is_migrated(db):
    import sqlite3

    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TABLE events (seq INTEGER PRIMARY KEY, at REAL NOT NULL, kind TEXT NOT NULL, "
        "role TEXT NOT NULL, client_id TEXT, session_id TEXT, msg_id TEXT, data TEXT NOT NULL)"
    )
    conn.execute("CREATE INDEX events_client_at ON events (client_id, at)")
    old = [sent("c1", 5.0 + i) for i in range(3)]
    conn.executemany(
        "INSERT INTO events (at, kind, role, client_id, session_id, msg_id, data) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(e.at, e.kind, e.role, "c1", None, MSG, e.model_dump_json()) for e in old],
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    plugin = HistoryPlugin(db, max_age=None)
    sender = object()
    plugin.install(sender)
    try:
        new = [sent("c1", 10.0 + i / 100) for i in range(50)]
        for e in new:
            emit(sender, e)
        assert plugin.flush(5)
        assert plugin.history("c1", limit=None) == old + new
        assert plugin.count() == 53 and plugin.row_count() < 53
        assert plugin.history("c1", since=6.0, until=10.005) == [old[1], old[2], new[0]]
    finally:
        plugin.close()


def test_heartbeats_are_sampled_and_the_last_is_kept(installed):
    plugin, s = installed(heartbeat_every=10.0)
    emit(s, Connected(role="server", client_id="c1", session_id="s1", peer="p", at=0.0))
    for i in range(36):
        emit(s, HeartbeatReceived(role="server", client_id="c1", session_id="s1", at=float(i)))
    emit(s, Disconnected(role="server", client_id="c1", session_id="s1", reason="closed", at=40.0))
    emit(s, Connected(role="server", client_id="c1", session_id="s2", peer="p", at=41.0))
    emit(s, HeartbeatReceived(role="server", client_id="c1", session_id="s2", at=42.0))
    assert plugin.flush(5)
    beats = [e.at for e in plugin.history("c1", kinds=["heartbeat.received"])]
    # one per 10 s, the last of session s1 before its end, the first of session s2
    assert beats == [0.0, 10.0, 20.0, 30.0, 35.0, 42.0]
    hb = plugin.heartbeat_stats("c1")
    assert hb is not None and hb.count == 37 and hb.last_at == 42.0
    assert plugin.session_view("c1") == plugin.live_view("c1")


def test_reducer_is_pure_and_scoped():
    v0 = SessionView("c1")
    v1 = apply(v0, Connected(role="server", client_id="c1", session_id="s1", peer="p", at=1.0))
    assert v0 == SessionView("c1") and v1.connected and v1.connected_since == 1.0
    assert apply(v1, sent("c2", 2.0)) is v1  # another client
    assert apply(v1, sent("c1", 2.0, role="client")) is v1  # another side
    # the old session's end, arriving after the new one started, leaves it connected
    v2 = apply(v1, Connected(role="server", client_id="c1", session_id="s2", peer="p", at=3.0))
    v3 = apply(
        v2, Disconnected(role="server", client_id="c1", session_id="s1", reason="replaced", at=3.1)
    )
    assert v3.connected and v3.session_id == "s2" and v3.disconnect_reasons == {"replaced": 1}
    v4 = apply(
        v3, Disconnected(role="server", client_id="c1", session_id="s2", reason="closed", at=4.0)
    )
    assert not v4.connected and v3.disconnect_reasons == {"replaced": 1}
    assert v4.disconnects == 2 and v4.disconnect_reasons == {"replaced": 1, "closed": 1}
    events: list[Event] = [
        AckReceived(
            role="server", msg_id=MSG, client_id="c1", ok=False, error_type="E", latency=0.1, at=5.0
        ),
        AckTimedOut(role="server", msg_id=MSG, client_id="c1", timeout=1.0, at=6.0),
        MessageReceived(role="server", msg_id=MSG, client_id="c1", size=1, wait_ack=False, at=7.0),
        MessageProcessed(
            role="server",
            msg_id=MSG,
            client_id="c1",
            wait_ack=False,
            ok=True,
            started_at=7.0,
            processing_time=0.01,
            at=7.1,
        ),
    ]
    v5 = replay(events, "c1")
    assert (v5.acks_failed, v5.ack_timeouts, v5.messages_received) == (1, 1, 1)
    assert replay(events) == v5  # client id taken from the events
    with pytest.raises(ValueError):
        replay([])


def test_stored_json_parses_back_to_each_class():
    for event in (
        sent("c1", 1.0),
        Connected(role="client", client_id="c1", session_id="s", peer="p", setup_time=0.01),
        AckTimedOut(role="server", msg_id=MSG, client_id="c1", timeout=1.0),
    ):
        assert parse_event(event.model_dump_json()) == event


def test_loaded_by_name_through_the_entry_point(db):
    plugin = load_plugin("history", path=db, max_rows=5)
    assert isinstance(plugin, HistoryPlugin) and plugin.max_rows == 5


# --- retention -----------------------------------------------------------------------------


def test_retention_keeps_at_most_max_rows(installed, monkeypatch):
    monkeypatch.setattr(history_mod, "RETENTION_CHUNK", 7)  # several delete transactions
    plugin, s = installed(max_rows=100, max_age=None, retention_every=0, batch=50)
    for i in range(250):
        emit(s, sent(f"c{i % 3}", float(i)))
    assert plugin.flush(5)
    assert plugin.count() == 100
    kept = sorted(e.at for c in plugin.clients() for e in plugin.history(c, limit=None))
    assert kept == [float(i) for i in range(150, 250)]
    assert plugin.stats()["pruned"] == 150


def test_retention_by_age_with_an_injected_clock(installed):
    now = [1000.0]
    plugin, s = installed(max_age=100.0, max_rows=None, retention_every=0, clock=lambda: now[0])
    for i in range(201):
        emit(s, sent("c1", 800.0 + i))
    assert plugin.flush(5)
    ats = [e.at for e in plugin.history("c1", limit=None)]
    assert ats == [900.0 + i for i in range(101)]  # older than now - max_age: gone
    now[0] = 1050.0
    assert plugin.prune() == 50
    assert plugin.history("c1", limit=None)[0].at == 950.0
    now[0] = 2000.0
    assert plugin.prune() == 51 and plugin.count() == 0
    emit(s, sent("c1", 1999.0))  # the writer prunes on its own, after a batch
    assert plugin.flush(5)
    assert [e.at for e in plugin.history("c1")] == [1999.0]


def test_retention_waits_for_its_interval(installed):
    now = [1000.0]
    plugin, s = installed(max_age=10.0, retention_every=3600.0, clock=lambda: now[0])
    emit(s, sent("c1", 995.0))  # first batch: retention runs (nothing expired)
    assert plugin.flush(5)
    now[0] = 2000.0
    emit(s, sent("c1", 1999.0))
    assert plugin.flush(5)
    assert plugin.count() == 2  # not yet: retention ran less than an hour ago
    assert plugin.prune() == 1 and plugin.count() == 1


# --- concurrency and isolation -----------------------------------------------------------------

WRITER = """
import sys
from backbone import signals
from backbone.events import MessageSent
from plugins.history import HistoryPlugin
p = HistoryPlugin(sys.argv[1], batch=20, retention_every=0, max_age=None)
s = object()
p.install(s)
for i in range(int(sys.argv[2])):
    signals.emit_event(s, MessageSent(role="server", msg_id="ab" * 16,
                 client_id="proc", size=1, wait_ack=False, at=float(i)))
assert p.flush(30)
assert p.stats()["failed_batches"] == 0, p.stats()
p.close()
"""


def test_concurrent_writers_lose_nothing(installed, db):
    n = 3000
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WRITER), str(db), str(n)],
        stderr=subprocess.PIPE,
        text=True,
    )
    a = installed(batch=20, retention_every=0, max_age=None)
    b = installed(batch=20, retention_every=0, max_age=None)
    errors: list[BaseException] = []
    done = threading.Event()

    def write(plugin_sender: tuple[HistoryPlugin, object], cid: str) -> None:
        try:
            for i in range(n):
                emit(plugin_sender[1], sent(cid, float(i)))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def read() -> None:
        while not done.is_set():
            try:
                a[0].history("a", limit=50)
                a[0].clients()
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)
                return

    threads = [
        threading.Thread(target=write, args=(a, "a")),
        threading.Thread(target=write, args=(b, "b")),
    ]
    reader = threading.Thread(target=read)
    for t in [*threads, reader]:
        t.start()
    for t in threads:
        t.join()
    assert a[0].flush(30) and b[0].flush(30)
    _, err = proc.communicate(timeout=60)
    done.set()
    reader.join()
    assert proc.returncode == 0, err
    assert not errors
    for plugin, _ in (a, b):
        stats = plugin.stats()
        assert stats["failed_batches"] == 0 and stats["dropped"] == 0, stats
    assert a[0].count() == 3 * n
    for cid in ("a", "b", "proc"):
        assert len(a[0].history(cid, limit=None)) == n


async def test_a_full_queue_drops_and_counts_but_never_blocks_delivery(
    make_server, make_client, db
):
    plugin = HistoryPlugin(db, queue_size=5, batch=1)
    gate = threading.Event()
    write = plugin._write

    def stuck(conn: Any, batch: list[Event]) -> None:
        gate.wait(10)
        write(conn, batch)

    plugin._write = stuck  # type: ignore[method-assign]
    drops_before = plugin_drops["history"]
    try:
        async with make_server(plugins=[plugin]) as server:
            client = make_client("dev-1", server.port, plugins=[])
            client.handler(lambda m: m.payload)
            async with connected(client):
                for i in range(30):
                    assert await server.send_to("dev-1", i, wait_ack=True, timeout=2) == i
            dropped = plugin.stats()["dropped"]
            assert dropped > 0 and plugin_drops["history"] - drops_before == dropped
            gate.set()
    finally:
        gate.set()
    stats = plugin.stats()
    assert plugin.count() == stats["recorded"] - stats["dropped"] > 0


async def test_a_failing_receiver_never_disturbs_delivery(
    make_server, make_client, events, db, monkeypatch
):
    def broken(state: dict[str, Any], event: Event) -> None:
        raise RuntimeError("reducer bug")

    monkeypatch.setattr(history_mod, "fold", broken)
    monkeypatch.setattr(history_mod, "fold_batch", broken)
    plugin = HistoryPlugin(db)
    name = signals.receiver_name(plugin._on_batch)  # the per-message steps come in batches
    before = signals.receiver_failures[name]
    try:
        async with make_server(plugins=[plugin]) as server:
            client = make_client("dev-1", server.port, plugins=[])
            client.handler(lambda m: m.payload)
            server.handler(lambda m: None)
            async with connected(client):
                for i in range(10):
                    assert await server.send_to("dev-1", i, wait_ack=True, timeout=2) == i
                    assert await client.send(i, wait_ack=True, timeout=2) is None
        assert signals.receiver_failures[name] - before >= 20
        assert len(events.of("ack.received", role="server")) == 10  # others still see all
    finally:
        signals.receiver_failures[name] = before
        if not before:
            del signals.receiver_failures[name]


def test_live_views_of_departed_clients_are_forgotten(installed):
    plugin, s = installed(max_live=10)
    emit(s, Connected(role="server", client_id="stay", session_id="s", peer="p", at=1.0))
    for i in range(30):
        cid = f"c{i:02d}"
        emit(s, Connected(role="server", client_id=cid, session_id=cid, peer="p", at=2.0 + i))
        emit(
            s,
            Disconnected(role="server", client_id=cid, session_id=cid, reason="closed", at=2.5 + i),
        )
    live = plugin.live_clients()
    assert len(live) <= 10 and "stay" in live and "c29" in live
    assert plugin.flush(5)
    assert len(plugin.clients()) == 31  # the store keeps them all


def test_kinds_choose_what_is_stored_and_what_is_built(db):
    """By default ``message.received`` is not stored (``message.processed`` is), so with
    only this plugin installed that event is never even built; ``kinds=`` adds it back.
    The per-message kinds come in batches: no per-step event is built for this plugin."""
    sender = object()
    default = HistoryPlugin(db)
    default.install(sender)
    try:
        assert not signals.wants(signals.on_message_received)
        assert not signals.wants(signals.on_message_processed)
        assert not signals.wants(signals.on_message_sent) and not signals.wants(signals.on_ack)
        assert signals.batching() and signals.wants(signals.on_heartbeat)
        assert signals.batching("message.processed") and signals.batching("ack.received")
        assert not signals.batching("message.received")  # no row for a kind not stored
        assert not signals.on_event.receivers
    finally:
        default.close()
    chosen = HistoryPlugin(db, kinds="message.*;connected")
    assert chosen.kinds == {"message.sent", "message.received", "message.processed", "connected"}
    chosen.install(sender)
    try:
        assert signals.batching("message.received") and not signals.batching("ack.sent")
        assert not signals.wants(signals.on_ack)
        received = MessageReceived(role="client", msg_id=MSG, client_id="c", size=1, wait_ack=False)
        emit(sender, received)
        emit(sender, AckReceived(role="client", msg_id=MSG, client_id="c", ok=True, latency=0.1))
        assert chosen.flush(5)
        assert [e.kind for e in chosen.history("c")] == ["message.received"]
    finally:
        chosen.close()
    with pytest.raises(ValueError, match="cannot record"):
        HistoryPlugin(db, kinds=["heartbeat.received"])


async def test_on_an_event_loop_events_are_packed_there_and_the_writer_only_writes(
    installed, monkeypatch
):
    """Packing and serialising hold the GIL; SQLite does not.  Events recorded on a loop
    are packed on that loop's thread (here once per pass: ``pack_delay=0``), so the
    writer thread runs no Python work that would keep the loop waiting for the GIL."""
    real = history_mod.rows_of
    packed_on: set[int] = set()

    def recording(records: Any) -> Any:
        packed_on.add(threading.get_ident())
        return real(records)

    monkeypatch.setattr(history_mod, "rows_of", recording)
    plugin, s = installed(batch=1000, pack_delay=0)
    emitted: list[Event] = []
    for i in range(2500):
        e: Event = sent("c1", 1000.0 + i / 1000) if i % 3 else ack("c1", 1000.0 + i / 1000)
        emitted.append(e)
        emit(s, e)
        if i % 100 == 99:
            await asyncio.sleep(0)  # a loop pass: what was recorded is packed
    # the steps of a pass reach the plugin as batches at its end; with pack_delay=0 the
    # pack is in the pass after
    await asyncio.sleep(0)
    assert await asyncio.to_thread(plugin.flush, 10)
    assert packed_on == {threading.get_ident()}
    assert plugin.count() == 2500
    assert plugin.row_count() <= 30  # packs of at most one loop pass each
    assert plugin.history("c1", limit=None) == emitted
    assert plugin.stats()["dropped"] == 0


async def test_packing_that_fails_on_the_loop_is_retried_by_the_writer(installed, monkeypatch):
    real = history_mod.rows_of
    calls: list[int] = []

    def failing_once(records: Any) -> Any:
        calls.append(threading.get_ident())
        if len(calls) == 1:
            raise ValueError("cannot serialise")
        return real(records)

    monkeypatch.setattr(history_mod, "rows_of", failing_once)
    plugin, s = installed(pack_delay=0)
    events = [sent("c1", 10.0 + i / 100) for i in range(50)]
    for e in events:
        emit(s, e)
    await asyncio.sleep(0)  # the pass's batches reach the plugin
    await asyncio.sleep(0)  # the pass's pack: it fails, the records go over unpacked
    assert await asyncio.to_thread(plugin.flush, 10)
    assert calls[0] == threading.get_ident() and calls[1] != threading.get_ident()
    assert plugin.history("c1", limit=None) == events
    assert plugin.stats()["failed_batches"] == 0


def test_a_pack_left_on_a_loop_that_stopped_does_not_strand_later_events(installed):
    """The pack scheduled on a loop that stops before running it: the next event, on
    another loop, schedules its own."""
    plugin, s = installed(pack_delay=0)
    first = asyncio.new_event_loop()

    connected = Connected(role="server", client_id="c1", session_id="s", peer="p", at=1.0)

    async def emit_in_the_last_pass() -> None:
        # the emit runs in the pass that also stops the loop: its pack never runs
        # (a connection event: recorded at once, not in a batch at the end of the pass)
        asyncio.get_running_loop().call_soon(emit, s, connected)

    try:
        first.run_until_complete(emit_in_the_last_pass())
    finally:
        first.close()
    assert len(plugin._unpacked) == 1

    async def later() -> None:
        emit(s, sent("c1", 2.0))
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(later())
    assert len(plugin._unpacked) == 0
    assert plugin.flush(10) and plugin.count() == 2


async def test_a_pass_of_two_kinds_is_stored_in_the_order_it_happened(installed):
    """A loop pass's steps reach the plugin one kind after another (all processed, then
    all ack.sent); the pack puts them back in seq order, so a pack split on PACK_SPAN
    never starts after an event it holds and a query by time finds each event."""
    plugin, s = installed()

    def processed(at: float) -> MessageProcessed:
        return MessageProcessed(
            role="server",
            msg_id=MSG,
            client_id="c1",
            wait_ack=True,
            ok=True,
            started_at=at,
            processing_time=0.0,
            at=at,
        )

    def ack_sent(at: float) -> AckSent:
        return AckSent(
            role="server",
            msg_id=MSG,
            client_id="c1",
            ok=True,
            size=1,
            processing_time=0.0,
            at=at,
        )

    steps: list[Event] = [processed(0.0), processed(0.999), ack_sent(1.0), processed(1.001)]
    steps.append(ack_sent(1.002))
    for e in steps:
        emit(s, e)  # one loop pass: two batches, one per kind
    await asyncio.sleep(0)
    assert await asyncio.to_thread(plugin.flush, 10)
    assert [e.at for e in plugin.history("c1", limit=None)] == [0.0, 0.999, 1.0, 1.001, 1.002]
    early = plugin.history("c1", until=1.0005, limit=None)
    assert [(e.kind, e.at) for e in early] == [
        ("message.processed", 0.0),
        ("message.processed", 0.999),
        ("ack.sent", 1.0),
    ]
    view = plugin.live_view("c1")
    assert view is not None and view.last_event_at == 1.002
    assert replay(plugin.history("c1", limit=None), "c1") == view


async def test_flush_from_another_thread_gets_the_steps_the_loop_still_holds(
    installed, monkeypatch
):
    """The batches of a pass are delivered on the loop's thread; flush() called from
    another thread asks that loop for them instead of returning without them."""
    plugin, s = installed()
    emit(s, sent("c1", 1.0))  # a first batch: the plugin learns which loop they come from
    await asyncio.sleep(0)
    monkeypatch.setattr(signals, "_flush_when_due", lambda: None)  # the pass's own: off
    emit(s, sent("c1", 2.0))
    assert await asyncio.to_thread(plugin.flush, 10)
    assert [e.at for e in plugin.history("c1", limit=None)] == [1.0, 2.0]


def test_events_of_a_batch_whose_write_failed_are_counted_as_lost(installed, db, caplog):
    """A write that fails (here the table is gone) loses its events: they were counted as
    written.  Now they are ``failed`` in stats() and in plugin_drops."""
    import sqlite3

    from backbone.plugins import plugin_drops

    plugin, s = installed()
    before = plugin_drops[plugin.name]
    with sqlite3.connect(db) as other:
        other.execute("DROP TABLE events")
    for i in range(10):
        emit(s, sent("c1", 1.0 + i))
    assert plugin.flush(5)
    stats = plugin.stats()
    assert (stats["written"], stats["failed"], stats["dropped"]) == (0, 10, 0), stats
    assert stats["failed_batches"] >= 1
    assert plugin_drops[plugin.name] - before == 10


def test_a_batch_that_fails_while_packing_counts_every_event(db):
    """Records handed over unpacked are packed by the writer; when that failed, the
    events of the chunks after the failing one were not counted at all: flush() waited
    in vain and the stats did not add up."""
    plugin = HistoryPlugin(db)
    plugin._ensure_schema()
    conn = plugin._connect()
    unpackable = {"kind": "connected", "role": "server", "client_id": "c", "at": 1.0}
    unpackable["peer"] = 2**70  # an int orjson cannot write
    # raw records (packing them fails), then chunks already packed on the loop
    chunks: Any = [(1, [], [unpackable]), (3, [], [unpackable]), (4, ["x"], []), (5, ["y"], [])]
    try:
        with pytest.raises(Exception):  # noqa: B017 - the worker logs and counts it
            plugin._write(conn, chunks)
    finally:
        conn.close()
    assert (plugin._done, plugin._failed) == (13, 13)
