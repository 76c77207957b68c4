"""The bus delivers each event to the receivers connected at that moment, although it
caches routes per (signal, sender); a failing receiver is isolated and counted."""

import asyncio
import gc
from typing import Any

from backbone import signals
from backbone.events import Connected, MessageSent, next_seq


class Sender:
    pass


def connected(cid: str = "c") -> Connected:
    return Connected(role="server", client_id=cid, session_id="s", peer="p")


def test_routes_follow_connects_and_disconnects():
    a, b = Sender(), Sender()
    got: list[tuple[str, object]] = []

    def first(sender, event):
        got.append(("first", sender))

    def second(sender, event):
        got.append(("second", sender))

    def on_all(sender, event):
        got.append(("all", sender))

    signals.on_connected.connect(first, sender=a, weak=False)
    try:
        signals.emit(signals.on_connected, a, connected())
        signals.emit(signals.on_connected, b, connected())
        assert got == [("first", a)]  # the route of a is cached now
        signals.on_connected.connect(second, weak=False)  # any sender
        signals.on_event.connect(on_all, sender=b, weak=False)
        got.clear()
        signals.emit(signals.on_connected, a, connected())
        signals.emit(signals.on_connected, b, connected())
        assert sorted(got, key=str) == sorted(
            [("first", a), ("second", a), ("second", b), ("all", b)], key=str
        )
        signals.on_connected.disconnect(first, sender=a)
        signals.on_connected.disconnect(first)
        got.clear()
        signals.emit(signals.on_connected, a, connected())
        assert got == [("second", a)]
    finally:
        signals.on_connected.disconnect(first)
        signals.on_connected.disconnect(second)
        signals.on_event.disconnect(on_all)
    got.clear()
    signals.emit(signals.on_connected, a, connected())
    assert got == []


def test_weakly_held_receivers_are_never_called_after_they_are_gone():
    s = Sender()
    got: list[str] = []

    def make() -> object:
        def weak_receiver(sender, event):
            got.append("weak")

        return weak_receiver

    keep = make()
    signals.on_connected.connect(keep)  # weak=True: blinker's default
    signals.emit(signals.on_connected, s, connected())
    assert got == ["weak"]
    del keep
    gc.collect()
    signals.emit(signals.on_connected, s, connected())
    assert got == ["weak"]


def test_a_sender_that_goes_away_takes_its_routes_along():
    got: list[str] = []

    def receiver(sender, event):
        got.append(type(sender).__name__)  # holds no reference to the sender

    signals.on_connected.connect(receiver, weak=False)
    try:
        s = Sender()
        signals.emit(signals.on_connected, s, connected())
        assert any(key[1] == id(s) for key in signals._routes)
        sid = id(s)
        del s
        gc.collect()
        assert not any(key[1] == sid for key in signals._routes)
        signals.emit(signals.on_connected, None, connected())  # not weakly referenceable
        assert got == ["Sender", "NoneType"]
    finally:
        signals.on_connected.disconnect(receiver)


def test_a_failing_receiver_is_counted_then_disconnected(caplog):
    s = Sender()
    got: list[str] = []

    def broken(sender, event):
        raise RuntimeError("bug")

    def fine(sender, event):
        got.append(event.client_id)

    signals.on_connected.connect(broken, weak=False)
    signals.on_connected.connect(fine, weak=False)
    name = signals.receiver_name(broken)
    before = signals.receiver_failures[name]
    try:
        for i in range(signals.MAX_RECEIVER_FAILURES + 5):
            signals.emit(signals.on_connected, s, connected(str(i)))
        assert len(got) == signals.MAX_RECEIVER_FAILURES + 5  # the other one saw them all
        assert signals.receiver_failures[name] == signals.MAX_RECEIVER_FAILURES
        assert before == 0
        assert broken not in [r for r in signals.on_connected.receivers_for(s)]
        assert "was disconnected" in caplog.text
    finally:
        signals.on_connected.disconnect(broken)
        signals.on_connected.disconnect(fine)
        signals.receiver_failures.pop(name, None)


# --- batches of per-message steps --------------------------------------------------------


def sent_row(i: int) -> tuple:
    return (next_seq(), 1000.0 + i, f"{i:032x}", 10, False, False, None)


class Batches:
    """A batch receiver that also notes every other event, in delivery order."""

    def __init__(self) -> None:
        self.got: list[Any] = []

    def __call__(self, sender: Any, event: Any) -> None:
        self.got.append(event)

    def __enter__(self) -> "Batches":
        signals.on_events_batched.connect(self, weak=False)
        signals.on_connected.connect(self, weak=False)
        return self

    def __exit__(self, *exc: object) -> None:
        signals.flush_steps()
        signals.on_events_batched.disconnect(self)
        signals.on_connected.disconnect(self)


async def test_steps_of_a_loop_pass_become_one_batch_per_client_and_kind():
    a = Sender()
    with Batches() as rec:
        for i in range(5):
            signals.add_step(a, "server", "c1", "message.sent", sent_row(i))
            signals.add_step(a, "server", "c2", "message.sent", sent_row(100 + i))
        assert rec.got == []  # not before the end of the pass
        await asyncio.sleep(0)
        assert [(b.client_id, b.step, b.n) for b in rec.got] == [
            ("c1", "message.sent", 5),
            ("c2", "message.sent", 5),
        ]
        assert [e.at for e in rec.got[0].events()] == [1000.0 + i for i in range(5)]
        signals.add_step(a, "server", "c1", "message.sent", sent_row(9))
        await asyncio.sleep(0)
        assert [b.n for b in rec.got] == [5, 5, 1]  # a new pass, a new batch


async def test_another_event_delivers_the_pending_batches_first():
    a = Sender()
    with Batches() as rec:
        signals.add_step(a, "server", "c1", "message.sent", sent_row(1))
        signals.emit(signals.on_connected, a, connected("c1"))
        assert [e.kind for e in rec.got] == ["events.batched", "connected"]
        await asyncio.sleep(0)
        assert len(rec.got) == 2  # nothing left for the end of the pass


def test_outside_a_loop_each_step_is_delivered_at_once():
    a = Sender()
    with Batches() as rec:
        signals.add_step(a, "client", "c1", "message.sent", sent_row(1))
        assert [(b.role, b.n) for b in rec.got] == [("client", 1)]


def test_steps_left_by_a_loop_that_stopped_go_out_with_the_next_loops():
    a = Sender()
    with Batches() as rec:
        first = asyncio.new_event_loop()

        async def add_in_the_last_pass() -> None:
            loop = asyncio.get_running_loop()
            loop.call_soon(signals.add_step, a, "server", "c1", "message.sent", sent_row(1))

        try:
            first.run_until_complete(add_in_the_last_pass())
        finally:
            first.close()
        assert rec.got == []  # the flush scheduled on the stopped loop never ran

        async def later() -> None:
            signals.add_step(a, "server", "c1", "message.sent", sent_row(2))
            await asyncio.sleep(0)

        asyncio.run(later())
        assert [b.n for b in rec.got] == [2]
        # the same outside any loop: the step left behind goes out with the next one
        stopped = asyncio.new_event_loop()
        try:
            stopped.run_until_complete(add_in_the_last_pass())
        finally:
            stopped.close()
        signals.add_step(a, "server", "c1", "message.sent", sent_row(3))
        assert [b.n for b in rec.got] == [2, 2]


async def test_a_failing_batch_receiver_is_isolated_and_batches_skip_on_event():
    a = Sender()
    everything: list[Any] = []

    def broken(sender: Any, event: Any) -> None:
        raise RuntimeError("batch bug")

    def on_all(sender: Any, event: Any) -> None:
        everything.append(event)

    name = signals.receiver_name(broken)
    signals.on_event.connect(on_all, weak=False)
    signals.on_events_batched.connect(broken, weak=False)
    try:
        with Batches() as rec:
            signals.add_step(a, "server", "c1", "message.sent", sent_row(1))
            await asyncio.sleep(0)
            assert [b.n for b in rec.got] == [1]  # delivered to the others
        assert signals.receiver_failures[name] == 1
        assert everything == []  # batches are not "every event": on_event had the steps
    finally:
        signals.on_events_batched.disconnect(broken)
        signals.on_event.disconnect(on_all)
        signals.receiver_failures.pop(name, None)


async def test_a_receiver_raising_cancelled_error_is_isolated_and_batches_go_on():
    """CancelledError is a BaseException: it escaped the bus, and a batch receiver that
    raised it left the other connections of that pass unregistered for good (their rows
    piled up, never delivered).  It is a receiver failure like any other now."""
    a, b = Sender(), Sender()
    calls = 0

    def cancels(sender: Any, event: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncio.CancelledError

    name = signals.receiver_name(cancels)
    signals.on_events_batched.connect(cancels, weak=False)
    try:
        with Batches() as rec:
            signals.add_step(a, "server", "c1", "message.sent", sent_row(1))
            signals.add_step(b, "server", "c2", "message.sent", sent_row(2))
            await asyncio.sleep(0)
            assert sorted(x.client_id for x in rec.got) == ["c1", "c2"]
            # the next pass: both sources register again and are delivered
            signals.add_step(a, "server", "c1", "message.sent", sent_row(3))
            signals.add_step(b, "server", "c2", "message.sent", sent_row(4))
            await asyncio.sleep(0)
            assert sorted(x.client_id for x in rec.got) == ["c1", "c1", "c2", "c2"]
        assert signals.receiver_failures[name] == 1
        assert calls == 4
    finally:
        signals.on_events_batched.disconnect(cancels)
        signals.receiver_failures.pop(name, None)


async def test_a_receiver_that_adds_steps_and_flushes_keeps_each_clients_order():
    """A batch receiver whose work adds a step to another connection and then delivers
    (any emit flushes first): that connection's older rows still go out first."""
    a, b = Sender(), Sender()
    got: list[tuple[str, list[int]]] = []

    def rx(sender: Any, event: Any) -> None:
        got.append((event.client_id, [int(row[2], 16) for row in event.rows]))
        if event.client_id == "c1" and len(got) == 1:
            signals.add_step(b, "server", "c2", "message.sent", sent_row(99))
            signals.flush_steps()

    signals.on_events_batched.connect(rx, weak=False)
    try:
        signals.add_step(a, "server", "c1", "message.sent", sent_row(1))
        signals.add_step(b, "server", "c2", "message.sent", sent_row(2))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    finally:
        signals.on_events_batched.disconnect(rx)
    rows_of_c2 = [n for cid, rows in got if cid == "c2" for n in rows]
    assert rows_of_c2 == [2, 99], got


def test_emit_event_sends_a_step_both_ways():
    a = Sender()
    single: list[Any] = []

    def on_sent(sender: Any, event: Any) -> None:
        single.append(event)

    signals.on_message_sent.connect(on_sent, weak=False)
    try:
        with Batches() as rec:
            event = MessageSent(
                role="server", msg_id="ab" * 16, client_id="c1", size=1, wait_ack=False
            )
            signals.emit_event(a, event)
            assert single == [event]
            assert rec.got[0].events() == [event]
    finally:
        signals.on_message_sent.disconnect(on_sent)


async def test_a_plugin_gets_exactly_the_steps_taken_while_it_is_installed():
    """Batches are routed when delivered; install and uninstall deliver the pending ones
    first, so a plugin installed mid-pass does not get earlier steps and one uninstalled
    mid-pass still gets the steps taken before."""
    from backbone.plugins import Plugin

    class Steps(Plugin):
        name = "steps"

        def __init__(self) -> None:
            super().__init__()
            self.rows: list[int] = []

        def receivers(self) -> dict[Any, Any]:
            return {signals.on_events_batched: self.take}

        def take(self, sender: Any, event: Any) -> None:
            self.rows.extend(e.at for e in event.events())

    a = Sender()
    early, late = Steps(), Steps()
    early.install(a)
    try:
        signals.add_step(a, "server", "c1", "message.sent", sent_row(1))
        late.install(a)  # mid-pass
        signals.add_step(a, "server", "c1", "message.sent", sent_row(2))
        early.uninstall(a)  # mid-pass
        signals.add_step(a, "server", "c1", "message.sent", sent_row(3))
        await asyncio.sleep(0)
    finally:
        early.uninstall(a)
        late.uninstall(a)
    assert early.rows == [1001.0, 1002.0]
    assert late.rows == [1002.0, 1003.0]


def test_rows_are_built_only_for_the_kinds_some_batch_receiver_wants():
    """A batch receiver may say which kinds it uses (``batched_steps``, on a plugin or
    on the callable); the core asks ``batching(kind)`` and builds no row of a kind
    nobody wants.  A receiver that says nothing wants them all."""

    def sent_only(sender: Any, event: Any) -> None:
        pass

    sent_only.batched_steps = frozenset({"message.sent"})  # type: ignore[attr-defined]

    def everything(sender: Any, event: Any) -> None:
        pass

    assert not signals.batching("message.sent")
    signals.on_events_batched.connect(sent_only, weak=False)
    try:
        assert signals.batching() and signals.batching("message.sent")
        assert not signals.batching("message.received")
        signals.on_events_batched.connect(everything, weak=False)
        assert signals.batching("message.received") and signals.batching("ack.sent")
        signals.on_events_batched.disconnect(everything)
        assert not signals.batching("message.received")
    finally:
        signals.on_events_batched.disconnect(sent_only)
    assert not signals.batching("message.sent")
