"""The server's ``gc_freeze`` setting: live connections are moved out of the cyclic
collector's reach as clients connect, and an ended connection is still freed (by reference
counting) although it was frozen."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest
from aioquic.quic.connection import QuicConnection

from backbone import Server, gc_freeze
from backbone.config import ClientConfig
from backbone.gc_freeze import SERVER_THRESHOLDS, ConnectionFreezer, RaisedThresholds
from backbone.settings import ClientSettings, ServeSettings


@pytest.fixture(autouse=True)
def thresholds_restored() -> Iterator[None]:
    """A failed test must not leave the process's thresholds raised for the others."""
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


class FakeGc:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.threshold = (700, 10, 10)

    def set_threshold(self, *t: int) -> None:
        self.calls.append(f"threshold {t}")
        self.threshold = t  # type: ignore[assignment]

    def raised(self) -> RaisedThresholds:
        return RaisedThresholds(lambda: self.threshold, self.set_threshold)

    def freezer(self, raised: RaisedThresholds | None = None, **kw: object) -> ConnectionFreezer:
        return ConnectionFreezer(
            collect_young=lambda: self.calls.append("collect"),
            freeze=lambda: self.calls.append("freeze"),
            unfreeze=lambda: self.calls.append("unfreeze"),
            frozen_count=lambda: 0,
            raised=raised or self.raised(),
            **kw,  # type: ignore[arg-type]
        )


def test_freezes_after_min_batch_then_after_a_tenth_of_the_live_sessions() -> None:
    fake = FakeGc()
    f = fake.freezer(min_batch=100, growth=0.1)
    for _ in range(99):
        f.connected()
    assert not f.tick(99)
    f.connected()
    assert f.tick(100)
    assert fake.calls == ["collect", "freeze"]  # the young generations first
    assert f.new_since_freeze == 0
    # at 5,000 live sessions, 100 new ones are not enough: 500 are
    for _ in range(499):
        f.connected()
    assert not f.tick(5000)
    f.connected()
    assert f.tick(5000)
    assert fake.calls == ["collect", "freeze"] * 2


def test_stop_unfreezes_only_if_it_froze() -> None:
    fake = FakeGc()
    f = fake.freezer(min_batch=1)
    f.stop()
    assert fake.calls == []
    f.connected()
    f.tick(1)
    f.stop()
    assert fake.calls == ["collect", "freeze", "unfreeze"]
    f.stop()  # idempotent
    assert fake.calls.count("unfreeze") == 1


def test_start_raises_the_thresholds_and_stop_puts_them_back() -> None:
    fake = FakeGc()
    f = fake.freezer(thresholds=(50_000, 20, 100))
    f.start()
    assert fake.threshold == (50_000, 20, 100)
    f.start()  # a second start does not save the raised ones as the originals
    f.stop()
    assert fake.threshold == (700, 10, 10)
    f.stop()
    assert fake.calls == ["threshold (50000, 20, 100)", "threshold (700, 10, 10)"]


def test_two_servers_stopped_in_either_order_put_the_thresholds_back() -> None:
    fake = FakeGc()
    raised = fake.raised()
    for first_out in (0, 1):
        a = fake.freezer(raised, thresholds=(50_000, 20, 100))
        b = fake.freezer(raised, thresholds=(50_000, 20, 100))
        a.start()
        b.start()  # must not save a's raised thresholds as the ones to put back
        freezers = [a, b]
        freezers.pop(first_out).stop()
        assert fake.threshold == (50_000, 20, 100), "the other server still runs"
        freezers[0].stop()
        assert fake.threshold == (700, 10, 10)
        assert raised.holders == 0


def test_no_thresholds_leaves_them_alone() -> None:
    fake = FakeGc()
    f = fake.freezer(thresholds=None)
    f.start()
    f.stop()
    assert fake.calls == [] and fake.threshold == (700, 10, 10)


def test_on_for_serve_off_for_an_embedded_server(certs) -> None:
    assert ServeSettings(certfile="c", keyfile="k").server_config().gc_freeze is True
    server = Server("127.0.0.1", 0, certfile=str(certs.server_cert), keyfile=str(certs.server_key))
    assert server.config.gc_freeze is False
    assert server._freezer is None


def _server_quic(server: Server, client_id: str) -> QuicConnection:
    return server._sessions[client_id]._quic


async def test_connections_frozen_while_alive_and_freed_when_ended(
    make_server, make_client, events, no_cyclic_gc
):
    before = gc.get_threshold()
    async with make_server(gc_freeze=True) as server:
        assert server._freezer is not None
        assert gc.get_threshold() == SERVER_THRESHOLDS
        server._freezer.min_batch = 3
        clients = [make_client(f"frz-{i}", server.port) for i in range(3)]
        for c in clients:
            await c.start()
        for c in clients:
            await c.wait_connected(5)
        # the server's once-a-second sampler freezes: wait for its next tick
        freezer = server._freezer
        ticked = asyncio.Event()
        tick = freezer.tick

        def tick_and_tell(sessions: int) -> None:
            tick(sessions)
            ticked.set()

        freezer.tick = tick_and_tell  # type: ignore[method-assign]
        await asyncio.wait_for(ticked.wait(), 3)
        assert freezer.freezes == 1
        tracked = {id(o) for o in gc.get_objects() if type(o) is QuicConnection}
        quics = [_server_quic(server, f"frz-{i}") for i in range(3)]
        assert not any(id(q) in tracked for q in quics), "live connections still tracked"
        freed = asyncio.Event()
        weakref.finalize(quics[0], freed.set)
        del quics
        await clients[0].close()
        await events.wait("disconnected", role="server", client_id="frz-0")
        # aioquic's closing period ends on its own timer; then reference counting frees it
        try:
            await asyncio.wait_for(freed.wait(), 3)
        except TimeoutError:
            raise AssertionError("an ended frozen connection was not freed") from None
        for c in clients[1:]:
            await c.close()
    assert server._freezer.freezes == 0  # stop() gave them back to the collector
    assert gc.get_threshold() == before


async def test_a_cancelled_stop_still_lets_go_of_the_thresholds(make_server) -> None:
    before = gc.get_threshold()
    async with make_server(gc_freeze=True) as server:
        assert gc.get_threshold() == SERVER_THRESHOLDS
        entered, gate = asyncio.Event(), asyncio.Event()

        async def held(grace: float | None) -> None:
            entered.set()
            await gate.wait()  # as stop() waiting out the grace for pending results

        server._say_goodbye = held  # type: ignore[method-assign]
        stopping = asyncio.create_task(server.stop())
        await entered.wait()
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        assert gc.get_threshold() == before
        assert server._quic_server is None  # the cancelled stop() closed everything


# --- the client's gc_freeze: its setup frozen once, at start -------------------------------


def test_a_client_freezes_only_for_backbone_client() -> None:
    assert ClientSettings(client_id="agent-1").client_config().gc_freeze is True
    assert ClientConfig(client_id="agent-1").gc_freeze is False


async def test_a_client_with_gc_freeze_freezes_its_setup_when_it_starts(
    make_server, make_client
) -> None:
    try:
        async with make_server() as server:

            @server.handler
            async def echo(msg) -> object:  # type: ignore[no-untyped-def]
                return msg.payload

            plain = make_client("gc-plain", server.port)
            before = gc_freeze.setup_freezes
            async with plain:
                await plain.wait_connected(5)
            assert gc_freeze.setup_freezes == before  # off: nothing frozen
            gc.unfreeze()
            setup = ["made before the client starts"]  # a list: the collector tracks it
            assert gc.is_tracked(setup) and any(o is setup for o in gc.get_objects())
            frozen = make_client("gc-frozen", server.port, gc_freeze=True)

            @frozen.handler
            async def handle(msg) -> object:  # type: ignore[no-untyped-def]
                return {"got": msg.payload}

            async with frozen:
                assert gc_freeze.setup_freezes == before + 1
                assert gc.get_freeze_count() > 0
                # frozen: no longer among what a collection walks
                assert not any(o is setup for o in gc.get_objects())
                await frozen.wait_connected(5)
                assert await server.send_to("gc-frozen", 7, wait_ack=True) == {"got": 7}
                # made after the freeze: walked as usual
                later = ["made after"]
                assert any(o is later for o in gc.get_objects())
    finally:
        gc.unfreeze()  # the rest of the test process is not frozen
