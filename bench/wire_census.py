"""Datagrams and QUIC frames per broadcast recipient: backbone vs. raw aioquic.

Runs ``bench/scale.py``'s fleet (one server process, ``--generators`` load-generator
processes with many clients each; the same agents, ``bench/_scale_agents.py``), with
every process counting, through wrappers around aioquic:

* datagrams sent (``QuicConnection.datagrams_to_send``) and received
  (``receive_datagram``), and ``transmit`` calls (those that sent nothing too);
* every 1-RTT packet by its set of frames (``ACK``, ``ACK+STREAM``, ``STREAM``,
  ``ACK+MAX_STREAM_DATA`` …), PINGs by reason (probe, ACK-of-ACK trigger);
* stream writes (``send_stream_data``) by stream and by the type byte of their first
  backbone frame (MESSAGE 0x10, RESULT 0x11, CREDIT, PING/PONG 0x03/0x04);
* packets declared lost, and how (a real loss, or a PTO retransmission);
* the host's UDP receive-buffer drops (``/proc/net/snmp``);
* always (with ``--no-probe`` too): the cyclic GC's passes and milliseconds per
  generation, and each process's CPU time over the window.

Heartbeats are every 45 s (under QUIC's 60 s idle timeout) so that few fall in the
window (``--hb`` sets another); their stream writes are counted apart (stream 4).  For
each stack it ramps to ``--clients``, waits, snapshots every process's counters
(SIGUSR1), runs one broadcast (one-way, then WaitAck, ``--rounds`` times; each in its own
window of ``--settle`` s after the broadcast ends, so the ACKs it causes are counted),
snapshots again and prints the timings and the differences per recipient::

    PYTHONPATH=. python3 bench/wire_census.py --clients 300
    PYTHONPATH=. python3 bench/wire_census.py --clients 2000 --generators 4 --stacks backbone
    PYTHONPATH=. python3 bench/wire_census.py --clients 2000 --generators 4 --no-probe \
        --rounds 3 --flush-budget 0.05          # timings only, a fixed Flusher budget
    PYTHONPATH=. python3 bench/wire_census.py --clients 2000 --no-probe --profile /tmp/p

The counters cost time in every process (wrappers on aioquic's hot paths), so take the
timings from a ``--no-probe`` run.  Prints only; writes nothing but logs in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import itertools
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# --- the probe, inside each agent process ---------------------------------------------------

_counts: collections.Counter[str] = collections.Counter()


def install_probe() -> None:
    """Wrap aioquic's send and receive paths with counters (this process only)."""
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.quic import connection as qc
    from aioquic.quic import recovery
    from aioquic.quic.packet import QuicFrameType
    from aioquic.quic.packet_builder import QuicPacketBuilder

    names = {int(f): f.name for f in QuicFrameType}
    for t in range(0x08, 0x10):
        names[t] = "STREAM"
    c = _counts
    current: list[list[list[str]]] = []  # per datagrams_to_send call: its packets' frames

    orig_start_packet = QuicPacketBuilder.start_packet
    orig_start_frame = QuicPacketBuilder.start_frame

    def start_packet(self: Any, packet_type: Any, crypto: Any) -> None:
        orig_start_packet(self, packet_type, crypto)
        if current:
            current[-1].append([])

    def start_frame(self: Any, frame_type: int, *a: Any, **kw: Any) -> Any:
        buf = orig_start_frame(self, frame_type, *a, **kw)
        if current and current[-1]:
            current[-1][-1].append(names.get(frame_type, hex(frame_type)))
        return buf

    QuicPacketBuilder.start_packet = start_packet  # type: ignore[method-assign]
    QuicPacketBuilder.start_frame = start_frame  # type: ignore[method-assign]

    orig_dts = qc.QuicConnection.datagrams_to_send

    def datagrams_to_send(self: Any, now: float) -> Any:
        current.append([])
        try:
            out = orig_dts(self, now)
        finally:
            packets = [p for p in current.pop() if p]
        c["datagrams_out"] += len(out)
        c["bytes_out"] += sum(len(d) for d, _ in out)
        for p in packets:
            c["packet " + "+".join(sorted(set(p)))] += 1
        return out

    qc.QuicConnection.datagrams_to_send = datagrams_to_send  # type: ignore[method-assign]

    orig_rd = qc.QuicConnection.receive_datagram

    def receive_datagram(self: Any, data: bytes, addr: Any, now: float) -> None:
        c["datagrams_in"] += 1
        c["bytes_in"] += len(data)
        orig_rd(self, data, addr, now)

    qc.QuicConnection.receive_datagram = receive_datagram  # type: ignore[method-assign]

    orig_ssd = qc.QuicConnection.send_stream_data

    def send_stream_data(self: Any, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        kind = f"0x{data[4]:02x}" if len(data) > 4 else "short"
        c[f"stream_write s{stream_id} {kind}"] += 1
        orig_ssd(self, stream_id, data, end_stream)

    qc.QuicConnection.send_stream_data = send_stream_data  # type: ignore[method-assign]

    orig_ping = qc.QuicConnection._write_ping_frame

    def write_ping(self: Any, builder: Any, uids: Any = (), comment: str = "") -> None:
        orig_ping(self, builder, list(uids), comment)
        c[f"ping ({comment or 'user'})"] += 1

    qc.QuicConnection._write_ping_frame = write_ping  # type: ignore[method-assign]

    orig_lost = recovery.QuicPacketRecovery._on_packets_lost

    def on_packets_lost(
        self: Any, *, congestion_event: bool = True, packets: Any, **kw: Any
    ) -> Any:
        packets = list(packets)
        c["lost (loss)" if congestion_event else "lost (PTO resend)"] += len(packets)
        return orig_lost(self, congestion_event=congestion_event, packets=packets, **kw)

    recovery.QuicPacketRecovery._on_packets_lost = on_packets_lost  # type: ignore[method-assign]

    orig_transmit = QuicConnectionProtocol.transmit

    def transmit(self: Any) -> None:
        before = c["datagrams_out"]
        orig_transmit(self)
        c["transmit calls"] += 1
        if c["datagrams_out"] == before:
            c["transmit calls (nothing sent)"] += 1

    QuicConnectionProtocol.transmit = transmit  # type: ignore[method-assign]

    orig_timer = QuicConnectionProtocol._handle_timer

    def handle_timer(self: Any) -> None:
        c["aioquic timer fired"] += 1
        orig_timer(self)

    QuicConnectionProtocol._handle_timer = handle_timer  # type: ignore[method-assign]

    signal.signal(signal.SIGUSR1, lambda *_: _dump(dict(c)))


def _dump(counts: dict[str, int]) -> None:
    path = Path(os.environ["WIRE_CENSUS_DIR"]) / f"{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(counts))
    tmp.replace(path)


def count_gc() -> None:
    """The cyclic garbage collector's passes and their time, by generation (ms)."""
    import gc

    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            gen = info["generation"]
            _counts[f"gc gen{gen} passes"] += 1
            _counts[f"gc gen{gen} ms"] += round((time.perf_counter() - started[0]) * 1000)

    gc.callbacks.append(on_gc)


def agent_main(argv: list[str]) -> None:
    count_gc()
    if os.environ.get("WIRE_CENSUS_PROBE") == "1":
        install_probe()
    else:  # still answer the snapshot signal, with the GC counted only
        signal.signal(signal.SIGUSR1, lambda *_: _dump(dict(_counts)))
    budget = os.environ.get("WIRE_FLUSH_BUDGET")
    if budget:
        from backbone import _link

        # the same budget whether or not results are awaited
        _link.Flusher.__init__.__defaults__ = (float(budget), float(budget), None)
    from bench import _scale_agents

    sys.argv = ["bench._scale_agents", *argv]
    _scale_agents.main()


# --- the driver -----------------------------------------------------------------------------


def udp_snmp() -> dict[str, int]:
    lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines()]
    for head, vals in itertools.pairwise(lines):
        if head[0] == "Udp:" and vals[0] == "Udp:":
            return {k: int(v) for k, v in zip(head[1:], vals[1:], strict=True)}
    return {}


async def snapshot(pids: list[int], out_dir: Path) -> list[dict[str, int]]:
    for pid in pids:
        (out_dir / f"{pid}.json").unlink(missing_ok=True)
        os.kill(pid, signal.SIGUSR1)
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline:
        if all((out_dir / f"{pid}.json").exists() for pid in pids):
            break
        await asyncio.sleep(0.05)
    return [json.loads((out_dir / f"{pid}.json").read_text()) for pid in pids]


def diff(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b) if b.get(k, 0) - a.get(k, 0)}


def add(parts: list[dict[str, int]]) -> dict[str, int]:
    total: collections.Counter[str] = collections.Counter()
    for p in parts:
        total.update(p)
    return dict(total)


async def run_stack(stack: str, args: argparse.Namespace, certs: Any, work: Path) -> dict[str, Any]:
    from bench import scale

    out_dir = work / f"census-{stack}"
    out_dir.mkdir()
    os.environ["WIRE_CENSUS_DIR"] = str(out_dir)

    extra_env = {"WIRE_CENSUS_PROBE": "0" if args.no_probe else "1"}
    if args.flush_budget is not None:
        extra_env["WIRE_FLUSH_BUDGET"] = str(args.flush_budget)
    start_agent = functools.partial(
        scale.start_agent, module=("bench.wire_census", "agent"), extra_env=extra_env
    )

    scale.start_agent = start_agent  # type: ignore[assignment]
    fleet = scale.Fleet(stack, args, certs, work)
    res: dict[str, Any] = {}
    try:
        await fleet.start_server(scale.free_port())
        await fleet.start_generators()
        ramp = await fleet.ramp(args.clients)
        n = ramp["connected"]
        res["clients"] = n
        await asyncio.sleep(args.settle)
        pids = [fleet.server_pid, *(g.proc.pid for g in fleet.gens)]
        for kind in ("oneway", "waitack") * args.rounds:
            before = await snapshot(pids, out_dir)
            snmp0 = udp_snmp()
            cpu0 = [scale.proc_cpu(p) for p in pids]
            if args.profile:
                await fleet.server.request("prof_start", timeout=60)
            b = await fleet.broadcast(kind == "waitack", n)
            await asyncio.sleep(args.settle)
            cpu1 = [scale.proc_cpu(p) for p in pids]
            if args.profile:
                path = f"{args.profile}-{stack}-{kind}.prof"
                prof = await fleet.server.request("prof_stop", timeout=120, path=path, top=30)
                print(f"[{stack} {kind}] server profile in {path}:\n{prof['tottime']}")
            after = await snapshot(pids, out_dir)
            snmp1 = udp_snmp()
            res.setdefault(kind, []).append(
                {
                    "broadcast": b,
                    "server": diff(before[0], after[0]),
                    "clients": add(
                        [diff(x, y) for x, y in zip(before[1:], after[1:], strict=True)]
                    ),
                    "udp": diff(snmp0, snmp1),
                    "cpu_s": [round(y - x, 3) for x, y in zip(cpu0, cpu1, strict=True)],
                }
            )
    finally:
        await fleet.stop()
    return res


def report(stack: str, res: dict[str, Any]) -> None:
    n = res["clients"]
    print(f"\n=== {stack}: {n} clients ===")
    for kind in ("oneway", "waitack"):
        rounds = res[kind]
        print(f"\n--- {kind}")
        for r in rounds:
            b = r["broadcast"]
            took = b["call_s"] if kind == "waitack" else b["all_received_s"]
            print(
                f"{_s(took)} s (server done sending {_s(b['sent_s'])} s); received "
                f"{b['received']}, results {b['results']}, errors {b['errors']}; UDP "
                f"{r['udp']}; CPU s (server, generators) {r['cpu_s']}"
            )
        server = add([r["server"] for r in rounds])
        clients = add([r["clients"] for r in rounds])
        if not server:
            continue
        per = n * len(rounds)
        print(
            f"{'counter (per recipient: mean of rounds)':<44} {'server':>9} {'/recip':>7} "
            f"{'clients':>9} {'/recip':>7}"
        )
        for k in sorted(set(server) | set(clients)):
            s, cl = server.get(k, 0), clients.get(k, 0)
            print(f"{k:<44} {s:>9} {s / per:>7.2f} {cl:>9} {cl / per:>7.2f}")


def _s(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from backbone.certs import make_dev_certs

    work = Path(tempfile.mkdtemp(prefix="wire-census-"))
    certs = make_dev_certs(work / "certs")
    out = {}
    for stack in args.stacks:
        out[stack] = await run_stack(stack, args, certs, work)
        report(stack, out[stack])
    print(f"\nload average {os.getloadavg()}; logs in {work}")
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "agent":
        agent_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=300)
    ap.add_argument("--generators", type=int, default=2)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--inflight", type=int, default=100)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds before and after")
    ap.add_argument("--stacks", nargs="+", default=["backbone", "raw"], choices=["backbone", "raw"])
    ap.add_argument("--rounds", type=int, default=1, help="broadcasts of each kind")
    ap.add_argument("--no-probe", action="store_true", help="count nothing: timings only")
    ap.add_argument(
        "--flush-budget",
        type=float,
        default=None,
        help="backbone: the Flusher's budget per loop pass, s, results awaited or not",
    )
    ap.add_argument("--profile", help="cProfile the server per broadcast: PREFIX-stack-kind.prof")
    ap.add_argument("--json", help="also write the raw counts here")
    ap.add_argument(
        "--hb",
        type=float,
        default=45.0,
        help="heartbeat interval, s (default 45: few heartbeats in the window, under "
        "QUIC's 60 s idle timeout; 15 is backbone's default)",
    )
    args = ap.parse_args()
    out = asyncio.run(main_async(args))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
