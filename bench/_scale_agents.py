"""Processes for ``bench/scale.py``: servers and load generators for three stacks.

Started as ``python3 -m bench._scale_agents ROLE ...``; like ``tests/fault_agents.py`` each
prints JSON lines (events, and one answer per command) and reads JSON commands on stdin.

Roles (stack × side):

* ``bb-server`` / ``bb-clients``: ``backbone.Server`` / many ``backbone.Client`` on one loop;
* ``raw-server`` / ``raw-clients``: aioquic alone, the same framing (u32 length, u8 type,
  MESSAGE head ``flags u8, msg id 16 B, headers length u16``, orjson body) on one
  bidirectional stream, client-driven PING frames on a second stream, each answered, as
  backbone's are, by the QUIC acknowledgement of its packet (a QUIC PING frame rides
  with it; no PONG), RESULT frames
  for WaitAck — what backbone does on the wire, without backbone;
* ``ws-server`` / ``ws-clients``: ``websockets`` over TLS (TCP), one binary WebSocket
  message per frame in the same framing, client WebSocket pings at the same interval.

Every client handler records when each broadcast (payload ``{"b": n}``) arrived (wall
clock, so the parent can compare across processes on one machine) and answers
``{"ok": true}`` when the message asks for a result.

Servers answer ``count``, ``broadcast`` (one-way or WaitAck; returns the wall time just
before the send and how long a WaitAck broadcast took to collect every result),
``bcast_loop`` (one one-way broadcast per interval for a while) and ``stop``.  With
``--sample`` a server prints its connected count every 0.25 s (``{"event": "count"}``).
Load generators start clients at a given rate (``grow``) and answer ``status``
(connected, connect failures by reason, clients that stopped trying) and ``recv``
(arrivals of one broadcast).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import logging
import os
import resource
import ssl
import struct
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from tests.fault_agents import _command_loop, _out, rss_kib  # noqa: E402

# --- the shared framing (what backbone puts on the wire) --------------------------------
_LEN = struct.Struct("!I")
_DATA_HEAD = struct.Struct("!IBB16sH")
_U64 = struct.Struct("!Q")
HELLO, PING, PONG, MESSAGE, RESULT = 0x01, 0x03, 0x04, 0x10, 0x11
FLAG_WAIT_ACK = 0x01
MSG_STREAM, HB_STREAM = 0, 4
OK_BODY = orjson.dumps({"ok": True})


def data_frame(ftype: int, flags: int, msg_id: bytes, body: bytes) -> bytes:
    return _DATA_HEAD.pack(1 + 19 + len(body), ftype, flags, msg_id, 0) + body


def small_frame(ftype: int, body: bytes) -> bytes:
    return _LEN.pack(len(body) + 1) + bytes((ftype,)) + body


class Decoder:
    """Incremental u32-length framing."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self.buf
        buf += data
        out = []
        pos = 0
        n = len(buf)
        while n - pos >= 5:
            (length,) = _LEN.unpack_from(buf, pos)
            if n - pos - 4 < length:
                break
            out.append((buf[pos + 4], bytes(buf[pos + 5 : pos + 4 + length])))
            pos += 4 + length
        if pos:
            del buf[:pos]
        return out


_keep: list[Any] = []  # background tasks

#: seconds this process spent in the cyclic garbage collector (a full pass with 2,000
#: QUIC connections takes 0.5-0.7 s: it shows in whichever broadcast it falls into)
_gc = {"s": 0.0, "t": 0.0, "cpu": 0.0, "c": 0.0}


def _count_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc["t"] = time.perf_counter()
        _gc["c"] = time.process_time()
        return
    _gc["s"] += time.perf_counter() - _gc["t"]
    # CPU time too: on a saturated machine the wall time includes waiting for a CPU
    _gc["cpu"] += time.process_time() - _gc["c"]


gc.callbacks.append(_count_gc)

#: load generators move their clients out of the collector's reach every this many starts
#: (all three stacks alike): each holds thousands of connections on one loop, and its full
#: collections would otherwise stall it like the server's (``backbone.gc_freeze``)
FREEZE_EVERY = 250


def _freeze_generator(started: int) -> None:
    if started % FREEZE_EVERY == 0 and os.environ.get("BENCH_GC_FREEZE", "1") != "0":
        gc.collect(1)
        gc.freeze()


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Arrivals:
    """Per broadcast id: how many arrived, first and last arrival (wall clock)."""

    def __init__(self) -> None:
        self.by_id: dict[int, list[float]] = {}

    def record(self, bid: int) -> None:
        now = time.time()
        slot = self.by_id.get(bid)
        if slot is None:
            self.by_id[bid] = [1, now, now]
        else:
            slot[0] += 1
            slot[2] = now

    def get(self, bid: int) -> dict[str, Any]:
        slot = self.by_id.get(bid)
        if slot is None:
            return {"n": 0, "first": None, "last": None}
        return {"n": int(slot[0]), "first": slot[1], "last": slot[2]}


def _bid(body: bytes) -> int | None:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return obj.get("b") if type(obj) is dict else None


# --- release of aioquic's handshake-only memory (the prototype measured by scale.py) ----


def release_handshake_memory(quic: Any) -> None:
    """After the handshake is confirmed (server side: at HandshakeCompleted), drop what
    aioquic keeps for life but only needs during the handshake: the three 16 KiB CRYPTO
    write buffers (``_crypto_buffers``; C ``Buffer`` objects, so invisible to tracemalloc),
    the INITIAL/HANDSHAKE crypto streams' buffers and the TLS transcript state."""
    from aioquic.buffer import Buffer
    from aioquic.quic.stream import QuicStream
    from aioquic.tls import Epoch

    bufs = quic._crypto_buffers
    # the server issues no session tickets, so TLS writes nothing after the handshake;
    # a small buffer still accepts the (empty) post-handshake pushes
    for epoch in (Epoch.INITIAL, Epoch.HANDSHAKE, Epoch.ONE_RTT):
        if epoch in bufs:
            bufs[epoch] = Buffer(capacity=256 if epoch == Epoch.ONE_RTT else 0)
    streams = quic._crypto_streams
    for epoch in (Epoch.INITIAL, Epoch.HANDSHAKE):
        if epoch in streams:
            streams[epoch] = QuicStream()


def share_epoch_sets() -> None:
    """aioquic builds its frame-handler table per connection, calling ``EPOCHS(...)`` for
    every frame type: ~19 identical frozensets per connection.  Cache them (process-wide)."""
    import functools

    from aioquic.quic import connection

    if not hasattr(connection.EPOCHS, "cache_info"):
        connection.EPOCHS = functools.lru_cache(maxsize=None)(connection.EPOCHS)


# --- backbone ---------------------------------------------------------------------------


async def bb_server_main(args: argparse.Namespace) -> None:
    from backbone import Server

    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(args.tracemalloc)
    # e.g. "700,10,10" (CPython's): set after the server started, which sets its own
    # with gc_freeze (backbone.gc_freeze.SERVER_THRESHOLDS)
    gc_threshold = os.environ.get("BENCH_GC_THRESHOLD")
    settings: dict[str, Any] = {}
    if args.admission is not None:
        settings["max_new_sessions_per_second"] = args.admission
    if args.retry_above is not None:
        settings["retry_above"] = args.retry_above
    server = Server(
        args.host,
        args.port,
        certfile=args.cert,
        keyfile=args.key,
        heartbeat_interval=args.hb,
        # as `backbone serve` runs it (BENCH_GC_FREEZE=0: the collector left as it is)
        gc_freeze=os.environ.get("BENCH_GC_FREEZE", "1") != "0",
        **settings,
    )
    if args.release:
        from backbone import server as _srv

        orig = _srv._ServerConnection.handshake_done

        def handshake_done(self: Any) -> None:
            orig(self)
            release_handshake_memory(self._quic)

        _srv._ServerConnection.handshake_done = handshake_done  # type: ignore[method-assign]
    await server.start()
    if gc_threshold:
        gc.set_threshold(*(int(x) for x in gc_threshold.split(",")))
    _out({"event": "listening", "port": server.port, "pid": os.getpid(), "t": time.time()})
    if args.sample:
        _keep.append(asyncio.ensure_future(_sampler(lambda: len(server))))

    async def count(cmd: dict[str, Any]) -> dict[str, Any]:
        return {
            "clients": len(server),
            "t": time.time(),
            "refused": server.refused_handshakes,
            "retries": server.retries_sent,
        }

    async def broadcast(cmd: dict[str, Any]) -> dict[str, Any]:
        wait = bool(cmd.get("wait_ack"))
        n = len(server)
        gc0 = _gc["s"]
        t0 = time.time()
        p0 = time.perf_counter()
        task = asyncio.ensure_future(
            server.broadcast(
                {"b": cmd["bid"]}, wait_ack=wait, timeout=float(cmd.get("timeout_s", 30))
            )
        )
        # the broadcast queues every copy in its first step; its writes are then spread
        # over loop passes (a few ms each): done sending when the server's flusher is
        await asyncio.sleep(0)
        await server._flushed()
        sent = time.perf_counter() - p0
        report = await task
        took = time.perf_counter() - p0
        errs = collections.Counter(type(e).__name__ for e in report.errors.values())
        return {
            "clients": n,
            "t0": t0,
            "call": took,
            "sent": sent,
            "results": len(report.results) if wait else 0,
            "errors": dict(errs),
            "gc_s": _gc["s"] - gc0,
        }

    def reader_counts() -> dict[str, Any]:
        reader = server._reader
        if reader is None:
            return {}
        return {"datagrams_read": reader.datagrams, "read_batches": reader.batches}

    async def bcast_loop(cmd: dict[str, Any]) -> dict[str, Any]:
        return await _bcast_loop(
            cmd, lambda bid: server.broadcast({"b": bid, "pad": "x" * 100}), reader_counts
        )

    async def mem(cmd: dict[str, Any]) -> dict[str, Any]:
        return _mem_report(cmd)

    async def stop(cmd: dict[str, Any]) -> dict[str, Any]:
        await server.stop(grace=0)
        return {}

    await _command_loop(
        {
            "count": count,
            "broadcast": broadcast,
            "bcast_loop": bcast_loop,
            "mem": mem,
            "prof_start": prof_start,
            "prof_stop": prof_stop,
            "stop": stop,
        }
    )


async def _flushed(p0: float) -> float:
    """Seconds from ``p0`` until the writes queued with ``call_soon`` so far have run (two
    loop passes: the broadcast task's own pass, then the flush callbacks it queued)."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    return time.perf_counter() - p0


async def _sampler(count: Any) -> None:
    while True:
        _out({"event": "count", "n": count(), "t": time.time()})
        await asyncio.sleep(0.25)


async def _bcast_loop(cmd: dict[str, Any], send: Any, counts: Any = lambda: {}) -> dict[str, Any]:
    """One broadcast every ``every`` s for ``seconds`` (the next one starts when the last
    has been sent, if that took longer): how many, how long each call took, and what
    ``counts()`` (the server's socket reader) counted during each."""
    seconds, every = float(cmd["seconds"]), float(cmd.get("every", 1.0))
    bid = int(cmd.get("bid0", 1_000_000))
    start = time.perf_counter()
    sent = 0
    calls: list[dict[str, Any]] = []
    while time.perf_counter() - start < seconds:
        c0, t0 = counts(), time.perf_counter()
        await send(bid + sent)
        c1 = counts()
        call = {"s": round(time.perf_counter() - t0, 3)}
        call.update({k: v - c0[k] for k, v in c1.items()})
        calls.append(call)
        sent += 1
        nxt = start + sent * every
        await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
    return {"sent": sent, "calls": calls}


_profiler: list[Any] = []


async def prof_start(cmd: dict[str, Any]) -> dict[str, Any]:
    import cProfile

    prof = cProfile.Profile()
    _profiler[:] = [prof]
    prof.enable()
    return {}


async def prof_stop(cmd: dict[str, Any]) -> dict[str, Any]:
    """Stop the profiler; the top functions by own time, and by cumulative time."""
    import io
    import pstats

    prof = _profiler.pop()
    prof.disable()
    if cmd.get("path"):
        prof.dump_stats(cmd["path"])
    out: dict[str, Any] = {}
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        st = pstats.Stats(prof, stream=buf)
        st.sort_stats(key).print_stats(int(cmd.get("top", 25)))
        out[key] = buf.getvalue()
    total = sum(v[2] for v in pstats.Stats(prof).stats.values())  # type: ignore[attr-defined]
    out["total_tottime"] = total
    return out


def _mem_report(cmd: dict[str, Any]) -> dict[str, Any]:
    """Python-heap census: tracemalloc top sites and QUIC object counts."""
    import tracemalloc

    gc.collect()
    out: dict[str, Any] = {"rss_kib": rss_kib()}
    if tracemalloc.is_tracing():
        snap = tracemalloc.take_snapshot()
        stats = snap.statistics(cmd.get("key", "lineno"))
        out["traced"] = sum(s.size for s in stats)
        out["top"] = [
            {"size": s.size, "count": s.count, "where": str(s.traceback[0])}
            for s in stats[: int(cmd.get("top", 25))]
        ]
        by_file: collections.Counter[str] = collections.Counter()
        for s in snap.statistics("filename"):
            by_file[s.traceback[0].filename.split("site-packages/")[-1]] += s.size
        out["by_file"] = by_file.most_common(15)
    return out


async def bb_clients_main(args: argparse.Namespace) -> None:
    from backbone import Client, Message, signals

    raise_nofile()
    arrivals = Arrivals()
    clients: list[Any] = []
    failures: collections.Counter[str] = collections.Counter()
    disconnects: collections.Counter[str] = collections.Counter()
    connected_at: list[float] = []
    mine: set[int] = set()
    not_yet: set[int] = set()  # started, never connected yet (the ramp's in-flight set)

    def on_failed(sender: Any, event: Any) -> None:
        if id(sender) in mine:
            reason = event.reason
            if reason == "timeout" and "(" in event.detail:  # where the attempt stalled
                reason += " (" + event.detail.split("(", 1)[1].split(";", 1)[0] + ")"
                if failures[reason] < 20:  # a sample of the details, in this process's log
                    logging.getLogger("bench.scale").warning(
                        "%s: connect %s", event.client_id, event.detail
                    )
            failures[reason] += 1

    def on_connected(sender: Any, event: Any) -> None:
        if id(sender) in mine:
            connected_at.append(time.time())
            not_yet.discard(id(sender))
            if len(connected_at) > len(clients):  # a reconnect (the storm): its new
                # connection objects join the frozen ones, as the ramp's do
                _freeze_generator(len(connected_at) - len(clients))

    def on_disconnected(sender: Any, event: Any) -> None:
        if id(sender) in mine:
            disconnects[event.reason] += 1

    signals.on_connect_failed.connect(on_failed, weak=False)
    signals.on_connected.connect(on_connected, weak=False)
    lags: list[tuple[float, float]] = []  # (wall clock, how late a 0.1 s sleep woke)

    async def watch_lag() -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.1)
            lags.append((time.time(), loop.time() - t - 0.1))

    lag_watch = asyncio.get_running_loop().create_task(watch_lag())
    signals.on_disconnected.connect(on_disconnected, weak=False)

    def make(i: int) -> Any:
        client = Client(
            f"{args.prefix}{args.start + i}",
            args.host,
            args.port,
            cafile=args.ca,
            server_name="localhost",
            heartbeat_interval=args.hb,
        )

        @client.handler
        async def handle(msg: Message) -> Any:
            payload = msg.payload
            if type(payload) is dict and "b" in payload:
                arrivals.record(payload["b"])
            return {"ok": True}

        mine.add(id(client))
        not_yet.add(id(client))
        return client

    async def grow(cmd: dict[str, Any]) -> dict[str, Any]:
        total, rate = int(cmd["total"]), float(cmd["rate"])
        inflight = int(cmd.get("inflight", 25))
        t0 = time.perf_counter()
        k = 0
        while len(clients) < total:
            while len(not_yet) >= inflight:  # closed loop: never more handshakes in flight
                await asyncio.sleep(0.02)
                t0 = time.perf_counter() - k / rate
            c = make(len(clients))
            clients.append(c)
            await c.start()
            k += 1
            _freeze_generator(len(clients))
            await asyncio.sleep(max(0.0, t0 + k / rate - time.perf_counter()))
        return {"started": len(clients)}

    async def status(cmd: dict[str, Any]) -> dict[str, Any]:
        since = float(cmd.get("since", 0.0))
        stopped = sum(1 for c in clients if c._task is not None and c._task.done())
        return {
            "started": len(clients),
            "connected": sum(1 for c in clients if c.connected),
            "failures": dict(failures),
            "disconnects": dict(disconnects),
            "gave_up": stopped,
            "connected_times": [t for t in connected_at if t >= since] if since else [],
            "rss_kib": rss_kib(),
            "gc_s": _gc["s"],
            "gc_cpu_s": _gc["cpu"],
            "loop_lags": [lag for t, lag in lags if t >= since] if since else [],
        }

    async def recv(cmd: dict[str, Any]) -> dict[str, Any]:
        return arrivals.get(int(cmd["bid"]))

    async def stop(cmd: dict[str, Any]) -> dict[str, Any]:
        lag_watch.cancel()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        return {}

    _out({"event": "ready", "pid": os.getpid(), "nofile": raise_nofile()})
    await _command_loop({"grow": grow, "status": status, "recv": recv, "stop": stop})


# --- raw aioquic --------------------------------------------------------------------------


def _raw_proto_classes() -> tuple[type, type]:
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.quic.events import (
        ConnectionTerminated,
        HandshakeCompleted,
        StreamDataReceived,
    )
    from aioquic.tls import Group

    class RawServerProto(QuicConnectionProtocol):
        registry: set[Any]
        results: dict[bytes, list[Any]]
        release = False

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.dec = {MSG_STREAM: Decoder(), HB_STREAM: Decoder()}
            self.hello = False

        def quic_event_received(self, event: Any) -> None:
            if type(event) is StreamDataReceived:
                dec = self.dec.get(event.stream_id)
                if dec is None:
                    return
                for ftype, body in dec.feed(event.data):
                    if ftype == PING:
                        pass  # answered by the QUIC ACK of its packet, as backbone does
                    elif ftype == HELLO and not self.hello:
                        self.hello = True
                        self.registry.add(self)
                    elif ftype == RESULT:
                        msg_id = body[1:17]
                        waiter = self.results.get(msg_id)
                        if waiter is not None:
                            orjson.loads(body[19:])
                            waiter[0] += 1
                            if waiter[0] >= waiter[1] and not waiter[2].done():
                                waiter[2].set_result(None)
            elif type(event) is HandshakeCompleted:
                if self.release:
                    release_handshake_memory(self._quic)
            elif type(event) is ConnectionTerminated:
                self.registry.discard(self)

        def send(self, frame: bytes) -> None:
            self._quic.send_stream_data(MSG_STREAM, frame)
            self._transmit_soon()

    class RawClientProto(QuicConnectionProtocol):
        arrivals: Arrivals

        def __init__(self, quic: Any, *a: Any, **kw: Any) -> None:
            super().__init__(quic, *a, **kw)
            self.dec = {MSG_STREAM: Decoder(), HB_STREAM: Decoder()}
            original = quic._initialize

            def _initialize(peer_cid: bytes) -> None:  # one key share, as backbone offers
                original(peer_cid)
                quic.tls._supported_groups = [Group.X25519]

            quic._initialize = _initialize
            self.gone = asyncio.get_running_loop().create_future()

        def quic_event_received(self, event: Any) -> None:
            if type(event) is StreamDataReceived:
                dec = self.dec.get(event.stream_id)
                if dec is None:
                    return
                for ftype, body in dec.feed(event.data):
                    if ftype == MESSAGE:
                        flags, msg_id = body[0], body[1:17]
                        bid = _bid(body[19:])
                        if bid is not None:
                            self.arrivals.record(bid)
                        if flags & FLAG_WAIT_ACK:
                            self._quic.send_stream_data(
                                MSG_STREAM, data_frame(RESULT, 0, msg_id, OK_BODY)
                            )
                    # no PONG comes: the QUIC ACK of the PING's packet answers it
            elif type(event) is ConnectionTerminated and not self.gone.done():
                self.gone.set_result(None)

    return RawServerProto, RawClientProto


def _send_each(conns: list[Any], frame: bytes) -> None:
    for proto in conns:
        proto.send(frame)


def _baseline_broadcast_commands(
    registry: Any, results: dict[bytes, list[Any]], write_all: Any
) -> dict[str, Any]:
    """``count``, ``broadcast`` and ``bcast_loop`` of a baseline server (raw aioquic or
    websockets): ``registry`` holds its connected clients, ``results`` the WaitAck
    waiters ``[results, expected, future]`` by MsgID, and ``write_all(conns, frame)``
    writes one frame to each."""
    seq = [0]

    def do_broadcast(bid: int, wait: bool, pad: str = "") -> list[Any] | None:
        seq[0] += 1
        msg_id = seq[0].to_bytes(16, "big")
        payload: dict[str, Any] = {"b": bid}
        if pad:
            payload["pad"] = pad
        frame = data_frame(MESSAGE, FLAG_WAIT_ACK if wait else 0, msg_id, orjson.dumps(payload))
        conns = list(registry)
        waiter = None
        if wait:
            waiter = [0, len(conns), asyncio.get_running_loop().create_future()]
            results[msg_id] = waiter
        write_all(conns, frame)
        return waiter

    async def count(cmd: dict[str, Any]) -> dict[str, Any]:
        return {"clients": len(registry), "t": time.time()}

    async def broadcast(cmd: dict[str, Any]) -> dict[str, Any]:
        wait = bool(cmd.get("wait_ack"))
        n = len(registry)
        gc0 = _gc["s"]
        t0 = time.time()
        p0 = time.perf_counter()
        waiter = do_broadcast(int(cmd["bid"]), wait)
        sent = await _flushed(p0)
        got = 0
        if waiter is not None:
            if waiter[1]:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        asyncio.shield(waiter[2]), float(cmd.get("timeout_s", 30))
                    )
            got = waiter[0]
        return {
            "clients": n,
            "t0": t0,
            "call": time.perf_counter() - p0,
            "sent": sent,
            "results": got,
            "errors": {},
            "gc_s": _gc["s"] - gc0,
        }

    async def bcast_loop(cmd: dict[str, Any]) -> dict[str, Any]:
        async def one(bid: int) -> None:
            do_broadcast(bid, False, "x" * 100)

        return await _bcast_loop(cmd, one)

    return {"count": count, "broadcast": broadcast, "bcast_loop": bcast_loop}


async def raw_server_main(args: argparse.Namespace) -> None:
    from aioquic.asyncio.server import serve
    from aioquic.quic.configuration import QuicConfiguration

    raise_nofile()
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(args.tracemalloc)
    server_cls, _ = _raw_proto_classes()
    registry: set[Any] = set()
    results: dict[bytes, list[Any]] = {}
    server_cls.registry = registry
    server_cls.results = results
    server_cls.release = bool(args.release)
    config = QuicConfiguration(is_client=False, alpn_protocols=["backbone/1"], idle_timeout=60.0)
    config.load_cert_chain(args.cert, args.key)
    srv = await serve(args.host, args.port, configuration=config, create_protocol=server_cls)
    sock = srv._transport.get_extra_info("socket")
    for opt in (0x8, 0x7):  # SO_RCVBUF, SO_SNDBUF, as backbone does
        with contextlib.suppress(OSError):
            sock.setsockopt(1, opt, 4 * 1024 * 1024)
    port = srv._transport.get_extra_info("sockname")[1]
    _out({"event": "listening", "port": port, "pid": os.getpid(), "t": time.time()})
    if args.sample:
        _keep.append(asyncio.ensure_future(_sampler(lambda: len(registry))))
    commands = _baseline_broadcast_commands(registry, results, _send_each)

    async def mem(cmd: dict[str, Any]) -> dict[str, Any]:
        return _mem_report(cmd)

    async def stop(cmd: dict[str, Any]) -> dict[str, Any]:
        srv.close()
        return {}

    await _command_loop(
        {
            **commands,
            "mem": mem,
            "prof_start": prof_start,
            "prof_stop": prof_stop,
            "stop": stop,
        }
    )


async def _serve_generator(
    args: argparse.Namespace,
    one: Any,
    tasks: list[asyncio.Task[None]],
    state: dict[str, Any],
    arrivals: Arrivals,
) -> None:
    """The command loop of a baseline load generator (raw aioquic or websockets): ``grow``
    starts clients with ``one(index)`` at a paced rate (at most ``inflight`` connecting at
    a time), ``status`` / ``recv`` / ``stop`` report and end them."""

    async def grow(cmd: dict[str, Any]) -> dict[str, Any]:
        total, rate = int(cmd["total"]), float(cmd["rate"])
        inflight = int(cmd.get("inflight", 25))
        t0 = time.perf_counter()
        k = 0
        while len(tasks) < total:
            while state["connecting"] >= inflight:
                await asyncio.sleep(0.02)
                t0 = time.perf_counter() - k / rate
            tasks.append(asyncio.ensure_future(one(args.start + len(tasks))))
            k += 1
            _freeze_generator(len(tasks))
            await asyncio.sleep(max(0.0, t0 + k / rate - time.perf_counter()))
        return {"started": len(tasks)}

    async def status(cmd: dict[str, Any]) -> dict[str, Any]:
        return {
            "started": len(tasks),
            "connected": state["connected"],
            "failures": dict(state["failures"]),
            "gave_up": 0,
            "rss_kib": rss_kib(),
        }

    async def recv(cmd: dict[str, Any]) -> dict[str, Any]:
        return arrivals.get(int(cmd["bid"]))

    async def stop(cmd: dict[str, Any]) -> dict[str, Any]:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {}

    _out({"event": "ready", "pid": os.getpid(), "nofile": raise_nofile()})
    await _command_loop({"grow": grow, "status": status, "recv": recv, "stop": stop})


async def raw_clients_main(args: argparse.Namespace) -> None:
    from aioquic.asyncio.client import connect
    from aioquic.quic.configuration import QuicConfiguration

    raise_nofile()
    _, client_cls = _raw_proto_classes()
    arrivals = Arrivals()
    client_cls.arrivals = arrivals
    state = {"connected": 0, "failures": collections.Counter(), "connecting": 0}
    tasks: list[asyncio.Task[None]] = []

    def config() -> Any:
        c = QuicConfiguration(
            is_client=True,
            alpn_protocols=["backbone/1"],
            idle_timeout=60.0,
            server_name="localhost",
        )
        c.load_verify_locations(args.ca)
        return c

    async def one(i: int) -> None:
        """Connect, HELLO, then a PING every ``hb`` s until closed (no reconnects)."""
        state["connecting"] += 1
        pending = True
        try:
            async with connect(
                args.host, args.port, configuration=config(), create_protocol=client_cls
            ) as proto:
                proto._quic.send_stream_data(
                    MSG_STREAM, small_frame(HELLO, orjson.dumps({"client_id": f"r{i}"}))
                )
                proto.transmit()
                state["connected"] += 1
                state["connecting"] -= 1
                pending = False
                nonce = 0
                try:
                    while True:
                        done, _ = await asyncio.wait([proto.gone], timeout=args.hb)
                        if done:
                            break
                        nonce += 1
                        proto._quic.send_stream_data(HB_STREAM, small_frame(PING, _U64.pack(nonce)))
                        proto._quic.send_ping(nonce)  # its ACK is the answer (no PONG)
                        proto.transmit()
                finally:
                    state["connected"] -= 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            state["failures"][type(exc).__name__] += 1
        finally:
            if pending:
                state["connecting"] -= 1

    await _serve_generator(args, one, tasks, state, arrivals)


# --- websockets over TLS ----------------------------------------------------------------------


async def ws_server_main(args: argparse.Namespace) -> None:
    from websockets.asyncio.server import broadcast as ws_broadcast
    from websockets.asyncio.server import serve

    raise_nofile()
    registry: set[Any] = set()
    results: dict[bytes, list[Any]] = {}
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)

    async def handler(ws: Any) -> None:
        dec_ok = False
        try:
            async for data in ws:
                ftype = data[4]
                if ftype == HELLO and not dec_ok:
                    dec_ok = True
                    registry.add(ws)
                elif ftype == RESULT:
                    msg_id = data[6:22]
                    waiter = results.get(msg_id)
                    if waiter is not None:
                        orjson.loads(data[24:])
                        waiter[0] += 1
                        if waiter[0] >= waiter[1] and not waiter[2].done():
                            waiter[2].set_result(None)
        finally:
            registry.discard(ws)

    # server pings off: the clients ping (as backbone's clients do)
    srv = await serve(
        handler,
        args.host,
        args.port,
        ssl=ctx,
        ping_interval=None,
        max_queue=64,
        compression=None,
    )
    port = next(iter(srv.sockets)).getsockname()[1]
    _out({"event": "listening", "port": port, "pid": os.getpid(), "t": time.time()})
    commands = _baseline_broadcast_commands(registry, results, ws_broadcast)

    async def stop(cmd: dict[str, Any]) -> dict[str, Any]:
        srv.close()
        return {}

    await _command_loop({**commands, "stop": stop})


async def ws_clients_main(args: argparse.Namespace) -> None:
    from websockets.asyncio.client import connect

    raise_nofile()
    arrivals = Arrivals()
    state = {"connected": 0, "failures": collections.Counter(), "connecting": 0}
    tasks: list[asyncio.Task[None]] = []
    ctx = ssl.create_default_context(cafile=args.ca)
    uri = f"wss://localhost:{args.port}/"

    async def one(i: int) -> None:
        state["connecting"] += 1
        pending = True
        try:
            async with connect(
                uri,
                ssl=ctx,
                ping_interval=args.hb,
                ping_timeout=args.hb * 3,
                max_queue=64,
                compression=None,
                open_timeout=60,
            ) as ws:
                await ws.send(small_frame(HELLO, orjson.dumps({"client_id": f"w{i}"})))
                state["connected"] += 1
                state["connecting"] -= 1
                pending = False
                try:
                    async for data in ws:
                        if data[4] == MESSAGE:
                            bid = _bid(data[24:])
                            if bid is not None:
                                arrivals.record(bid)
                            if data[5] & FLAG_WAIT_ACK:
                                await ws.send(data_frame(RESULT, 0, data[6:22], OK_BODY))
                finally:
                    state["connected"] -= 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            state["failures"][type(exc).__name__] += 1
        finally:
            if pending:
                state["connecting"] -= 1

    await _serve_generator(args, one, tasks, state, arrivals)


# --- entry point ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m bench._scale_agents")
    p.add_argument(
        "role",
        choices=(
            "bb-server",
            "bb-clients",
            "raw-server",
            "raw-clients",
            "ws-server",
            "ws-clients",
        ),
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--ca")
    p.add_argument("--hb", type=float, default=15.0)
    p.add_argument("--prefix", default="s")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--sample", action="store_true")
    p.add_argument(
        "--release",
        action="store_true",
        help="server: release aioquic's handshake buffers (prototype)",
    )
    p.add_argument("--share-epochs", action="store_true", help="server: cache EPOCHS()")
    p.add_argument("--tracemalloc", type=int, default=0, help="server: frames to trace")
    p.add_argument("--admission", type=float, default=None)
    p.add_argument("--retry-above", type=float, default=None, help="server: retry_above")
    return p


def main() -> None:
    args = _parser().parse_args()
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format=f"%(asctime)s {args.role}[{os.getpid()}] %(name)s %(levelname)s %(message)s",
    )
    raise_nofile()
    if args.share_epochs:
        share_epoch_sets()
    runner = {
        "bb-server": bb_server_main,
        "bb-clients": bb_clients_main,
        "raw-server": raw_server_main,
        "raw-clients": raw_clients_main,
        "ws-server": ws_server_main,
        "ws-clients": ws_clients_main,
    }[args.role]
    asyncio.run(runner(args))


if __name__ == "__main__":
    main()
