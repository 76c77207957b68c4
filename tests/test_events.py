"""Events built with ``Event.unchecked`` (the core's once-per-message events) are the
same as validated ones: same class, fields, JSON, immutability."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import ValidationError

from backbone import signals
from backbone.events import (
    BATCHED_KINDS,
    EVENT_TYPES,
    STEP_EVENT,
    STEP_FIELDS,
    AckReceived,
    AckSent,
    EventsBatched,
    LateAckDropped,
    MessageProcessed,
    MessageReceived,
    MessageSent,
)

MID = "ab" * 16
SAMPLES: dict[type[Any], dict[str, Any]] = {
    MessageSent: dict(role="server", msg_id=MID, client_id="c", size=3, wait_ack=True),
    MessageReceived: dict(
        role="client", msg_id=MID, client_id="c", size=3, wait_ack=False, headers={"k": "v"}
    ),
    MessageProcessed: dict(
        role="client",
        msg_id=MID,
        client_id="c",
        wait_ack=True,
        ok=False,
        error_type="ValueError",
        started_at=1.5,
        processing_time=0.25,
    ),
    AckSent: dict(role="client", msg_id=MID, client_id="c", ok=True, size=2, processing_time=0.1),
    AckReceived: dict(role="server", msg_id=MID, client_id="c", ok=True, latency=0.01),
}


@pytest.mark.parametrize("cls", list(SAMPLES), ids=lambda c: c.__name__)
def test_unchecked_equals_validated(cls):
    fast = cls.unchecked(**SAMPLES[cls])
    slow = cls(**SAMPLES[cls], seq=fast.seq, at=fast.at)
    assert type(fast) is cls and fast == slow
    assert fast.model_dump_json() == slow.model_dump_json()
    assert list(fast.__dict__) == list(cls.model_fields)  # declaration order
    assert fast.model_fields_set == set(cls.model_fields)  # all count as set
    assert cls.model_validate(fast.model_dump()) == fast
    later = cls.unchecked(**SAMPLES[cls])
    assert later.seq > fast.seq and later.at >= fast.at
    with pytest.raises(ValidationError):
        fast.kind = "x"  # frozen, like any event


def test_unchecked_refuses_unknown_and_missing_fields():
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        MessageSent.unchecked(**SAMPLES[MessageSent], bogus=1)
    with pytest.raises(TypeError, match=r"missing 2 required .*'size' and 'wait_ack'"):
        MessageSent.unchecked(role="server", msg_id=MID, client_id="c")
    with pytest.raises(TypeError, match="unexpected keyword argument 'seq'"):
        MessageSent.unchecked(**SAMPLES[MessageSent], seq=1)  # the core never sets these


@pytest.mark.parametrize("cls", list(SAMPLES), ids=lambda c: c.__name__)
def test_the_event_of_a_row_equals_the_event_built_directly(cls):
    """``STEP_EVENT[kind](role, client_id, row)``, how the core builds a step's event
    from the row it also batches, gives the same event as ``unchecked``: same fields in
    the same order, same seq and at, all counted as set, valid."""
    direct = cls.unchecked(**SAMPLES[cls])
    kind = direct.kind
    rebuilt = STEP_EVENT[kind](direct.role, direct.client_id, signals.row_of(direct))
    assert type(rebuilt) is cls and rebuilt == direct
    assert list(rebuilt.__dict__) == list(direct.__dict__)
    assert rebuilt.model_fields_set == direct.model_fields_set
    assert cls.model_validate(rebuilt.model_dump(), strict=True) == direct
    with pytest.raises(ValueError):
        STEP_EVENT[kind](direct.role, direct.client_id, signals.row_of(direct)[:-1])


def test_every_event_class_has_its_own_builder():
    for cls in EVENT_TYPES:
        assert cls.unchecked.__qualname__ == f"{cls.__name__}.unchecked"


async def test_what_the_core_builds_validates(make_server, make_client, events):
    """The events of a real exchange, both ways, WaitAck and not, survive validation
    unchanged: the core passes values of the declared types."""
    async with make_server() as server:
        server.handler(lambda m: {"ok": 1})
        client = make_client("dev-1", server.port)
        client.handler(lambda m: m.payload)
        async with client:
            await client.wait_connected(5)
            assert await server.send_to("dev-1", {"a": 1}, wait_ack=True) == {"a": 1}
            await server.send_to("dev-1", "one-way")
            assert await client.send([1, 2], wait_ack=True) == {"ok": 1}
            await events.wait("message.processed", role="client", wait_ack=False)
    checked = 0
    for e in events.items:
        if type(e) in SAMPLES:
            again = type(e).model_validate(e.model_dump(), strict=True)
            assert again == e and again.model_dump_json() == e.model_dump_json()
            checked += 1
    assert {e.kind for e in events.items} >= {
        "message.sent",
        "message.received",
        "message.processed",
        "ack.sent",
        "ack.received",
    }
    assert checked >= 10


async def test_batches_carry_the_same_steps_as_the_events(make_server, make_client, events):
    """With a batch receiver and per-step receivers both listening, every per-message
    step of a real exchange is in exactly one batch, and the batch rebuilds its event
    field for field (same seq and at); a batch holds one kind, role and client."""
    batches: list[EventsBatched] = []

    def on_batch(sender: Any, event: EventsBatched) -> None:
        batches.append(event)

    signals.on_events_batched.connect(on_batch, weak=False)
    try:
        async with make_server() as server:
            server.handler(lambda m: {"ok": 1})
            client = make_client("dev-1", server.port)
            client.handler(lambda m: m.payload)
            async with client:
                await client.wait_connected(5)
                assert await server.send_to("dev-1", {"a": 1}, wait_ack=True) == {"a": 1}
                for i in range(20):
                    await server.send_to("dev-1", i)
                assert await client.send([1, 2], wait_ack=True) == {"ok": 1}
                await events.wait("message.processed", role="client", wait_ack=False)
                await events.wait("message.processed", role="server")
            signals.flush_steps()
    finally:
        signals.on_events_batched.disconnect(on_batch)
    steps = [e for e in events.items if e.kind in BATCHED_KINDS]
    rebuilt = [e for b in batches for e in b.events()]
    assert {e.kind for e in steps} == BATCHED_KINDS
    assert sorted(rebuilt, key=lambda e: e.seq) == sorted(steps, key=lambda e: e.seq)
    for b in batches:
        assert b.step in BATCHED_KINDS and b.n >= 1 and b.fields == STEP_FIELDS[b.step]
        assert [e.seq for e in b.events()] == sorted(e.seq for e in b.events())
        assert all(e.role == b.role and e.__dict__["client_id"] == b.client_id for e in b.events())
        assert b.records() == [e.__dict__ for e in b.events()]
        assert b.column("msg_id") == tuple(e.msg_id for e in b.events())  # type: ignore[attr-defined]
        assert EventsBatched.of(b.events()).rows == b.rows
    assert not any(e.kind == "events.batched" for e in events.items)  # never on on_event
    # twenty one-way messages sent in one pass make one batch on the server
    assert any(b.step == "message.sent" and b.n >= 20 for b in batches)


async def test_batches_without_step_receivers_match_what_the_events_would_be(
    make_server, make_client
):
    """With only a batch receiver, the core builds rows and no per-step event; the rows
    still validate as the step's event."""
    batches: list[EventsBatched] = []
    built: list[Any] = []
    both_processed = asyncio.Event()  # the client handled both messages

    def take(sender: Any, event: EventsBatched) -> None:
        batches.append(event)
        if sum(b.n for b in batches if b.step == "message.processed") >= 2:
            both_processed.set()

    signals.on_events_batched.connect(take, weak=False)
    try:
        assert not signals.wants(signals.on_message_sent)
        async with make_server() as server:
            client = make_client("dev-1", server.port)
            client.handler(lambda m: m.payload)
            async with client:
                await client.wait_connected(5)
                assert await server.send_to("dev-1", {"a": 1}, wait_ack=True) == {"a": 1}
                await server.send_to("dev-1", "x", headers={"h": "v"})
                # batches are delivered at the end of a loop pass
                await asyncio.wait_for(both_processed.wait(), 5)
    finally:
        signals.on_events_batched.receivers.clear()
    for b in batches:
        for e in b.events():
            again = type(e).model_validate(e.model_dump(), strict=True)
            assert again == e
            built.append(e)
    kinds = {e.kind for e in built}
    assert kinds == BATCHED_KINDS
    sent = [e for e in built if e.kind == "message.sent"]
    assert [e.headers for e in sent][-1] == {"h": "v"}  # type: ignore[attr-defined]
    assert len({e.seq for e in built}) == len(built)


def test_batch_of_refuses_mixed_steps():
    a = MessageSent.unchecked(**SAMPLES[MessageSent])
    b = MessageSent.unchecked(**{**SAMPLES[MessageSent], "client_id": "other"})
    with pytest.raises(ValueError, match="one kind, role and client"):
        EventsBatched.of([a, b])
    with pytest.raises(ValueError, match="not a batched kind"):
        EventsBatched.of([LateAckDropped.unchecked(role="server", msg_id=MID, client_id="c")])
    with pytest.raises(ValueError, match="at least one"):
        EventsBatched.of([])
