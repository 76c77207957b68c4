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


async def _count_settles(kind: type, expected: int, at_most: bool = False) -> int:
    """The number of live ``kind`` objects once it reaches ``expected`` (or, ``at_most``,
    is no more than that; aioquic's closing period ends on its own timer), or what it is
    after 2 s."""
    n = _alive(kind)
    for _ in range(40):
        if n == expected or (at_most and n < expected):
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
            reconnected = events.expect("connected", role="client", client_id="cyc-1")
            assert server.evict("cyc-1")
            await reconnected
            await client.wait_connected(5)
            assert await server.send_to("cyc-1", 8, wait_ack=True) == 8
            assert await _count_settles(QuicConnection, before + 2) == before + 2
        await events.wait("disconnected", role="server", client_id="cyc-1")
        # the client closed: its connection and the server's are gone too
        # (the Client object itself stays: it is still referenced here)
        assert await _count_settles(QuicConnection, before) == before


async def test_failed_connect_attempts_are_freed_without_the_cyclic_collector(
    make_server, make_client, events, no_cyclic_gc
):
    import socket

    # refused before the handshake: the connection's ready future held the error whose
    # traceback held the frames that held the connection
    async with make_server(max_new_sessions_per_second=0.01, admission_burst=1) as server:
        first = make_client("first", server.port)
        async with first:
            await first.wait_connected(5)
            before = _alive(QuicConnection)
            late = make_client("late", server.port, backoff_max=0.05)
            async with late:
                for _ in range(6):
                    failed = await events.wait_new("connect.failed", client_id="late")
                    assert failed.reason == "rejected"
                # none of the refused attempts is left; at most the one under way
                assert await _count_settles(QuicConnection, before + 1, at_most=True) <= before + 1
    # timed out: nothing answers (aioquic never reaches its end by itself once we have
    # closed the socket)
    silent_server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent_server.bind(("127.0.0.1", 0))
    try:
        before = _alive(QuicConnection)
        lonely = make_client(
            "lonely", silent_server.getsockname()[1], connect_timeout=0.2, backoff_max=0.05
        )
        async with lonely:
            for _ in range(4):
                failed = await events.wait_new("connect.failed", client_id="lonely")
                assert failed.reason == "timeout"
                assert "(no packet from the server processed;" in failed.detail
            assert await _count_settles(QuicConnection, before + 1, at_most=True) <= before + 1
    finally:
        silent_server.close()
