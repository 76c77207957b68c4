"""Single-connection benchmark: backbone vs. a raw aioquic baseline with the same framing.

One invocation measures, on loopback, with the server and the client in separate
processes (``multiprocessing`` spawn), for both stacks:

* ``oneway``  -- server -> client messages with a 200-byte orjson payload; the rate is
  what the client's handler counts;
* ``ack1``    -- WaitAck round trips, 1 in flight (server sends, client handler answers);
* ``ack32``   -- WaitAck round trips, 32 in flight (32 tasks each awaiting a result).

The *raw* stack is aioquic alone (no backbone code is imported in its processes): the
same wire framing as backbone (u32 length, u8 type, then the MESSAGE header ``flags u8,
msg id 16 bytes, headers length u16`` and an orjson body) on one long-lived bidirectional
stream, writes coalesced per event-loop pass (a list, one ``send_stream_data`` +
``transmit`` via ``call_soon``), frames decoded with ``struct``, a trivial synchronous
handler, and a RESULT frame (0x11) back for WaitAck.

The *backbone* stack is ``backbone.Server`` + ``backbone.Client`` with an async handler
returning a small dict.

Each measurement: start both processes, connect, let the sender run ``--warmup``
seconds, then the parent asks both processes for a snapshot of their counters and CPU
time, waits ``--duration`` seconds and asks again.  Rates come from the measuring
process's own clock.  Rounds alternate raw/backbone; the table shows the median.

Run from the repository root::

    PYTHONPATH=. python3 bench/single_connection.py            # full (~2.5 min)
    PYTHONPATH=. python3 bench/single_connection.py --quick    # ~1 s per measurement
    PYTHONPATH=. python3 bench/single_connection.py --profile /tmp/prof   # cProfile pass
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import re
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_JSON = ROOT / "bench" / "results" / "single_connection.json"
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION_START = "<!-- bench/single_connection.py:start -->"
SECTION_END = "<!-- bench/single_connection.py:end -->"

SCENARIOS = {
    "oneway": "one-way, 200 B payload",
    "ack1": "WaitAck, 1 in flight",
    "ack32": "WaitAck, 32 in flight",
}
STACKS = ("raw", "backbone")

PAYLOAD_SIZE = 200
OUTBOUND_LIMIT = 4 * 1024 * 1024  # backbone's default outbound_buffer_limit, used by raw too
BACKPRESSURE_SLEEP = 0.001
CLIENT_ID = "bench"

# --- wire format for the raw baseline (identical bytes to backbone's MESSAGE/RESULT) -------
T_HELLO = 0x01
T_MESSAGE = 0x10
T_RESULT = 0x11
FLAG_WAIT_ACK = 0x01
_HEAD = struct.Struct("!IBB16sH")  # length, type, flags, msg id, headers length
_LEN_TYPE = struct.Struct("!IB")
_MSG_HEAD = struct.Struct("!B16sH")
STREAM_ID = 0


def make_payload(size: int = PAYLOAD_SIZE) -> dict[str, Any]:
    """A dict whose orjson encoding is exactly ``size`` bytes."""
    import orjson

    base = {"op": "tick", "seq": 123456, "data": ""}
    pad = size - len(orjson.dumps(base))
    base["data"] = "x" * pad
    assert len(orjson.dumps(base)) == size
    return base


class MsgIds:
    """16-byte ids: 8-byte random prefix + 8-byte counter (same shape as backbone's)."""

    def __init__(self) -> None:
        self._prefix = int.from_bytes(os.urandom(8), "big") << 64
        self._n = 0

    def next(self) -> bytes:
        self._n += 1
        return (self._prefix | self._n).to_bytes(16, "big")


class Stats:
    __slots__ = ("backpressure", "completed", "received", "sent")

    def __init__(self) -> None:
        self.received = 0  # handler invocations (receiver)
        self.sent = 0  # messages queued (sender)
        self.completed = 0  # WaitAck results received (sender)
        self.backpressure = 0  # times the sender had to yield for backpressure

    def snapshot(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


# --- child-process control ----------------------------------------------------------------


class Control:
    """Commands from the parent over a Pipe, read on the event loop: ``mark`` answers a
    snapshot of counters + clocks (and toggles cProfile when profiling), ``quit`` ends."""

    def __init__(self, conn: Any, stats: Stats, profile_path: str | None) -> None:
        self.conn = conn
        self.stats = stats
        self.loop = asyncio.get_running_loop()
        self.quit = asyncio.Event()
        self.marks = 0
        self.profile_path = profile_path
        self.profiler: Any = None
        self.loop.add_reader(conn.fileno(), self._on_cmd)

    def send(self, *msg: Any) -> None:
        self.conn.send(msg)

    def _on_cmd(self) -> None:
        try:
            cmd = self.conn.recv()
        except (EOFError, OSError):
            self.loop.remove_reader(self.conn.fileno())
            self.quit.set()
            return
        if cmd == "mark":
            self.marks += 1
            snap = {
                "t": time.perf_counter(),
                "cpu": time.process_time(),
                "sys": os.times().system,
                **self.stats.snapshot(),
            }
            if self.profile_path:
                if self.marks == 1:
                    import cProfile

                    self.profiler = cProfile.Profile()
                    self.profiler.enable()
                elif self.marks == 2 and self.profiler is not None:
                    self.profiler.disable()
                    self.profiler.dump_stats(self.profile_path)
            self.conn.send(("mark", snap))
        elif cmd == "quit":
            self.loop.remove_reader(self.conn.fileno())
            self.quit.set()

    async def wait_ready(self, predicate: Any, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.005)


def child_main(role: str, stack: str, scenario: str, params: dict[str, Any], conn: Any) -> None:
    try:
        if stack == "raw":
            coro = (
                raw_server(conn, scenario, params) if role == "server" else raw_client(conn, params)
            )
        else:
            coro = (
                bb_server(conn, scenario, params) if role == "server" else bb_client(conn, params)
            )
        asyncio.run(coro)
    except BaseException as exc:  # report, then die
        with contextlib.suppress(Exception):
            conn.send(("error", f"{role}/{stack}: {type(exc).__name__}: {exc}"))
        raise


def _profile_path(params: dict[str, Any], stack: str, scenario: str, role: str) -> str | None:
    d = params.get("profile_dir")
    return str(Path(d) / f"{stack}-{scenario}-{role}.prof") if d else None


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

    class RawProtocol(QuicConnectionProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.outbox: list[bytes] = []
            self.outbox_bytes = 0
            self.flush_handle: asyncio.Handle | None = None
            self.buf = bytearray()
            self.pending: dict[bytes, asyncio.Future[Any]] = {}
            self.stats: Stats | None = None
            self.hello = False

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
                    self.hello = True
                pos = end
            if pos:
                del buf[:pos]

        def handle(self, payload: Any) -> Any:
            # the trivial handler
            self.stats.received += 1  # type: ignore[union-attr]
            return {"ok": True}

    return RawProtocol


async def raw_server(conn: Any, scenario: str, params: dict[str, Any]) -> None:
    from aioquic.asyncio.server import serve
    from aioquic.quic.configuration import QuicConfiguration

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

    qconf = QuicConfiguration(is_client=False, alpn_protocols=["bench/1"], idle_timeout=60.0)
    qconf.load_cert_chain(params["server_cert"], params["server_key"])
    server = await serve("127.0.0.1", 0, configuration=qconf, create_protocol=factory)
    port = server._transport.get_extra_info("sockname")[1]
    ctl.send("port", port)
    await ctl.wait_ready(lambda: bool(protos) and protos[0].hello)
    proto = protos[0]
    ctl.send("ready")
    payload = params["payload"]
    ids = MsgIds()

    async def oneway() -> None:
        batch = params["batch"]
        loop_sleep = asyncio.sleep
        while True:
            if proto.buffered() > OUTBOUND_LIMIT:
                stats.backpressure += 1
                await loop_sleep(BACKPRESSURE_SLEEP)
                continue
            for _ in range(batch):
                proto.send_message(0, ids.next(), payload)
            stats.sent += batch
            await loop_sleep(0)

    async def requester() -> None:
        loop = asyncio.get_running_loop()
        pending = proto.pending
        while True:
            msg_id = ids.next()
            fut = loop.create_future()
            pending[msg_id] = fut
            proto.send_message(FLAG_WAIT_ACK, msg_id, payload)
            stats.sent += 1
            await fut
            stats.completed += 1

    tasks = _start_workload(scenario, oneway, requester)
    await ctl.quit.wait()
    for t in tasks:
        t.cancel()
    server.close()


async def raw_client(conn: Any, params: dict[str, Any]) -> None:
    from aioquic.asyncio.client import connect
    from aioquic.quic.configuration import QuicConfiguration

    assert "backbone" not in sys.modules, "the raw baseline must not load backbone"
    stats = Stats()
    ctl = Control(conn, stats, _profile_path(params, "raw", params["scenario"], "client"))
    RawProtocol = _raw_protocol_class()
    qconf = QuicConfiguration(
        is_client=True, alpn_protocols=["bench/1"], idle_timeout=60.0, server_name="localhost"
    )
    qconf.load_verify_locations(params["ca_cert"])
    async with connect(
        "127.0.0.1", params["port"], configuration=qconf, create_protocol=RawProtocol
    ) as proto:
        proto.stats = stats
        proto.queue(_LEN_TYPE.pack(3, T_HELLO) + b"{}")  # opens stream 0
        ctl.send("ready")
        await ctl.quit.wait()
        proto.close()


def _start_workload(scenario: str, oneway: Any, requester: Any) -> list[asyncio.Task[None]]:
    if scenario == "oneway":
        return [asyncio.ensure_future(oneway())]
    n = {"ack1": 1, "ack32": 32}[scenario]
    return [asyncio.ensure_future(requester()) for _ in range(n)]


# --- backbone -------------------------------------------------------------------------------


async def bb_server(conn: Any, scenario: str, params: dict[str, Any]) -> None:
    from backbone import Backpressure, Server

    stats = Stats()
    ctl = Control(conn, stats, _profile_path(params, "backbone", scenario, "server"))
    server = Server("127.0.0.1", 0, certfile=params["server_cert"], keyfile=params["server_key"])
    await server.start()
    ctl.send("port", server.port)
    await ctl.wait_ready(lambda: CLIENT_ID in server.client_ids())
    ctl.send("ready")
    payload = params["payload"]
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

    async def requester() -> None:
        while True:
            stats.sent += 1
            await send_to(CLIENT_ID, payload, wait_ack=True)
            stats.completed += 1

    tasks = _start_workload(scenario, oneway, requester)
    await ctl.quit.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await server.stop(grace=0)


async def bb_client(conn: Any, params: dict[str, Any]) -> None:
    from backbone import Client

    stats = Stats()
    ctl = Control(conn, stats, _profile_path(params, "backbone", params["scenario"], "client"))
    client = Client(CLIENT_ID, "127.0.0.1", params["port"], cafile=params["ca_cert"])

    @client.handler
    async def handle(msg: Any) -> Any:
        stats.received += 1
        return {"ok": True}

    async with client:
        await client.wait_connected(20)
        ctl.send("ready")
        await ctl.quit.wait()


# --- parent: orchestration ------------------------------------------------------------------


def _recv(conn: Any, kind: str, timeout: float, who: str) -> Any:
    if not conn.poll(timeout):
        raise RuntimeError(f"{who}: no {kind!r} within {timeout} s")
    msg = conn.recv()
    if msg[0] == "error":
        raise RuntimeError(msg[1])
    if msg[0] != kind:
        raise RuntimeError(f"{who}: expected {kind!r}, got {msg!r}")
    return msg[1] if len(msg) > 1 else None


def udp_rcvbuf_errors() -> int | None:
    try:
        lines = Path("/proc/net/snmp").read_text().splitlines()
    except OSError:
        return None
    udp = [ln.split() for ln in lines if ln.startswith("Udp:")]
    if len(udp) < 2:
        return None
    return int(dict(zip(udp[0][1:], udp[1][1:], strict=False)).get("RcvbufErrors", 0))


def run_one(stack: str, scenario: str, params: dict[str, Any]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    s_parent, s_child = ctx.Pipe()
    c_parent, c_child = ctx.Pipe()
    params = dict(params, scenario=scenario)
    srv = ctx.Process(
        target=child_main, args=("server", stack, scenario, params, s_child), daemon=True
    )
    srv.start()
    procs = [srv]
    try:
        port = _recv(s_parent, "port", 30, "server")
        cparams = dict(params, port=port)
        cli = ctx.Process(
            target=child_main, args=("client", stack, scenario, cparams, c_child), daemon=True
        )
        cli.start()
        procs.append(cli)
        _recv(c_parent, "ready", 30, "client")
        _recv(s_parent, "ready", 30, "server")
        time.sleep(params["warmup"])

        def mark() -> tuple[dict[str, Any], dict[str, Any]]:
            s_parent.send("mark")
            c_parent.send("mark")
            return _recv(s_parent, "mark", 30, "server"), _recv(c_parent, "mark", 30, "client")

        drops0 = udp_rcvbuf_errors()
        s0, c0 = mark()
        time.sleep(params["duration"])
        s1, c1 = mark()
        drops1 = udp_rcvbuf_errors()
        for p in (s_parent, c_parent):
            p.send("quit")
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)
    for pipe in (s_parent, c_parent):
        while pipe.poll(0):
            msg = pipe.recv()
            if msg[0] == "error":
                raise RuntimeError(msg[1])

    if scenario == "oneway":
        count = c1["received"] - c0["received"]
        elapsed = c1["t"] - c0["t"]
    else:
        count = s1["completed"] - s0["completed"]
        elapsed = s1["t"] - s0["t"]
    rate = count / elapsed
    return {
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
        "udp_rcvbuf_errors": (drops1 - drops0)
        if drops0 is not None and drops1 is not None
        else None,
    }


def machine_info() -> dict[str, Any]:
    import aioquic
    import orjson

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "cpu_model": cpu,
        "python": platform.python_version(),
        "aioquic": aioquic.__version__,
        "orjson": orjson.__version__,
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


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


def summarize(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for scenario, by_stack in runs.items():
        entry: dict[str, Any] = {"label": SCENARIOS[scenario]}
        for stack, rs in by_stack.items():
            entry[stack] = {
                "median_msgs_per_s": _med([r["rate"] for r in rs]),
                "runs_msgs_per_s": [round(r["rate"], 1) for r in rs],
                "sender_cpu_us_per_msg": _med([r["sender_cpu_us_per_msg"] for r in rs]),
                "receiver_cpu_us_per_msg": _med([r["receiver_cpu_us_per_msg"] for r in rs]),
                "backpressure_yields": [r["backpressure_yields"] for r in rs],
                "udp_rcvbuf_errors": [r["udp_rcvbuf_errors"] for r in rs],
                "runs": rs,
            }
        raw = entry.get("raw", {}).get("median_msgs_per_s")
        bb = entry.get("backbone", {}).get("median_msgs_per_s")
        entry["ratio_backbone_over_raw"] = bb / raw if raw and bb is not None else None
        c_raw, c_bb = _cpu_total(entry.get("raw")), _cpu_total(entry.get("backbone"))
        entry["cpu_ratio_backbone_over_raw"] = c_bb / c_raw if c_raw and c_bb else None
        out[scenario] = entry
    return out


def render_table(summary: dict[str, Any]) -> str:
    head = (
        "| scenario | raw msgs/s (median) | backbone msgs/s (median) | backbone/raw "
        "| raw runs | backbone runs | CPU µs/msg send / recv, raw "
        "| CPU µs/msg send / recv, backbone | CPU/msg backbone/raw |"
    )
    sep = "|---|--:|--:|--:|---|---|--:|--:|--:|"
    rows = [head, sep]

    def runs(e: dict[str, Any]) -> str:
        return ", ".join(f"{v / 1000:.1f}k" for v in e["runs_msgs_per_s"])

    def cpu(e: dict[str, Any]) -> str:
        s, r = e["sender_cpu_us_per_msg"], e["receiver_cpu_us_per_msg"]
        return f"{s:.1f} / {r:.1f}" if s is not None and r is not None else "-"

    for entry in summary.values():
        raw, bb = entry.get("raw"), entry.get("backbone")
        ratio = entry["ratio_backbone_over_raw"]
        cpu_ratio = entry.get("cpu_ratio_backbone_over_raw")
        rows.append(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                entry["label"],
                _fmt_rate(raw["median_msgs_per_s"]) if raw else "-",
                _fmt_rate(bb["median_msgs_per_s"]) if bb else "-",
                f"**{ratio:.2f}**" if ratio is not None else "-",
                runs(raw) if raw else "-",
                runs(bb) if bb else "-",
                cpu(raw) if raw else "-",
                cpu(bb) if bb else "-",
                f"{cpu_ratio:.2f}" if cpu_ratio is not None else "-",
            )
        )
    return "\n".join(rows)


def render_docs_section(result: dict[str, Any]) -> str:
    m = result["machine"]
    p = result["params"]
    s = result["summary"]
    ratios = ", ".join(
        f"{e['label']}: **{e['ratio_backbone_over_raw']:.2f}**"
        for e in s.values()
        if e.get("ratio_backbone_over_raw") is not None
    )
    drops = []
    for e in s.values():
        for stack in STACKS:
            if stack in e:
                d = [x for x in e[stack]["udp_rcvbuf_errors"] if x is not None]
                if any(d):
                    drops.append(f"{e['label']} {stack}: {d}")
    lines = [
        SECTION_START,
        "## Single connection: backbone vs. raw aioquic",
        "",
        "Written by `bench/single_connection.py` (do not edit by hand; rerun it).",
        "",
        "Command:",
        "",
        "```",
        result["command"],
        "```",
        "",
        f"Machine: {m['nproc']} CPUs (`nproc`), {m['cpu_model']}; Python {m['python']}, "
        f"aioquic {m['aioquic']}, orjson {m['orjson']}; {m['platform']}; {m['date']}.",
        "",
        f"Setup: loopback, server and client in separate processes (multiprocessing spawn), "
        f"stdlib asyncio loop, one QUIC connection.  The server is the sender in every "
        f"scenario; payload {p['payload_bytes']} bytes of orjson.  Each measurement: "
        f"{p['warmup']:g} s warm-up, then {p['duration']:g} s measured; "
        f"{p['rounds']} rounds alternating raw/backbone; the table shows the median "
        f"(runs listed).  One-way sends {p['batch']} messages per event-loop pass and "
        f"yields {BACKPRESSURE_SLEEP * 1000:g} ms when over {OUTBOUND_LIMIT // 1024 // 1024} "
        "MiB buffered (backbone: on `Backpressure`).  CPU µs/msg is process CPU time over "
        "the window divided by messages (sender = server, receiver = client).",
        "",
        render_table(s),
        "",
        f"Throughput ratios backbone/raw: {ratios}.  CPU-per-message ratios "
        "(sender + receiver): "
        + ", ".join(
            f"{e['label']}: {e['cpu_ratio_backbone_over_raw']:.2f}"
            for e in s.values()
            if e.get("cpu_ratio_backbone_over_raw") is not None
        )
        + ".",
        "",
        "Reading the numbers: one-way throughput is set by QUIC congestion control reacting "
        "to UDP receive-buffer drops, so single runs can differ by tens of percent; the "
        "CPU µs/msg columns are the steadier measure of what backbone adds.  WaitAck with 1 "
        "in flight is a latency test: per round trip, aioquic and event-loop wake-ups on "
        "both sides dominate either stack's own code.  "
        "`bench/micro_paths.py` measures backbone's own per-message cost without QUIC.",
        "",
    ]
    if drops:
        lines += [
            "UDP receive-buffer drops during the windows (`/proc/net/snmp` RcvbufErrors): "
            + "; ".join(drops)
            + ".",
            "",
        ]
    lines += [
        "Raw baseline: aioquic only, the same bytes on the wire (u32 length, u8 type, "
        "MESSAGE header, orjson body), writes coalesced per loop pass, a synchronous "
        "trivial handler that still `orjson.loads` the payload and `orjson.dumps` the "
        "result.  Backbone: `Server.send_to` / `Client` with an `async` handler returning "
        '`{"ok": True}`.',
        SECTION_END,
    ]
    return "\n".join(lines)


def write_docs(section: str) -> None:
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(SECTION_START) + r".*?" + re.escape(SECTION_END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    if not text.endswith("\n"):
        text += "\n"
    DOCS.write_text(text)


def _group(filename: str) -> str:
    if "/backbone/" in filename:
        return "backbone"
    if "/aioquic/" in filename:
        return "aioquic"
    if "/asyncio/" in filename or filename.endswith("selectors.py"):
        return "asyncio"
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
    ap.add_argument("--quick", action="store_true", help="~1 s per measurement, 1 round")
    ap.add_argument("--duration", type=float, help="measured seconds (default 5, quick 1)")
    ap.add_argument("--warmup", type=float, help="warm-up seconds (default 1, quick 0.5)")
    ap.add_argument("--rounds", type=int, help="rounds, alternating raw/backbone (default 3)")
    ap.add_argument("--batch", type=int, default=64, help="one-way messages per loop pass")
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

    duration = args.duration or (1.0 if args.quick else 5.0)
    warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    rounds = args.rounds or (1 if args.quick or args.profile else 3)
    scenarios = [s for s in args.scenarios.split(",") if s]
    stacks = [s for s in args.stacks.split(",") if s]
    for s in scenarios:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}")
    for s in stacks:
        if s not in STACKS:
            ap.error(f"unknown stack {s!r}")

    from backbone.certs import make_dev_certs  # parent only; children get file paths

    tmp = tempfile.TemporaryDirectory(prefix="bench-certs-")
    certs = make_dev_certs(tmp.name)
    params: dict[str, Any] = {
        "server_cert": str(certs.server_cert),
        "server_key": str(certs.server_key),
        "ca_cert": str(certs.ca_cert),
        "payload": make_payload(),
        "batch": args.batch,
        "warmup": warmup,
        "duration": duration,
    }
    if args.profile:
        pdir = Path(args.profile).resolve()
        pdir.mkdir(parents=True, exist_ok=True)
        params["profile_dir"] = str(pdir)

    command = "PYTHONPATH=. python3 bench/single_connection.py" + (
        " " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else ""
    )
    machine = machine_info()
    print(
        f"# {machine['nproc']} CPUs, {machine['cpu_model']}, Python {machine['python']}, "
        f"aioquic {machine['aioquic']}; {rounds} round(s) x {warmup:g}+{duration:g} s",
        flush=True,
    )

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        sc: {st: [] for st in stacks} for sc in scenarios
    }
    t_start = time.time()
    for rnd in range(rounds):
        order = stacks if rnd % 2 == 0 else list(reversed(stacks))
        for scenario in scenarios:
            for stack in order:
                r = run_one(stack, scenario, params)
                runs[scenario][stack].append(r)
                print(
                    f"round {rnd + 1} {scenario:7s} {stack:9s} {r['rate']:>10,.0f} msgs/s  "
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
    print(f"\n(total {time.time() - t_start:.0f} s)")

    if args.profile:
        counts = {(st, sc): rs[0]["count"] for sc, d in runs.items() for st, rs in d.items()}
        profile_report(Path(params["profile_dir"]), stacks, scenarios, args.top, counts)
        return 0
    if args.no_write:
        return 0
    public_params = {
        k: v
        for k, v in params.items()
        if k not in ("payload",) and "cert" not in k and "key" not in k
    }
    public_params.update(
        rounds=rounds,
        payload_bytes=PAYLOAD_SIZE,
        outbound_limit=OUTBOUND_LIMIT,
        backpressure_sleep=BACKPRESSURE_SLEEP,
    )
    result = {
        "command": command,
        "machine": machine,
        "params": public_params,
        "summary": summary,
    }
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(result, indent=2) + "\n")
    write_docs(render_docs_section(result))
    print(f"wrote {RESULTS_JSON.relative_to(ROOT)} and {DOCS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
