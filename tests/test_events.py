"""Events built with ``Event.unchecked`` (the core's once-per-message events) are the
same as validated ones: same class, fields, JSON, immutability."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from backbone.events import (
    EVENT_TYPES,
    AckReceived,
    AckSent,
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
