"""Shared helpers for the benchmark scripts: machine facts, child processes with a control
pipe, counters, percentiles, and the writers for ``bench/results/*.json`` and the
generated sections of ``docs/benchmarks.md``.

Imported by the parent *and* by spawned children, so it imports nothing heavy at module
level and never imports ``backbone`` (the raw-aioquic and websockets children must not
load it).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import math
import multiprocessing as mp
import os
import platform
import re
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
RESULTS_DIR = ROOT / "bench" / "results"

CLIENT_ID = "bench"


# --- machine ----------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return str(getattr(mod, "__version__", "?"))


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    """CPU, versions, platform, date and the load average (1/5/15 min) right now."""
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
        "aioquic": _version("aioquic"),
        "orjson": _version("orjson"),
        "websockets": _version("websockets"),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg": loadavg(),
    }


def machine_line(m: dict[str, Any], load_end: Sequence[float] | None = None) -> str:
    """One sentence for the docs: the machine, the versions, the load average."""
    parts = [f"{m['nproc']} CPUs (`nproc`), {m['cpu_model']}", f"Python {m['python']}"]
    for name in ("aioquic", "orjson", "websockets"):
        if m.get(name):
            parts.append(f"{name} {m[name]}")
    parts.append(m["platform"])
    parts.append(m["date"])
    text = "Machine: " + "; ".join(parts) + "."
    if m.get("loadavg"):
        text += " Load average (1/5/15 min) at the start: " + ", ".join(
            f"{x:.2f}" for x in m["loadavg"]
        )
        if load_end:
            text += "; at the end: " + ", ".join(f"{x:.2f}" for x in load_end)
        text += " (the machine is shared: other work competes for the CPUs)."
        if overloaded(m, load_end):
            text += (
                "  **The 1-minute load average exceeded the number of CPUs: the processes "
                "were starved of CPU (see the CPU-use columns), so these figures describe a "
                "contended machine, not the stacks' capacity; compare ratios only.**"
            )
    return text


def overloaded(m: dict[str, Any], load_end: Sequence[float] | None = None) -> bool:
    """True when the 1-minute load average at the start or the end exceeded the CPUs."""
    loads = [x[0] for x in (m.get("loadavg"), load_end) if x]
    return bool(loads) and max(loads) > (m.get("nproc") or 1)


def command_line(script: str, argv: list[str] | None) -> str:
    """The command as typed (``argv`` None means: this process's ``sys.argv``)."""
    args = sys.argv[1:] if argv is None else argv
    return f"PYTHONPATH=. python3 {script}" + (" " + " ".join(args) if args else "")


# --- payloads and counters ----------------------------------------------------------------


def make_payload(size: int = 200, **fields: Any) -> dict[str, Any]:
    """A dict whose orjson encoding is exactly ``size`` bytes (``fields`` included, as
    they are now; a float field may later encode a few bytes shorter or longer)."""
    import orjson

    base: dict[str, Any] = {"op": "tick", "seq": 123456, **fields, "data": ""}
    pad = size - len(orjson.dumps(base))
    if pad < 0:
        raise ValueError(f"payload of {size} bytes is too small for its fields")
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
    """Counters a child reports at each ``mark``.  ``lat`` collects one-way latencies
    (seconds) while ``recording`` is on (between the first and the second mark), and
    ``sent_at`` the sender's ``perf_counter()`` of each (the same order)."""

    __slots__ = (
        "backpressure",
        "completed",
        "lag_max",
        "lat",
        "probe",
        "received",
        "recording",
        "sent",
        "sent_at",
    )
    COUNTERS = ("backpressure", "completed", "received", "sent", "lag_max")

    def __init__(self) -> None:
        self.received = 0  # handler invocations (receiver)
        self.sent = 0  # messages queued (sender)
        self.completed = 0  # WaitAck results received (sender)
        self.backpressure = 0  # times the sender had to yield for backpressure
        self.lag_max = 0.0  # paced sender: the most it fell behind its schedule, seconds
        self.lat = array("d")
        self.sent_at = array("d")
        self.recording = False
        self.probe: Callable[[], dict[str, Any]] | None = None  # transport state, if any

    def snapshot(self) -> dict[str, Any]:
        snap = {k: getattr(self, k) for k in self.COUNTERS}
        if self.probe is not None:
            with contextlib.suppress(Exception):
                snap["probe"] = self.probe()
        return snap


def quic_probe(get_quic: Callable[[], Any]) -> Callable[[], dict[str, Any]]:
    """A ``Stats.probe`` reading an aioquic ``QuicConnection``'s congestion state (private
    attributes of aioquic 1.7.2): congestion window, bytes in flight, smoothed and min
    RTT, the pacer's packet interval, and the bytes waiting in stream 0's send buffer."""

    def probe() -> dict[str, Any]:
        quic = get_quic()
        loss = quic._loss
        out: dict[str, Any] = {
            "cwnd": loss.congestion_window,
            "in_flight": loss.bytes_in_flight,
            "srtt_ms": loss._rtt_smoothed * 1e3,
            "rtt_min_ms": loss._rtt_min * 1e3 if loss._rtt_min != math.inf else None,
            "pacer_packet_ms": (loss._pacer.packet_time or 0.0) * 1e3,
        }
        stream = quic._streams.get(0)
        if stream is not None:
            out["stream0_buffered"] = stream.sender._buffer_stop - stream.sender._buffer_start
        return out

    return probe


# --- child-process control ----------------------------------------------------------------


class Control:
    """Commands from the parent over a Pipe, read on the event loop: ``mark`` answers a
    snapshot of counters + clocks (and toggles cProfile when profiling; latency recording
    runs from the first mark to the second, whose answer carries the samples), ``quit``
    ends."""

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
            snap: dict[str, Any] = {
                "t": time.perf_counter(),
                "cpu": time.process_time(),
                "sys": os.times().system,
                **self.stats.snapshot(),
            }
            if self.marks == 1:
                del self.stats.lat[:]
                del self.stats.sent_at[:]
                self.stats.recording = True
            elif self.marks == 2:
                self.stats.recording = False
                snap["lat"] = self.stats.lat.tobytes()
                snap["sent_at"] = self.stats.sent_at.tobytes()
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

    async def wait_ready(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.005)


def run_child(
    conn: Any, who: str, factory: Callable[..., Any], *args: Any
) -> None:  # pragma: no cover - runs in a child
    """Child entry point: ``asyncio.run(factory(*args))``; an exception is reported to the
    parent as ``("error", text)`` before the child dies."""
    try:
        asyncio.run(factory(*args))
    except BaseException as exc:
        with contextlib.suppress(Exception):
            conn.send(("error", f"{who}: {type(exc).__name__}: {exc}"))
        raise


def spawn(target: Callable[..., None], *args: Any) -> tuple[Any, Any]:
    """Start ``target(*args, conn)`` in a fresh (spawned) process; returns (process, the
    parent's end of the pipe)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child), daemon=True)
    proc.start()
    return proc, parent


def recv(conn: Any, kind: str, timeout: float, who: str) -> Any:
    """The next message from a child, which must be ``kind``; its payload."""
    if not conn.poll(timeout):
        raise RuntimeError(f"{who}: no {kind!r} within {timeout} s")
    msg = conn.recv()
    if msg[0] == "error":
        raise RuntimeError(msg[1])
    if msg[0] != kind:
        raise RuntimeError(f"{who}: expected {kind!r}, got {msg!r}"[:300])
    return msg[1] if len(msg) > 1 else None


def reap(procs: Sequence[Any], pipes: Sequence[Any], timeout: float = 10.0) -> None:
    """Join the children (terminate the ones that hang), then raise any error they sent."""
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.terminate()
            p.join(5)
    for pipe in pipes:
        with contextlib.suppress(EOFError, OSError):
            while pipe.poll(0):
                msg = pipe.recv()
                if msg[0] == "error":
                    raise RuntimeError(msg[1])


def udp_rcvbuf_errors() -> int | None:
    try:
        lines = Path("/proc/net/snmp").read_text().splitlines()
    except OSError:
        return None
    udp = [ln.split() for ln in lines if ln.startswith("Udp:")]
    if len(udp) < 2:
        return None
    return int(dict(zip(udp[0][1:], udp[1][1:], strict=False)).get("RcvbufErrors", 0))


def dev_certs() -> tuple[Any, dict[str, str]]:
    """A temporary directory (keep a reference) and the paths of fresh dev certificates."""
    import tempfile

    from backbone.certs import make_dev_certs  # parent only; children get file paths

    tmp = tempfile.TemporaryDirectory(prefix="bench-certs-")
    certs = make_dev_certs(tmp.name)
    return tmp, {
        "server_cert": str(certs.server_cert),
        "server_key": str(certs.server_key),
        "ca_cert": str(certs.ca_cert),
    }


# --- statistics ---------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of already sorted values."""
    n = len(sorted_values)
    if not n:
        return None
    k = max(0, min(n - 1, math.ceil(q / 100.0 * n) - 1))
    return float(sorted_values[k])


def log_histogram(
    sorted_values: Sequence[float], lo: float = 1e-5, hi: float = 10.0, per_decade: int = 20
) -> dict[str, list[float]]:
    """Counts in log-spaced bins (edges in seconds), for the JSON results."""
    import bisect

    decades = math.log10(hi / lo)
    nbins = round(decades * per_decade)
    edges = [lo * 10 ** (i / per_decade) for i in range(nbins + 1)]
    counts = []
    prev = bisect.bisect_left(sorted_values, edges[0])
    below = prev
    for e in edges[1:]:
        i = bisect.bisect_left(sorted_values, e)
        counts.append(i - prev)
        prev = i
    return {
        "edges_s": [float(f"{e:.6g}") for e in edges],
        "counts": counts,
        "below": [below],
        "above": [len(sorted_values) - prev],
    }


# --- output -------------------------------------------------------------------------------


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def section_markers(script: str) -> tuple[str, str]:
    """``<!-- bench/NAME:start -->`` / ``<!-- bench/NAME:end -->`` for ``bench/NAME``."""
    return f"<!-- {script}:start -->", f"<!-- {script}:end -->"


def write_docs_section(
    start: str, end: str, section: str, docs: Path = DOCS, after: str | None = None
) -> None:
    """Replace the text between ``start`` and ``end`` (markers included) in ``docs`` with
    ``section``; if the markers are not there yet, insert it after the section whose end
    marker is ``after`` (if present) or else append it."""
    docs.parent.mkdir(parents=True, exist_ok=True)
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section, text)
    elif after and after in text:
        i = text.index(after) + len(after)
        text = text[:i] + "\n\n" + section + text[i:]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    if not text.endswith("\n"):
        text += "\n"
    docs.write_text(text)
