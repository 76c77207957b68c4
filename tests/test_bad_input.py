"""A raw QUIC peer that speaks the protocol badly: each mistake gets its documented close
code and a ``protocol.violated`` event, while a well-behaved client keeps working."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest

from backbone._quic import QuicEndpoint, client_configuration, open_connection
from backbone.errors import ErrorCode
from backbone.frames import (
    FrameType,
    encode_credit,
    encode_data_frame,
    encode_json_frame,
    encode_ping,
)

from .test_e2e import running


class RawPeer(QuicEndpoint):
    def __init__(self, quic: Any, **kw: Any) -> None:
        super().__init__(quic)
        self.received: list[tuple[int, bytes]] = []
        self.data_arrived = asyncio.Event()
        self.closed_code: asyncio.Future[tuple[int, str]] = self._loop.create_future()

    def stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self.received.append((stream_id, data))
        self.data_arrived.set()

    def terminated(self, error_code: int, reason: str, by_peer: bool) -> None:
        if not self.closed_code.done():
            self.closed_code.set_result((error_code, reason))


def hello(client_id: Any = "raw", version: int = 1) -> bytes:
    return encode_json_frame(FrameType.HELLO, {"version": version, "client_id": client_id})


MID = b"\x07" * 16
#: a step that sends STOP_SENDING for its stream instead of writing
STOP = None
#: a step (on this stream number) that waits for the server's answer (WELCOME, PONG)
WAIT = -1

CASES: list[tuple[str, list[tuple[int, bytes | None]], ErrorCode]] = [
    ("garbage", [(0, b"\x00\x00\x00\x09garbage!!")], ErrorCode.PROTOCOL_ERROR),
    (
        "length 4 GiB",
        [(0, struct.pack("!IB", 2**32 - 1, FrameType.MESSAGE))],
        ErrorCode.FRAME_TOO_LARGE,
    ),
    (
        "message before hello",
        [(0, encode_data_frame(FrameType.MESSAGE, 0, MID, b"1"))],
        ErrorCode.PROTOCOL_ERROR,
    ),
    ("two hellos", [(0, hello() + hello())], ErrorCode.PROTOCOL_ERROR),
    ("empty client id", [(0, hello(""))], ErrorCode.INVALID_CLIENT_ID),
    ("control character", [(0, hello("ab\ncd"))], ErrorCode.INVALID_CLIENT_ID),
    ("id over 256 bytes", [(0, hello("é" * 129))], ErrorCode.INVALID_CLIENT_ID),
    ("id not a string", [(0, hello(42))], ErrorCode.INVALID_CLIENT_ID),
    ("unknown version", [(0, hello(version=7))], ErrorCode.UNSUPPORTED_VERSION),
    (
        "ack for unknown msg id",
        [(0, hello()), (0, encode_data_frame(FrameType.RESULT, 0, MID, b"1"))],
        ErrorCode.UNKNOWN_MESSAGE_ID,
    ),
    (
        "frame over max_payload",
        [(0, hello()), (0, encode_data_frame(FrameType.MESSAGE, 0x02, MID, b"x" * 20_000))],
        ErrorCode.FRAME_TOO_LARGE,
    ),
    ("unknown stream", [(0, hello()), (8, encode_ping(1))], ErrorCode.PROTOCOL_ERROR),
    ("ping before hello", [(4, encode_ping(1))], ErrorCode.PROTOCOL_ERROR),
    (
        "credit for messages never sent",
        [(0, hello()), (0, encode_credit(5))],
        ErrorCode.PROTOCOL_ERROR,
    ),
    ("credit before hello", [(0, encode_credit(0))], ErrorCode.PROTOCOL_ERROR),
    (
        "not json payload",
        [(0, hello()), (0, encode_data_frame(FrameType.MESSAGE, 0, MID, b"{oops"))],
        ErrorCode.PROTOCOL_ERROR,
    ),
    # STOP_SENDING: aioquic resets our side of the stream, and every write there raises
    ("stop sending stream 0", [(0, hello()), (WAIT, b""), (0, STOP)], ErrorCode.PROTOCOL_ERROR),
    # in the HELLO's own packet (it was left open, unlisted, without a link, for ever)
    ("stop sending with the hello", [(0, hello()), (0, STOP)], ErrorCode.PROTOCOL_ERROR),
    (
        "stop sending stream 4, pongs asked for",
        [(0, hello()), (WAIT, b""), (4, encode_ping(1)), (4, STOP)],
        ErrorCode.PROTOCOL_ERROR,
    ),
]


@pytest.mark.parametrize(("name", "sends", "code"), CASES, ids=[c[0] for c in CASES])
async def test_bad_peer_is_closed_with_its_code(
    name, sends, code, make_server, make_client, events, certs
):
    async with make_server(max_payload=10_000) as server:
        good = make_client("good", server.port)
        good.handler(lambda m: m.payload)
        async with running(good):
            conf = client_configuration(
                server_name="localhost", cafile=str(certs.ca_cert), verify=True, idle_timeout=10.0
            )
            peer = await open_connection("127.0.0.1", server.port, conf, RawPeer)
            assert isinstance(peer, RawPeer)
            try:
                for stream_id, data in sends:
                    if stream_id == WAIT:
                        await asyncio.wait_for(peer.data_arrived.wait(), 5)
                    elif data is STOP:
                        peer._quic.stop_stream(stream_id, 99)
                        peer.transmit()
                    else:
                        peer.write(stream_id, data)
                got_code, reason = await asyncio.wait_for(peer.closed_code, 5)
                assert got_code == code, reason
                ev = await events.wait("protocol.violated", role="server")
                assert ev.code == code and ev.reason
                # the well-behaved client never noticed
                for i in range(5):
                    assert await server.send_to("good", i, wait_ack=True, timeout=2) == i
                assert not events.of("disconnected", client_id="good")
            finally:
                peer.close_with(0, "done")


async def test_hello_timeout_closes_a_silent_connection(make_server, certs, events):
    async with make_server(hello_timeout=0.2) as server:
        conf = client_configuration(
            server_name="localhost", cafile=str(certs.ca_cert), verify=True, idle_timeout=10.0
        )
        peer = await open_connection("127.0.0.1", server.port, conf, RawPeer)
        assert isinstance(peer, RawPeer)
        got_code, _ = await asyncio.wait_for(peer.closed_code, 5)
        assert got_code == ErrorCode.HELLO_TIMEOUT
        peer.close_with(0, "done")


async def test_malformed_result_fails_the_waiting_sender_instead_of_hanging(
    make_server, certs, events
):
    from backbone import ClientGone
    from backbone.frames import FLAG_ERROR, FrameDecoder, parse_data_frame

    async with make_server() as server:
        conf = client_configuration(
            server_name="localhost", cafile=str(certs.ca_cert), verify=True, idle_timeout=10.0
        )
        peer = await open_connection("127.0.0.1", server.port, conf, RawPeer)
        assert isinstance(peer, RawPeer)
        peer.write(0, hello("raw"))
        await events.wait("connected", role="server", client_id="raw")
        sending = asyncio.ensure_future(server.send_to("raw", "cmd", wait_ack=True, timeout=30))
        decoder = FrameDecoder(1 << 20)
        msg_id = None
        async with asyncio.timeout(5):
            while msg_id is None:
                await peer.data_arrived.wait()
                peer.data_arrived.clear()
                for _sid, data in peer.received:
                    for ftype, body in decoder.feed(data):
                        if ftype == FrameType.MESSAGE:
                            msg_id = parse_data_frame(ftype, body).msg_id
                peer.received.clear()
        peer.write(0, encode_data_frame(FrameType.RESULT, FLAG_ERROR, msg_id, b"[1]"))
        with pytest.raises(ClientGone):
            async with asyncio.timeout(5):
                await sending
        assert len(server.pending) == 0
        code, _ = await asyncio.wait_for(peer.closed_code, 5)
        assert code == ErrorCode.PROTOCOL_ERROR
        peer.close_with(0, "done")


async def test_goaway_is_sent_on_stop_even_with_nothing_pending(make_server, make_client, events):
    async with make_server() as server:
        client = make_client("dev-1", server.port)
        async with running(client):
            await server.stop()
            ev = await events.wait("goaway.received")
            assert ev.retry_after >= 0 and ev.window > 0
            sched = await events.wait("reconnect.scheduled")
            assert ev.retry_after <= sched.delay <= ev.retry_after + ev.window


async def _raw_peer(port: int, certs: Any, kind: type[RawPeer] = RawPeer) -> RawPeer:
    conf = client_configuration(
        server_name="localhost", cafile=str(certs.ca_cert), verify=True, idle_timeout=10.0
    )
    peer = await open_connection("127.0.0.1", port, conf, kind)
    assert isinstance(peer, kind)
    return peer


async def test_ping_flood_and_many_streams_are_closed_others_unaffected(
    make_server, make_client, events, certs
):
    async with make_server() as server:
        good = make_client("good", server.port)
        good.handler(lambda m: m.payload)
        async with running(good):
            flooder = await _raw_peer(server.port, certs)
            flooder.write(0, hello("flooder"))
            await events.wait("connected", role="server", client_id="flooder")
            flooder.write(4, b"".join(encode_ping(i) for i in range(5000)))
            code, reason = await asyncio.wait_for(flooder.closed_code, 5)
            assert code == ErrorCode.PROTOCOL_ERROR and "ping flood" in reason
            streams = await _raw_peer(server.port, certs)
            streams.write(0, hello("streams"))
            for i in range(100):  # client-initiated bidirectional streams 8, 12, 16, ...
                streams.write(8 + 4 * i, encode_ping(i))
            code, reason = await asyncio.wait_for(streams.closed_code, 5)
            assert code == ErrorCode.PROTOCOL_ERROR and "unexpected stream" in reason
            for i in range(10):
                assert await server.send_to("good", i, wait_ack=True, timeout=2) == i
            assert not events.of("disconnected", client_id="good")


async def test_burst_of_silent_handshakes_is_cleaned_up_control_client_unaffected(
    make_server, make_client, events, certs
):
    async with make_server(hello_timeout=0.5) as server:
        good = make_client("good", server.port)
        good.handler(lambda m: m.payload)
        async with running(good):
            peers = await asyncio.gather(*(_raw_peer(server.port, certs) for _ in range(30)))
            for i in range(20):
                assert await server.send_to("good", i, wait_ack=True, timeout=5) == i
            codes = await asyncio.wait_for(asyncio.gather(*(p.closed_code for p in peers)), 10)
            assert {c for c, _ in codes} == {ErrorCode.HELLO_TIMEOUT}
            assert [c.client_id for c in server.clients()] == ["good"]
            for p in peers:
                p.close_with(0, "done")


async def test_a_peer_that_does_not_take_its_results_stops_being_served(
    make_server, make_client, events, certs
):
    """A peer sends WaitAck commands but grants no more QUIC flow control on stream 0:
    the results cannot leave.  They piled up without end (past 10 MiB against a 4 MiB
    limit); now the peer's messages wait unhandled once it holds more than
    outbound_buffer_limit, and a peer that floods on regardless overflows its window."""
    limit = 256 * 1024
    async with make_server(
        outbound_buffer_limit=limit,
        max_payload=100_000,
        max_inbound_queue=16,
        heartbeat_interval=5.0,
    ) as server:
        server.handler(lambda m: m.payload)  # echo: 60 KB results
        good = make_client("good", server.port)
        good.handler(lambda m: m.payload)
        async with running(good):
            peer = await _raw_peer(server.port, certs)
            peer._quic._write_stream_limits = lambda *a, **k: None  # never more stream credit
            try:
                peer.write(0, hello("hog"))
                await asyncio.wait_for(peer.data_arrived.wait(), 5)  # the WELCOME
                conn = server._sessions["hog"]
                held: list[int] = []
                wait = conn.wait_unacked_below

                def noting_wait(stream_id: int, below: int) -> Any:
                    held.append(conn.unacked_bytes(stream_id))
                    return wait(stream_id, below)

                conn.wait_unacked_below = noting_wait
                body = b"x" * 60_000
                for i in range(60):
                    mid = i.to_bytes(16, "big")
                    peer.write(0, encode_data_frame(FrameType.MESSAGE, 0x03, mid, body))
                    await asyncio.sleep(0)
                ended = await events.wait("disconnected", role="server", client_id="hog")
                assert ended.reason == "inbound_overflow", ended
                # it paused with at most one result over the limit held for the peer
                assert held and max(held) <= limit + 61_000, held
                handled = events.of("message.processed", role="server", client_id="hog")
                assert len(handled) < 60
                assert await server.send_to("good", 1, wait_ack=True) == 1  # others served
            finally:
                peer.close_with(0, "done")


async def test_a_quic_transport_error_is_the_peers_violation(
    make_server, make_client, events, certs
):
    """aioquic closes a connection itself when the peer breaks QUIC (here: DATAGRAM
    frames, which were never negotiated).  That close is ours, for the peer's fault: a
    protocol.violated event with the transport code, and disconnected with reason
    transport_error.  (It was reported as the peer closing: connection_lost, no event.)"""
    async with make_server() as server:
        good = make_client("good", server.port)
        good.handler(lambda m: m.payload)
        async with running(good):
            peer = await _raw_peer(server.port, certs)
            try:
                peer.write(0, hello("dgram"))
                await asyncio.wait_for(peer.data_arrived.wait(), 5)  # the WELCOME
                peer._quic._datagrams_pending.append(b"x" * 100)
                peer.transmit()
                ended = await events.wait("disconnected", role="server", client_id="dgram")
                assert ended.reason == "transport_error", ended
                violated = await events.wait("protocol.violated", role="server")
                assert violated.client_id == "dgram"
                assert violated.code_name == "PROTOCOL_VIOLATION", violated
                assert await server.send_to("good", 1, wait_ack=True) == 1
            finally:
                peer.close_with(0, "done")
