"""A connect burst: N clients start at once against a server with few handshake places.

One process, one event loop: a backbone server with ``max_handshakes_in_flight`` K (no
session budget) and N backbone clients started together, each with a 5 s connect
timeout and backoff 0.2-1 s.  Reported: the time until all N have a session, the
server's refusals and Retries, and how many admitted connections the server closed for
sending no HELLO within ``hello_timeout`` (a place held for 10 s by an attempt its client
had given up).  A small stand-in for a restart storm that runs in seconds.

Run::

    PYTHONPATH=. python3 bench/connect_burst.py [--clients 300] [--places 16] [--retry-above 1]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import tempfile

from backbone import Client, Server, signals
from backbone.certs import make_dev_certs
from backbone.events import ConnectFailed


class HelloTimeouts(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "HELLO_TIMEOUT" in record.getMessage():
            self.count += 1


async def burst(args: argparse.Namespace) -> None:
    certs = make_dev_certs(tempfile.mkdtemp(prefix="bench-burst-"))
    timeouts = HelloTimeouts()
    failed: collections.Counter[str] = collections.Counter()

    def count_failure(_sender: object, event: ConnectFailed, **_: object) -> None:
        failed[event.reason] += 1

    signals.on_connect_failed.connect(count_failure)
    server_log = logging.getLogger("backbone.server")
    server_log.addHandler(timeouts)
    server_log.setLevel(logging.WARNING)
    server_log.propagate = False  # counted, not printed
    server = Server(
        "127.0.0.1",
        0,
        certfile=str(certs.server_cert),
        keyfile=str(certs.server_key),
        max_handshakes_in_flight=args.places,
        retry_above=args.retry_above,
        max_new_sessions_per_second=0,
    )
    async with server:
        clients = [
            Client(
                f"burst-{i}",
                "127.0.0.1",
                server.port,
                cafile=str(certs.ca_cert),
                server_name="localhost",
                connect_timeout=5.0,
                backoff_initial=0.2,
                backoff_max=1.0,
                max_connects_per_loop=args.connects_per_loop,
            )
            for i in range(args.clients)
        ]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for c in clients:
            await c.start()
        while sum(c.connected for c in clients) < len(clients):
            if loop.time() - t0 > args.limit:
                break
            await asyncio.sleep(0.1)
        took = loop.time() - t0
        connected = sum(c.connected for c in clients)
        print(
            f"{connected} of {args.clients} connected in {took:.1f} s "
            f"({args.places} places, retry_above {args.retry_above:g}, "
            f"max_connects_per_loop {args.connects_per_loop}); "
            f"refused {server.refused_handshakes}, Retries {server.retries_sent}, "
            f"closed for no HELLO in time {timeouts.count}; "
            f"failed attempts {dict(failed) or 'none'}"
        )
        await asyncio.gather(*(c.close() for c in clients))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=300)
    ap.add_argument("--places", type=int, default=16, help="max_handshakes_in_flight")
    ap.add_argument("--retry-above", type=float, default=0.5)
    ap.add_argument("--limit", type=float, default=60.0, help="give up after this many s")
    ap.add_argument(
        "--connects-per-loop", type=int, default=64, help="clients: max_connects_per_loop"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(burst(args))


if __name__ == "__main__":
    main()
