"""End-to-end acceptance scenarios of US1–US3 over real loopback QUIC, with short intervals.
Tests wait on events, never on bare sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

from backbone import (
    AckTimeout,
    Backpressure,
    ClientGone,
    ClientNotConnected,
    ClientState,
    Message,
    NotConnected,
    PayloadTooLarge,
    RemoteError,
    signals,
)

from .relay import UdpRelay


@contextlib.asynccontextmanager
async def running(*clients: Any):
    async with contextlib.AsyncExitStack() as stack:
        for c in clients:
            await stack.enter_async_context(c)
        for c in clients:
            await c.wait_connected(5)
        yield clients


async def test_connects_in_under_100_ms_and_lists_the_client(make_server, make_client, events):
    async with make_server() as server:
        client = make_client("dev-1", server.port)
        async with running(client):
            ev = await events.wait("connected", role="client")
            assert ev.setup_time < 0.1
            info = server.client("dev-1")
            assert info is not None and info.client_id == "dev-1"
            assert info.remote_address.startswith("127.0.0.1:")
            assert info.connected_at <= time.time()
            await events.wait("heartbeat.received", client_id="dev-1")
            info = server.client("dev-1")
            assert info.last_heartbeat_at is not None and info.heartbeats >= 1
            assert [c.client_id for c in server.clients()] == ["dev-1"]
    states = [(e.old, e.new) for e in events.of("state.changed")]
    assert states[:2] == [("idle", "connecting"), ("connecting", "connected")]
    assert states[-1][1] == "closed"


async def test_broadcast_reaches_five_and_unicast_only_one(make_server, make_client):
    async with make_server() as server:
        got: dict[str, list[Any]] = {f"c{i}": [] for i in range(5)}
        clients = []
        for cid in got:
            c = make_client(cid, server.port)

            def handler(msg: Message, cid: str = cid) -> str:
                got[cid].append(msg.payload)
                return cid

            c.handler(handler)
            clients.append(c)
        async with running(*clients):
            report = await server.broadcast({"op": "refresh"}, wait_ack=True, timeout=5)
            assert report.results == {cid: cid for cid in got}
            assert sorted(report.sent_to) == sorted(got)
            assert await server.send_to("c3", {"op": "only-you"}, wait_ack=True) == "c3"
            assert got["c3"] == [{"op": "refresh"}, {"op": "only-you"}]
            for cid in ("c0", "c1", "c2", "c4"):
                assert got[cid] == [{"op": "refresh"}]
            # fire-and-forget broadcast reports who it went to
            report = await server.broadcast({"op": "ping"})
            assert sorted(report.sent_to) == sorted(got) and not report.errors


async def test_waitack_results_errors_and_bytes(make_server, make_client):
    async with make_server() as server:
        client = make_client("dev-1", server.port)

        @client.handler
        async def handle(msg: Message) -> Any:
            if msg.payload == {"op": "fail"}:
                raise ValueError("disk full")
            if isinstance(msg.payload, bytes):
                return msg.payload[::-1]
            return {"ok": True, "echo": msg.payload}

        async with running(client):
            assert await server.send_to("dev-1", {"op": "x"}, wait_ack=True) == {
                "ok": True,
                "echo": {"op": "x"},
            }
            assert await server.send_to("dev-1", b"\x00\x01\x02", wait_ack=True) == b"\x02\x01\x00"
            with pytest.raises(RemoteError) as e:
                await server.send_to("dev-1", {"op": "fail"}, wait_ack=True)
            assert e.value.error_type == "ValueError" and e.value.message == "disk full"
            msg_id = await server.send_to("dev-1", {"op": "fire"})
            assert isinstance(msg_id, str) and len(msg_id) == 32
            assert len(server.pending) == 0


async def test_client_to_server_waitack(make_server, make_client):
    async with make_server() as server:

        @server.handler
        def on_client_message(msg: Message) -> Any:  # a sync handler
            return {"from": msg.client_id, "temp": msg.payload["temp"]}

        client = make_client("dev-1", server.port)
        async with running(client):
            assert await client.send({"temp": 21}, wait_ack=True) == {"from": "dev-1", "temp": 21}


async def test_handler_too_slow_gives_ack_timeout_then_late_result_is_dropped(
    make_server, make_client, events
):
    async with make_server() as server:
        client = make_client("dev-1", server.port)
        release = asyncio.Event()

        @client.handler
        async def slow(msg: Message) -> str:
            await release.wait()
            return "late"

        async with running(client):
            t0 = time.perf_counter()
            with pytest.raises(AckTimeout):
                await server.send_to("dev-1", {"op": "slow"}, wait_ack=True, timeout=0.2)
            assert 0.19 <= time.perf_counter() - t0 < 1.0
            assert len(server.pending) == 0
            await events.wait("ack.timed_out", client_id="dev-1")
            release.set()
            await events.wait("ack.late", client_id="dev-1")
            # the connection survived the late result
            assert await server.send_to("dev-1", {"op": "again"}, wait_ack=True) == "late"


async def test_unknown_client_fails_at_once(make_server, events):
    async with make_server() as server:
        t0 = time.perf_counter()
        with pytest.raises(ClientNotConnected):
            await server.send_to("nobody", {"op": 1}, wait_ack=True, timeout=30)
        assert time.perf_counter() - t0 < 0.05
        ev = await events.wait("send.rejected")
        assert ev.reason == "not_connected" and ev.client_id == "nobody"


async def test_payload_too_large_is_refused_locally(make_server, make_client):
    async with make_server(max_payload=1000) as server:
        client = make_client("dev-1", server.port)
        async with running(client):
            with pytest.raises(PayloadTooLarge):
                await server.send_to("dev-1", b"x" * 1001)
            with pytest.raises(PayloadTooLarge):  # the server told the client its limit
                await client.send(b"x" * 1001)


async def test_crashed_client_is_evicted_and_others_are_undisturbed(
    make_server, make_client, events
):
    async with make_server() as server:
        victim = make_client("victim", server.port)
        healthy = make_client("healthy", server.port)
        healthy.handler(lambda m: m.payload)
        server.handler(lambda m: m.payload)
        async with running(victim, healthy):
            pending = asyncio.ensure_future(
                server.send_to("victim", {"op": 1}, wait_ack=True, timeout=30)
            )
            await events.wait("message.received", client_id="victim", role="client")
            # crash: the process vanishes without a CONNECTION_CLOSE
            victim._conn._transport.abort()
            victim._task.cancel()
            t0 = time.perf_counter()
            ev = await events.wait("heartbeat.timed_out", role="server", client_id="victim")
            elapsed = time.perf_counter() - t0
            assert elapsed <= 0.6 + 0.3  # interval × misses = 0.6 s, plus timer slack
            assert ev.silent_for >= 0.6
            with pytest.raises(ClientGone):
                await pending
            assert server.client("victim") is None
            for i in range(20):
                assert await healthy.send(i, wait_ack=True, timeout=2) == i
                assert await server.send_to("healthy", i, wait_ack=True, timeout=2) == i
            assert not events.of("disconnected", client_id="healthy")


async def test_outage_then_reconnect(make_server, make_client, events):
    async with make_server() as server:
        relay = await UdpRelay.start(("127.0.0.1", server.port))
        try:
            client = make_client("dev-1", relay.port)
            client.handler(lambda m: "pong")
            async with running(client):
                relay.blackhole = True
                await events.wait("heartbeat.timed_out", role="client", timeout=5)
                await events.wait("heartbeat.timed_out", role="server", timeout=5)
                await events.wait("state.changed", new="backoff")
                assert client.state in (ClientState.BACKOFF, ClientState.CONNECTING)
                with pytest.raises(NotConnected):
                    await client.send("x")
                relay.blackhole = False
                await client.wait_connected(10)
                assert await server.send_to("dev-1", "ping", wait_ack=True, timeout=5) == "pong"
            kinds = [e.kind for e in events.items if e.role == "client"]
            assert "reconnect.scheduled" in kinds
        finally:
            relay.close()


async def test_connect_refused_is_retried_with_backoff(make_client, events):
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    client = make_client("dev-1", port, backoff_initial=0.05, backoff_max=0.1)
    async with client:
        await events.wait("reconnect.scheduled", attempt=2)
    fails = events.of("connect.failed")
    assert fails and fails[0].reason == "refused"  # at once, from the ICMP error
    delays = [e.delay for e in events.of("reconnect.scheduled")]
    assert 0.04 <= delays[0] <= 0.05 and 0.08 <= delays[1] <= 0.1


async def test_wrong_ca_is_a_tls_failure(make_server, make_client, events, tmp_path):
    from backbone.certs import make_dev_certs

    other = make_dev_certs(tmp_path / "other")
    async with make_server() as server:
        client = make_client("dev-1", server.port, cafile=str(other.ca_cert))
        async with client:
            ev = await events.wait("connect.failed", timeout=5)
            assert ev.reason == "tls"
            await events.wait("reconnect.scheduled")
            assert client.state is not ClientState.CONNECTED
        assert server.clients() == []


async def test_duplicate_client_id_newest_wins(make_server, make_client, events):
    async with make_server() as server:
        first = make_client("dup", server.port)
        first.handler(lambda m: "first")
        async with running(first):
            second = make_client("dup", server.port, backoff_initial=5.0, backoff_max=5.0)
            second.handler(lambda m: "second")
            async with running(second):
                ev = await events.wait("disconnected", role="server", reason="replaced")
                assert ev.client_id == "dup"
                assert await server.send_to("dup", 1, wait_ack=True) == "second"


async def test_receiver_that_raises_never_breaks_the_data_path(make_server, make_client):
    def broken(sender: Any, event: Any) -> None:
        raise RuntimeError("plugin bug")

    signals.on_message_sent.connect(broken, weak=False)
    signals.on_ack.connect(broken, weak=False)
    try:
        async with make_server() as server:
            client = make_client("dev-1", server.port)
            client.handler(lambda m: m.payload)
            async with running(client):
                for i in range(10):
                    assert await server.send_to("dev-1", i, wait_ack=True) == i
        assert signals.receiver_failures[broken.__qualname__] >= 10
    finally:
        signals.on_message_sent.disconnect(broken)
        signals.on_ack.disconnect(broken)


async def test_slow_consumer_gets_backpressure(make_server, make_client, events):
    async with make_server(max_payload=16_384, outbound_buffer_limit=65_536) as server:
        relay = await UdpRelay.start(("127.0.0.1", server.port))
        try:
            client = make_client("dev-1", relay.port, heartbeat_interval=5.0)
            got = []
            client.handler(lambda m: got.append(1))
            async with running(client):
                relay.blackhole = True  # the client stops reading: nothing is acknowledged
                with pytest.raises(Backpressure):
                    for _ in range(100):
                        await server.send_to("dev-1", b"x" * 10_000)
                        await asyncio.sleep(0)
                info = server.client("dev-1")
                assert info.outbound_buffered <= 65_536
                ev = await events.wait("send.rejected", reason="backpressure")
                assert ev.client_id == "dev-1"
        finally:
            relay.close()


async def test_slow_consumer_disconnect_policy(make_server, make_client, events):
    async with make_server(
        max_payload=16_384, outbound_buffer_limit=65_536, slow_consumer_policy="disconnect"
    ) as server:
        relay = await UdpRelay.start(("127.0.0.1", server.port))
        try:
            client = make_client("dev-1", relay.port, heartbeat_interval=5.0)
            async with running(client):
                relay.blackhole = True
                with pytest.raises(Backpressure):
                    for _ in range(100):
                        await server.send_to("dev-1", b"x" * 10_000)
                        await asyncio.sleep(0)
                ev = await events.wait("disconnected", role="server")
                assert ev.reason == "slow_consumer"
                assert server.client("dev-1") is None
        finally:
            relay.close()


async def test_server_stop_fails_pending_and_clients_reconnect_to_new_server(
    make_server, make_client, events, certs
):
    from backbone import Server

    async with make_server() as server:
        port = server.port
        client = make_client("dev-1", port)
        block = asyncio.Event()

        @client.handler
        async def h(msg: Message) -> str:
            if msg.payload == "block":
                await block.wait()
            return "ok"

        async with running(client):
            pending = asyncio.ensure_future(server.send_to("dev-1", "block", wait_ack=True))
            await events.wait("message.received", role="client")
            await server.stop(grace=0.1)
            with pytest.raises(ClientGone, match="server closing"):
                await pending
            await events.wait("goaway.received")
            await events.wait("disconnected", role="client")
            block.set()
            async with Server(
                "127.0.0.1",
                port,
                certfile=str(certs.server_cert),
                keyfile=str(certs.server_key),
                heartbeat_interval=0.2,
            ) as again:
                await client.wait_connected(10)
                assert await again.send_to("dev-1", "hi", wait_ack=True) == "ok"


async def test_a_cancelled_stop_still_closes_everything(make_server, make_client, events):
    """stop() cancelled while it waits out the grace (an outer timeout, Ctrl-C): pending
    results still fail with "server closing", the connections are closed and the socket
    released.  (It left the server half-stopped, and stop() would not run again.)"""
    async with make_server() as server:
        client = make_client("dev-1", server.port)
        block = asyncio.Event()

        @client.handler
        async def h(msg: Message) -> str:
            await block.wait()
            return "ok"

        async with running(client):
            pending = asyncio.ensure_future(server.send_to("dev-1", "block", wait_ack=True))
            await events.wait("message.received", role="client")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(server.stop(grace=30), 0.2)
            with pytest.raises(ClientGone, match="server closing"):
                await pending
            assert server._quic_server is None and len(server.pending) == 0
            await events.wait("disconnected", role="server", client_id="dev-1")
            await events.wait("disconnected", role="client", client_id="dev-1")
            assert events.of("server.stopped")
            block.set()
