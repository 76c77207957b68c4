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

Run::

    PYTHONPATH=. python3 bench/heartbeat_cost.py [--pairs 1 1000] [--n 4000]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, nargs="+", default=[1, 1000])
    ap.add_argument("--n", type=int, default=4000)
    args = ap.parse_args()
    for pairs in args.pairs:
        rx, ack = measure(pairs, args.n)
        print(
            f"{pairs:>6} connection(s): server CPU per heartbeat {rx + ack:6.1f} µs "
            f"(receive {rx:.1f}, ACK {ack:.1f})"
        )


if __name__ == "__main__":
    main()
