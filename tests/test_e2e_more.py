"""More end-to-end guarantees: heartbeat independence, ordering client → server, backoff
reset, events built only when someone listens, MsgIDs unique across restarts."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import pytest

from backbone import Message, signals
from backbone.ids import MsgIdGenerator

from .test_e2e import running


async def test_heartbeats_survive_big_messages_and_a_busy_handler(make_server, make_client, events):
    # 0.2 s heartbeats, evict after 1 s: a heartbeat queued behind three 1 MiB messages, or a
    # handler blocking its thread for 2.5 s, would be noticed. (1 s, not less: on a loaded
    # 2-vCPU machine pongs were seen 180 ms apart, and a 0.3 s timeout failed once in CI.)
    async with make_server(
        heartbeat_interval=0.2, heartbeat_misses=5, max_payload=1024 * 1024
    ) as server:
        client = make_client(
            "busy", server.port, heartbeat_interval=0.2, heartbeat_misses=5, max_payload=1024 * 1024
        )
        stop = threading.Event()
        calls: list[int] = []

        @client.handler
        def handle(msg: Message) -> int:  # sync: runs in a worker thread
            calls.append(len(msg.payload))
            if len(calls) == 1:
                stop.wait(2.5)  # the first one is busy for 2.5 s: more than two timeouts
            return len(msg.payload)

        async with running(client):
            big = b"x" * (1024 * 1024 - 100)
            results = await asyncio.gather(
                *(server.send_to("busy", big, wait_ack=True, timeout=20) for _ in range(3))
            )
            assert results == [len(big)] * 3
            stop.set()
            beats = events.of("heartbeat.received", client_id="busy")
            assert len(beats) >= 10
        assert not events.of("heartbeat.timed_out")
        assert not [
            e
            for e in events.of("disconnected")
            if e.reason != "closed_by_client" and e.reason != "closed"
        ]


async def test_client_to_server_order_is_kept(make_server, make_client):
    async with make_server() as server:
        seen: list[int] = []

        @server.handler
        async def on_msg(msg: Message) -> None:
            seen.append(msg.payload)

        client = make_client("dev-1", server.port)
        async with running(client):
            for i in range(500):
                await client.send(i)
            assert await client.send(-1, wait_ack=True) is None
        assert seen == [*range(500), -1]


async def test_backoff_resets_after_a_stable_connection(make_server, make_client, events):
    async with make_server() as server:
        client = make_client(
            "dev-1", server.port, backoff_reset_after=0.0, backoff_initial=0.05, backoff_jitter=0.0
        )
        async with running(client):
            client.backoff.attempt = 5  # as if it had failed five times before
            assert server.evict("dev-1")
            ev = await events.wait("reconnect.scheduled")
            assert ev.delay == pytest.approx(0.05)
            await events.wait("connected", role="client", timeout=5)


async def test_events_are_not_built_when_nobody_listens(make_server, make_client, monkeypatch):
    import backbone._link as link_mod

    def explode(*args: Any, **kw: Any) -> None:
        raise AssertionError("an event (or a batch row) was built with no listener")

    # every per-message step's event is built from its row by STEP_EVENT, and its row
    # goes to the batches through Link._step
    monkeypatch.setattr(link_mod, "STEP_EVENT", dict.fromkeys(link_mod.STEP_EVENT, explode))
    monkeypatch.setattr(link_mod.Link, "_step", explode)
    monkeypatch.setattr(link_mod.Link, "_report", explode)
    assert not signals.on_event.receivers
    async with make_server() as server:
        client = make_client("dev-1", server.port)
        client.handler(lambda m: m.payload)
        async with running(client):
            assert await server.send_to("dev-1", 7, wait_ack=True) == 7


def test_msg_ids_are_unique_across_restarts():
    a, b = MsgIdGenerator(), MsgIdGenerator()
    ids_a = {a.next() for _ in range(1000)}
    ids_b = {b.next() for _ in range(1000)}
    assert len(ids_a) == 1000 and not ids_a & ids_b
    assert all(len(i) == 16 for i in ids_a)


async def test_handler_cancelling_its_own_work_does_not_kill_the_worker(make_server, make_client):
    async with make_server() as server:
        client = make_client("dev-1", server.port)

        @client.handler
        async def handle(msg: Message) -> Any:
            if msg.payload == "cancel-inside":
                inner = asyncio.ensure_future(asyncio.sleep(10))
                await asyncio.sleep(0)
                inner.cancel()
                await inner  # raises CancelledError inside the handler
            return msg.payload

        async with running(client):
            from backbone import RemoteError

            with pytest.raises(RemoteError) as e:
                await server.send_to("dev-1", "cancel-inside", wait_ack=True, timeout=2)
            assert e.value.error_type == "CancelledError"
            assert await server.send_to("dev-1", "next", wait_ack=True, timeout=2) == "next"


async def test_a_slow_handler_pushes_back_on_the_sender(make_server, make_client, events):
    """QUIC acknowledges data on arrival, so byte accounting alone never notices a handler
    that falls behind; CREDIT frames do: the sender gets Backpressure at the peer's window,
    and room again once the handler catches up.  Nothing overflows, nothing is lost."""
    async with make_server() as server:
        client = make_client("slow", server.port, max_inbound_queue=100)
        gate = asyncio.Event()
        handled: list[int] = []

        @client.handler
        async def handle(msg: Message) -> None:
            await gate.wait()
            handled.append(msg.payload)

        async with running(client):
            sent = 0
            from backbone import Backpressure

            with pytest.raises(Backpressure) as e:
                for i in range(1000):
                    await server.send_to("slow", i)
                    sent += 1
            assert sent == 100 and e.value.unhandled == 100
            gate.set()
            # room again once credits come back.  No event marks a CREDIT's arrival, and
            # the client may handle its whole inbox in one loop pass before its CREDIT
            # reaches the server: retry after each handled message or 50 ms
            async with asyncio.timeout(5):
                while True:
                    try:
                        await server.send_to("slow", sent)
                        break
                    except Backpressure:
                        with contextlib.suppress(TimeoutError):
                            await events.wait_new("message.processed", role="client", timeout=0.05)
            assert await server.send_to("slow", -1, wait_ack=True, timeout=5) is None
            assert handled == [*range(sent + 1), -1]
        assert not events.of("protocol.violated")


async def test_late_results_give_the_handler_window_back(make_server, make_client, events):
    """Results that arrive after their sends timed out still say that the peer handled
    those messages: the window they took is given back.  (It was not: a peer whose
    handler outlasted ack_timeout four times stayed at its window of 4, and every later
    send was refused with Backpressure until a reconnect.)"""
    from backbone import AckTimeout

    async with make_server() as server:
        client = make_client("late-window", server.port, max_inbound_queue=4)
        gate = asyncio.Event()

        @client.handler
        async def handle(msg: Message) -> Any:
            await gate.wait()
            return {"got": msg.payload}

        async with running(client):
            sends = [server.send_to("late-window", i, wait_ack=True, timeout=0.1) for i in range(4)]
            outcomes = await asyncio.gather(*sends, return_exceptions=True)
            assert all(isinstance(o, AckTimeout) for o in outcomes), outcomes
            gate.set()  # the handler finishes all four: four late results
            await events.wait_count("ack.late", 4, client_id="late-window")
            assert await server.send_to("late-window", 5, wait_ack=True, timeout=5) == {"got": 5}
        assert not events.of("send.rejected", client_id="late-window")


@pytest.mark.parametrize("timeout", [float("nan"), 0.0, -1.0, float("inf")])
async def test_a_timeout_that_is_not_seconds_above_zero_is_refused(
    make_server, make_client, timeout
):
    async with make_server() as server:
        client = make_client("bad-timeout", server.port)
        client.handler(lambda m: m.payload)
        async with running(client):
            with pytest.raises(ValueError, match="timeout must be"):
                await server.send_to("bad-timeout", 1, wait_ack=True, timeout=timeout)
            with pytest.raises(ValueError, match="timeout must be"):
                await server.broadcast(1, wait_ack=True, timeout=timeout)
            with pytest.raises(ValueError, match="timeout must be"):
                await client.send(1, wait_ack=True, timeout=timeout)
            # nothing was left behind: a normal WaitAck still times out and answers
            assert await server.send_to("bad-timeout", 2, wait_ack=True, timeout=5) == 2
            assert len(server.pending) == 0


async def test_wrong_host_name_is_a_tls_failure(make_server, make_client, events):
    async with make_server() as server:
        client = make_client("dev-1", server.port, server_name="not-the-server.example")
        async with client:
            ev = await events.wait("connect.failed", timeout=5)
            assert ev.reason == "tls"
        assert server.clients() == []
        # a failed handshake is not the other side breaking QUIC
        assert not events.of("protocol.violated")


async def test_verification_off_connects_and_says_so_loudly(
    make_server, make_client, tmp_path, caplog
):
    from backbone.certs import make_dev_certs

    other = make_dev_certs(tmp_path / "other")
    async with make_server() as server:
        with caplog.at_level("WARNING", logger="backbone.client"):
            client = make_client("dev-1", server.port, cafile=str(other.ca_cert), verify=False)
        assert "verification is OFF" in caplog.text
        async with running(client):
            assert server.client("dev-1") is not None


async def test_too_many_pending_fails_at_once(make_server, make_client, events):
    from backbone import TooManyPending

    async with make_server(max_pending_per_client=2, max_pending_total=3) as server:
        a = make_client("a", server.port)
        b = make_client("b", server.port)
        gate = asyncio.Event()

        async def wait_gate(msg: Message) -> str:
            await gate.wait()
            return "done"

        a.handler(wait_gate)
        b.handler(wait_gate)
        async with running(a, b):
            first = [asyncio.ensure_future(server.send_to("a", i, wait_ack=True)) for i in (1, 2)]
            await asyncio.sleep(0)  # one pass: each send registers its entry before it awaits
            assert len(server.pending) == 2
            with pytest.raises(TooManyPending, match="per-peer"):
                await server.send_to("a", 3, wait_ack=True)
            third = asyncio.ensure_future(server.send_to("b", 1, wait_ack=True))
            await asyncio.sleep(0)
            assert len(server.pending) == 3
            with pytest.raises(TooManyPending, match="total"):
                await server.send_to("b", 2, wait_ack=True)
            ev = await events.wait("send.rejected", reason="too_many_pending")
            assert ev.msg_id is not None
            gate.set()
            assert await asyncio.gather(*first, third) == ["done"] * 3
            assert len(server.pending) == 0


async def test_a_welcome_in_the_pass_the_connect_timeout_fires_leaves_no_handler_task(
    make_server, make_client, events
):
    """A WELCOME and the client's connect timeout in one loop pass (a restart storm on a
    busy machine): the attempt fails with ``timeout``, and the link the WELCOME opened is
    shut down with it, not left with a pending handler task for the garbage collector
    ("Task was destroyed but it is pending!"); the client then connects normally."""
    blocked: list[bool] = []

    def stall_once(sender: object, event: object) -> None:
        # the server has queued the WELCOME, sent at the end of this read batch: block
        # the loop here past the client's deadline, so that on the next pass the client
        # reads the WELCOME and then runs its expired timeout (I/O callbacks go first)
        if not blocked and getattr(event, "role", None) == "server":
            blocked.append(True)
            time.sleep(0.8)

    signals.on_connected.connect(stall_once, weak=False)
    try:
        async with make_server() as server:
            client = make_client("stall-1", server.port, connect_timeout=0.5)

            @client.handler
            async def echo(msg: Message) -> object:
                return msg.payload

            async with client:
                failed = await events.wait("connect.failed", client_id="stall-1", timeout=5)
                assert failed.reason == "timeout"
                # the detail says how far the attempt got
                assert "(QUIC handshake complete;" in failed.detail, failed.detail
                await client.wait_connected(5)
                assert await server.send_to("stall-1", 5, wait_ack=True) == 5
                handlers = [
                    t
                    for t in asyncio.all_tasks()
                    if t.get_name() == "backbone-handler-stall-1" and not t.done()
                ]
                assert len(handlers) == 2, handlers  # the server's link and the client's
    finally:
        signals.on_connected.disconnect(stall_once)


async def test_a_refusal_read_in_the_pass_the_connect_timeout_fires_in_decides(
    make_server, make_client, events
):
    """A refusal and the client's connect timeout in one loop pass (a process hosting
    thousands of clients in a restart storm runs passes of seconds): the attempt fails as
    refused, with the server's hint, not as a timeout (which would back off as for a
    silent server)."""
    blocked: list[bool] = []

    def stall_once(sender: object, event: object) -> None:
        # the server is about to send its refusal: block the loop past the client's
        # deadline, so that on the next pass the client reads the refusal and then runs
        # its expired timeout (I/O callbacks go first)
        if not blocked:
            blocked.append(True)
            time.sleep(0.6)

    slow_beat = dict(heartbeat_interval=5.0)  # the 0.6 s stall must not evict "first"
    async with make_server(
        max_new_sessions_per_second=0.01, admission_burst=1, **slow_beat
    ) as server:
        first = make_client("first", server.port, **slow_beat)
        async with first:
            await first.wait_connected(5)  # took the only token
            signals.on_session_refused.connect(stall_once, weak=False)
            try:
                late = make_client("late", server.port, connect_timeout=0.3)
                async with late:
                    for _ in range(5):  # an attempt may time out before the server sees it
                        failed = await events.wait_new("connect.failed", client_id="late")
                        if blocked:
                            break
                    assert blocked
                    assert failed.reason == "rejected", failed.detail
                    assert "overloaded retry_after=" in failed.detail
                    scheduled = await events.wait("reconnect.scheduled", client_id="late")
                    assert scheduled.reason == "rejected"
            finally:
                signals.on_session_refused.disconnect(stall_once)


async def test_a_client_pings_on_the_wall_clock_grid(make_server, make_client, events):
    # heartbeat_align reaches the client's scheduler with the loop's offset from the wall
    # clock, and the pings after the first one are due on that grid
    async with make_server(heartbeat_interval=0.4) as server:
        client = make_client("aligned", server.port, heartbeat_interval=0.4, heartbeat_align=0.05)
        async with running(client):
            await events.wait_count("heartbeat.acknowledged", 3, role="client")
            conn = client._conn
            assert conn is not None
            hb = conn.session.heartbeat
            loop = asyncio.get_running_loop()
            assert hb.align == 0.05
            assert hb.wall_offset == pytest.approx(time.time() - loop.time(), abs=0.05)
            k = (hb.next_ping_at + hb.wall_offset) / 0.05
            assert k == pytest.approx(round(k), abs=1e-6)
            assert 0 < hb.next_ping_at - loop.time() <= 0.4 + 0.025


async def test_a_client_reads_its_socket_before_it_declares_the_server_dead(
    make_server, make_client, events
):
    # A loop that fell behind can run the heartbeat timer before reading the datagram
    # that answers the ping.  Here the client's reader is unhooked, the server's answer
    # to a ping waits in the socket, and the timer runs as if the silence had lasted: the
    # client reads first, finds the answer and stays connected.
    import os

    async with make_server(heartbeat_interval=0.2, heartbeat_misses=3) as server:
        client = make_client("lagging", server.port, heartbeat_interval=0.2, heartbeat_misses=3)
        async with running(client):
            await events.wait("heartbeat.acknowledged", role="client")
            conn = client._conn
            assert conn is not None and conn.reader is not None
            loop = asyncio.get_running_loop()
            fd = conn.reader._sock.fileno()
            loop._remove_reader(fd)  # type: ignore[attr-defined]
            try:
                if conn._hb_timer is not None:
                    conn._hb_timer.cancel()
                hb = conn.session.heartbeat
                hb.next_ping_at = loop.time()
                conn._on_timer()  # sends a ping, re-arms
                assert conn._hb_timer is not None
                conn._hb_timer.cancel()
                # wait until its answer is in the socket, without reading it: a second
                # descriptor of the same socket, watched by the loop
                watch = os.dup(fd)
                arrived: asyncio.Future[None] = loop.create_future()
                loop.add_reader(watch, lambda: arrived.done() or arrived.set_result(None))
                try:
                    await asyncio.wait_for(arrived, 5.0)
                finally:
                    loop.remove_reader(watch)
                    os.close(watch)
                # as if 10 s had passed with every ping unanswered
                assert hb._sent
                hb.last_pong_at = loop.time() - 10.0
                for nonce in hb._sent:
                    hb._sent[nonce] = loop.time() - 10.0
                assert hb.server_dead(loop.time())
                conn._on_timer()
                assert not conn.terminated_reported
                assert not hb.server_dead(loop.time())
                assert hb.last_pong_at is not None and loop.time() - hb.last_pong_at < 1.0
            finally:
                if not conn.terminated_reported:
                    loop._add_reader(fd, conn.reader._read_ready)  # type: ignore[attr-defined]
            await events.wait("heartbeat.acknowledged", role="client")
            assert client.connected
            assert not events.of("disconnected", client_id="lagging")


async def test_a_send_in_the_pass_the_connection_ended_is_refused(make_server, make_client):
    """Between a connection's end and the client's state change (the next loop pass) a
    send must not be queued on the dead connection and reported as sent."""
    from backbone import NotConnected

    async with make_server() as server:
        client = make_client("ended", server.port)
        async with running(client):
            conn = client._conn
            assert conn is not None
            conn.terminated_reported = True  # what the end of the connection sets first
            with pytest.raises(NotConnected):
                await client.send("lost?")
            conn.terminated_reported = False


async def test_what_a_connection_end_drops_is_counted_in_its_event(
    make_server, make_client, events
):
    """Received messages still waiting for the handler, and frames never handed to QUIC,
    are dropped with the connection: counted in ``disconnected`` and logged, not lost
    without a word."""
    async with make_server() as server:
        gate = asyncio.Event()

        @server.handler
        async def stuck(msg: Message) -> None:
            await gate.wait()

        client = make_client("dropper", server.port)
        async with running(client):
            for i in range(10):
                await client.send(i)
            await events.wait_count("message.received", 10, role="server", client_id="dropper")
        ended = await events.wait("disconnected", role="server", client_id="dropper")
        assert ended.unhandled == 10  # one in the handler, nine behind it
        assert ended.unsent == 0
        gate.set()

        quiet = make_client("unsent", server.port)
        async with running(quiet):
            await server.send_to("unsent", "queued, not yet written")  # returns once queued
            assert server.evict("unsent")  # in the same loop pass: never handed to QUIC
            ended = await events.wait("disconnected", role="server", client_id="unsent")
        assert (ended.unhandled, ended.unsent) == (0, 1)


async def test_a_handler_error_that_is_not_valid_utf8_still_answers(make_server, make_client):
    """The error RESULT of a handler whose exception text holds a lone surrogate (a name
    decoded with surrogateescape) still goes out: the sender gets RemoteError, not an
    AckTimeout after its whole timeout."""
    from backbone import RemoteError

    async with make_server() as server:
        client = make_client("utf8", server.port)

        @client.handler
        def fails(msg: Message) -> None:
            raise ValueError(b"no file named \xff".decode("utf-8", "surrogateescape"))

        async with running(client):
            with pytest.raises(RemoteError) as err:
                await server.send_to("utf8", 1, wait_ack=True, timeout=5)
            assert err.value.error_type == "ValueError"
            assert err.value.message == "no file named \\udcff"


async def test_a_client_closed_right_after_start_says_so(make_server, make_client, events):
    """close() before the connection task took its first step: the client still ends
    CLOSED, with its state.changed, not IDLE for ever."""
    from backbone import ClientState, NotConnected

    async with make_server() as server:
        client = make_client("brief", server.port)
        await client.start()
        await client.close()
        assert client.state is ClientState.CLOSED
        changed = events.of("state.changed", client_id="brief")
        assert [(e.old, e.new) for e in changed] == [("idle", "closed")]
        with pytest.raises(NotConnected, match="closed"):
            await client.wait_connected(1)


async def test_big_results_in_one_pass_are_all_delivered(make_server, make_client, events):
    """Nine WaitAck commands whose results are about 1 MB each, handled in one loop
    pass: more than twice outbound_buffer_limit at once.  Every result arrives; the
    handler only waits while the peer holds more than the limit."""
    async with make_server() as server:
        big = "x" * 1_000_000

        @server.handler
        async def answer(msg: Message) -> str:
            return big

        client = make_client("big-results", server.port)
        async with running(client):
            results = await asyncio.gather(
                *(client.send(i, wait_ack=True, timeout=20) for i in range(9))
            )
            assert results == [big] * 9
        assert not events.of("disconnected", role="server", reason="slow_consumer")


async def test_wait_connected_returns_when_the_connection_ends_right_away(
    make_server, make_client, events
):
    """Connected, then evicted in the next loop pass: wait_connected() returns (the client
    was connected), it does not say the client has stopped; the client reconnects."""
    async with make_server() as server:
        loop = asyncio.get_running_loop()
        evicted: list[str] = []

        def evict_once(sender: Any, event: Any) -> None:
            if event.role == "server" and not evicted:
                evicted.append(event.client_id)
                loop.call_soon(server.evict, event.client_id)

        signals.on_connected.connect(evict_once, weak=False)
        try:
            client = make_client("brief-2", server.port, backoff_initial=0.05, backoff_max=0.1)
            async with running(client):
                await client.wait_connected(5)
                await events.wait("disconnected", role="client", client_id="brief-2")
                await events.wait_count("connected", 2, role="client", client_id="brief-2")
                await client.wait_connected(5)
        finally:
            signals.on_connected.disconnect(evict_once)
        assert evicted == ["brief-2"]


async def test_a_client_closed_in_the_pass_its_welcome_came_reports_no_session(
    make_server, make_client, events, monkeypatch
):
    """close() in the loop pass the WELCOME arrived in: the session was never reported
    connected, so no disconnected may be reported for it either (a connections gauge
    went to -1)."""
    from backbone import ClientState
    from backbone.client import _ClientConnection

    async with make_server() as server:
        client = make_client("welcome-close", server.port)
        original = _ClientConnection.stream_data
        cancelled = asyncio.Event()

        def then_close(self: Any, stream_id: int, data: bytes, end_stream: bool) -> None:
            original(self, stream_id, data, end_stream)
            if self.welcomed.done() and not client._closing:
                # what close() does before its first await, in this very pass
                client._closing = True
                assert client._task is not None
                client._task.cancel()
                cancelled.set()

        monkeypatch.setattr(_ClientConnection, "stream_data", then_close)
        await client.start()
        await asyncio.wait_for(cancelled.wait(), 5)
        await asyncio.gather(client._task, return_exceptions=True)  # its cancellation ran
        await client.close()
        assert client.state is ClientState.CLOSED
        assert not events.of("connected", role="client", client_id="welcome-close")
        assert not events.of("disconnected", role="client", client_id="welcome-close")
