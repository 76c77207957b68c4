"""A connection's aioquic timer reads the socket before it fires.

asyncio runs every due timer in one pass, after one read of the socket.  A server that
wrote a broadcast to 10,000 clients had thousands of loss-detection timers due at once;
they declared their packets lost and resent them while the acknowledgements waited
unread (docs/benchmarks.md, session 11).  Here one connection is put in exactly that
position over loopback: its probe timeout is due while the client's acknowledgement of
the packet waits in the server's socket behind another datagram that the reader's
batch stops at.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import HandshakeCompleted, StreamDataReceived

from backbone._quic import server_configuration, start_server
from backbone.frames import ALPN

from .test_bad_input import RawPeer


async def test_a_due_loss_timer_reads_the_waiting_ack_before_it_probes(certs):
    opened: list[RawPeer] = []

    def create(quic: Any, **kw: Any) -> RawPeer:
        peer = RawPeer(quic, **kw)
        opened.append(peer)
        return peer

    qconf = server_configuration(str(certs.server_cert), str(certs.server_key), 10.0)
    server, reader, port = await start_server("127.0.0.1", 0, qconf, create)
    assert reader is not None
    loop = asyncio.get_running_loop()
    addr = ("127.0.0.1", port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    client = QuicConnection(
        configuration=QuicConfiguration(
            is_client=True,
            alpn_protocols=[ALPN],
            server_name="localhost",
            verify_mode=ssl.CERT_NONE,
        )
    )
    seen: list[Any] = []

    def send_client() -> None:
        for data, _addr in client.datagrams_to_send(now=loop.time()):
            sock.sendto(data, addr)

    async def receive_client() -> None:
        data = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5.0)
        client.receive_datagram(data, addr, now=loop.time())
        seen.extend(iter(client.next_event, None))

    try:
        client.connect(addr, now=loop.time())
        send_client()
        while not any(isinstance(e, HandshakeCompleted) for e in seen):
            await receive_client()
            send_client()
        [peer] = opened
        await asyncio.wait_for(peer.ready, 5.0)

        # the server writes one packet of stream data; its probe timer is armed.  The
        # client's ACK delay, as the server knows it, is made 0.5 s so that the probe
        # cannot fire before the test has set the scene, however slow the machine
        peer._quic._loss.max_ack_delay = 0.5
        stream_id = peer._quic.get_next_available_stream_id()
        peer.write_now(stream_id, b"command")
        while not any(isinstance(e, StreamDataReceived) for e in seen):
            await receive_client()  # everything the server sent before it, too
        loss = peer._quic._loss
        assert loss.bytes_in_flight > 0
        due = peer._timer_at
        assert due is not None and due == peer._quic.get_timer()

        timeouts: list[float] = []
        on_timeout = loss.on_loss_detection_timeout

        def spy(now: float) -> None:
            timeouts.append(now)
            on_timeout(now=now)

        loss.on_loss_detection_timeout = spy  # type: ignore[method-assign]
        # the client's acknowledgement (its ACK delay elapsed) waits in the server's
        # socket behind a stray datagram; the reader's batch stops after one datagram
        acks = client.datagrams_to_send(now=loop.time() + 1.0)
        assert acks
        reader.budget = 1
        reader.catch_up_after = 0.0
        sock.sendto(b"\x00stray", addr)
        for data, _addr in acks:
            sock.sendto(data, addr)
        # keep the loop from running until the timer is due: the next pass reads one
        # datagram (the stray) and runs the due timer
        time.sleep(max(0.0, due - loop.time()) + 0.02)
        await asyncio.sleep(0)
        await asyncio.sleep(0)

        # the timer read the acknowledgement first: nothing in flight, no probe sent
        assert timeouts == []
        assert loss.bytes_in_flight == 0
        assert peer._quic._loss._pto_count == 0
        assert peer._timer_at is not None and peer._timer_at > due  # re-armed (idle)
    finally:
        sock.close()
        for peer in opened:
            peer.close_with(0, "done")
        server.close()
