"""Overload: a server short of CPU degrades gracefully and recovers by itself.

The server runs on its own event loop in a thread, so only the server is slowed; the 60
clients and the test run on the test's loop.  For 4 s every datagram the server reads
costs it an extra 3.5 ms (a blocking hook: a CPU shortfall of the kind tracemalloc or a
busy machine causes).  That caps it at ~280 datagrams/s while its clients offer more:
heartbeats every 0.2 s, the ACKs of the PONGs, WaitAck traffic, and then reconnects.

Before the fix (docs/reliability.md §5.1) the datagrams queued for seconds in the 4 MiB
socket buffer: the server read stale pings, evicted every client (60–95 heartbeat
evictions in 4 s, some clients twice) and read only 0–45 pings of live sessions.  Now it
drains its socket, drops datagrams that waited longer than two heartbeat intervals,
holds evictions while it is behind and refuses new handshakes before the TLS
work: it keeps reading pings (145–239), and every client is back soon after the overload.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from backbone import AckTimeout, ClientGone, ClientNotConnected, Server, signals
from backbone.admission import HandshakeGate, TokenBucket
from backbone.errors import ErrorCode
from backbone.events import Event

from .conftest import Events

T = TypeVar("T")

CLIENTS = 60
HEARTBEAT = dict(heartbeat_interval=0.2, heartbeat_misses=3)  # 0.6 s budget
EXTRA_COST_PER_DATAGRAM = 0.0035  # the server reads at most ~280 datagrams/s
PINGS_READ_AT_LEAST = 60  # during the overload; before the fix 0–45, after it 145–239
OVERLOAD_SECONDS = 4.0
SEND_EVERY = 0.5  # seconds between WaitAck sends to each client
RECOVERY_BOUND = 6.0  # seconds after the overload until every client has a session again


class ServerThread:
    """A Server on its own event loop in a thread; ``slow`` makes each datagram it reads
    cost ``EXTRA_COST_PER_DATAGRAM`` more (a blocking sleep on the server's loop)."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.slow = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: Server | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = Server("127.0.0.1", 0, **self.settings)

        @server.handler
        async def echo(msg: Any) -> Any:
            return msg.payload

        async with server:
            quic_server = server._quic_server
            receive = quic_server.datagram_received

            def slow_receive(data: bytes, addr: Any) -> None:
                if self.slow:
                    time.sleep(EXTRA_COST_PER_DATAGRAM)
                receive(data, addr)

            quic_server.datagram_received = slow_receive
            self.server = server
            self._started.set()
            await self._stop.wait()
            await server.stop(grace=0)

    async def start(self) -> Server:
        self._thread.start()
        await asyncio.to_thread(self._started.wait, 10)
        assert self.server is not None
        return self.server

    def run(self, coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
        """Run a coroutine on the server's loop; awaitable from the test's loop."""
        assert self.loop is not None
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        await asyncio.to_thread(self._thread.join, 10)


def record_events(events: Events) -> Callable[[Any, Event], None]:
    """Events from both loops into ``events``, always on the test's loop."""
    loop = asyncio.get_running_loop()
    test_thread = threading.get_ident()

    def receiver(sender: Any, event: Event) -> None:
        if threading.get_ident() == test_thread:
            events(sender, event)
        else:
            loop.call_soon_threadsafe(events, sender, event)

    signals.on_event.connect(receiver, weak=False)
    return receiver


async def test_overloaded_server_degrades_gracefully_and_recovers(certs, make_client):
    events = Events()
    receiver = record_events(events)
    st = ServerThread(
        certfile=str(certs.server_cert), keyfile=str(certs.server_key), close_grace=0, **HEARTBEAT
    )
    server = await st.start()
    handled: collections.Counter[tuple[str, int]] = collections.Counter()
    clients = []
    for i in range(CLIENTS):
        client = make_client(f"ov{i:02d}", server.port, **HEARTBEAT, connect_timeout=3.0)

        @client.handler
        async def echo(msg: Any, cid: str = client.client_id) -> Any:
            handled[(cid, msg.payload["n"])] += 1
            return msg.payload

        clients.append(client)
    outcomes: dict[tuple[str, int], list[str]] = collections.defaultdict(list)
    traffic_stop = asyncio.Event()

    async def traffic(cid: str) -> None:
        """A WaitAck send to one client every ``SEND_EVERY`` s, from the server's loop."""
        n = 0
        while not traffic_stop.is_set():
            n += 1
            try:
                result = await st.run(server.send_to(cid, {"n": n}, wait_ack=True, timeout=2.0))
                outcomes[(cid, n)].append("result" if result == {"n": n} else "wrong")
            except ClientNotConnected:
                outcomes[(cid, n)].append("not_connected")
                with contextlib.suppress(TimeoutError):
                    await events.wait_new("connected", timeout=0.5, role="server", client_id=cid)
            except (AckTimeout, ClientGone) as exc:
                outcomes[(cid, n)].append(type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(traffic_stop.wait(), SEND_EVERY)

    try:
        async with contextlib.AsyncExitStack() as stack:
            for c in clients:
                await stack.enter_async_context(c)
            async with asyncio.timeout(20):
                await asyncio.gather(*(c.wait_connected() for c in clients))
            senders = [asyncio.create_task(traffic(c.client_id)) for c in clients]
            events.items.clear()

            st.slow = True
            await asyncio.sleep(OVERLOAD_SECONDS)  # the overload lasts this long
            st.slow = False
            overload_ended = time.monotonic()
            during = list(events.items)
            # every client has a session again, and the server agrees
            try:
                async with asyncio.timeout(RECOVERY_BOUND):
                    while not (
                        all(c.connected for c in clients)
                        and set(await st.run(_client_ids(server))) == {c.client_id for c in clients}
                    ):
                        with contextlib.suppress(TimeoutError):
                            await events.wait_new("connected", timeout=0.2, role="client")
                recovered_in: float | None = time.monotonic() - overload_ended
            except TimeoutError:
                recovered_in = None
            connected_at_bound = sum(c.connected for c in clients)
            traffic_stop.set()
            async with asyncio.timeout(10):  # every send resolves (ack timeout 2 s)
                await asyncio.gather(*senders)
    finally:
        await st.stop()
        signals.on_event.disconnect(receiver)

    kinds = collections.Counter(
        (e.kind, e.role, getattr(e, "reason", ""))
        for e in during
        if e.kind in ("disconnected", "session.refused", "heartbeat.timed_out", "connected")
    )
    evicted = kinds[("heartbeat.timed_out", "server", "")]
    pings_read = sum(1 for e in during if e.kind == "heartbeat.received")
    results = collections.Counter(o for seq in outcomes.values() for o in seq)
    print(
        f"\noverload {OVERLOAD_SECONDS:g} s ({EXTRA_COST_PER_DATAGRAM * 1000:g} ms more per "
        f"datagram): {evicted} heartbeat evictions, {pings_read} pings read; all {CLIENTS} "
        f"clients back {'never' if recovered_in is None else f'{recovered_in:.2f} s'} after it "
        f"({connected_at_bound} at the bound); outcomes {dict(results)}; during it {dict(kinds)}"
    )
    # graceful: the server kept reading its clients' pings
    assert pings_read >= PINGS_READ_AT_LEAST
    # and recovered by itself
    assert recovered_in is not None, f"{connected_at_bound} of {CLIENTS} clients connected"

    # each send resolved exactly once, and a result is the right one
    assert all(len(seq) == 1 for seq in outcomes.values())
    sent = sum(1 for seq in outcomes.values() if seq != ["not_connected"])
    endings = collections.Counter(
        e.msg_id
        for e in events.items
        if e.role == "server" and e.kind in ("ack.received", "ack.timed_out", "ack.failed")
    )
    assert len(endings) == sent and set(endings.values()) == {1}
    assert results["wrong"] == 0
    # no message was handled twice
    assert max(handled.values()) == 1
    assert results["result"] > 0


async def _client_ids(server: Server) -> list[str]:
    return server.client_ids()


# --- the gate before the handshake ---------------------------------------------------------


def test_gate_admits_within_the_budget_and_none_while_behind():
    gate = HandshakeGate(TokenBucket(rate=100.0, burst=5, now=0.0), behind_after=0.1)
    assert [gate.check(0.0, waited=0.0) for _ in range(6)] == [None] * 5 + ["overloaded"]
    assert gate.check(0.01, waited=0.0) is None  # the bucket refilled one token
    # behind: refused whatever the bucket holds, and without taking a token
    assert gate.check(1.0, waited=0.5) == "server_behind"
    assert [gate.check(1.0, waited=0.1) for _ in range(6)] == [None] * 5 + ["overloaded"]


def test_gate_admits_no_more_than_max_in_flight_handshakes():
    gate = HandshakeGate(TokenBucket(rate=100.0, burst=4, now=0.0), 0.1, max_in_flight=4)
    assert gate.check(0.0, waited=0.0) is None
    gate.opened()
    assert gate.check(0.0, waited=0.0) is None
    gate.opened()
    # half the places taken: a packet without a token is sent through a Retry (no token
    # of the bucket taken), one that answers a Retry still gets a place
    assert gate.check(0.0, waited=0.0) == "retry"
    assert gate.check(0.0, waited=0.0, validated=True) is None
    gate.opened()
    assert gate.check(0.0, waited=0.0, validated=True) is None  # the bucket's last token
    gate.opened()
    # all four open: refused, with or without a token, and no bucket token taken
    assert gate.check(0.0, waited=0.0, validated=True) == "handshakes_in_flight"
    assert gate.check(0.0, waited=0.0) == "retry"
    assert gate.check(0.0, waited=0.5) == "server_behind"  # behind is still said first
    for _ in range(3):
        gate.finished()
    assert gate.in_flight == 1
    assert gate.check(0.0, waited=0.0) == "overloaded"  # the bucket still applies
    assert gate.check(0.01, waited=0.0) is None  # refilled one token
    # retry_above: 1 never sends a Retry, 0 always does (for packets without a token)
    never = HandshakeGate(TokenBucket(0.0, 1, 0.0), 0.1, max_in_flight=4, retry_above=1.0)
    always = HandshakeGate(TokenBucket(0.0, 1, 0.0), 0.1, max_in_flight=4, retry_above=0.0)
    for _ in range(3):
        never.opened()
        always.opened()
    assert never.check(0.0, waited=0.0) is None
    assert always.check(0.0, waited=0.0) == "retry"
    assert always.check(0.0, waited=0.0, validated=True) is None
    unlimited = HandshakeGate(TokenBucket(rate=0.0, burst=1, now=0.0), 0.1, max_in_flight=0)
    for _ in range(1000):
        unlimited.opened()
    assert unlimited.check(0.0, waited=0.0) is None


def test_refused_clients_are_given_slots_at_the_admission_rate():
    from backbone.admission import ReturnSchedule

    returns = ReturnSchedule(first=0.5, longest=3.0)
    # ten refused at once, 4 admitted a second: back 0.25 s apart, from 0.5 s on
    slots = [returns.next_slot(10.0, rate=4.0) for _ in range(10)]
    assert slots == pytest.approx([0.5 + 0.25 * i for i in range(10)])
    # none further than `longest`: those get `longest` and take no slot
    assert [returns.next_slot(10.0, rate=4.0) for _ in range(3)] == [3.0, 3.0, 3.0]
    # time passes: the next slot is after the last one given, or `first` from now
    assert returns.next_slot(11.0, rate=4.0) == pytest.approx(2.0)  # 13.0 - 11.0
    assert returns.next_slot(20.0, rate=1.0) == pytest.approx(0.5)
    assert returns.next_slot(20.0, rate=1.0) == pytest.approx(1.5)


def test_the_return_rate_follows_the_budget_or_how_fast_handshakes_finish():
    from backbone.admission import RATE_MEMORY

    gate = HandshakeGate(TokenBucket(rate=50.0, burst=4, now=0.0), 0.1, max_in_flight=8)
    # the budget is spent: its rate; places all taken, nothing measured yet: the same
    assert gate.admit_rate(0.0, "overloaded") == 50.0
    assert gate.admit_rate(0.0, "handshakes_in_flight") == 50.0
    for _ in range(8):
        gate.opened()
    for _ in range(5):  # 5 finish in the next 2 s: 2.5 a second
        gate.finished()
    assert gate.admit_rate(2.0, "handshakes_in_flight") == pytest.approx(2.5)
    assert gate.admit_rate(2.0, "overloaded") == 50.0
    for _ in range(3):
        gate.finished()
    assert gate.admit_rate(2.5, "handshakes_in_flight") == pytest.approx(2.5)  # < 1 s: kept
    assert gate.admit_rate(3.5, "handshakes_in_flight") == pytest.approx(3 / 1.5)
    # never below MIN_ADMIT_RATE, never above the budget
    assert gate.admit_rate(5.0, "handshakes_in_flight") == 1.0
    for _ in range(200):
        gate.opened()
        gate.finished()
    assert gate.admit_rate(6.0, "handshakes_in_flight") == 50.0
    # an old measurement is forgotten: it was another overload
    later = 6.0 + RATE_MEMORY + 1
    assert gate.admit_rate(later, "handshakes_in_flight") == 50.0
    assert gate.finish_rate is None
    # slots of the gate's schedule: 1 / rate apart
    first = gate.come_back_in(later, "overloaded")
    assert gate.come_back_in(later, "overloaded") == pytest.approx(first + 1 / 50.0)
    unlimited = HandshakeGate(TokenBucket(rate=0.0, burst=1, now=0.0), 0.1, max_in_flight=4)
    assert unlimited.admit_rate(0.0, "handshakes_in_flight") == 4.0


def test_a_refusal_phrase_carries_when_to_come_back():
    from backbone.admission import parse_refusal_hint, refusal_phrase

    phrase = refusal_phrase("handshakes_in_flight", 12.3456, 1.0)
    assert phrase == "handshakes_in_flight retry_after=12.346 window=1.000"
    assert len(phrase.encode()) <= 100  # what the refusal packet carries
    assert parse_refusal_hint(phrase) == (12.346, 1.0)
    assert parse_refusal_hint("overloaded") is None  # an older server: back off
    assert parse_refusal_hint("overloaded retry_after=x window=1") is None


async def test_a_refused_client_comes_back_when_the_server_says_not_after_its_backoff(
    make_server, make_client, events
):
    # one session every 2 s; the refused client's own backoff would wait 24-30 s
    async with make_server(
        max_new_sessions_per_second=0.5, admission_burst=1, overload_window=0.2
    ) as server:
        first = make_client("first", server.port)
        late = make_client("late", server.port, backoff_initial=30.0, backoff_max=60.0)
        async with first:
            await first.wait_connected(5)
            async with late:
                await events.wait("connected", role="server", client_id="late", timeout=10)
        refusals = events.of("session.refused", role="server")
        scheduled = events.of("reconnect.scheduled", client_id="late")
        failed = events.of("connect.failed", client_id="late")
        assert refusals and len(scheduled) == len(refusals) == len(failed)
        for refused, plan, fail in zip(refusals, scheduled, failed, strict=True):
            assert fail.reason == "rejected" and "retry_after=" in fail.detail
            assert refused.reason == "overloaded" and refused.window == 0.2
            # the client waits its slot, up to the window more: not its backoff
            assert refused.retry_after <= plan.delay <= refused.retry_after + 0.2
            assert plan.delay < 3.0
        assert late.backoff.attempt == 0  # the hints did not grow its backoff


def _initial(token: bytes = b"") -> tuple[Any, bytes]:
    """A client connection and its first Initial (with ``token``, as if answering a
    Retry)."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from backbone.frames import ALPN

    conf = QuicConfiguration(
        is_client=True, alpn_protocols=[ALPN], server_name="localhost", token=token
    )
    conn = QuicConnection(configuration=conf)
    conn.connect(("127.0.0.1", 9), now=0.0)
    [(data, _addr)] = conn.datagrams_to_send(now=0.0)
    return conn, data


def _bare_initial(i: int) -> bytes:
    """A client's first Initial, as a spoofed flood sends it: nobody will answer what
    the server sends back."""
    return _initial()[1]


def test_recent_refusals_remember_the_last_ids_with_their_answer():
    from backbone.admission import RecentRefusals

    recent = RecentRefusals(size=3)
    for i in range(3):
        recent.remember(bytes([i]) * 8, f"overloaded retry_after={i}.000 window=1.000")
    assert recent.get(b"\x01" * 8) == "overloaded retry_after=1.000 window=1.000"
    recent.remember(b"\x09" * 8, "handshakes_in_flight retry_after=2.000 window=1.000")
    assert len(recent) == 3
    assert recent.get(b"\x00" * 8) is None  # the oldest made room
    assert recent.get(b"\x09" * 8) is not None and recent.get(b"\x07" * 8) is None


async def test_a_resent_copy_of_a_refused_initial_is_refused_again_not_admitted(certs):
    import socket

    from aioquic.quic.events import ConnectionTerminated
    from aioquic.quic.packet import QuicErrorCode

    from backbone._quic import Refusal, server_configuration, start_server

    from .test_bad_input import RawPeer

    asked: list[str] = []
    opened: list[RawPeer] = []

    def gate(peer: str, tokened: bool) -> Refusal | None:
        asked.append(peer)
        if len(asked) == 1:  # the first is refused, then a place comes free
            return Refusal("handshakes_in_flight", close=True, phrase="handshakes_in_flight x")
        return None

    def create(quic: Any, **kw: Any) -> RawPeer:
        peer = RawPeer(quic, **kw)
        opened.append(peer)
        return peer

    qconf = server_configuration(str(certs.server_cert), str(certs.server_key), 10.0)
    server, _reader, port = await start_server("127.0.0.1", 0, qconf, create, gate=gate)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)

    async def send(data: bytes) -> bytes:
        sock.sendto(data, ("127.0.0.1", port))
        return await asyncio.wait_for(loop.sock_recv(sock, 2048), 5.0)

    try:
        conn, data = _initial()
        first = await send(data)
        conn.receive_datagram(first, ("127.0.0.1", 9), now=0.0)
        conn.handle_timer(now=conn.get_timer())  # the end of the draining period
        ended = [e for e in iter(conn.next_event, None) if isinstance(e, ConnectionTerminated)]
        assert [e.error_code for e in ended] == [QuicErrorCode.CONNECTION_REFUSED]
        # the client resent it before our answer came: the copy is refused again with the
        # same answer (the same packet: stateless, keyed from the same connection ID), and
        # the gate is not asked (it would admit it now)
        assert await send(data) == first
        assert len(asked) == 1 and opened == []
        # a new attempt (a new connection ID) goes to the gate and is admitted
        _fresh, fresh_data = _initial()
        sock.sendto(fresh_data, ("127.0.0.1", port))
        await asyncio.wait_for(loop.sock_recv(sock, 2048), 5.0)  # the server's first flight
        assert len(asked) == 2 and len(opened) == 1
    finally:
        sock.close()
        for peer in opened:
            peer.close_with(0, "done")
        server.close()


async def test_a_forged_retry_token_is_closed_with_invalid_token(make_server, make_client):
    import socket

    from aioquic.quic.events import ConnectionTerminated
    from aioquic.quic.packet import QuicErrorCode

    async with make_server(max_handshakes_in_flight=4) as server:
        conn, data = _initial(token=bytes(64))
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.sendto(data, ("127.0.0.1", server.port))
            loop = asyncio.get_running_loop()
            reply = await asyncio.wait_for(loop.sock_recv(sock, 2048), 5.0)
        finally:
            sock.close()
        # (the address the connection was made for: aioquic takes an Initial only from it)
        conn.receive_datagram(reply, ("127.0.0.1", 9), now=0.0)
        conn.handle_timer(now=conn.get_timer())  # the end of the draining period
        ended = [e for e in iter(conn.next_event, None) if isinstance(e, ConnectionTerminated)]
        assert [e.error_code for e in ended] == [QuicErrorCode.INVALID_TOKEN]
        assert server._gate.in_flight == 0  # no connection was opened for it
        real = make_client("real", server.port)
        async with real:
            await real.wait_connected(5)


async def test_spoofed_initials_cannot_take_the_places_of_real_clients(
    make_server, make_client, events
):
    import socket

    # 4 places; from 2 taken on, an Initial without a token gets a QUIC Retry, which a
    # spoofed sender never answers.  Without the Retry, the flood would hold all 4 places
    # until hello_timeout and the real client would be refused.
    # (5 s heartbeats: the server counts as behind only after 1 s, not 0.2 s, so a slow
    # first handshake on a loaded machine does not make it drop the rest of the flood)
    async with make_server(
        max_handshakes_in_flight=4, hello_timeout=5.0, heartbeat_interval=5.0
    ) as server:
        flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # wait until the server has decided on all 20 (an event per datagram read)
            quic_server = server._quic_server
            receive = quic_server.datagram_received
            all_handled = asyncio.Event()

            def handled() -> int:
                return server._gate.in_flight + server.retries_sent + server.refused_handshakes

            def receive_and_count(data: bytes, addr: Any) -> None:
                receive(data, addr)
                if handled() >= 20:
                    all_handled.set()

            quic_server.datagram_received = receive_and_count
            for i in range(20):
                flood.sendto(_bare_initial(i), ("127.0.0.1", server.port))
            try:
                await asyncio.wait_for(all_handled.wait(), 5)
            except TimeoutError:
                raise AssertionError(f"only {handled()} of 20 Initials handled") from None
            assert (server._gate.in_flight, server.retries_sent) == (2, 18)
            assert server.refused_handshakes == 0
            real = make_client("real", server.port)
            async with real:
                await real.wait_connected(5)  # through a Retry: 2 places taken
            assert server.retries_sent == 19
            assert not events.of("session.refused")
        finally:
            flood.close()


async def test_handshakes_in_flight_are_limited_and_counted_until_the_hello(
    make_server, make_client, events, certs
):
    from backbone._quic import client_configuration, open_connection

    from .test_bad_input import RawPeer

    # one handshake in flight at most: a connection that never sends its HELLO holds the
    # only place until the server's hello_timeout closes it
    async with make_server(max_handshakes_in_flight=1, hello_timeout=1.0) as server:
        conf = client_configuration(
            server_name="localhost", cafile=str(certs.ca_cert), verify=True, idle_timeout=10.0
        )
        silent = await open_connection("127.0.0.1", server.port, conf, RawPeer)
        assert isinstance(silent, RawPeer)
        assert server._gate.in_flight == 1
        late = make_client("late", server.port, backoff_initial=0.1, backoff_max=0.2)
        async with late:
            failed = await events.wait("connect.failed", client_id="late")
            assert failed.reason == "rejected"
            refused = await events.wait("session.refused", reason="handshakes_in_flight")
            assert refused.client_id is None
            # the silent one is closed at its hello_timeout; then "late" gets in
            await events.wait("connected", role="server", client_id="late")
            code, _ = await asyncio.wait_for(silent.closed_code, 5)
            assert code == ErrorCode.HELLO_TIMEOUT
            silent.close_with(0, "done")
            assert server._gate.in_flight == 0  # a session is no longer in flight
            # a session that opened does not hold a place: a second client gets in at once
            other = make_client("other", server.port)
            async with other:
                await other.wait_connected(5)
            assert server._gate.in_flight == 0


async def test_a_refused_connection_fails_at_once_before_the_tls_handshake(
    make_server, make_client, events
):
    async with make_server(max_new_sessions_per_second=0.01, admission_burst=1) as server:
        first = make_client("first", server.port)
        second = make_client("second", server.port, connect_timeout=5.0)
        async with first:
            await first.wait_connected(5)
            t0 = time.monotonic()
            async with second:
                failed = await events.wait("connect.failed", client_id="second")
            assert time.monotonic() - t0 < 1.0  # refused, not timed out
        assert "0x2" in failed.detail  # QUIC CONNECTION_REFUSED
        assert failed.reason == "rejected"  # not mistaken for FRAME_TOO_LARGE (app code 0x2)
        refused = await events.wait("session.refused", reason="overloaded")
        assert refused.client_id is None and refused.peer.startswith("127.0.0.1:")
        assert server.refused_handshakes >= 1
        assert [e.client_id for e in events.of("connected", role="server")] == ["first"]


def test_a_refusal_hint_is_never_taken_as_sooner_than_the_first_slot():
    from types import SimpleNamespace

    from backbone.admission import MIN_RETRY_AFTER
    from backbone.client import _come_back_hint

    def conn(phrase: str) -> Any:
        return SimpleNamespace(close_reason=phrase)

    # a forged refusal saying "at once" must not make the client loop
    forged = _come_back_hint(conn("overloaded retry_after=0.000 window=0.000"), "rejected", 0.5)
    assert forged is not None and forged.retry_after == MIN_RETRY_AFTER == 0.5
    ours = _come_back_hint(conn("overloaded retry_after=7.250 window=1.000"), "rejected", 0.5)
    assert ours is not None and (ours.reason, ours.retry_after, ours.window) == (
        "overloaded",
        7.25,
        1.0,
    )
    assert _come_back_hint(conn("overloaded"), "rejected", 0.5) is None  # older servers
    assert _come_back_hint(conn("x retry_after=1.0 window=1.0"), "tls", 0.5) is None


async def test_an_attempt_discarded_before_it_connected_ends_cleanly():
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection, QuicConnectionState

    from backbone._quic import QuicEndpoint, discard_connection

    # cancelled between the socket's creation and connect(): aioquic has no TLS context yet
    endpoint = QuicEndpoint(QuicConnection(configuration=QuicConfiguration(is_client=True)))
    discard_connection(endpoint)
    assert endpoint._quic._state is QuicConnectionState.TERMINATED
    discard_connection(endpoint)  # and twice is harmless
