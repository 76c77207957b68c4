"""A client that gets a QUIC Retry restarts its loss recovery (RFC 9002 §6.3).

In memory, aioquic's client and server connections with injected time: no socket.  The
client's first Initial goes unanswered a few times (a server behind its socket drops
Initials), then a Retry comes; the Initial carrying the token is lost once more.  aioquic
alone keeps the PTO backoff across the Retry and resends that Initial seconds later; with
:func:`backbone._quic.reset_recovery_on_retry` it resends it after one initial PTO."""

from __future__ import annotations

import os

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import HandshakeCompleted
from aioquic.quic.packet import encode_quic_retry, pull_quic_header

from backbone._quic import client_configuration, client_connection, server_configuration

ADDR = ("127.0.0.1", 4433)
CLIENT_ADDR = ("127.0.0.1", 50000)


def _in_flight_tracked(quic: QuicConnection) -> int:
    return sum(
        p.sent_bytes
        for space in quic._loss.spaces
        for p in space.sent_packets.values()
        if p.in_flight
    )


def _retry_after_unanswered_initials(certs, unanswered: int, patched: bool):
    conf = client_configuration(
        server_name="localhost", cafile=str(certs.ca_cert), verify=True, idle_timeout=60.0
    )
    client = client_connection(conf) if patched else QuicConnection(configuration=conf)
    now = 0.0
    client.connect(ADDR, now=now)
    [(first, _)] = client.datagrams_to_send(now)
    for _ in range(unanswered):  # the loss timer resends the Initial; each copy is dropped
        now = client.get_timer()
        client.handle_timer(now)
        assert client.datagrams_to_send(now)
    header = pull_quic_header(Buffer(data=first), host_cid_length=8)
    retry_cid = os.urandom(8)
    retry = encode_quic_retry(
        version=header.version,
        source_cid=retry_cid,
        destination_cid=header.source_cid,
        original_destination_cid=header.destination_cid,
        retry_token=b"t" * 32,
    )
    now += 0.05
    client.receive_datagram(retry, ADDR, now=now)
    sent = client.datagrams_to_send(now)  # the Initial with the token: lost too
    assert len(sent) == 1 and len(sent[0][0]) >= 1200
    return client, now, header.destination_cid, retry_cid


@pytest.mark.parametrize("unanswered", [0, 3, 5])
def test_a_retry_resets_the_pto_backoff_and_bytes_in_flight(certs, unanswered):
    client, now, _, _ = _retry_after_unanswered_initials(certs, unanswered, patched=True)
    # the first PTO of a fresh connection (2 × aioquic's initial RTT of 100 ms), whatever
    # happened before the Retry
    assert client.get_timer() - now == pytest.approx(0.2, abs=0.01)
    # only the Initial sent after the Retry counts against the congestion window
    assert client._loss.bytes_in_flight == _in_flight_tracked(client) > 0


def test_aioquic_alone_keeps_the_backoff_across_a_retry(certs):
    """What the patch is for: if aioquic ever resets recovery itself this fails, and the
    patch can go."""
    client, now, _, _ = _retry_after_unanswered_initials(certs, 5, patched=False)
    assert client.get_timer() - now == pytest.approx(0.2 * 2**5, abs=0.01)
    assert client._loss.bytes_in_flight > _in_flight_tracked(client)


def test_after_a_retry_and_a_lost_initial_the_handshake_completes_within_a_second(certs):
    client, now, original_cid, retry_cid = _retry_after_unanswered_initials(certs, 5, patched=True)
    retried_at = now
    server = QuicConnection(
        configuration=server_configuration(
            str(certs.server_cert), str(certs.server_key), idle_timeout=60.0
        ),
        original_destination_connection_id=original_cid,
        retry_source_connection_id=retry_cid,
    )
    done = False
    while not done:
        now = client.get_timer()
        assert now is not None and now - retried_at < 1.0, "handshake stalled"
        client.handle_timer(now)
        for _ in range(4):  # exchange until both sides are quiet
            for data, _ in client.datagrams_to_send(now):
                server.receive_datagram(data, CLIENT_ADDR, now=now)
            for data, _ in server.datagrams_to_send(now):
                client.receive_datagram(data, ADDR, now=now)
        while (event := client.next_event()) is not None:
            done = done or isinstance(event, HandshakeCompleted)
