"""What one QUIC handshake costs aioquic on each side, without sockets or an event loop.

A client and a server ``QuicConnection``, configured as backbone configures them (the
server's certificate from ``backbone.certs``, the client verifying it against the CA,
ALPN ``backbone/1``, the client offering one X25519 key share), exchange datagrams in
memory until both report the handshake done.  Reported: each side's CPU time
(``thread_time``) per handshake, and per connect attempt that the server refuses at its
first packet (the client's new connection and its first Initial only).

This is the floor under a restart storm: 10,000 reconnects need at least 10,000 times
(client + server) of CPU, before any socket, event loop, HELLO/WELCOME or backbone code.
On the machine of 2026-11-28 (2 vCPU): client 4.2-5.8 ms, server 2.6-3.4 ms per
handshake, 0.7-1.0 ms per refused attempt (several runs): 10,000 handshakes need 70-92 s
of CPU, 35-46 s on both CPUs at full use.

Run::

    PYTHONPATH=. python3 bench/handshake_cost.py [--n 300] [--mtls]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from typing import Any

from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import HandshakeCompleted

from backbone._quic import (
    client_configuration,
    offer_one_key_share,
    request_client_certificate,
    server_configuration,
)
from backbone.certs import make_dev_certs

SERVER = ("127.0.0.1", 4433)
CLIENT = ("127.0.0.1", 5555)


class Clock:
    def __init__(self) -> None:
        self.client = 0.0
        self.server = 0.0

    def on(self, side: str, fn: Any, *args: Any) -> Any:
        t = time.thread_time()
        try:
            return fn(*args)
        finally:
            setattr(self, side, getattr(self, side) + time.thread_time() - t)


def handshake(sconf: Any, cconf: Any, clock: Clock, mtls: bool) -> None:
    now = 0.0
    client = clock.on("client", lambda: QuicConnection(configuration=cconf))
    offer_one_key_share(client)
    clock.on("client", client.connect, SERVER, now)
    server: QuicConnection | None = None
    done = {"client": False, "server": False}
    for _ in range(20):
        for data, _addr in clock.on("client", client.datagrams_to_send, now):
            if server is None:

                def new() -> QuicConnection:
                    conn = QuicConnection(
                        configuration=sconf,
                        original_destination_connection_id=client.original_destination_connection_id,
                    )
                    if mtls:
                        request_client_certificate(conn)
                    return conn

                server = clock.on("server", new)
            clock.on("server", server.receive_datagram, data, CLIENT, now)
        if server is None:
            raise RuntimeError("the client sent nothing")
        while (event := server.next_event()) is not None:
            done["server"] |= isinstance(event, HandshakeCompleted)
        out = clock.on("server", server.datagrams_to_send, now)
        for data, _addr in out:
            clock.on("client", client.receive_datagram, data, SERVER, now)
        while (event := client.next_event()) is not None:
            done["client"] |= isinstance(event, HandshakeCompleted)
        if done["client"] and done["server"] and not out:
            return
        now += 0.001
    raise RuntimeError(f"the handshake did not finish: {done}")


def refused_attempt(cconf: Any, clock: Clock) -> None:
    def attempt() -> None:
        client = QuicConnection(configuration=cconf)
        offer_one_key_share(client)
        client.connect(SERVER, now=0.0)
        client.datagrams_to_send(now=0.0)

    clock.on("client", attempt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="handshakes (and refused attempts)")
    ap.add_argument("--mtls", action="store_true", help="the client presents a certificate")
    args = ap.parse_args()
    certs = make_dev_certs(tempfile.mkdtemp(prefix="bench-handshake-"), client_ids=("c1",))
    sconf = server_configuration(str(certs.server_cert), str(certs.server_key), 60.0)
    cert, key = certs.clients["c1"]
    cconf = client_configuration(
        server_name="localhost",
        cafile=str(certs.ca_cert),
        verify=True,
        idle_timeout=60.0,
        certfile=str(cert) if args.mtls else None,
        keyfile=str(key) if args.mtls else None,
    )
    gc.disable()  # the collector's pauses are the process's business, not the handshake's
    for _ in range(20):  # warm-up
        handshake(sconf, cconf, Clock(), args.mtls)
    clock = Clock()
    for _ in range(args.n):
        handshake(sconf, cconf, clock, args.mtls)
    refused = Clock()
    for _ in range(args.n):
        refused_attempt(cconf, refused)
    n = args.n
    per = (clock.client + clock.server) / n
    print(
        f"per handshake{' (mutual TLS)' if args.mtls else ''}: client "
        f"{clock.client / n * 1e3:.2f} ms, server {clock.server / n * 1e3:.2f} ms; "
        f"per refused attempt (client) {refused.client / n * 1e3:.2f} ms; "
        f"10,000 handshakes: {per * 10_000:.0f} s of CPU"
    )


if __name__ == "__main__":
    main()
