"""Per-message cost of backbone's own code, without QUIC and without the network.

A server connection and a client connection are wired back to back in ONE process and
ONE event loop: what the server link flushes is fed straight into the client's
``stream_data`` and back.  aioquic's ``QuicConnection`` objects exist (backbone's
classes need them) but never carry a packet.  The same is done for the raw baseline of
``bench/single_connection.py`` (its ``RawProtocol``), so the difference is what backbone
costs per message on top of the bare framing, on the paths the benchmark exercises:

* ``send``      -- ``Server.send_to`` one-way, 64 per loop pass, bytes discarded;
* ``receive``   -- ``_ClientConnection.stream_data`` + handler for 64 frames per read;
* ``oneway``    -- both of the above, back to back;
* ``ack1`` / ``ack32`` -- WaitAck round trips (both sides) with 1 / 32 in flight.

Run::

    PYTHONPATH=. python3 bench/micro_paths.py [--seconds 1] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.single_connection import (
    _LEN_TYPE,
    FLAG_WAIT_ACK,
    T_HELLO,
    MsgIds,
    Stats,
    _raw_protocol_class,
    make_payload,
)

BATCH = 64
CLIENT_ID = "bench"


def _quic(is_client: bool = True) -> Any:
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    return QuicConnection(configuration=QuicConfiguration(is_client=is_client))


# --- wiring ---------------------------------------------------------------------------------


class Pair:
    """What a scenario needs: ``send(payload)`` (one-way), ``request(payload)`` (WaitAck),
    a ``received`` counter, and hooks to cut the wire for the send/receive-only cases."""

    send: Callable[[Any], Awaitable[Any]]
    request: Callable[[Any], Awaitable[Any]]
    stats: Stats
    discard: bool = False  # drop what the sender flushes
    capture: list[bytes]

    def deliver_to_receiver(self, data: bytes) -> None:
        raise NotImplementedError


async def backbone_pair() -> Pair:
    from backbone import Client, Server
    from backbone.admission import TokenBucket
    from backbone.client import _ClientConnection
    from backbone.frames import FrameType, encode_json_frame
    from backbone.pending import PendingTable
    from backbone.server import _ServerConnection

    loop = asyncio.get_running_loop()
    pair = Pair()
    pair.stats = stats = Stats()
    pair.capture = []

    server = Server("127.0.0.1", 0, certfile="unused.pem")
    server._loop = loop
    scfg = server.config
    server.pending = PendingTable(scfg.max_pending_per_client, scfg.max_pending_total)
    server._admission = TokenBucket(0.0, 1, loop.time())  # unlimited: one session here
    server._client_cas = []
    client = Client(CLIENT_ID, "127.0.0.1", 4433)
    client._loop = loop
    client.pending = PendingTable(client.config.max_pending, client.config.max_pending)
    client._connected_event = asyncio.Event()

    @client.handler
    async def handle(msg: Any) -> Any:
        stats.received += 1
        return {"ok": True}

    holder: dict[str, Any] = {}

    class SConn(_ServerConnection):
        def transmit(self) -> None:
            pass

        def write_now(self, stream_id: int, data: bytes) -> None:
            if pair.discard:
                pair.capture.append(data)
                return
            holder["c"].stream_data(stream_id, data, False)

    class CConn(_ClientConnection):
        def transmit(self) -> None:
            pass

        def write_now(self, stream_id: int, data: bytes) -> None:
            holder["s"].stream_data(stream_id, data, False)

    sconn = SConn(_quic(), server)
    cconn = CConn(_quic(), client)
    holder.update(s=sconn, c=cconn)
    client._conn = cconn
    # handshake, by hand: HELLO to the server, a WELCOME to the client
    for sid, out in cconn.session.data_to_send():
        if sid == 0:
            sconn.stream_data(0, out, False)
    assert sconn.link is not None, "HELLO was not accepted"
    welcome = encode_json_frame(
        FrameType.WELCOME,
        {
            "version": 1,
            "session_id": sconn.session_id,
            "max_payload": scfg.max_payload,
            "heartbeat_interval": scfg.heartbeat_interval,
            "heartbeat_misses": scfg.heartbeat_misses,
        },
    )
    cconn.stream_data(0, welcome, False)
    assert cconn.link is not None, "WELCOME was not accepted"
    # the send-only measurement discards what the server writes, so no CREDIT ever comes
    # back: measure the send path without the handler window
    sconn.link.peer_window = None
    # the receive measurement replays captured frames, so the client's CREDIT would count
    # messages the server never sent: leave CREDIT out of these path costs
    cconn.link._credit = lambda: None  # type: ignore[method-assign]

    send_to = server.send_to

    async def send(payload: Any) -> Any:
        return await send_to(CLIENT_ID, payload)

    async def request(payload: Any) -> Any:
        return await send_to(CLIENT_ID, payload, wait_ack=True)

    pair.send = send
    pair.request = request
    pair.deliver_to_receiver = lambda data: cconn.stream_data(0, data, False)
    return pair


async def raw_pair() -> Pair:
    RawProtocol = _raw_protocol_class()
    pair = Pair()
    pair.stats = stats = Stats()
    pair.capture = []
    loop = asyncio.get_running_loop()

    class Wired(RawProtocol):  # type: ignore[misc, valid-type]
        peer: Any = None
        is_sender = False

        def flush(self) -> None:
            self.flush_handle = None
            out = self.outbox
            if not out:
                return
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            self.outbox_bytes = 0
            if self.is_sender and pair.discard:
                pair.capture.append(data)
                return
            self.peer.feed(data)

    s, c = Wired(_quic()), Wired(_quic())
    s.peer, c.peer = c, s
    s.is_sender = True
    s.stats = c.stats = stats
    c.queue(_LEN_TYPE.pack(3, T_HELLO) + b"{}")
    await asyncio.sleep(0)
    assert s.hello
    ids = MsgIds()

    async def send(payload: Any) -> Any:
        # the raw sender's per-message work (see raw_server.oneway); the buffer check is
        # per batch there, so it is left out here
        s.send_message(0, ids.next(), payload)

    async def request(payload: Any) -> Any:
        msg_id = ids.next()
        fut = loop.create_future()
        s.pending[msg_id] = fut
        s.send_message(FLAG_WAIT_ACK, msg_id, payload)
        return await fut

    pair.send = send
    pair.request = request
    pair.deliver_to_receiver = c.feed
    return pair


# --- scenarios ------------------------------------------------------------------------------


async def run_send(pair: Pair, payload: Any, seconds: float) -> tuple[int, float]:
    pair.discard = True
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        for _ in range(BATCH):
            await pair.send(payload)
        n += BATCH
        await asyncio.sleep(0)
        pair.capture.clear()
    return n, time.perf_counter() - t0


async def run_receive(pair: Pair, payload: Any, seconds: float) -> tuple[int, float]:
    pair.discard = True
    for _ in range(BATCH):
        await pair.send(payload)
    await asyncio.sleep(0)
    data = b"".join(pair.capture)
    pair.capture.clear()
    deliver = pair.deliver_to_receiver
    stats = pair.stats
    start = stats.received
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        deliver(data)
        await asyncio.sleep(0)  # let a handler worker run
    await asyncio.sleep(0)
    return stats.received - start, time.perf_counter() - t0


async def run_oneway(pair: Pair, payload: Any, seconds: float) -> tuple[int, float]:
    pair.discard = False
    stats = pair.stats
    start = stats.received
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        for _ in range(BATCH):
            await pair.send(payload)
        await asyncio.sleep(0)  # flush -> receiver
        await asyncio.sleep(0)  # receiver's handler worker
    await asyncio.sleep(0)
    return stats.received - start, time.perf_counter() - t0


def run_ack(inflight: int) -> Callable[[Pair, Any, float], Awaitable[tuple[int, float]]]:
    async def run(pair: Pair, payload: Any, seconds: float) -> tuple[int, float]:
        pair.discard = False
        done = 0
        stop = False

        async def worker() -> None:
            nonlocal done
            while not stop:
                await pair.request(payload)
                done += 1

        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(worker()) for _ in range(inflight)]
        await asyncio.sleep(seconds)
        stop = True
        await asyncio.gather(*tasks)
        return done, time.perf_counter() - t0

    return run


SCENARIOS: dict[str, Callable[[Pair, Any, float], Awaitable[tuple[int, float]]]] = {
    "send": run_send,
    "receive": run_receive,
    "oneway": run_oneway,
    "ack1": run_ack(1),
    "ack32": run_ack(32),
}


async def measure(stack: str, scenario: str, seconds: float, profile: str | None) -> float:
    pair = await (raw_pair() if stack == "raw" else backbone_pair())
    payload = make_payload()
    fn = SCENARIOS[scenario]
    await fn(pair, payload, min(0.2, seconds))  # warm-up
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    n, elapsed = await fn(pair, payload, seconds)
    if prof:
        prof.disable()
        prof.dump_stats(profile)
    return elapsed / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument(
        "--profile", metavar="DIR", help="cProfile each backbone scenario into DIR/<name>.prof"
    )
    args = ap.parse_args()
    scenarios = args.scenarios.split(",")
    head = ("path", "raw µs/msg", "backbone µs/msg", "added µs", "ratio")
    print("{:8s} {:>11s} {:>16s} {:>9s} {:>6s}".format(*head))
    for scenario in scenarios:
        res: dict[str, list[float]] = {"raw": [], "backbone": []}
        for _ in range(args.rounds):
            for stack in ("raw", "backbone"):
                res[stack].append(asyncio.run(measure(stack, scenario, args.seconds, None)))
        raw, bb = min(res["raw"]), min(res["backbone"])
        print(f"{scenario:8s} {raw:11.2f} {bb:16.2f} {bb - raw:9.2f} {bb / raw:6.2f}", flush=True)
        if args.profile:
            d = Path(args.profile)
            d.mkdir(parents=True, exist_ok=True)
            path = str(d / f"micro-backbone-{scenario}.prof")
            asyncio.run(measure("backbone", scenario, args.seconds, path))
            print(f"  profile: {path}")
            pstats.Stats(path).sort_stats("tottime").print_stats(25)
    print("(best of rounds; one process, no QUIC, no sockets)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
