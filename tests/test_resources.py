"""Resource bounds: 100,000 WaitAck messages that all time out leave nothing behind, and
a client that stops reading costs the server at most ``outbound_buffer_limit`` while the
other clients notice nothing."""

from __future__ import annotations

import asyncio
import collections
import gc
import sys
import time
from typing import Any

import pytest

from backbone import BackboneError, Backpressure, signals

from .fault_agents import Agent, clients_args, rss_kib, run_waitack_plan
from .test_faults import report, started


def heap_figures() -> tuple[int, int, int]:
    gc.collect()
    gc.collect()
    return sys.getallocatedblocks(), len(gc.get_objects()), rss_kib()


@pytest.mark.slow
async def test_100k_waitack_timeouts_leave_no_pending_and_no_memory_behind(
    make_server, certs, tmp_path
):
    n_clients, per_wave, waves, timeout = 4, 5_000, 5, 0.5  # 4 × 5,000 × 5 = 100,000
    ids = [f"mute-{i}" for i in range(n_clients)]
    async with make_server(
        heartbeat_interval=1.0,
        heartbeat_misses=5,
        max_pending_per_client=25_000,
        max_pending_total=100_000,
    ) as server:
        agent = await Agent.start(
            "clients",
            # the handler never returns: no RESULT ever comes back
            clients_args(
                host="127.0.0.1",
                port=server.port,
                ca=str(certs.ca_cert),
                count=n_clients,
                prefix="mute-",
                hb=1.0,
                misses=5,
                handler="hang",
                max_inbound=(waves + 1) * per_wave + 10,
                quiet=True,
            ),
            log_path=tmp_path / "mute.log",
            name="mute",
        )
        try:
            # (no recording `events` fixture here: 100,000 events would be the memory
            # this test looks for)
            all_connected = asyncio.Event()

            def on_connected(sender: Any, event: Any) -> None:
                if len(server) >= n_clients:
                    all_connected.set()

            signals.on_connected.connect(on_connected, sender=server, weak=False)
            try:
                if len(server) < n_clients:
                    await asyncio.wait_for(all_connected.wait(), 60)
            finally:
                signals.on_connected.disconnect(on_connected, sender=server)
            assert len(server) == n_clients

            async def wave() -> collections.Counter[str]:
                """``per_wave`` WaitAck sends to each client, launched 40 per event-loop
                pass.  One huge batch would block the server's loop, and asyncio reads one
                datagram per socket per loop pass: ACKs and heartbeats would starve."""
                outcomes: collections.Counter[str] = collections.Counter()

                async def one(cid: str, i: int) -> None:
                    try:
                        await server.send_to(cid, i, wait_ack=True, timeout=timeout)
                    except BackboneError as exc:
                        outcomes[type(exc).__name__] += 1
                    else:
                        outcomes["result"] += 1

                tasks = []
                for i in range(per_wave):
                    tasks += [asyncio.ensure_future(one(cid, i)) for cid in ids]
                    if i % 10 == 9:
                        await asyncio.sleep(0)
                await asyncio.gather(*tasks)
                return outcomes

            async def settled() -> None:
                """Until QUIC has delivered everything (its per-packet records gone) and
                the finished sends' tasks are gone from the event loop."""
                async with asyncio.timeout(30):
                    while (
                        len(server.pending)
                        or any(i.outbound_buffered for i in server.clients())
                        or len(asyncio.all_tasks() - steady_tasks) > 0
                    ):
                        await asyncio.sleep(0.05)

            async def run_wave() -> tuple[collections.Counter[str], int]:
                """One wave in its own task (the same way for warm-up and measurement);
                returns the outcomes and the peak of the pending table meanwhile."""
                task = asyncio.ensure_future(wave())
                peak = 0
                while not task.done():
                    peak = max(peak, len(server.pending))
                    await asyncio.wait([task], timeout=0.1)
                return task.result(), peak

            steady_tasks = asyncio.all_tasks()  # the test, the agent reader, handler workers
            warm, _ = await run_wave()  # fills every table to its steady size
            assert warm == {"AckTimeout": n_clients * per_wave}
            await settled()
            blocks0, objects0, rss0 = heap_figures()
            t0 = time.perf_counter()
            total: collections.Counter[str] = collections.Counter()
            peak_pending = 0
            for _ in range(waves):
                outcomes, peak = await run_wave()
                total += outcomes
                peak_pending = max(peak_pending, peak)
            elapsed = time.perf_counter() - t0
            await settled()
            blocks1, objects1, rss1 = heap_figures()
            table = server.pending.snapshot()
            recent = {peer: len(r) for peer, r in server.pending._recent.items()}
            infos = server.clients()
        finally:
            await agent.stop()
    sent = waves * n_clients * per_wave
    report(
        "100k WaitAck timeouts",
        sent=sent,
        elapsed=elapsed,
        peak_pending=peak_pending,
        blocks_growth=blocks1 - blocks0,
        objects_growth=objects1 - objects0,
        rss_growth_kib=rss1 - rss0,
    )
    assert total == {"AckTimeout": sent}  # every one, and nothing else
    assert table == {"total": 0, "peers": 0, "heap": 0}
    assert all(n <= 4096 for n in recent.values()) and len(recent) == n_clients
    assert [i.pending_acks for i in infos] == [0] * n_clients
    assert peak_pending >= 2_000  # thousands pending at once, not one at a time
    # A leak of one small object per message would be ≥ 100,000 blocks and objects; a
    # leaked pending entry (entry, waiter, future, heap item: ~600 B) would be ~60 MB.
    # Measured: ~1,600 blocks, ~100 objects (cancelled timer handles not yet purged by
    # the loop).  RSS only shrinks when whole arenas empty, so the peak of thousands of
    # pending sends can leave ~10-20 MB resident: a coarse bound only.
    assert blocks1 - blocks0 < 10_000
    assert objects1 - objects0 < 2_000
    assert rss1 - rss0 < 40 * 1024


async def test_a_client_that_stops_reading_is_bounded_and_isolated(
    make_server, make_client, events
):
    from .relay import UdpRelay

    limit, size = 256 * 1024, 8 * 1024
    async with make_server(
        heartbeat_interval=2.0,
        heartbeat_misses=5,
        max_payload=16 * 1024,
        outbound_buffer_limit=limit,
    ) as server:
        relay = await UdpRelay.start(("127.0.0.1", server.port))
        try:
            stuck = make_client("stuck", relay.port, heartbeat_interval=2.0)
            got: list[int] = []
            stuck.handler(lambda m: got.append(1))
            others = [
                make_client(f"fine-{i}", server.port, heartbeat_interval=2.0) for i in range(3)
            ]
            for c in others:
                c.handler(lambda m: m.payload)
            async with started(stuck, *others):
                relay.down.blackhole = True  # the client stops reading: nothing is acked
                accepted = 0
                with pytest.raises(Backpressure) as exc:
                    for _ in range(10_000):
                        await server.send_to("stuck", b"x" * size)
                        accepted += 1
                        assert server.client("stuck").outbound_buffered <= limit
                        await asyncio.sleep(0)
                assert exc.value.limit == limit and exc.value.buffered <= limit
                full = server.client("stuck").outbound_buffered
                # the others keep working, with big payloads, while the stuck one is full
                out = await run_waitack_plan(server, {c.client_id: 30 for c in others}, inflight=4)
                # and it stays full, never more: every further send is refused at once
                for _ in range(50):
                    t0 = time.perf_counter()
                    with pytest.raises(Backpressure):
                        await server.send_to("stuck", b"y" * size, wait_ack=True, timeout=30)
                    assert time.perf_counter() - t0 < 0.05
                    await asyncio.sleep(0.01)
                after = server.client("stuck").outbound_buffered
                fine_buffered = [server.client(c.client_id).outbound_buffered for c in others]
                rejected = events.of("send.rejected", reason="backpressure")
                disconnects = [e for e in events.of("disconnected")]
                pending = len(server.pending)
        finally:
            relay.close()
    report(
        "client stops reading",
        accepted=accepted,
        buffered_full=full,
        buffered_after=after,
        limit=limit,
        others_p50=out["latency"]["p50"],
        others_max=out["latency"]["max"],
    )
    assert accepted * size <= limit < (accepted + 2) * (size + 100)
    assert full <= limit and after <= limit
    assert {e.client_id for e in rejected} == {"stuck"} and len(rejected) == 51
    assert out["results_ok"] == 90 and out["errors"] == {}
    assert out["latency"]["max"] < 0.5
    assert all(b < 64 * 1024 for b in fine_buffered)
    assert disconnects == [] and pending == 0


async def test_server_connections_give_back_their_handshake_buffers(make_server, make_client):
    """After the handshake a server connection keeps no Initial/Handshake CRYPTO buffers
    (aioquic would keep 2 × 16 KiB for the connection's life), and messaging still works
    both ways afterwards."""
    from aioquic.tls import Epoch

    from backbone._quic import server_connections

    async with make_server() as server:
        server.handler(lambda m: m.payload)
        clients = [make_client(f"dev-{i}", server.port) for i in range(3)]
        for c in clients:
            c.handler(lambda m: m.payload)
            await c.start()
        try:
            for c in clients:
                await c.wait_connected(5)
            conns = server_connections(server._quic_server)
            assert len(conns) == 3
            for conn in conns:
                quic = conn._quic
                for epoch in (Epoch.INITIAL, Epoch.HANDSHAKE):
                    assert quic._spaces[epoch].discarded
                    assert quic._crypto_buffers[epoch].capacity == 0
                assert quic._crypto_buffers[Epoch.ONE_RTT].capacity > 0
            for i, c in enumerate(clients):
                assert await server.send_to(f"dev-{i}", {"n": i}, wait_ack=True) == {"n": i}
                assert await c.send([i], wait_ack=True) == [i]
        finally:
            for c in clients:
                await c.close()
