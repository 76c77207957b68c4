"""Single-connection benchmark: backbone vs. raw aioquic with the same framing vs.
``websockets`` over TLS doing the same job.

One invocation measures, on loopback, with the server and the client in separate
processes (``multiprocessing`` spawn), for each of the three stacks:

* ``oneway``    -- server -> client messages, 200-byte orjson payload; the rate is what
  the client's handler counts;
* ``oneway16k`` -- the same with a 16 KiB payload;
* ``ack1`` / ``ack32`` / ``ack256`` -- WaitAck round trips with 1, 32 and 256 in flight
  (that many tasks each awaiting a result; the server sends, the client handler answers).

The *raw* stack is aioquic alone (no backbone code is imported in its processes): the
same wire framing as backbone (u32 length, u8 type, then the MESSAGE header ``flags u8,
msg id 16 bytes, headers length u16`` and an orjson body) on one long-lived bidirectional
stream, writes coalesced per event-loop pass (a list, one ``send_stream_data`` +
``transmit`` via ``call_soon``), frames decoded with ``struct``, a trivial synchronous
handler, and a RESULT frame (0x11) back for WaitAck.

The *websockets* stack is ``websockets`` (its asyncio implementation) over TLS 1.3 on
TCP, no compression: one binary websocket message per frame, carrying the same bytes as
the raw framing minus the u32 length (``type u8``, MESSAGE header, orjson body); the
client's receive loop parses the payload with orjson and, for WaitAck, sends a RESULT
message back; the server resolves a future per msg id.

The *backbone* stack is ``backbone.Server`` + ``backbone.Client`` with an async handler
returning a small dict.

Each measurement: start both processes, connect, let the sender run ``--warmup``
seconds, then the parent asks both processes for a snapshot of their counters and CPU
time, waits ``--duration`` seconds and asks again.  Rates come from the measuring
process's own clock.  Rounds rotate the order of the stacks; the table shows the median.

``bench/latency.py`` reuses these processes for its paced scenario (``run_one(stack,
"paced", params)`` with ``params["rate"]``).

Run from the repository root::

    PYTHONPATH=. python3 bench/single_connection.py            # full (~5 min)
    PYTHONPATH=. python3 bench/single_connection.py --quick    # smoke test (~45 s)
    PYTHONPATH=. python3 bench/single_connection.py --profile /tmp/prof   # cProfile pass
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from bench._harness import (
    CLIENT_ID,
    DOCS,
    ROOT,
    Control,
    MsgIds,
    Stats,
    command_line,
    dev_certs,
    loadavg,
    machine_info,
    machine_line,
    make_payload,
    quic_probe,
    reap,
    recv,
    run_child,
    section_markers,
    spawn,
    udp_rcvbuf_errors,
    write_docs_section,
    write_json,
)

__all__ = [  # also imported by bench/micro_paths.py and bench/plugins_overhead.py
    "BACKPRESSURE_SLEEP",
    "CLIENT_ID",
    "FLAG_WAIT_ACK",
    "PAYLOAD_SIZE",
    "T_HELLO",
    "Control",
    "MsgIds",
    "Stats",
    "machine_info",
    "make_payload",
]

RESULTS_NAME = "single_connection.json"
RESULTS_JSON = ROOT / "bench" / "results" / RESULTS_NAME
SECTION_START, SECTION_END = section_markers("bench/single_connection.py")


class Scenario(NamedTuple):
    label: str
    kind: str  # "oneway" | "ack" | "paced"
    size: int  # payload bytes (orjson)
    inflight: int = 0


SCENARIOS: dict[str, Scenario] = {
    "oneway": Scenario("one-way, 200 B payload", "oneway", 200),
    "oneway16k": Scenario("one-way, 16 KiB payload", "oneway", 16 * 1024),
    "ack1": Scenario("WaitAck, 1 in flight", "ack", 200, 1),
    "ack32": Scenario("WaitAck, 32 in flight", "ack", 200, 32),
    "ack256": Scenario("WaitAck, 256 in flight", "ack", 200, 256),
}
# bench/latency.py: one-way at a fixed rate (params["rate"]), latency carried in the payload
PACED = Scenario("paced one-way", "paced", 200)
ALL_SCENARIOS = {**SCENARIOS, "paced": PACED}
STACKS = ("raw", "backbone", "websockets")

PAYLOAD_SIZE = 200
OUTBOUND_LIMIT = 4 * 1024 * 1024  # backbone's default outbound_buffer_limit, used by raw too
BACKPRESSURE_SLEEP = 0.001

# --- wire format for the raw baseline (identical bytes to backbone's MESSAGE/RESULT) -------
T_HELLO = 0x01
T_WELCOME = 0x02
T_MESSAGE = 0x10
T_RESULT = 0x11
FLAG_WAIT_ACK = 0x01
_HEAD = struct.Struct("!IBB16sH")  # length, type, flags, msg id, headers length
_LEN_TYPE = struct.Struct("!IB")
_MSG_HEAD = struct.Struct("!B16sH")
_WS_HEAD = struct.Struct("!BB16sH")  # websockets: type, flags, msg id, headers length
STREAM_ID = 0
WELCOME_BODY = b'{"version":1,"session_id":"raw-1","max_payload":1048576}'


def _payload_for(scenario: str) -> dict[str, Any]:
    return make_payload(ALL_SCENARIOS[scenario].size)


def _profile_path(params: dict[str, Any], stack: str, scenario: str, role: str) -> str | None:
    d = params.get("profile_dir")
    return str(Path(d) / f"{stack}-{scenario}-{role}.prof") if d else None


def child_main(role: str, stack: str, scenario: str, params: dict[str, Any], conn: Any) -> None:
    fn = {
        ("server", "raw"): raw_server,
        ("client", "raw"): raw_client,
        ("server", "backbone"): bb_server,
        ("client", "backbone"): bb_client,
        ("server", "websockets"): ws_server,
        ("client", "websockets"): ws_client,
    }[(role, stack)]
    run_child(conn, f"{role}/{stack}", fn, conn, scenario, params)


# --- the workloads (the same code drives every stack) ---------------------------------------


async def oneway_loop(
    stats: Stats,
    batch: int,
    send: Any,
    buffered: Any = None,
    is_async: bool = False,
    limit: int = OUTBOUND_LIMIT,
) -> None:
    """``batch`` sends per event-loop pass; yield ``BACKPRESSURE_SLEEP`` while ``buffered()``
    is over ``limit`` (raw)."""
    sleep = asyncio.sleep
    while True:
        if buffered is not None and buffered() > limit:
            stats.backpressure += 1
            await sleep(BACKPRESSURE_SLEEP)
            continue
        if is_async:
            for _ in range(batch):
                await send()
        else:
            for _ in range(batch):
                send()
        stats.sent += batch
        await sleep(0)


async def paced_loop(stats: Stats, rate: float, size: int, send: Any) -> None:
    """One-way at a fixed ``rate``: every message carries ``t`` = ``time.perf_counter()``
    taken just before it is handed to the stack (CLOCK_MONOTONIC, the same clock in every
    process of the host).  Between sends the task sleeps until the next message is due;
    when it wakes late it sends every message that is due at once (the lateness is
    recorded as ``lag_max``)."""
    perf = time.perf_counter
    pad = make_payload(size, t=perf())["data"]
    t0 = perf()
    n = 0
    while True:
        now = perf()
        due = int((now - t0) * rate) + 1
        if due > n + 1 and stats.recording:
            stats.lag_max = max(stats.lag_max, now - (t0 + n / rate))
        while n < due:
            await send({"op": "tick", "seq": n, "t": perf(), "data": pad})
            n += 1
        stats.sent = n
        delay = t0 + n / rate - perf()
        await asyncio.sleep(delay if delay > 0 else 0)


def start_workload(
    scenario: str,
    params: dict[str, Any],
    stats: Stats,
    oneway: Any,
    request: Any,
    paced_send: Any,
) -> list[asyncio.Task[None]]:
    sc = ALL_SCENARIOS[scenario]
    if sc.kind == "oneway":
        return [asyncio.ensure_future(oneway())]
    if sc.kind == "paced":
        return [asyncio.ensure_future(paced_loop(stats, params["rate"], sc.size, paced_send))]

    async def requester() -> None:
        while True:
            stats.sent += 1
            await request()
            stats.completed += 1

    return [asyncio.ensure_future(requester()) for _ in range(sc.inflight)]


def latency_handler(stats: Stats) -> Any:
    """The receiver's handler body for the paced scenario: count, and record
    now - ``payload["t"]`` while the parent's measurement window is open."""
    perf = time.perf_counter
    lat, sent_at = stats.lat, stats.sent_at

    def on_payload(payload: Any) -> None:
        stats.received += 1
        if stats.recording:
            t = payload["t"]
            lat.append(perf() - t)
            sent_at.append(t)

    return on_payload


async def stop_tasks(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --- the raw aioquic baseline ---------------------------------------------------------------


def _raw_protocol_class() -> Any:
    import orjson
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.quic.events import StreamDataReceived

    dumps = orjson.dumps
    loads = orjson.loads
    head_pack = _HEAD.pack
    len_type = _LEN_TYPE.unpack_from
    msg_head = _MSG_HEAD.unpack_from
    ok = {"ok": True}

    class RawProtocol(QuicConnectionProtocol):
        answer_hello = False  # the server answers HELLO with WELCOME (latency.py's connects)

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.outbox: list[bytes] = []
            self.outbox_bytes = 0
            self.flush_handle: asyncio.Handle | None = None
            self.buf = bytearray()
            self.pending: dict[bytes, asyncio.Future[Any]] = {}
            self.stats: Stats | None = None
            self.hello = False
            self.welcomed: asyncio.Future[None] | None = None

        # outgoing: coalesced per loop pass
        def queue(self, frame: bytes) -> None:
            self.outbox.append(frame)
            self.outbox_bytes += len(frame)
            if self.flush_handle is None:
                self.flush_handle = self._loop.call_soon(self.flush)

        def flush(self) -> None:
            self.flush_handle = None
            out = self.outbox
            if not out:
                return
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            self.outbox_bytes = 0
            self._quic.send_stream_data(STREAM_ID, data)
            self.transmit()

        def buffered(self) -> int:
            stream = self._quic._streams.get(STREAM_ID)
            if stream is None:
                return self.outbox_bytes
            s = stream.sender
            return self.outbox_bytes + s._buffer_stop - s._buffer_start

        def send_message(self, flags: int, msg_id: bytes, payload: Any) -> None:
            body = dumps(payload)
            self.queue(head_pack(20 + len(body), T_MESSAGE, flags, msg_id, 0) + body)

        # incoming
        def quic_event_received(self, event: Any) -> None:
            if type(event) is StreamDataReceived:
                self.feed(event.data)

        def feed(self, data: bytes) -> None:
            buf = self.buf
            buf += data
            pos = 0
            size = len(buf)
            while size - pos >= 5:
                length, ftype = len_type(buf, pos)
                end = pos + 4 + length
                if end > size:
                    break
                if ftype in (T_MESSAGE, T_RESULT):
                    flags, msg_id, hlen = msg_head(buf, pos + 5)
                    value = loads(buf[pos + 24 + hlen : end])
                    if ftype == T_MESSAGE:
                        result = self.handle(value)
                        if flags & FLAG_WAIT_ACK:
                            body = dumps(result)
                            self.queue(head_pack(20 + len(body), T_RESULT, 0, msg_id, 0) + body)
                    else:
                        fut = self.pending.pop(msg_id, None)
                        if fut is not None and not fut.done():
                            fut.set_result(value)
                elif ftype == T_HELLO:
                    loads(buf[pos + 5 : end])
                    self.hello = True
                    if self.answer_hello:
                        self.queue(_LEN_TYPE.pack(1 + len(WELCOME_BODY), T_WELCOME) + WELCOME_BODY)
                elif ftype == T_WELCOME:
                    loads(buf[pos + 5 : end])
                    if self.welcomed is not None and not self.welcomed.done():
                        self.welcomed.set_result(None)
                pos = end
            if pos:
                del buf[:pos]

        def handle(self, payload: Any) -> Any:
            # the trivial handler
            self.stats.received += 1  # type: ignore[union-attr]
            return ok

    return RawProtocol


def raw_server_configuration(params: dict[str, Any]) -> Any:
    from aioquic.quic.configuration import QuicConfiguration

    qconf = QuicConfiguration(is_client=False, alpn_protocols=["bench/1"], idle_timeout=60.0)
    qconf.load_cert_chain(params["server_cert"], params["server_key"])
    return qconf


def raw_client_configuration(params: dict[str, Any]) -> Any:
    from aioquic.quic.configuration import QuicConfiguration

    qconf = QuicConfiguration(
        is_client=True, alpn_protocols=["bench/1"], idle_timeout=60.0, server_name="localhost"
    )
    qconf.load_verify_locations(params["ca_cert"])
    return qconf


async def raw_server(conn: Any, scenario: str, params: dict[str, Any]) -> None:
    from aioquic.asyncio.server import serve

    assert "backbone" not in sys.modules, "the raw baseline must not load backbone"
    stats = Stats()
    ctl = Control(conn, stats, _profile_path(params, "raw", scenario, "server"))
    RawProtocol = _raw_protocol_class()
    protos: list[Any] = []

    def factory(*args: Any, **kwargs: Any) -> Any:
        p = RawProtocol(*args, **kwargs)
        p.stats = stats
        protos.append(p)
        return p

    server = await serve(
        "127.0.0.1", 0, configuration=raw_server_configuration(params), create_protocol=factory
    )
    port = server._transport.get_extra_info("sockname")[1]
    ctl.send("port", port)
    await ctl.wait_ready(lambda: bool(protos) and protos[0].hello)
    proto = protos[0]
    stats.probe = quic_probe(lambda: proto._quic)
    ctl.send("ready")
    payload = _payload_for(scenario)
    ids = MsgIds()
    send_message = proto.send_message
    loop = asyncio.get_running_loop()
    pending = proto.pending

    async def request() -> None:
        msg_id = ids.next()
        fut = loop.create_future()
        pending[msg_id] = fut
        send_message(FLAG_WAIT_ACK, msg_id, payload)
        await fut

    async def paced_send(p: Any) -> None:
        send_message(0, ids.next(), p)

    tasks = start_workload(
        scenario,
        params,
        stats,
        lambda: oneway_loop(
            stats,
            params["batch"],
            lambda: send_message(0, ids.next(), payload),
            proto.buffered,
            limit=params["outbound_limit"],
        ),
        request,
        paced_send,
    )
    await ctl.quit.wait()
    await stop_tasks(tasks)
    server.close()


async def raw_client(conn: Any, scenario: str, params: dict[str, Any]) -> None:
    from aioquic.asyncio.client import connect

    assert "backbone" not in sys.modules, "the raw baseline must not load backbone"
    stats = Stats()
    ctl = Control(conn, stats, _profile_path(params, "raw", scenario, "client"))
    RawProtocol = _raw_protocol_class()
    async with connect(
        "127.0.0.1",
        params["port"],
        configuration=raw_client_configuration(params),
        create_protocol=RawProtocol,
    ) as proto:
        proto.stats = stats
        if ALL_SCENARIOS[scenario].kind == "paced":
            on_payload = latency_handler(stats)
            ok = {"ok": True}

            def handle(payload: Any) -> Any:
                on_payload(payload)
                return ok

            proto.handle = handle
        proto.queue(_LEN_TYPE.pack(3, T_HELLO) + b"{}")  # opens stream 0
        ctl.send("ready")
        await ctl.quit.wait()
        proto.close()


# --- websockets over TLS ------------------------------------------------------------------


def ws_server_ssl(params: dict[str, Any]) -> Any:
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(params["server_cert"], params["server_key"])
    return ctx


def ws_client_ssl(params: dict[str, Any]) -> Any:
    import ssl

    ctx = ssl.create_default_context(cafile=params["ca_cert"])
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def ws_hello() -> bytes:
    return bytes([T_HELLO]) + b"{}"


def ws_welcome() -> bytes:
    return bytes([T_WELCOME]) + WELCOME_BODY


async def ws_server(conn: Any, scenario: str, params: dict[str, Any]) -> None:
    import orjson
    from websockets.asyncio.server import serve

    assert "backbone" not in sys.modules, "the websockets baseline must not load backbone"
    stats = Stats()
    ctl = Control(conn, stats, _profile_path(params, "websockets", scenario, "server"))
    loads, dumps = orjson.loads, orjson.dumps
    head = _WS_HEAD.pack
    conns: list[Any] = []
    pending: dict[bytes, asyncio.Future[Any]] = {}

    async def handler(ws: Any) -> None:
        hello = await ws.recv()
        assert hello[0] == T_HELLO
        loads(hello[1:])
        conns.append(ws)
        async for data in ws:  # RESULT frames
            if data[0] == T_RESULT:
                _flags, msg_id, hlen = _MSG_HEAD.unpack_from(data, 1)
                fut = pending.pop(msg_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(loads(data[20 + hlen :]))

    async with serve(
        handler, "127.0.0.1", 0, ssl=ws_server_ssl(params), compression=None, max_size=None
    ) as server:
        port = server.sockets[0].getsockname()[1]
        ctl.send("port", port)
        await ctl.wait_ready(lambda: bool(conns))
        ws = conns[0]
        ctl.send("ready")
        payload = _payload_for(scenario)
        ids = MsgIds()
        loop = asyncio.get_running_loop()
        send = ws.send

        async def send_oneway() -> None:
            await send(head(T_MESSAGE, 0, ids.next(), 0) + dumps(payload))

        async def request() -> None:
            msg_id = ids.next()
            fut = loop.create_future()
            pending[msg_id] = fut
            await send(head(T_MESSAGE, FLAG_WAIT_ACK, msg_id, 0) + dumps(payload))
            await fut

        async def paced_send(p: Any) -> None:
            await send(head(T_MESSAGE, 0, ids.next(), 0) + dumps(p))

        tasks = start_workload(
            scenario,
            params,
            stats,
            lambda: oneway_loop(stats, params["batch"], send_oneway, is_async=True),
            request,
            paced_send,
        )
        await ctl.quit.wait()
        await stop_tasks(tasks)
        await ws.close()


async def ws_client(conn: Any, scenario: str, params: dict[str, Any]) -> None:
    import orjson
    from websockets.asyncio.client import connect

    assert "backbone" not in sys.modules, "the websockets baseline must not load backbone"
    stats = Stats()
    ctl = Control(conn, stats, _profile_path(params, "websockets", scenario, "client"))
    loads, dumps = orjson.loads, orjson.dumps
    head = _WS_HEAD.pack
    on_payload = latency_handler(stats) if ALL_SCENARIOS[scenario].kind == "paced" else None
    ok = {"ok": True}

    def handle(payload: Any) -> Any:
        # the trivial handler
        if on_payload is not None:
            on_payload(payload)
        else:
            stats.received += 1
        return ok

    async with connect(
        f"wss://localhost:{params['port']}",
        ssl=ws_client_ssl(params),
        compression=None,
        max_size=None,
    ) as ws:
        await ws.send(ws_hello())

        async def receive() -> None:
            async for data in ws:
                if data[0] == T_MESSAGE:
                    flags, msg_id, hlen = _MSG_HEAD.unpack_from(data, 1)
                    result = handle(loads(data[20 + hlen :]))
                    if flags & FLAG_WAIT_ACK:
                        await ws.send(head(T_RESULT, 0, msg_id, 0) + dumps(result))

        reader = asyncio.ensure_future(receive())
        ctl.send("ready")
        await ctl.quit.wait()
        await stop_tasks([reader])  # type: ignore[list-item]


# --- backbone -------------------------------------------------------------------------------


async def bb_server(conn: Any, scenario: str, params: dict[str, Any]) -> None:
    from backbone import Backpressure, Server

    stats = Stats()
    ctl = Control(conn, stats, _profile_path(params, "backbone", scenario, "server"))
    extra: dict[str, Any] = {}
    if params["outbound_limit"] != OUTBOUND_LIMIT:
        extra["outbound_buffer_limit"] = params["outbound_limit"]
    if os.environ.get("BENCH_GC_FREEZE") == "1":  # as `backbone serve` runs
        extra["gc_freeze"] = True
    server = Server(
        "127.0.0.1", 0, certfile=params["server_cert"], keyfile=params["server_key"], **extra
    )
    await server.start()
    ctl.send("port", server.port)
    await ctl.wait_ready(lambda: CLIENT_ID in server.client_ids())
    stats.probe = quic_probe(lambda: server._sessions[CLIENT_ID]._quic)
    ctl.send("ready")
    payload = _payload_for(scenario)
    send_to = server.send_to

    async def oneway() -> None:
        batch = params["batch"]
        loop_sleep = asyncio.sleep
        while True:
            n = 0
            try:
                for _ in range(batch):
                    await send_to(CLIENT_ID, payload)
                    n += 1
            except Backpressure:
                stats.backpressure += 1
                stats.sent += n
                await loop_sleep(BACKPRESSURE_SLEEP)
                continue
            stats.sent += n
            await loop_sleep(0)

    async def request() -> None:
        await send_to(CLIENT_ID, payload, wait_ack=True)

    async def paced_send(p: Any) -> None:
        try:
            await send_to(CLIENT_ID, p)
        except Backpressure:
            stats.backpressure += 1

    tasks = start_workload(scenario, params, stats, oneway, request, paced_send)
    await ctl.quit.wait()
    await stop_tasks(tasks)
    await server.stop(grace=0)


async def bb_client(conn: Any, scenario: str, params: dict[str, Any]) -> None:
    from backbone import Client

    stats = Stats()
    ctl = Control(conn, stats, _profile_path(params, "backbone", scenario, "client"))
    client = Client(
        CLIENT_ID,
        "127.0.0.1",
        params["port"],
        cafile=params["ca_cert"],
        # as `backbone client` runs
        gc_freeze=os.environ.get("BENCH_GC_FREEZE") == "1",
    )
    ok = {"ok": True}

    if ALL_SCENARIOS[scenario].kind == "paced":
        on_payload = latency_handler(stats)

        @client.handler
        async def handle_paced(msg: Any) -> Any:
            on_payload(msg.payload)
            return ok

    else:

        @client.handler
        async def handle(msg: Any) -> Any:
            stats.received += 1
            return ok

    async with client:
        await client.wait_connected(20)
        ctl.send("ready")
        await ctl.quit.wait()


# --- parent: orchestration ------------------------------------------------------------------


def run_one(stack: str, scenario: str, params: dict[str, Any]) -> dict[str, Any]:
    """One measurement: fresh server and client processes, warm-up, window, counters."""
    params = dict(params)
    srv, s_parent = spawn(child_main, "server", stack, scenario, params)
    procs, pipes = [srv], [s_parent]
    try:
        port = recv(s_parent, "port", 30, "server")
        cli, c_parent = spawn(child_main, "client", stack, scenario, dict(params, port=port))
        procs.append(cli)
        pipes.append(c_parent)
        recv(c_parent, "ready", 30, "client")
        recv(s_parent, "ready", 30, "server")
        time.sleep(params["warmup"])

        def mark() -> tuple[dict[str, Any], dict[str, Any]]:
            s_parent.send("mark")
            c_parent.send("mark")
            return recv(s_parent, "mark", 30, "server"), recv(c_parent, "mark", 30, "client")

        drops0 = udp_rcvbuf_errors()
        s0, c0 = mark()
        time.sleep(params["duration"])
        s1, c1 = mark()
        drops1 = udp_rcvbuf_errors()
        for p in pipes:
            p.send("quit")
    finally:
        reap(procs, pipes)

    kind = ALL_SCENARIOS[scenario].kind
    if kind == "ack":
        count = s1["completed"] - s0["completed"]
        elapsed = s1["t"] - s0["t"]
    else:
        count = c1["received"] - c0["received"]
        elapsed = c1["t"] - c0["t"]
    rate = count / elapsed
    out: dict[str, Any] = {
        "rate": rate,
        "count": count,
        "elapsed": elapsed,
        "sender_cpu_us_per_msg": (s1["cpu"] - s0["cpu"]) / count * 1e6 if count else None,
        "receiver_cpu_us_per_msg": (c1["cpu"] - c0["cpu"]) / count * 1e6 if count else None,
        "sender_cpu_util": (s1["cpu"] - s0["cpu"]) / (s1["t"] - s0["t"]),
        "sender_sys_util": (s1["sys"] - s0["sys"]) / (s1["t"] - s0["t"]),
        "receiver_sys_util": (c1["sys"] - c0["sys"]) / (c1["t"] - c0["t"]),
        "receiver_cpu_util": (c1["cpu"] - c0["cpu"]) / (c1["t"] - c0["t"]),
        "sent_rate": (s1["sent"] - s0["sent"]) / (s1["t"] - s0["t"]),
        "backpressure_yields": s1["backpressure"] - s0["backpressure"],
        "sender_lag_max_s": s1["lag_max"],
        "quic_sender_state": {"start": s0.get("probe"), "end": s1.get("probe")},
        "udp_rcvbuf_errors": (drops1 - drops0)
        if drops0 is not None and drops1 is not None and stack != "websockets"
        else None,
    }
    if kind == "paced":
        from array import array

        lat = array("d")
        lat.frombytes(c1["lat"])
        out["latencies"] = lat
        sent_at = array("d")
        sent_at.frombytes(c1["sent_at"])
        out["sent_at"] = sent_at
    return out


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def _med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _cpu_total(e: dict[str, Any] | None) -> float | None:
    """Sender + receiver CPU µs per message."""
    if not e or e["sender_cpu_us_per_msg"] is None or e["receiver_cpu_us_per_msg"] is None:
        return None
    return float(e["sender_cpu_us_per_msg"] + e["receiver_cpu_us_per_msg"])


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for scenario, by_stack in runs.items():
        sc = SCENARIOS[scenario]
        entry: dict[str, Any] = {"label": sc.label, "payload_bytes": sc.size}
        for stack, rs in by_stack.items():
            if not rs:
                continue
            entry[stack] = {
                "median_msgs_per_s": _med([r["rate"] for r in rs]),
                "runs_msgs_per_s": [round(r["rate"], 1) for r in rs],
                "sender_cpu_us_per_msg": _med([r["sender_cpu_us_per_msg"] for r in rs]),
                "receiver_cpu_us_per_msg": _med([r["receiver_cpu_us_per_msg"] for r in rs]),
                "sender_cpu_util": _med([r["sender_cpu_util"] for r in rs]),
                "receiver_cpu_util": _med([r["receiver_cpu_util"] for r in rs]),
                "backpressure_yields": [r["backpressure_yields"] for r in rs],
                "udp_rcvbuf_errors": [r["udp_rcvbuf_errors"] for r in rs],
                "runs": rs,
            }
        rate = {st: entry.get(st, {}).get("median_msgs_per_s") for st in STACKS}
        cpu = {st: _cpu_total(entry.get(st)) for st in STACKS}
        entry["ratio_backbone_over_raw"] = _ratio(rate["backbone"], rate["raw"])
        entry["ratio_backbone_over_websockets"] = _ratio(rate["backbone"], rate["websockets"])
        entry["cpu_ratio_backbone_over_raw"] = _ratio(cpu["backbone"], cpu["raw"])
        entry["cpu_ratio_backbone_over_websockets"] = _ratio(cpu["backbone"], cpu["websockets"])
        out[scenario] = entry
    return out


def _r(x: float | None, bold: bool = True) -> str:
    if x is None:
        return "-"
    return f"**{x:.2f}**" if bold else f"{x:.2f}"


def render_table(summary: dict[str, Any]) -> str:
    head = (
        "| scenario | raw aioquic | backbone | websockets | backbone/raw | backbone/websockets "
        "| raw runs | backbone runs | websockets runs |"
    )
    rows = [head, "|---|--:|--:|--:|--:|--:|---|---|---|"]

    def runs(e: dict[str, Any] | None) -> str:
        if not e:
            return "-"
        return ", ".join(f"{v / 1000:.1f}k" for v in e["runs_msgs_per_s"])

    def med(e: dict[str, Any] | None) -> str:
        return _fmt_rate(e["median_msgs_per_s"]) if e else "-"

    for entry in summary.values():
        raw, bb, ws = entry.get("raw"), entry.get("backbone"), entry.get("websockets")
        rows.append(
            f"| {entry['label']} | {med(raw)} | {med(bb)} | {med(ws)} "
            f"| {_r(entry['ratio_backbone_over_raw'])} "
            f"| {_r(entry['ratio_backbone_over_websockets'])} "
            f"| {runs(raw)} | {runs(bb)} | {runs(ws)} |"
        )
    return "\n".join(rows)


def render_cpu_table(summary: dict[str, Any]) -> str:
    head = (
        "| scenario | raw: send / recv | backbone: send / recv | websockets: send / recv "
        "| backbone/raw | backbone/websockets | CPU use send / recv, backbone |"
    )
    rows = [head, "|---|--:|--:|--:|--:|--:|--:|"]

    def cpu(e: dict[str, Any] | None) -> str:
        if not e:
            return "-"
        s, r = e["sender_cpu_us_per_msg"], e["receiver_cpu_us_per_msg"]
        return f"{s:.1f} / {r:.1f}" if s is not None and r is not None else "-"

    for entry in summary.values():
        bb = entry.get("backbone")
        util = (
            f"{bb['sender_cpu_util']:.0%} / {bb['receiver_cpu_util']:.0%}"
            if bb and bb.get("sender_cpu_util") is not None
            else "-"
        )
        rows.append(
            f"| {entry['label']} | {cpu(entry.get('raw'))} | {cpu(bb)} "
            f"| {cpu(entry.get('websockets'))} "
            f"| {_r(entry['cpu_ratio_backbone_over_raw'], False)} "
            f"| {_r(entry['cpu_ratio_backbone_over_websockets'], False)} | {util} |"
        )
    return "\n".join(rows)


def render_docs_section(result: dict[str, Any]) -> str:
    m = result["machine"]
    p = result["params"]
    s = result["summary"]
    drops = []
    for e in s.values():
        for stack in STACKS:
            if stack in e:
                d = [x for x in e[stack]["udp_rcvbuf_errors"] if x is not None]
                if any(d):
                    drops.append(f"{e['label']} {stack}: {d}")
    lines = [
        SECTION_START,
        "## Single connection: backbone vs. raw aioquic vs. websockets",
        "",
        "Written by `bench/single_connection.py` (do not edit by hand; rerun it).",
        "",
        "Command:",
        "",
        "```",
        result["command"],
        "```",
        "",
        machine_line(m, result.get("loadavg_end")),
        "",
        "Setup: loopback, server and client in separate processes (multiprocessing spawn), "
        "stdlib asyncio loop, one connection.  The server is the sender in every scenario; "
        "payloads are orjson (200 B unless the scenario says otherwise).  Each measurement: "
        f"{p['warmup']:g} s warm-up, then {p['duration']:g} s measured; {p['rounds']} "
        "round(s) rotating the order of the stacks; the tables show the median (runs "
        f"listed).  One-way sends {p['batch']} messages per event-loop pass; raw and backbone "
        f"yield {BACKPRESSURE_SLEEP * 1000:g} ms when over "
        f"{p['outbound_limit'] / 1024 / 1024:g} MiB "
        "buffered (backbone: on `Backpressure`); websockets waits in `send()` for its "
        "transport to drain (its default 32 KiB write limit).",
        "",
        "Messages (one-way) or results (WaitAck) per second:",
        "",
        render_table(s),
        "",
        "CPU µs per message (process CPU time over the window divided by messages; sender = "
        "server, receiver = client), and how busy backbone's two processes were:",
        "",
        render_cpu_table(s),
        "",
        "Reading the numbers: one-way throughput over QUIC is set by congestion control "
        "reacting to UDP receive-buffer drops and by whichever process saturates its CPU "
        "first, so single runs can differ by tens of percent; the CPU µs/msg columns are "
        "the steadier measure of what backbone adds.  WaitAck with 1 in flight is a latency "
        "test: per round trip, the transport and event-loop wake-ups on both sides dominate "
        "either stack's own code.  `bench/micro_paths.py` measures backbone's own "
        "per-message cost without QUIC.",
        "",
    ]
    if drops:
        lines += [
            "UDP receive-buffer drops during the windows (`/proc/net/snmp` RcvbufErrors, "
            "whole host): " + "; ".join(drops) + ".",
            "",
        ]
    lines += [
        "Raw baseline: aioquic only, the same bytes on the wire (u32 length, u8 type, "
        "MESSAGE header, orjson body), writes coalesced per loop pass, a synchronous "
        "trivial handler that still `orjson.loads` the payload and `orjson.dumps` the "
        "result.  websockets baseline: `websockets` "
        f"{m.get('websockets') or '?'} (asyncio implementation) over TLS 1.3/TCP on "
        "loopback, `compression=None`, one binary message per frame with the same bytes "
        "minus the u32 length, the same trivial handler in the client's receive loop, and "
        "a RESULT message back for WaitAck.  Backbone: `Server.send_to` / `Client` with an "
        '`async` handler returning `{"ok": True}`.',
        SECTION_END,
    ]
    return "\n".join(lines)


def _group(filename: str) -> str:
    if "/backbone/" in filename:
        return "backbone"
    if "/aioquic/" in filename:
        return "aioquic"
    if "/websockets/" in filename:
        return "websockets"
    if "/asyncio/" in filename or filename.endswith("selectors.py"):
        return "asyncio"
    if filename.endswith("ssl.py"):
        return "ssl"
    if "/bench/" in filename:
        return "bench"
    if filename == "~":
        return "C calls"
    return "other"


def profile_report(
    profile_dir: Path,
    stacks: list[str],
    scenarios: list[str],
    top: int,
    counts: dict[tuple[str, str], int],
) -> None:
    """Per process: self time grouped by module (idle ``epoll.poll`` left out) and the top
    functions by self time, in profiled µs per message (cProfile inflates everything ~3x;
    compare shares and stacks, not absolute values)."""
    import pstats

    for scenario in scenarios:
        for stack in stacks:
            n = counts.get((stack, scenario)) or 1
            for role in ("server", "client"):
                path = profile_dir / f"{stack}-{scenario}-{role}.prof"
                if not path.exists():
                    continue
                st = pstats.Stats(str(path))
                groups: dict[str, float] = {}
                rows = []
                for (fn, line, name), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
                    if name == "<method 'poll' of 'select.epoll' objects>":
                        continue
                    g = _group(fn)
                    groups[g] = groups.get(g, 0.0) + tt
                    short = fn.split("/site-packages/")[-1].replace(str(ROOT) + "/", "")
                    rows.append((tt, ct, nc, f"{short}:{line}({name})"))
                busy = sum(groups.values())
                print(
                    f"\n==== {stack} {scenario} {role}: {n} msgs, busy {busy:.2f} s "
                    f"= {busy / n * 1e6:.1f} profiled µs/msg ===="
                )
                print(
                    "  "
                    + ", ".join(
                        f"{g} {t / n * 1e6:.1f} ({t / busy:.0%})"
                        for g, t in sorted(groups.items(), key=lambda kv: -kv[1])
                    )
                )
                rows.sort(reverse=True)
                print(f"  {'self µs/msg':>11} {'cum µs/msg':>10} {'calls/msg':>9}  function")
                for tt, ct, nc, label in rows[:top]:
                    print(f"  {tt / n * 1e6:11.2f} {ct / n * 1e6:10.2f} {nc / n:9.2f}  {label}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="0.3 + 0.5 s per measurement, 1 round (a smoke test)"
    )
    ap.add_argument("--duration", type=float, help="measured seconds (default 4, quick 0.5)")
    ap.add_argument("--warmup", type=float, help="warm-up seconds (default 1, quick 0.3)")
    ap.add_argument(
        "--rounds",
        type=int,
        # the one-way rate is bimodal on a shared machine: a median of 3 can land on the
        # slow mode (0.69 against 0.85 with 5 rounds, 2026-11-28)
        help="rounds, rotating the stacks (default 5)",
    )
    ap.add_argument("--batch", type=int, default=64, help="one-way messages per loop pass")
    ap.add_argument(
        "--outbound-limit",
        type=int,
        default=OUTBOUND_LIMIT,
        help="bytes buffered before a one-way sender yields (raw; backbone's "
        "outbound_buffer_limit); default 4 MiB, backbone's default",
    )
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list")
    ap.add_argument("--stacks", default=",".join(STACKS), help="comma list")
    ap.add_argument("--no-write", action="store_true", help="do not write JSON / docs")
    ap.add_argument(
        "--profile",
        metavar="DIR",
        help="profiling pass instead: cProfile both processes over the measured window "
        "(one round; writes DIR/<stack>-<scenario>-<role>.prof and prints the top entries)",
    )
    ap.add_argument("--top", type=int, default=30, help="entries to print per profile")
    args = ap.parse_args(argv)

    duration = args.duration or (0.5 if args.quick else 4.0)
    warmup = args.warmup if args.warmup is not None else (0.3 if args.quick else 1.0)
    rounds = args.rounds or (1 if args.quick or args.profile else 5)
    scenarios = [s for s in args.scenarios.split(",") if s]
    stacks = [s for s in args.stacks.split(",") if s]
    for s in scenarios:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r} (known: {', '.join(SCENARIOS)})")
    for s in stacks:
        if s not in STACKS:
            ap.error(f"unknown stack {s!r} (known: {', '.join(STACKS)})")

    _tmp, certs = dev_certs()
    params: dict[str, Any] = {
        **certs,
        "batch": args.batch,
        "warmup": warmup,
        "duration": duration,
        "outbound_limit": args.outbound_limit,
    }
    if args.profile:
        pdir = Path(args.profile).resolve()
        pdir.mkdir(parents=True, exist_ok=True)
        params["profile_dir"] = str(pdir)

    command = command_line("bench/single_connection.py", argv)
    machine = machine_info()
    print(
        f"# {machine['nproc']} CPUs, {machine['cpu_model']}, Python {machine['python']}, "
        f"aioquic {machine['aioquic']}, websockets {machine['websockets']}; {rounds} round(s) "
        f"x {warmup:g}+{duration:g} s; load {machine['loadavg']}",
        flush=True,
    )

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        sc: {st: [] for st in stacks} for sc in scenarios
    }
    t_start = time.time()
    for rnd in range(rounds):
        k = rnd % len(stacks)
        order = stacks[k:] + stacks[:k]
        for scenario in scenarios:
            for stack in order:
                r = run_one(stack, scenario, params)
                runs[scenario][stack].append(r)
                print(
                    f"round {rnd + 1} {scenario:9s} {stack:10s} {r['rate']:>10,.0f} msgs/s  "
                    f"cpu µs/msg send {r['sender_cpu_us_per_msg'] or 0:.1f} "
                    f"recv {r['receiver_cpu_us_per_msg'] or 0:.1f}  "
                    f"util {r['sender_cpu_util']:.2f}/{r['receiver_cpu_util']:.2f} "
                    f"(sys {r['sender_sys_util']:.2f}/{r['receiver_sys_util']:.2f})  "
                    f"bp {r['backpressure_yields']}  drops {r['udp_rcvbuf_errors']}",
                    flush=True,
                )
    summary = summarize(runs)
    print()
    print(render_table(summary))
    print()
    print(render_cpu_table(summary))
    print(f"\n(total {time.time() - t_start:.0f} s)")

    if args.profile:
        counts = {(st, sc): rs[0]["count"] for sc, d in runs.items() for st, rs in d.items()}
        profile_report(Path(params["profile_dir"]), stacks, scenarios, args.top, counts)
        return 0
    if args.no_write:
        return 0
    public_params = {k: v for k, v in params.items() if "cert" not in k and "key" not in k}
    public_params.update(
        rounds=rounds,
        scenarios={k: SCENARIOS[k]._asdict() for k in scenarios},
        stacks=stacks,
        backpressure_sleep=BACKPRESSURE_SLEEP,
    )
    result = {
        "command": command,
        "machine": machine,
        "loadavg_end": loadavg(),
        "params": public_params,
        "summary": summary,
    }
    path = write_json(RESULTS_NAME, result)
    write_docs_section(SECTION_START, SECTION_END, render_docs_section(result), DOCS)
    print(f"wrote {path.relative_to(ROOT)} and {DOCS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
