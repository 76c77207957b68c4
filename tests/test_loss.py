"""20 % random datagram loss both ways (a seeded UDP relay): every WaitAck result arrives,
in order, exactly once, and nobody is evicted by mistake."""

from __future__ import annotations

import asyncio
import time

from backbone import Message

from .relay import UdpRelay


async def test_1000_waitack_messages_at_20_percent_loss(make_server, make_client, events):
    async with make_server(heartbeat_interval=1.0, heartbeat_misses=3) as server:
        relay = await UdpRelay.start(("127.0.0.1", server.port), loss=0.2, seed=42)
        try:
            client = make_client("lossy", relay.port, heartbeat_interval=1.0, connect_timeout=10.0)
            seen: list[int] = []

            @client.handler
            async def handle(msg: Message) -> int:
                seen.append(msg.payload)
                return msg.payload * 2

            async with client:
                await client.wait_connected(30)
                results: dict[int, int] = {}
                answered_within_5s = 0

                async def one(i: int) -> None:
                    nonlocal answered_within_5s
                    t0 = time.perf_counter()
                    results[i] = await server.send_to("lossy", i, wait_ack=True, timeout=60)
                    if time.perf_counter() - t0 <= 5.0:
                        answered_within_5s += 1

                sem = asyncio.Semaphore(32)

                async def bounded(i: int) -> None:
                    async with sem:
                        await one(i)

                # started in order: the handler must see them in exactly that order
                tasks = []
                for i in range(1000):
                    await sem.acquire()
                    sem.release()
                    tasks.append(asyncio.ensure_future(bounded(i)))
                    await asyncio.sleep(0)
                await asyncio.gather(*tasks)
            assert results == {i: 2 * i for i in range(1000)}
            assert seen == list(range(1000))  # in order, exactly once
            assert answered_within_5s / 1000 >= 0.95
            # the loss was real both ways (how many datagrams carry the 1,000 results
            # depends on how the client's loop coalesces them: about 230 up here)
            for way in ("up", "down"):
                dropped, total = relay.dropped[way], relay.dropped[way] + relay.forwarded[way]
                assert dropped >= 20 and dropped / total >= 0.1, (way, dropped, total)
            assert not events.of("heartbeat.timed_out")
            assert len(server.pending) == 0
        finally:
            relay.close()
