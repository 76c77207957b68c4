"""What goes on the wire per message: datagrams counted by a loopback relay (client →
server "up", server → client "down"), and the server's transmits per burst of input.

Every datagram costs both ends a full receive path (and, on loopback, the sender the
receiver's kernel work too), so a WaitAck round trip should cost one datagram each way
in steady state: the MESSAGE (carrying the ACK of the previous RESULT) down, the RESULT
(carrying the ACK of its MESSAGE) up.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from backbone import Client, Message
from backbone._link import Flusher

from .relay import UdpRelay

QUIET = dict(heartbeat_interval=30.0, heartbeat_misses=3)  # no heartbeat in the window


@contextlib.asynccontextmanager
async def through_relay(server: Any) -> AsyncIterator[UdpRelay]:
    relay = await UdpRelay.start(("127.0.0.1", server.port))
    try:
        yield relay
    finally:
        relay.close()


async def test_a_waitack_round_trip_is_one_datagram_each_way(make_server, make_client):
    """The handler takes a few ms (longer than aioquic's 1 ms ACK delay): the client holds
    the ACK of the MESSAGE for the RESULT instead of sending it alone first."""
    n = 40
    async with make_server(**QUIET) as server, through_relay(server) as relay:
        client: Client = make_client("dg-1", relay.port, **QUIET)

        @client.handler
        async def handle(msg: Message) -> Any:
            await asyncio.sleep(0.003)  # a little work
            return {"ok": msg.payload}

        async with client:
            await client.wait_connected(5)
            assert await server.send_to("dg-1", -1, wait_ack=True) == {"ok": -1}  # warm up
            # the handshake's last ACKs have crossed: count from a quiet wire
            before = await relay.wait_quiet()
            for i in range(n):
                assert await server.send_to("dg-1", i, wait_ack=True) == {"ok": i}
            # at least the n MESSAGEs and the last RESULT's ACK went down; then count
            # once the wire is quiet again, so a late datagram is not left out
            await relay.wait_until(lambda r: r.forwarded["down"] >= before["down"] + n + 1)
            after = await relay.wait_quiet()
    up = after["up"] - before["up"]
    down = after["down"] - before["down"]
    # up: one RESULT+ACK per message (was a RESULT and an ACK: 2n); down: one MESSAGE
    # (+ ACK of the previous RESULT) per message, and the last RESULT's ACK alone.
    # A little slack for a descheduled test process (a late hold, a probe).
    assert up <= n + n // 5, (up, down)
    assert down <= n + 1 + n // 5, (up, down)


async def test_a_heartbeat_is_one_datagram_each_way(make_server, make_client, events):
    """The client's PING rides with a QUIC PING frame; the server's QUIC acknowledgement of
    that packet, sent at once, answers it (no PONG frame, so nothing for the client to
    acknowledge in turn): one datagram each way per heartbeat, where PING + PONG took
    three.  Every PING is still acknowledged, with its RTT."""
    hb = dict(heartbeat_interval=0.05, heartbeat_misses=40)
    async with make_server(**hb) as server, through_relay(server) as relay:
        client = make_client("dg-2", relay.port, **hb)
        async with client:
            await client.wait_connected(5)
            await events.wait("heartbeat.acknowledged", role="client", client_id="dg-2")
            # count from the moment an acknowledgement arrives: no heartbeat in flight
            await events.wait_new("heartbeat.acknowledged", role="client", client_id="dg-2")

            def pings() -> int:
                return len(events.of("heartbeat.received", role="server", client_id="dg-2"))

            def acks() -> int:
                return len(events.of("heartbeat.acknowledged", role="client", client_id="dg-2"))

            pings0, acks0 = pings(), acks()
            up0, down0 = relay.forwarded["up"], relay.forwarded["down"]
            # twenty more heartbeats, each answered: the window ends as the last answer
            # arrives, with nothing of the next heartbeat sent yet
            await events.wait_count(
                "heartbeat.acknowledged", acks0 + 20, role="client", client_id="dg-2"
            )
            n, acked = pings() - pings0, acks() - acks0
            up = relay.forwarded["up"] - up0
            down = relay.forwarded["down"] - down0
            # the server's ACK-only answers are acknowledged by the next PING's packet:
            # aioquic keeps a sent packet until then (it was one more per heartbeat)
            unacked = server._sessions["dg-2"].sent_packets_unacked()
    assert unacked <= 3, unacked
    assert acked >= 20, acked
    assert n >= acked, (n, acked)  # every PING acknowledged reached the server
    assert all(e.rtt is not None and e.rtt < 1.0 for e in events.of("heartbeat.acknowledged"))
    slack = 2 + n // 5
    assert n <= up <= n + slack, (n, up)  # was 2 per heartbeat: the PING, the PONG's ACK
    assert acked <= down <= n + slack, (n, down)  # the ACK of the PING, nothing else


async def test_the_server_transmits_once_per_connection_per_read_batch(make_server, make_client):
    """A burst of datagrams from one client is handled in one batch of the server's socket
    reader and answered with one transmit at its end, not one transmit per datagram."""
    async with make_server() as server:
        got = asyncio.Event()
        count = 0
        n = 40

        @server.handler
        async def on_message(msg: Message) -> None:
            nonlocal count
            count += 1
            if count == n:
                got.set()

        client = make_client("dg-3", server.port)
        async with client:
            await client.wait_connected(5)
            conn = server._sessions["dg-3"]
            transmits = 0
            original = conn.transmit

            def counting_transmit() -> None:
                nonlocal transmits
                transmits += 1
                original()

            conn.transmit = counting_transmit  # type: ignore[method-assign]
            reader = server._reader
            assert reader is not None
            datagrams0 = reader.datagrams
            for i in range(n):  # 40 × 1 KiB in one loop pass: one write, many datagrams
                await client.send({"i": i, "pad": "x" * 1000})
            await asyncio.wait_for(got.wait(), 5)
            datagrams = reader.datagrams - datagrams0
    assert datagrams >= 20, datagrams
    assert transmits <= datagrams // 2, (transmits, datagrams)  # was one per datagram


class _FakeLink:
    def __init__(self, log: list[str], name: str, cost: float) -> None:
        self.log, self.name, self.cost = log, name, cost
        self.flushes = 0

    def _flush(self) -> None:
        self.flushes += 1
        self.log.append(self.name)
        time.sleep(self.cost)  # the write and the transmit


async def test_the_flusher_spreads_a_burst_over_loop_passes():
    """A broadcast's writes take a budget's worth per loop pass: callbacks queued after it
    (the socket reader, timers) run in between, not after the whole burst."""
    loop = asyncio.get_running_loop()
    log: list[str] = []
    flusher = Flusher(loop, budget=0.004, one_way_budget=1.0, reading_first=lambda: True)
    links = [_FakeLink(log, f"l{i}", 0.001) for i in range(30)]
    for link in links:
        flusher.add(link)  # type: ignore[arg-type]
    done = flusher.wait_flushed()
    loop.call_soon(log.append, "reader")  # queued after the flusher's first pass
    await asyncio.wait_for(done, 5)
    assert all(link.flushes == 1 for link in links)
    i = log.index("reader")
    assert 0 < i < 10, log  # after the first pass's few links, long before the last
    assert flusher.passes >= 4
    assert flusher.flushed == flusher.queued == 30


async def test_the_flusher_takes_longer_slices_when_no_answer_is_awaited():
    loop = asyncio.get_running_loop()
    log: list[str] = []
    first = [False]
    flusher = Flusher(loop, budget=0.0, one_way_budget=1.0, reading_first=lambda: first[0])
    for i in range(10):
        flusher.add(_FakeLink(log, f"a{i}", 0.0))  # type: ignore[arg-type]
    await flusher.wait_flushed()
    assert flusher.passes == 1  # one-way: all in one slice
    first[0] = True  # results awaited, or the reader behind: one link per slice here
    for i in range(10):
        flusher.add(_FakeLink(log, f"b{i}", 0.0))  # type: ignore[arg-type]
    await flusher.wait_flushed()
    assert flusher.passes == 11


async def test_the_server_reads_first_while_results_are_awaited_or_its_reader_lags(
    make_server, make_client
):
    async with make_server() as server:
        assert server._reader is not None
        assert not server._reading_first()
        server._reader.lag = server.config.behind_after  # a batch left old datagrams
        assert server._reading_first()
        server._reader.lag = 0.0
        client = make_client("rf-1", server.port)
        release = asyncio.Event()

        @client.handler
        async def hold(msg: Message) -> str:
            entered.set()
            await release.wait()
            return "done"

        entered = asyncio.Event()
        async with client:
            await client.wait_connected(5)
            waiting = asyncio.ensure_future(server.send_to("rf-1", 1, wait_ack=True))
            await asyncio.wait_for(entered.wait(), 5)  # the message is in the handler
            assert server._reading_first()  # a result is awaited
            release.set()
            assert await waiting == "done"
            assert not server._reading_first()


async def test_the_flusher_writes_in_queue_order_and_says_when_done():
    loop = asyncio.get_running_loop()
    log: list[str] = []
    flusher = Flusher(loop)
    a, b = _FakeLink(log, "a", 0.0), _FakeLink(log, "b", 0.0)
    flusher.add(a)  # type: ignore[arg-type]
    flusher.add(b)  # type: ignore[arg-type]
    assert not flusher.wait_flushed().done()
    await flusher.wait_flushed()
    assert log == ["a", "b"]
    assert flusher.wait_flushed().done()  # nothing queued: done at once


async def test_a_paced_broadcast_reaches_everyone_and_one_way_returns_once_written(
    make_server, make_client
):
    """With a budget that lets one link through per loop pass, a broadcast still reaches
    every client (WaitAck: every result); a one-way broadcast returns once every copy is
    handed to QUIC, not while copies still wait in the links' buffers."""
    async with make_server() as server:
        clients = [make_client(f"bc-{i}", server.port) for i in range(6)]
        for c in clients:
            c.handler(lambda m: m.payload)
        async with contextlib.AsyncExitStack() as stack:
            for c in clients:
                await stack.enter_async_context(c)
            for c in clients:
                await c.wait_connected(5)
            flusher = server.flusher()
            flusher.budget = flusher.one_way_budget = 0.0  # one link per pass
            passes = flusher.passes
            report = await server.broadcast({"one": "way"})
            assert not report.errors and len(report.outcomes) == 6
            assert all(not conn.link._outbox for conn in server._sessions.values())
            assert flusher.passes - passes >= 6
            report = await server.broadcast("echo", wait_ack=True, timeout=5)
            assert not report.errors
            assert report.results == {f"bc-{i}": "echo" for i in range(6)}
