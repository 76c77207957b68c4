"""Latency benchmark: connect time and one-way latency under a fixed load, for backbone,
raw aioquic with the same framing, and ``websockets`` over TLS.

Two parts, each with the server and the client in separate processes on loopback:

* **connect** -- ``--connects`` (default 200) sequential connects from one client
  process, each timed from the start of the connect until the application can send:
  backbone: ``Client.start()`` until ``wait_connected()`` returns (QUIC + TLS 1.3
  handshake, HELLO, WELCOME); raw aioquic: a connected UDP socket, the QUIC handshake
  (X25519 key share only, as backbone's client offers), then the same HELLO frame on
  stream 0 and a WELCOME frame back; websockets: TCP connect, TLS 1.3 handshake, the
  HTTP upgrade, then a HELLO message and a WELCOME message back.  Each connection is
  closed after it is timed (not part of the time); 5 connects first as a warm-up.
* **paced** -- the server sends one-way messages (≈200 B orjson) at a fixed rate
  (``--rates``, default 1,000 and 10,000 msgs/s) for ``--duration`` seconds after a
  warm-up.  **One-way latency, send → handler**: the sender puts ``time.perf_counter()``
  into each payload just before handing it to the stack, and the client's handler
  subtracts it from its own ``perf_counter()``.  On Linux ``perf_counter`` is
  CLOCK_MONOTONIC, one clock for every process of the host, so no clock sync is
  involved.  This is ``bench/single_connection.py``'s process pair with its ``paced``
  workload (``run_one(stack, "paced", ...)``).

Writes ``bench/results/latency.json``, ``docs/latency.png`` (the latency distributions)
and its section of ``docs/benchmarks.md``.

    PYTHONPATH=. python3 bench/latency.py              # full: 200 connects, 15 s per rate
    PYTHONPATH=. python3 bench/latency.py --quick      # 30 connects, 2 s per rate
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from array import array
from pathlib import Path
from typing import Any

from bench import single_connection as sc
from bench._harness import (
    DOCS,
    ROOT,
    Control,
    Stats,
    command_line,
    dev_certs,
    loadavg,
    log_histogram,
    machine_info,
    machine_line,
    percentile,
    reap,
    recv,
    run_child,
    section_markers,
    spawn,
    write_docs_section,
    write_json,
)
from bench.machine_stalls import StallProbe, brief, in_episodes

RESULTS_NAME = "latency.json"
PNG = ROOT / "docs" / "latency.png"
SECTION_START, SECTION_END = section_markers("bench/latency.py")
STACKS = sc.STACKS
WARMUP_CONNECTS = 5
QUANTILES = (50.0, 90.0, 99.0, 99.9)
AIM_P99_AT_1000 = 0.005  # seconds: p99 < 5 ms at 1,000 msgs/s on loopback
AIM_CONNECT_P99 = 0.050  # seconds: connect p99 < 50 ms
COLORS = {"raw": "tab:gray", "backbone": "tab:blue", "websockets": "tab:orange"}
LABELS = {"raw": "raw aioquic", "backbone": "backbone", "websockets": "websockets (TLS)"}


# --- connect: servers ------------------------------------------------------------------------


def connect_child(role: str, stack: str, params: dict[str, Any], conn: Any) -> None:
    fn = {
        ("server", "raw"): raw_connect_server,
        ("client", "raw"): raw_connect_client,
        ("server", "backbone"): bb_connect_server,
        ("client", "backbone"): bb_connect_client,
        ("server", "websockets"): ws_connect_server,
        ("client", "websockets"): ws_connect_client,
    }[(role, stack)]
    run_child(conn, f"connect {role}/{stack}", fn, conn, params)


async def raw_connect_server(conn: Any, params: dict[str, Any]) -> None:
    from aioquic.asyncio.server import serve

    assert "backbone" not in sys.modules, "the raw baseline must not load backbone"
    ctl = Control(conn, Stats(), None)
    base = sc._raw_protocol_class()

    class Answering(base):  # type: ignore[misc, valid-type]
        answer_hello = True

    server = await serve(
        "127.0.0.1",
        0,
        configuration=sc.raw_server_configuration(params),
        create_protocol=Answering,
    )
    ctl.send("port", server._transport.get_extra_info("sockname")[1])
    await ctl.quit.wait()
    server.close()


async def bb_connect_server(conn: Any, params: dict[str, Any]) -> None:
    from backbone import Server

    ctl = Control(conn, Stats(), None)
    server = Server("127.0.0.1", 0, certfile=params["server_cert"], keyfile=params["server_key"])
    await server.start()
    ctl.send("port", server.port)
    await ctl.quit.wait()
    await server.stop(grace=0)


async def ws_connect_server(conn: Any, params: dict[str, Any]) -> None:
    from websockets.asyncio.server import serve

    assert "backbone" not in sys.modules, "the websockets baseline must not load backbone"
    import orjson

    ctl = Control(conn, Stats(), None)
    welcome = sc.ws_welcome()

    async def handler(ws: Any) -> None:
        hello = await ws.recv()
        orjson.loads(hello[1:])
        await ws.send(welcome)
        async for _ in ws:
            pass

    async with serve(
        handler, "127.0.0.1", 0, ssl=sc.ws_server_ssl(params), compression=None
    ) as server:
        ctl.send("port", server.sockets[0].getsockname()[1])
        await ctl.quit.wait()


# --- connect: clients (each times ``n`` sequential connects) ---------------------------------


def _hello(i: int) -> bytes:
    return (
        b'{"version":1,"client_id":"bench-%d","max_payload":1048576,"heartbeat_interval":15.0}' % i
    )


async def _timed_connects(conn: Any, params: dict[str, Any], once: Any, close: Any) -> None:
    """``WARMUP_CONNECTS`` + ``params["connects"]`` sequential connects; reports the
    durations of the timed ones and this process's CPU time over them."""
    perf = time.perf_counter
    n = params["connects"]
    times = array("d")
    cpu0 = 0.0
    for i in range(WARMUP_CONNECTS + n):
        if i == WARMUP_CONNECTS:
            cpu0 = time.process_time()
        t0 = perf()
        handle = await once(i)
        t1 = perf()
        if i >= WARMUP_CONNECTS:
            times.append(t1 - t0)
        await close(handle)
    cpu = time.process_time() - cpu0
    conn.send(("result", {"times": times.tobytes(), "client_cpu_s": cpu}))


async def raw_connect_client(conn: Any, params: dict[str, Any]) -> None:
    from aioquic.quic.connection import QuicConnection
    from aioquic.tls import Group

    assert "backbone" not in sys.modules, "the raw baseline must not load backbone"
    loop = asyncio.get_running_loop()
    RawProtocol = sc._raw_protocol_class()
    qconf = sc.raw_client_configuration(params)
    addr = ("127.0.0.1", params["port"])

    async def once(i: int) -> Any:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.connect(addr)
        quic = QuicConnection(configuration=qconf)
        original = quic._initialize

        def _initialize(peer_cid: bytes) -> None:  # offer X25519 only, as backbone does
            original(peer_cid)
            quic.tls._supported_groups = [Group.X25519]

        quic._initialize = _initialize  # type: ignore[method-assign]
        transport, proto = await loop.create_datagram_endpoint(lambda: RawProtocol(quic), sock=sock)
        proto.connect(addr)
        await proto.wait_connected()
        proto.welcomed = loop.create_future()
        body = _hello(i)
        proto.queue(sc._LEN_TYPE.pack(1 + len(body), sc.T_HELLO) + body)
        await proto.welcomed
        return proto, transport

    async def close(handle: Any) -> None:
        proto, transport = handle
        proto.close()
        transport.close()

    await _timed_connects(conn, params, once, close)


async def bb_connect_client(conn: Any, params: dict[str, Any]) -> None:
    from backbone import Client

    async def once(i: int) -> Any:
        client = Client(f"bench-{i}", "127.0.0.1", params["port"], cafile=params["ca_cert"])
        await client.start()
        await client.wait_connected(20)
        return client

    async def close(client: Any) -> None:
        await client.close()

    # the Client object is built inside the timed span (pydantic config validation):
    # it is part of what a user pays per connect; it costs ≈0.1 ms
    await _timed_connects(conn, params, once, close)


async def ws_connect_client(conn: Any, params: dict[str, Any]) -> None:
    from websockets.asyncio.client import connect

    assert "backbone" not in sys.modules, "the websockets baseline must not load backbone"
    ctx = sc.ws_client_ssl(params)
    uri = f"wss://localhost:{params['port']}"

    async def once(i: int) -> Any:
        ws = await connect(uri, ssl=ctx, compression=None)
        await ws.send(bytes([sc.T_HELLO]) + _hello(i))
        welcome = await ws.recv()
        assert welcome[0] == sc.T_WELCOME
        return ws

    async def close(ws: Any) -> None:
        await ws.close()

    await _timed_connects(conn, params, once, close)


def run_connect(stack: str, params: dict[str, Any]) -> dict[str, Any]:
    srv, s_parent = spawn(connect_child, "server", stack, params)
    procs, pipes = [srv], [s_parent]
    try:
        port = recv(s_parent, "port", 30, "server")
        s_parent.send("mark")
        m0 = recv(s_parent, "mark", 30, "server")
        cli, c_parent = spawn(connect_child, "client", stack, dict(params, port=port))
        procs.append(cli)
        pipes.append(c_parent)
        res = recv(c_parent, "result", 60 + params["connects"] * 2, "client")
        s_parent.send("mark")
        m1 = recv(s_parent, "mark", 30, "server")
        s_parent.send("quit")
    finally:
        reap(procs, pipes)
    times = array("d")
    times.frombytes(res["times"])
    n = len(times)
    return {
        "samples": sorted(times),
        "client_cpu_ms_per_connect": res["client_cpu_s"] / n * 1e3,
        # the server's CPU over the client's whole run (warm-up connects and closes too)
        "server_cpu_ms_per_connect": (m1["cpu"] - m0["cpu"]) / (n + WARMUP_CONNECTS) * 1e3,
    }


# --- summaries ---------------------------------------------------------------------------------


def dist_summary(samples: list[float]) -> dict[str, Any]:
    """Percentiles in milliseconds (nearest rank) and a log-spaced histogram (seconds)."""
    out: dict[str, Any] = {"count": len(samples)}
    for q in QUANTILES:
        v = percentile(samples, q)
        out[f"p{q:g}_ms"] = v * 1e3 if v is not None else None
    out["max_ms"] = samples[-1] * 1e3 if samples else None
    out["mean_ms"] = sum(samples) / len(samples) * 1e3 if samples else None
    out["histogram"] = log_histogram(samples)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def add_ratios(entry: dict[str, Any], keys: tuple[str, ...]) -> None:
    for base in ("raw", "websockets"):
        entry[f"ratio_backbone_over_{base}"] = {
            k: _ratio(entry.get("backbone", {}).get(k), entry.get(base, {}).get(k)) for k in keys
        }


# --- plot ------------------------------------------------------------------------------------


def plot(samples: dict[str, dict[str, list[float]]], titles: dict[str, str], path: Path) -> None:
    """One panel per part: the fraction of samples above x (1 − CDF), log-log, so that the
    median, p99 and p99.9 are all readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    parts = [p for p in titles if p in samples]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.2 * len(parts), 4.2), squeeze=False)
    for ax, part in zip(axes[0], parts, strict=True):
        ymin = 1.0
        for stack in STACKS:
            xs = samples[part].get(stack)
            if not xs:
                continue
            n = len(xs)
            ms = [x * 1e3 for x in xs]
            ccdf = [1.0 - i / n for i in range(n)]
            ymin = min(ymin, 1.0 / n)
            ax.step(ms, ccdf, where="post", color=COLORS[stack], label=LABELS[stack])
        for y, name in ((0.5, "p50"), (0.01, "p99"), (0.001, "p99.9")):
            if y >= ymin:
                ax.axhline(y, color="lightgray", lw=0.8, ls="--", zorder=0)
                ax.text(
                    1.0,
                    y,
                    f" {name}",
                    transform=ax.get_yaxis_transform(),
                    va="center",
                    fontsize=8,
                    color="gray",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(max(ymin * 0.8, 1e-5), 1.05)
        ax.set_xlabel("ms (log)")
        ax.set_title(titles[part], fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    axes[0][0].set_ylabel("fraction of samples slower than x (1 − CDF)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- docs --------------------------------------------------------------------------------------


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def _rt(x: float | None) -> str:
    return f"{x:.2f}" if x is not None else "-"


def _tail_in_episodes(
    stalls: dict[str, Any], sent_at: Any, in_order: Any, sorted_lat: list[float]
) -> None:
    """Add to the probe's report the share of all messages, and of the messages at or
    above the p99, that were in flight during one of its stall episodes, and the p99 of
    the messages that were not (ms)."""
    p99 = percentile(sorted_lat, 99.0)
    hit = in_episodes(sent_at, in_order, stalls.get("episode_spans") or [])
    tail = [h for x, h in zip(in_order, hit, strict=True) if p99 is not None and x >= p99]
    outside = sorted(x for x, h in zip(in_order, hit, strict=True) if not h)
    p99_outside = percentile(outside, 99.0)
    stalls["messages_in_episodes"] = sum(hit) / len(hit) if hit else 0.0
    stalls["tail_in_episodes"] = sum(tail) / len(tail) if tail else 0.0
    stalls["p99_outside_episodes_ms"] = p99_outside * 1e3 if p99_outside is not None else None


def _stalls(report: dict[str, Any] | None) -> str:
    if not report or not report.get("chunks"):
        return "–"
    return (
        f"{report['cpu_stalled_share']:.1%}, {report['episodes_per_s']:.2f} | "
        f"{report.get('messages_in_episodes', 0.0):.0%} / "
        f"{report.get('tail_in_episodes', 0.0):.0%} | "
        f"{_ms(report.get('p99_outside_episodes_ms'))}"
    )


def render_docs_section(result: dict[str, Any]) -> str:
    m = result["machine"]
    p = result["params"]
    conn = result["connect"]
    paced = result["paced"]
    lines = [
        SECTION_START,
        "## Latency: connect time and one-way latency under load",
        "",
        "Written by `bench/latency.py` (do not edit by hand; rerun it).",
        "",
        "Command:",
        "",
        "```",
        result["command"],
        "```",
        "",
        machine_line(m, result.get("loadavg_end")),
        "",
        "![latency distributions](latency.png)",
        "",
        "`docs/latency.png`: for each part, the fraction of samples slower than x (1 − CDF), "
        "both axes logarithmic; where a curve crosses the p99 line is its p99.",
        "",
        f"### Connect time ({p['connects']} sequential connects, one client process)",
        "",
        "From the start of the connect until the application can send: backbone "
        "`Client.start()` → `wait_connected()` (QUIC + TLS 1.3 handshake, HELLO, WELCOME); "
        "raw aioquic: the QUIC handshake (X25519 key share only, as backbone's client "
        "offers), then the same HELLO frame and a WELCOME back; websockets: TCP + TLS 1.3 "
        "+ HTTP upgrade, then a HELLO message and a WELCOME back.  Closing is not timed; "
        f"{WARMUP_CONNECTS} warm-up connects first.  CPU ms per connect: the client's over "
        "the timed connects; the server's over the whole run (closes and warm-up included).",
        "",
        "| stack | p50 ms | p90 ms | p99 ms | max ms | client CPU ms/connect "
        "| server CPU ms/connect |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for stack in STACKS:
        e = conn.get(stack)
        if not e:
            continue
        lines.append(
            f"| {LABELS[stack]} | {_ms(e['p50_ms'])} | {_ms(e['p90_ms'])} | "
            f"**{_ms(e['p99_ms'])}** | {_ms(e['max_ms'])} | "
            f"{e['client_cpu_ms_per_connect']:.2f} | {e['server_cpu_ms_per_connect']:.2f} |"
        )
    r_raw = conn.get("ratio_backbone_over_raw", {})
    r_ws = conn.get("ratio_backbone_over_websockets", {})
    lines += [
        "",
        f"Ratios backbone/raw: p50 {_rt(r_raw.get('p50_ms'))}, p99 {_rt(r_raw.get('p99_ms'))}; "
        f"backbone/websockets: p50 {_rt(r_ws.get('p50_ms'))}, p99 {_rt(r_ws.get('p99_ms'))} "
        "(lower is better).",
        "",
        "### One-way latency at a fixed rate",
        "",
        f"≈200 B orjson payloads sent at a fixed rate by the server for {p['duration']:g} s "
        f"(after {p['warmup']:g} s of warm-up); the client's handler measures "
        "`perf_counter()` − the `perf_counter()` the sender put into the payload just before "
        "handing it to the stack (CLOCK_MONOTONIC: one clock for all processes on the "
        "host).  So this is send → handler, one way, including the sender's own send path "
        "and the receiver's dispatch to its handler (backbone: an `async` handler).  The "
        "sender sleeps until the next message is due and sends everything due when it wakes "
        "(the event loop's timer granularity is 1 ms, so at 10,000 msgs/s it sends ≈10 per "
        'wake-up); "sender lag" is the most it fell behind schedule.',
        "",
        "",
        '"Machine stalls": during each stack\'s run (set-up and warm-up included) a thread '
        "of the benchmark's parent process did 0.1 ms of pure-Python work every 10 ms "
        "(`bench/machine_stalls.StallProbe`); the column gives the share of those chunks "
        "that took more than 3× their median wall time *and* CPU time, and the episodes "
        "they came in per second.  A chunk whose CPU time grows that much ran on a CPU the "
        "virtual machine's host had taken away (the guest charges the lost time to the "
        "running thread); it is not our load, which only delays a chunk's start.  A message "
        "that meets such an episode is handled several times slower, and the ones behind it "
        "queue: the p99 of a stack that spends ≈0.4 ms of CPU per message on each side "
        "(both QUIC stacks here) follows these episodes.  The last column says so in "
        "numbers: the share of all messages that were in flight (sent, not yet handled) "
        "at some moment of an episode, and the same share among the messages at or above "
        "the p99; the last the p99 of the messages that were not (an upper bound of what "
        "the stack does on a machine that does not stall: a message sent just after an "
        "episode may still queue behind its backlog, and the probe misses stalls shorter "
        "than its 10 ms period).",
        "",
        "| rate | stack | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | messages "
        "| achieved msgs/s | sender lag max ms | CPU use send / recv "
        "| machine stalls: chunks, episodes/s | in flight during one: all / p99 tail "
        "| p99 ms of the others |",
        "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for rate_key, entry in paced.items():
        for stack in STACKS:
            e = entry.get(stack)
            if not e:
                continue
            lines.append(
                f"| {int(entry['rate']):,} | {LABELS[stack]} | {_ms(e['p50_ms'])} | "
                f"{_ms(e['p90_ms'])} | **{_ms(e['p99_ms'])}** | {_ms(e['p99.9_ms'])} | "
                f"{_ms(e['max_ms'])} | {e['count']:,} | {e['achieved_msgs_per_s']:,.0f} | "
                f"{e['sender_lag_max_ms']:.1f} | "
                f"{e['sender_cpu_util']:.0%} / {e['receiver_cpu_util']:.0%} | "
                f"{_stalls(e.get('machine_stalls'))} |"
            )
        _ = rate_key
    q_rows = []
    for entry in paced.values():
        for stack in ("raw", "backbone"):
            q = (entry.get(stack) or {}).get("quic_sender_state_end")
            if not q:
                continue
            pkt = q.get("pacer_packet_ms") or 0.0
            q_rows.append(
                f"| {int(entry['rate']):,} | {LABELS[stack]} | {q['cwnd'] / 1024:,.0f} "
                f"| {q['in_flight'] / 1024:,.0f} | {q['srtt_ms']:.1f} "
                f"| {q['rtt_min_ms'] or 0:.1f} | {pkt:.3f} "
                f"| {1000 / pkt if pkt else 0:,.0f} "
                f"| {q.get('stream0_buffered', 0) / 1024:,.0f} |"
            )
    if q_rows:
        lines += [
            "",
            "The QUIC sender's state at the end of each window (aioquic internals, read in the "
            "server process): congestion window, bytes in flight, smoothed and minimum RTT, "
            "the pacer's interval between packets (its rate is cwnd / smoothed RTT) and the "
            "bytes waiting in stream 0's send buffer:",
            "",
            "| rate | stack | cwnd KiB | in flight KiB | smoothed RTT ms | min RTT ms "
            "| pacer ms/packet | pacer packets/s (≈) | stream buffer KiB |",
            "|--:|---|--:|--:|--:|--:|--:|--:|--:|",
            *q_rows,
        ]
    lines += ["", "Ratios (lower is better):", ""]
    for entry in paced.values():
        rr = entry.get("ratio_backbone_over_raw", {})
        rw = entry.get("ratio_backbone_over_websockets", {})
        lines.append(
            f"* {int(entry['rate']):,} msgs/s: backbone/raw p50 {_rt(rr.get('p50_ms'))}, "
            f"p99 {_rt(rr.get('p99_ms'))}, p99.9 {_rt(rr.get('p99.9_ms'))}; backbone/websockets "
            f"p50 {_rt(rw.get('p50_ms'))}, p99 {_rt(rw.get('p99_ms'))}, "
            f"p99.9 {_rt(rw.get('p99.9_ms'))}."
        )
    lines += ["", SECTION_END]
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="30 connects, 2 s per rate")
    ap.add_argument("--connects", type=int, help="sequential connects per stack (default 200)")
    ap.add_argument("--duration", type=float, help="measured seconds per rate (default 15)")
    ap.add_argument("--warmup", type=float, help="warm-up seconds per rate (default 2)")
    ap.add_argument("--rates", default="1000,10000", help="comma list of msgs/s")
    ap.add_argument("--stacks", default=",".join(STACKS), help="comma list")
    ap.add_argument("--parts", default="connect,paced", help="connect and/or paced")
    ap.add_argument("--no-write", action="store_true", help="do not write JSON / PNG / docs")
    args = ap.parse_args(argv)

    connects = args.connects or (30 if args.quick else 200)
    duration = args.duration or (2.0 if args.quick else 15.0)
    warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 2.0)
    rates = [float(r) for r in args.rates.split(",") if r]
    stacks = [s for s in args.stacks.split(",") if s]
    parts = {s for s in args.parts.split(",") if s}
    for s in stacks:
        if s not in STACKS:
            ap.error(f"unknown stack {s!r}")
    if not parts or parts - {"connect", "paced"}:
        ap.error("--parts takes connect and/or paced")

    _tmp, certs = dev_certs()
    params: dict[str, Any] = {
        **certs,
        "connects": connects,
        "warmup": warmup,
        "duration": duration,
        "batch": 64,
        "outbound_limit": sc.OUTBOUND_LIMIT,
    }
    machine = machine_info()
    command = command_line("bench/latency.py", argv)
    print(
        f"# {machine['nproc']} CPUs, Python {machine['python']}, aioquic {machine['aioquic']}, "
        f"websockets {machine['websockets']}; load {machine['loadavg']}",
        flush=True,
    )
    t_start = time.time()
    samples: dict[str, dict[str, list[float]]] = {}
    connect_out: dict[str, Any] = {}
    if "connect" in parts:
        samples["connect"] = {}
        for stack in stacks:
            r = run_connect(stack, params)
            samples["connect"][stack] = r["samples"]
            e = dist_summary(r["samples"])
            e.update(
                client_cpu_ms_per_connect=r["client_cpu_ms_per_connect"],
                server_cpu_ms_per_connect=r["server_cpu_ms_per_connect"],
            )
            connect_out[stack] = e
            print(
                f"connect {stack:10s} p50 {e['p50_ms']:.2f} ms  p99 {e['p99_ms']:.2f} ms  "
                f"max {e['max_ms']:.2f} ms  client cpu {e['client_cpu_ms_per_connect']:.2f} "
                f"server cpu {e['server_cpu_ms_per_connect']:.2f} ms/connect",
                flush=True,
            )
        add_ratios(connect_out, ("p50_ms", "p90_ms", "p99_ms"))
    paced_out: dict[str, Any] = {}
    if "paced" in parts:
        for rate in rates:
            key = f"{int(rate)}"
            entry: dict[str, Any] = {"rate": rate}
            samples[f"paced{key}"] = {}
            for stack in stacks:
                probe = StallProbe()
                probe.start()
                r = sc.run_one(stack, "paced", dict(params, rate=rate))
                stalls = probe.stop()
                in_order = r.pop("latencies")
                sent_at = r.pop("sent_at")
                lat = sorted(in_order)
                _tail_in_episodes(stalls, sent_at, in_order, lat)
                samples[f"paced{key}"][stack] = lat
                e = dist_summary(lat)
                e.update(
                    achieved_msgs_per_s=r["rate"],
                    sender_lag_max_ms=r["sender_lag_max_s"] * 1e3,
                    sender_cpu_util=r["sender_cpu_util"],
                    receiver_cpu_util=r["receiver_cpu_util"],
                    backpressure=r["backpressure_yields"],
                    udp_rcvbuf_errors=r["udp_rcvbuf_errors"],
                    quic_sender_state_end=r["quic_sender_state"]["end"],
                    machine_stalls=stalls,
                )
                entry[stack] = e
                print(
                    f"paced {key:>6}/s {stack:10s} p50 {e['p50_ms']:.3f} p99 {e['p99_ms']:.3f} "
                    f"p99.9 {e['p99.9_ms']:.3f} max {e['max_ms']:.2f} ms  n {e['count']}  "
                    f"rate {r['rate']:,.0f}  lag {e['sender_lag_max_ms']:.1f} ms  "
                    f"util {r['sender_cpu_util']:.2f}/{r['receiver_cpu_util']:.2f}  "
                    f"machine: {brief(stalls)}; in flight during an episode: "
                    f"{stalls['messages_in_episodes']:.0%} of all, "
                    f"{stalls['tail_in_episodes']:.0%} of the p99 tail; p99 of the others "
                    f"{_ms(stalls['p99_outside_episodes_ms'])} ms  "
                    f"quic {r['quic_sender_state']['end']}",
                    flush=True,
                )
            add_ratios(entry, ("p50_ms", "p90_ms", "p99_ms", "p99.9_ms"))
            paced_out[key] = entry
    print(f"(total {time.time() - t_start:.0f} s)")
    if args.no_write:
        return 0

    titles = {"connect": f"connect time ({connects} sequential connects)"}
    for rate in rates:
        titles[f"paced{int(rate)}"] = f"one-way latency at {int(rate):,} msgs/s"
    plot(samples, titles, PNG)
    public = {k: v for k, v in params.items() if "cert" not in k and "key" not in k}
    public.update(rates=rates, stacks=stacks, warmup_connects=WARMUP_CONNECTS)
    result = {
        "command": command,
        "machine": machine,
        "loadavg_end": loadavg(),
        "params": public,
        "aims": {"p99_at_1000_ms": AIM_P99_AT_1000 * 1e3, "connect_p99_ms": AIM_CONNECT_P99 * 1e3},
        "connect": connect_out,
        "paced": paced_out,
    }
    path = write_json(RESULTS_NAME, result)
    write_docs_section(
        SECTION_START,
        SECTION_END,
        render_docs_section(result),
        DOCS,
        after=sc.SECTION_END,
    )
    print(f"wrote {path.relative_to(ROOT)}, {PNG.relative_to(ROOT)} and {DOCS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
