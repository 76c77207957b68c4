"""Clients of one event loop take turns to connect (``max_connects_per_loop``)."""

from __future__ import annotations

import asyncio
import contextlib

from backbone.admission import HandshakeGate
from backbone.client import connect_places


async def test_places_are_shared_per_loop_server_and_size_and_forgotten_when_idle():
    from backbone import client as client_module

    loop = asyncio.get_running_loop()
    a = ("127.0.0.1", 4433)
    assert connect_places(loop, *a, 4) is connect_places(loop, *a, 4)
    assert connect_places(loop, *a, 4) is not connect_places(loop, *a, 8)
    # attempts waiting on another server do not take this one's places
    assert connect_places(loop, *a, 4) is not connect_places(loop, "127.0.0.1", 4434, 4)
    assert isinstance(connect_places(loop, *a, 0), contextlib.nullcontext)  # no limit
    client_module._connect_places.clear()

    inside = 0
    most = 0

    async def attempt() -> None:
        nonlocal inside, most
        async with connect_places(loop, *a, 2):
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.01)
            inside -= 1

    tasks = [asyncio.ensure_future(attempt()) for _ in range(6)]
    await asyncio.sleep(0)
    tasks[-1].cancel()  # one gives up while waiting for a place: it takes none
    await asyncio.gather(*tasks, return_exceptions=True)
    assert most == 2
    # nothing left that would keep the loop (the semaphore's) alive
    assert client_module._connect_places == {}


async def _most_handshakes_in_flight(make_server, make_client, per_loop: int) -> int:
    class CountingGate(HandshakeGate):
        __slots__ = ()
        most = 0

        def opened(self) -> None:
            super().opened()
            CountingGate.most = max(CountingGate.most, self.in_flight)

    async with make_server() as server:
        server._gate.__class__ = CountingGate
        clients = [
            make_client(
                f"turn-{per_loop}-{i}",
                server.port,
                max_connects_per_loop=per_loop,
                connect_timeout=10.0,  # none gives up (its server side would stay counted)
            )
            for i in range(10)
        ]
        async with contextlib.AsyncExitStack() as stack:
            for c in clients:
                await stack.enter_async_context(c)
            await asyncio.gather(*(c.wait_connected(10) for c in clients))
        return CountingGate.most


async def test_clients_of_one_loop_connect_at_most_n_at_a_time(make_server, make_client):
    # the server sees at most 2 connections between first packet and HELLO at any time,
    # and all 10 clients get their session
    assert await _most_handshakes_in_flight(make_server, make_client, 2) <= 2
    # without the limit the same 10 start their handshakes together
    assert await _most_handshakes_in_flight(make_server, make_client, 0) > 2
