"""Plugins cannot break the data path: a plugin that raises on every event is counted and
then disconnected, and a plugin whose receiver is slow and whose worker queue is full
loses (counted, logged) events, while every WaitAck result still comes back right."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from blinker import NamedSignal

from backbone import Message, signals
from backbone.events import Event
from backbone.plugins import BoundedWorker, Plugin, Receiver, plugin_drops

from ..test_e2e import running

MESSAGES = 500
SLOW_QUEUE = "isolation-slow-queue"


class RaisingPlugin(Plugin):
    """Raises on every event it gets."""

    name = "raising"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def receivers(self) -> dict[NamedSignal, Receiver]:
        return {signals.on_event: self.explode}

    def explode(self, sender: Any, event: Event) -> None:
        self.calls += 1
        raise RuntimeError(f"plugin bug on {event.kind}")


class StuckPlugin(Plugin):
    """Blocks the loop a little on each message event and hands it to a worker whose
    handler is stuck, so its small queue fills and the rest is dropped."""

    name = "stuck"

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.handled: list[Event] = []
        self.seen = 0
        self.worker: BoundedWorker[Event] = BoundedWorker(
            SLOW_QUEUE, self.write, maxsize=8, batch=4, interval=0.05
        )

    def receivers(self) -> dict[NamedSignal, Receiver]:
        return {signals.on_message_sent: self.record, signals.on_ack: self.record}

    def record(self, sender: Any, event: Event) -> None:
        time.sleep(0.0002)  # a receiver doing slow work on the loop: bad, but survivable
        self.seen += 1
        self.worker.put(event)

    def write(self, batch: list[Event]) -> None:
        self.release.wait(30)
        self.handled.extend(batch)


async def test_raising_and_stuck_plugins_do_not_disturb_messages(
    make_server, make_client, events, caplog
):
    caplog.set_level(logging.WARNING)
    raising, stuck = RaisingPlugin(), StuckPlugin()
    name = signals.receiver_name(raising.explode)
    signals.receiver_failures.pop(name, None)
    plugin_drops.pop(SLOW_QUEUE, None)
    try:
        async with make_server(plugins=[raising, stuck]) as server:
            client = make_client("dev-1", server.port, plugins=[raising, stuck])

            @client.handler
            async def double(msg: Message) -> Any:
                return {"n": msg.payload["n"] * 2}

            async with running(client):

                async def one(n: int) -> None:
                    assert await server.send_to("dev-1", {"n": n}, wait_ack=True, timeout=10) == {
                        "n": 2 * n
                    }

                for start in range(0, MESSAGES, 50):  # 50 in flight at a time
                    await asyncio.gather(*(one(n) for n in range(start, start + 50)))
                assert await client.send({"n": -1}, wait_ack=False)
                await events.wait("message.processed", role="server")
            assert len(events.of("ack.received", role="server", ok=True)) == MESSAGES
    finally:
        stuck.release.set()
        stuck.worker.close()

    # the raising receiver: counted, then disconnected after MAX_RECEIVER_FAILURES
    assert signals.receiver_failures[name] == signals.MAX_RECEIVER_FAILURES
    assert raising.calls == signals.MAX_RECEIVER_FAILURES  # never called again after that
    disconnected = [
        r
        for r in caplog.records
        if r.name == "backbone.signals" and "was disconnected" in r.getMessage()
    ]
    assert len(disconnected) == 1 and name in disconnected[0].getMessage()
    assert disconnected[0].levelno == logging.ERROR

    # the stuck plugin: saw every message event; its queue took 8 (+ the batch being
    # written), the rest was dropped, counted and logged
    assert stuck.seen >= 3 * MESSAGES  # message.sent, ack.sent and ack.received at least
    assert plugin_drops[SLOW_QUEUE] == stuck.worker.dropped > 0
    assert stuck.seen == stuck.worker.dropped + len(stuck.handled)
    assert len(stuck.handled) <= 8 + 4
    warned = [
        r
        for r in caplog.records
        if r.name == "backbone.plugins" and "not keeping up" in r.getMessage()
    ]
    assert warned and SLOW_QUEUE in warned[0].getMessage()
    assert warned[0].levelno == logging.WARNING
    plugin_drops.pop(SLOW_QUEUE, None)


def test_a_weighted_worker_bounds_batches_and_counts_in_units() -> None:
    """Items that stand for several units (history's packed chunks of events): the bound,
    the batch and every count are in units."""
    release = threading.Event()
    in_handler = threading.Event()
    handled: list[list[tuple[str, int]]] = []

    def handle(batch: list[tuple[str, int]]) -> None:
        in_handler.set()
        release.wait(5)
        handled.append(batch)

    name = "weighted-test"
    before = plugin_drops[name]
    worker: BoundedWorker[tuple[str, int]] = BoundedWorker(
        name, handle, maxsize=10, batch=6, interval=0.01, weigh=lambda item: item[1]
    )
    try:
        worker.put(("a", 4))  # taken at once by the thread, which then waits on release
        assert in_handler.wait(5)
        assert worker._taken == 4
        for item in (("b", 3), ("c", 3), ("d", 4), ("e", 5)):
            worker.put(item)
        # queued: b, c, d = 10 units; e (5 more) is over the bound: 5 units dropped
        assert worker.dropped == 5 and plugin_drops[name] - before == 5
        release.set()
        assert worker.flush(5)
        assert handled == [[("a", 4)], [("b", 3), ("c", 3)], [("d", 4)]]  # <= 6 units each
        assert worker.handled == 14 and worker.backlog == 0
        worker.put(("big", 50))  # an empty queue takes even an oversize item
        assert worker.flush(5) and handled[-1] == [("big", 50)]
    finally:
        release.set()
        worker.close(1)


def test_a_batch_that_fails_counts_its_items_as_lost() -> None:
    """A handler that raises loses its batch: counted as failed and in plugin_drops
    (only full-queue drops were counted there)."""
    name = "failing-test"
    before = plugin_drops[name]
    worker: BoundedWorker[int] = BoundedWorker(name, lambda batch: 1 / 0, batch=5)
    try:
        for i in range(12):
            worker.put(i)
        assert worker.flush(5)
    finally:
        worker.close(5)
    assert (worker.failed, worker.handled) == (12, 0)
    assert worker.failed_batches >= 3
    assert plugin_drops[name] - before == 12
