"""A connection that has ended is freed by reference counting, without waiting for the
cyclic garbage collector: every full collection walks every object still tracked, and with
thousands of connections its pauses push datagrams past the drop limit
(docs/benchmarks.md, "10,000 clients")."""

from __future__ import annotations

import asyncio
import gc

from aioquic.quic.connection import QuicConnection

from backbone import Message


def _alive(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is kind)


async def _count_settles(kind: type, expected: int) -> int:
    """The number of live ``kind`` objects once it reaches ``expected`` (aioquic's closing
    period ends on its own timer), or what it is after 2 s."""
    n = _alive(kind)
    for _ in range(40):
        if n == expected:
            break
        await asyncio.sleep(0.05)
        n = _alive(kind)
    return n


async def test_ended_connections_are_freed_without_the_cyclic_collector(
    make_server, make_client, events, no_cyclic_gc
):
    async with make_server() as server:
        before = _alive(QuicConnection)
        client = make_client("cyc-1", server.port, backoff_initial=0.05, backoff_jitter=0.0)

        @client.handler
        async def echo(msg: Message) -> object:
            return msg.payload

        async with client:
            await client.wait_connected(5)
            assert await server.send_to("cyc-1", 7, wait_ack=True) == 7
            assert _alive(QuicConnection) == before + 2  # one at each end
            # the server drops the session, the client reconnects: both ended
            # connections must go, with the cyclic collector off
            reconnected = asyncio.ensure_future(
                events.wait_new("connected", role="client", client_id="cyc-1")
            )
            await asyncio.sleep(0)
            assert server.evict("cyc-1")
            await reconnected
            await client.wait_connected(5)
            assert await server.send_to("cyc-1", 8, wait_ack=True) == 8
            assert await _count_settles(QuicConnection, before + 2) == before + 2
        await events.wait("disconnected", role="server", client_id="cyc-1")
        # the client closed: its connection and the server's are gone too
        # (the Client object itself stays: it is still referenced here)
        assert await _count_settles(QuicConnection, before) == before
