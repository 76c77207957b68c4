"""Graceful drain and admission control: a server restarted under 200 clients gets every
client back, with reconnects spread over time instead of a synchronized storm."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time

import pytest

from backbone import Server
from backbone.admission import TokenBucket


def test_token_bucket_rate_and_burst():
    b = TokenBucket(rate=10.0, burst=3, now=0.0)
    assert [b.try_take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.wait_time(0.0) == pytest.approx(0.1)
    assert not b.try_take(0.05)
    assert b.try_take(0.1)
    assert TokenBucket(rate=0.0, burst=1, now=0.0).try_take(0.0)  # unlimited


@pytest.mark.slow
async def test_restart_under_200_clients_spreads_reconnects(make_client, certs, events):
    opts = dict(
        heartbeat_interval=2.0,
        max_new_sessions_per_second=60.0,
        admission_burst=10,
        overload_window=1.0,
        drain_retry_after=0.2,
        drain_window=2.0,
        close_grace=0.0,
    )

    def new_server(port: int) -> Server:
        return Server(
            "127.0.0.1",
            port,
            certfile=str(certs.server_cert),
            keyfile=str(certs.server_key),
            **opts,
        )

    n = 200
    first = new_server(0)
    await first.start()
    port = first.port
    clients = [
        make_client(
            f"c{i:03d}",
            port,
            heartbeat_interval=2.0,
            backoff_initial=0.5,
            backoff_max=5.0,
            connect_timeout=10.0,
        )
        for i in range(n)
    ]
    async with contextlib.AsyncExitStack() as stack:
        for c in clients:
            await stack.enter_async_context(c)
        try:
            async with asyncio.timeout(60):
                await asyncio.gather(*(c.wait_connected() for c in clients))
        except TimeoutError:
            from collections import Counter

            late = [c for c in clients if not c.connected]
            print("NOT CONNECTED", len(late), Counter(c.state.value for c in late))
            for c in late[:3]:
                mine = [e for e in events.items if getattr(e, "client_id", None) == c.client_id]
                print(c.client_id, [(e.kind, getattr(e, "reason", "")) for e in mine][-8:])
            raise
        assert len(first) == n, [(e.client_id, e.reason) for e in events.of("disconnected")]
        refusals = events.of("session.refused", reason="overloaded")
        assert refusals, "admission control should have refused part of the first wave"
        assert all(e.window == 1.0 for e in refusals)

        t_stop = time.monotonic()
        await first.stop()
        assert len(events.of("goaway.sent")) == n
        second = new_server(port)
        await second.start()
        try:
            async with asyncio.timeout(60):
                while len(second) < n:
                    await events.wait_new("connected", role="server")
            back = time.monotonic() - t_stop
            goaways = events.of("goaway.received")
            assert len({e.client_id for e in goaways}) == n
            # every client waited retry_after + U(0, window) after the go-away
            delays = [e.delay for e in events.of("reconnect.scheduled", reason="server_going_away")]
            assert len(delays) >= n
            assert all(0.2 <= d <= 2.2 for d in delays)
            assert statistics.pstdev(delays) > 0.3  # spread, not in lockstep
            wall_stop = t_stop + time.time() - time.monotonic()
            connected_at = sorted(
                e.at for e in events.of("connected", role="server") if e.at >= wall_stop
            )
            assert connected_at[-1] - connected_at[0] > 0.5
            print(f"all {n} clients back in {back:.2f} s; refusals {len(refusals)}")
        finally:
            await second.stop(grace=0)
