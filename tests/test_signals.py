"""The bus delivers each event to the receivers connected at that moment, although it
caches routes per (signal, sender); a failing receiver is isolated and counted."""

import gc

from backbone import signals
from backbone.events import Connected


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
