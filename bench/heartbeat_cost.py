"""What one heartbeat costs aioquic on the server, without sockets or an event loop.

``K`` client/server ``QuicConnection`` pairs are handshaken in memory.  Then, round robin
over the pairs, a client sends a QUIC PING (what a backbone client sends with each
heartbeat) and the server takes it (``receive_datagram`` and its events) and answers
with its acknowledgement (``datagrams_to_send`` after the ACK delay), as in
``docs/protocol.md`` §11.  Reported: the server's CPU time per heartbeat for each part.
Run with 1 pair and with many to see whether per-connection state that is cold in the
CPU caches matters: on the machine of 2026-11-28, 104–134 µs with 1 pair and 141–196 µs
with 1,000 (four runs), against 0.4–0.8 ms per heartbeat measured in a live server, where
``sendto`` and the loop's ``epoll`` make up about half: every heartbeat meets an idle
process cold (a ``sendto`` after a 1–5 ms sleep cost 26–94 µs of CPU here, 10 µs in a
busy loop).

At 10,000 pairs (2026-11-28 12:0x, same machine): 152–194 µs per heartbeat (two runs).
At one heartbeat per client per 15 s that is 10.1–12.9 % of a core for 10,000 clients
before any socket, event loop or backbone code: the issue's aim (< 10 %) is below
aioquic's own floor here.

``--fanout`` also measures one broadcast copy per connection the same way: writing the
copy on the connection's stream and building its packet (``send_stream_data`` +
``datagrams_to_send``), then taking the client's acknowledgement of it.  At 1,000 pairs
139 µs + 93 µs, at 10,000 pairs 146 µs + 73 µs per recipient: 1.46 s of server CPU to
build 10,000 copies, with no socket at all — the 1 s broadcast aim is below aioquic's
floor too.

Run::

    PYTHONPATH=. python3 bench/heartbeat_cost.py [--pairs 1 1000] [--n 4000] [--fanout]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from backbone.certs import make_dev_certs

SERVER = ("127.0.0.1", 4433)
CLIENT = ("127.0.0.1", 5555)


def configurations() -> tuple[QuicConfiguration, QuicConfiguration]:
    certs = make_dev_certs(tempfile.mkdtemp(prefix="bench-heartbeat-"))
    server = QuicConfiguration(is_client=False, alpn_protocols=["bench"])
    server.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    client = QuicConfiguration(is_client=True, alpn_protocols=["bench"], server_name="localhost")
    client.verify_mode = 0  # CERT_NONE: only the packet path is measured
    return server, client


def handshake(scfg: QuicConfiguration, ccfg: QuicConfiguration, now: float) -> Any:
    client = QuicConnection(configuration=ccfg)
    client.connect(SERVER, now=now)
    server: QuicConnection | None = None
    for _ in range(10):
        moved = False
        for data, _addr in client.datagrams_to_send(now=now):
            if server is None:
                server = QuicConnection(
                    configuration=scfg,
                    original_destination_connection_id=client.original_destination_connection_id,
                )
            server.receive_datagram(data, CLIENT, now=now)
            moved = True
        assert server is not None
        for data, _addr in server.datagrams_to_send(now=now):
            client.receive_datagram(data, SERVER, now=now)
            moved = True
        if not moved:
            break
    assert server is not None
    while client.next_event() is not None:
        pass
    while server.next_event() is not None:
        pass
    return client, server


def measure(pairs: int, n: int) -> tuple[float, float]:
    scfg, ccfg = configurations()
    now = 1000.0
    conns = [handshake(scfg, ccfg, now) for _ in range(pairs)]
    gc.collect()
    gc.freeze()
    received = answered = 0.0
    for i in range(n):
        client, server = conns[(i * 7919) % pairs]
        now += 0.004
        client.send_ping(i)
        datagrams = client.datagrams_to_send(now=now)
        t0 = time.process_time()
        for data, _addr in datagrams:
            server.receive_datagram(data, CLIENT, now=now)
        while server.next_event() is not None:
            pass
        t1 = time.process_time()
        out = server.datagrams_to_send(now=now + 0.026)  # past the ACK delay
        t2 = time.process_time()
        received += t1 - t0
        answered += t2 - t1
        for data, _addr in out:
            client.receive_datagram(data, SERVER, now=now)
        while client.next_event() is not None:
            pass
    gc.unfreeze()
    return received / n * 1e6, answered / n * 1e6


def measure_fanout(pairs: int, rounds: int, size: int = 200) -> tuple[float, float]:
    """One broadcast copy per connection, ``rounds`` times over all ``pairs``: the server's
    CPU per recipient to write the copy on the connection's stream and build its packet
    (``send_stream_data`` + ``datagrams_to_send``), and to take the client's
    acknowledgement of it.  No sockets, no backbone: aioquic's floor for a broadcast."""
    scfg, ccfg = configurations()
    now = 1000.0
    conns = [handshake(scfg, ccfg, now) for _ in range(pairs)]
    for client, server in conns:  # the client opens stream 0, as a backbone client does
        client.send_stream_data(0, b"hello")
        for data, _addr in client.datagrams_to_send(now=now + 0.1):
            server.receive_datagram(data, CLIENT, now=now + 0.1)
        while server.next_event() is not None:
            pass
    gc.collect()
    gc.freeze()
    payload = bytes(size)
    sent = acked = 0.0
    for _ in range(rounds):
        now += 0.5
        t0 = time.process_time()
        outs = []
        for _client, server in conns:
            server.send_stream_data(0, payload)
            outs.append(server.datagrams_to_send(now=now))
        t1 = time.process_time()
        sent += t1 - t0
        acks = []
        for (client, _server), out in zip(conns, outs, strict=True):
            for data, _addr in out:
                client.receive_datagram(data, SERVER, now=now)
            while client.next_event() is not None:
                pass
            acks.append(client.datagrams_to_send(now=now + 0.026))
        t2 = time.process_time()
        for (_client, server), ack in zip(conns, acks, strict=True):
            for data, _addr in ack:
                server.receive_datagram(data, CLIENT, now=now)
            while server.next_event() is not None:
                pass
        acked += time.process_time() - t2
    gc.unfreeze()
    n = pairs * rounds
    return sent / n * 1e6, acked / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, nargs="+", default=[1, 1000])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument(
        "--fanout",
        action="store_true",
        help="also measure one broadcast copy per connection (at least 3 rounds over all "
        "pairs, 3,000 copies in all)",
    )
    args = ap.parse_args()
    for pairs in args.pairs:
        if args.fanout:
            tx, ack_in = measure_fanout(pairs, max(3, 3000 // pairs))
            print(
                f"{pairs:>6} connection(s): server CPU per broadcast recipient "
                f"{tx + ack_in:6.1f} µs (copy written and packet built {tx:.1f}, "
                f"its acknowledgement taken {ack_in:.1f})"
            )
        rx, ack = measure(pairs, args.n)
        print(
            f"{pairs:>6} connection(s): server CPU per heartbeat {rx + ack:6.1f} µs "
            f"(receive {rx:.1f}, ACK {ack:.1f})"
        )


if __name__ == "__main__":
    main()
