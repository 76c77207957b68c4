"""What the observability plugins cost: single-connection one-way throughput, with and
without plugins, in one run.

The setup is ``bench/single_connection.py``'s backbone one-way scenario (its helpers are
reused): a server process sends 200-byte orjson payloads to one client process over
loopback QUIC, 64 per event-loop pass, yielding 1 ms on ``Backpressure``; the rate is what
the client's handler counts.  Both processes run the same plugin configuration:

* ``none``: ``plugins=[]``;
* ``logging+metrics+history``: the three with their defaults: ``LoggingPlugin`` (kv, the
  logger at INFO, to a real file through a ``logging.FileHandler``; per-message lines are
  DEBUG by default, so only connection and failure lines are written), ``MetricsPlugin``
  (its own provider; OTLP export to the sink below every 10 s and at shutdown) and
  ``HistoryPlugin`` (SQLite in a temp directory; default kinds: one row per message
  sent and per message processed);
* ``everything``: the same three with every message logged (``message_level=INFO``) and
  ``message.received`` stored too (``kinds=RECORDED_KINDS``);
* ``logging``, ``metrics``, ``history``: each of those alone, to see who costs what;
* ``logging-messages``: logging with ``message_level=INFO`` (a line per message);
* ``tracing 100%``: ``TracingPlugin(sampler_ratio=1.0)``;
* ``tracing default``: ``TracingPlugin()`` with its default sampling.

The warm-up is longer than ``single_connection.py``'s (3 s): a sender slowed by plugins
keeps queueing into the credit window (10,000 messages) and the 4 MiB buffer before it
meets ``Backpressure``, and until then what it sends and what the client receives differ;
the window must start once both run at the same rate (the ``sent/s`` figure printed per
run shows it).

Before each run the parent waits (up to 30 s) until the machine is quiet: at least 85 %
of its CPU time idle over half a second.

Exports are real: the parent process runs an OTLP/gRPC receiver (grpcio + the official
protos) that counts what arrives, and the children get ``OTEL_EXPORTER_OTLP_ENDPOINT``
pointing at it.  Rounds rotate the order of the configurations; the table shows medians.
Plugin queue drops (``backbone.plugins.plugin_drops``) and receiver failures are reported
per run: a plugin that falls behind shows up there, never silently.

Run from the repository root::

    PYTHONPATH=. python3 bench/plugins_overhead.py            # 3 rounds x 3+5 s (~5 min)
    PYTHONPATH=. python3 bench/plugins_overhead.py --quick    # 1 round x 1+2 s
    PYTHONPATH=. python3 bench/plugins_overhead.py --configs none,logging --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import single_connection as sc

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION_START = "<!-- bench/plugins_overhead.py:start -->"
SECTION_END = "<!-- bench/plugins_overhead.py:end -->"

CONFIGS: dict[str, str] = {
    "none": "no plugins",
    "logging+metrics+history": "logging + metrics + history (defaults)",
    "everything": "same, every message logged at INFO and message.received stored",
    "logging": "logging alone (defaults: kv, INFO, per-message lines at DEBUG)",
    "logging-messages": "logging, every message at INFO",
    "metrics": "metrics alone (OTLP every 10 s)",
    "history": "history alone (SQLite)",
    "tracing-100": "tracing, 100 % sampled",
    "tracing-default": "tracing, default sampling",
}
BASELINE = "none"
TARGET = "logging+metrics+history"
TARGET_MAX_COST = 0.25  # the aim: at most 25 % of throughput


# --- the plugins, built inside each child process ---------------------------------------


def build_plugins(config: str, role: str, workdir: str) -> tuple[list[Any], str | None]:
    """The plugin list for ``config``, or ``([], reason)`` if a plugin cannot be loaded."""
    plugins: list[Any] = []
    parts = {
        "none": [],
        "logging+metrics+history": ["logging", "metrics", "history"],
        "everything": ["logging-messages", "metrics", "history-all"],
        "logging": ["logging"],
        "logging-messages": ["logging-messages"],
        "metrics": ["metrics"],
        "history": ["history"],
        "tracing-100": ["tracing-100"],
        "tracing-default": ["tracing-default"],
    }[config]
    for part in parts:
        try:
            if part in ("logging", "logging-messages"):
                from plugins.logs import LoggingPlugin

                handler = logging.FileHandler(os.path.join(workdir, f"{role}.log"))
                handler.setFormatter(
                    logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
                )
                logger = logging.getLogger("backbone.events")
                logger.addHandler(handler)
                logger.setLevel(logging.INFO)
                logger.propagate = False
                plugins.append(
                    LoggingPlugin(
                        format="kv",
                        level=logging.INFO,
                        logger=logger,
                        message_level=logging.INFO if part == "logging-messages" else logging.DEBUG,
                    )
                )
            elif part == "metrics":
                from plugins.metrics import MetricsPlugin

                plugins.append(MetricsPlugin())  # OTLP from $OTEL_EXPORTER_OTLP_ENDPOINT
            elif part in ("history", "history-all"):
                from plugins.history import RECORDED_KINDS, HistoryPlugin

                kinds = RECORDED_KINDS if part == "history-all" else None
                plugins.append(HistoryPlugin(os.path.join(workdir, f"{role}.sqlite3"), kinds=kinds))
            else:
                from plugins.otel import TracingPlugin

                ratio = 1.0 if part == "tracing-100" else None
                plugins.append(TracingPlugin(sampler_ratio=ratio))
        except ImportError as exc:  # a plugin another change has not landed yet
            return [], f"{part}: {exc}"
    return plugins, None


def close_plugins(plugins: list[Any]) -> None:
    for p in plugins:
        for method in ("shutdown", "close"):
            fn = getattr(p, method, None)
            if callable(fn):
                with contextlib.suppress(Exception):
                    fn()
                break


def plugin_health() -> dict[str, Any]:
    from backbone import plugins, signals

    return {
        "plugin_drops": dict(plugins.plugin_drops),
        "receiver_failures": dict(signals.receiver_failures),
    }


# --- child processes -------------------------------------------------------------------------


def _idle_share(window: float = 0.5) -> float:
    """The share of this machine's CPU time that was idle over ``window`` seconds."""

    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    idle0, total0 = read()
    time.sleep(window)
    idle1, total1 = read()
    return (idle1 - idle0) / max(1, total1 - total0)


def settle(limit: float = 30.0, idle: float = 0.85) -> float:
    """Wait until the machine is quiet (at least ``idle`` of its CPU time idle over half
    a second), at most ``limit`` seconds; returns the seconds waited.  Between runs, so
    that nothing left over from the previous configuration (the parent's OTLP receiver
    busy with a tracing run's spans was the suspect) runs into the next one.  In the
    first full run with it, it never had to wait, and the no-plugin baseline right
    after a tracing run was still low (22.1k against 25.7k and 24.8k): that dip's
    cause is not known."""
    if not os.path.exists("/proc/stat"):
        return 0.0
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit and _idle_share() < idle:
        pass
    return time.monotonic() - t0


def child_main(role: str, config: str, params: dict[str, Any], conn: Any) -> None:
    if os.environ.get("BENCH_SWITCH"):
        sys.setswitchinterval(float(os.environ["BENCH_SWITCH"]))
    try:
        coro = (
            server_main(conn, config, params)
            if role == "server"
            else client_main(conn, config, params)
        )
        asyncio.run(coro)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            conn.send(("error", f"{role}/{config}: {type(exc).__name__}: {exc}"))
        raise


async def server_main(conn: Any, config: str, params: dict[str, Any]) -> None:
    from backbone import Backpressure, Server

    workdir = tempfile.mkdtemp(prefix="bench-plugins-server-")
    plugins, missing = build_plugins(config, "server", workdir)
    if missing:
        conn.send(("missing", missing))
        return
    stats = sc.Stats()
    ctl = sc.Control(conn, stats, None)
    server = Server(
        "127.0.0.1",
        0,
        certfile=params["server_cert"],
        keyfile=params["server_key"],
        plugins=plugins,
    )
    await server.start()
    ctl.send("port", server.port)
    await ctl.wait_ready(lambda: sc.CLIENT_ID in server.client_ids())
    ctl.send("ready")
    payload = params["payload"]
    send_to = server.send_to
    batch = params["batch"]

    async def oneway() -> None:
        while True:
            n = 0
            try:
                for _ in range(batch):
                    await send_to(sc.CLIENT_ID, payload)
                    n += 1
            except Backpressure:
                stats.backpressure += 1
                stats.sent += n
                await asyncio.sleep(sc.BACKPRESSURE_SLEEP)
                continue
            stats.sent += n
            await asyncio.sleep(0)

    task = asyncio.ensure_future(oneway())
    await ctl.quit.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    health = plugin_health()
    await server.stop(grace=0)
    await asyncio.to_thread(close_plugins, plugins)
    conn.send(("health", health))
    shutil.rmtree(workdir, ignore_errors=True)


async def client_main(conn: Any, config: str, params: dict[str, Any]) -> None:
    from backbone import Client

    workdir = tempfile.mkdtemp(prefix="bench-plugins-client-")
    plugins, missing = build_plugins(config, "client", workdir)
    if missing:
        conn.send(("missing", missing))
        return
    stats = sc.Stats()
    ctl = sc.Control(conn, stats, None)
    client = Client(
        sc.CLIENT_ID, "127.0.0.1", params["port"], cafile=params["ca_cert"], plugins=plugins
    )

    @client.handler
    async def handle(msg: Any) -> Any:
        stats.received += 1
        return {"ok": True}

    async with client:
        await client.wait_connected(20)
        ctl.send("ready")
        await ctl.quit.wait()
        health = plugin_health()
    await asyncio.to_thread(close_plugins, plugins)
    conn.send(("health", health))
    shutil.rmtree(workdir, ignore_errors=True)


# --- in-process CPU cost per message (robust to a busy machine) --------------------------------


def flush_plugins(plugins: list[Any]) -> None:
    """Wait until plugin threads have done the work queued so far (history's writer,
    the batch span processor), so its CPU time falls inside the measured window."""
    for p in plugins:
        fn = getattr(p, "flush", None)
        if callable(fn):
            fn()


def _patch_for_micro_paths() -> None:
    """``micro_paths.backbone_pair`` builds a Server without ``start()``; give it what
    ``start()`` now sets up (client CAs, the admission bucket) as class defaults, in this
    dedicated child process only."""
    from backbone import server as srv

    if not hasattr(srv.Server, "_client_cas"):
        srv.Server._client_cas = []  # type: ignore[attr-defined]
    try:
        from backbone.admission import TokenBucket
    except ImportError:
        return
    if not hasattr(srv.Server, "_admission"):
        srv.Server._admission = TokenBucket(0, 1, 0.0)  # type: ignore[attr-defined]


def inprocess_child(config: str, params: dict[str, Any], conn: Any) -> None:
    try:
        conn.send(("result", asyncio.run(inprocess(config, params))))
    except BaseException as exc:
        with contextlib.suppress(Exception):
            conn.send(("error", f"inprocess/{config}: {type(exc).__name__}: {exc}"))
        raise


async def inprocess(config: str, params: dict[str, Any]) -> dict[str, Any]:
    """CPU µs per message of backbone's send path and receive path, plugins included,
    with ``bench/micro_paths.py``'s back-to-back server and client links (no QUIC)."""
    from bench import micro_paths

    _patch_for_micro_paths()
    workdir = tempfile.mkdtemp(prefix="bench-plugins-inprocess-")
    plugins, missing = build_plugins(config, "inprocess", workdir)
    if missing:
        return {"missing": missing}
    for p in plugins:
        p.install(None)  # every sender of this (dedicated) process
    payload = sc.make_payload()
    out: dict[str, Any] = {}
    try:
        for scenario in ("send", "receive"):
            pair = await micro_paths.backbone_pair()
            run = micro_paths.SCENARIOS[scenario]
            await run(pair, payload, 0.3)  # warm-up
            await asyncio.to_thread(flush_plugins, plugins)
            cpu0 = time.process_time()
            n, _ = await run(pair, payload, params["inprocess_seconds"])
            flush_plugins(plugins)
            out[scenario] = (time.process_time() - cpu0) / n * 1e6
    finally:
        for p in plugins:
            p.uninstall(None)
        close_plugins(plugins)
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def run_inprocess(config: str, params: dict[str, Any]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=inprocess_child, args=(config, params, child), daemon=True)
    proc.start()
    try:
        result: dict[str, Any] = _recv_any(parent, ("result",), 120, "inprocess")[1]
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
    return result


def summarize_inprocess(
    runs: dict[str, list[dict[str, Any]]], base_cpu: dict[str, float | None]
) -> dict[str, Any]:
    """Medians; the overhead over ``none``; and the one-way throughput ratio it implies
    for the two-process setup, where each side's CPU per message (``base_cpu``, from
    the no-plugin runs) grows by the plugins' in-process overhead on that path."""
    out: dict[str, Any] = {}
    med: dict[str, dict[str, float]] = {}
    for config, rs in runs.items():
        ok = [r for r in rs if "missing" not in r]
        if not ok:
            out[config] = {"missing": rs[0].get("missing") if rs else "not run"}
            continue
        med[config] = {k: statistics.median(r[k] for r in ok) for k in ("send", "receive")}
    base = med.get(BASELINE)
    for config, m in med.items():
        entry: dict[str, Any] = {"send_us": m["send"], "receive_us": m["receive"]}
        if base is not None:
            d_send = m["send"] - base["send"]
            d_recv = m["receive"] - base["receive"]
            entry.update(send_overhead_us=d_send, receive_overhead_us=d_recv)
            s_cpu, r_cpu = base_cpu.get("send"), base_cpu.get("receive")
            if s_cpu and r_cpu:
                entry["implied_ratio"] = min(s_cpu / (s_cpu + d_send), r_cpu / (r_cpu + d_recv))
        out[config] = entry
    return out


def render_inprocess_table(summary: dict[str, Any]) -> str:
    rows = [
        "| configuration | send path CPU µs/msg | overhead | receive path CPU µs/msg "
        "| overhead | implied one-way ratio |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for config, e in summary.items():
        if "missing" in e:
            rows.append(f"| {CONFIGS[config]} | n/a | | | | {e['missing']} |")
            continue
        ratio = e.get("implied_ratio")
        rows.append(
            "| {} | {:.1f} | {} | {:.1f} | {} | {} |".format(
                CONFIGS[config],
                e["send_us"],
                f"+{e['send_overhead_us']:.1f}" if "send_overhead_us" in e else "-",
                e["receive_us"],
                f"+{e['receive_overhead_us']:.1f}" if "receive_overhead_us" in e else "-",
                f"**{ratio:.2f}**" if ratio is not None else "-",
            )
        )
    return "\n".join(rows)


# --- the OTLP receiver in the parent ---------------------------------------------------------


class Sink:
    """An OTLP/gRPC receiver that counts spans and metric data points."""

    def __init__(self) -> None:
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.metrics.v1 import (
            metrics_service_pb2,
            metrics_service_pb2_grpc,
        )
        from opentelemetry.proto.collector.trace.v1 import (
            trace_service_pb2,
            trace_service_pb2_grpc,
        )

        self.spans = 0
        self.metric_points = 0
        self._lock = threading.Lock()
        sink = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
            def Export(self, request: Any, context: Any) -> Any:
                n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
                with sink._lock:
                    sink.spans += n
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):  # type: ignore[misc]
            def Export(self, request: Any, context: Any) -> Any:
                n = 0
                for rm in request.resource_metrics:
                    for sm in rm.scope_metrics:
                        for m in sm.metrics:
                            kind = m.WhichOneof("data")
                            n += len(getattr(m, kind).data_points) if kind else 0
                with sink._lock:
                    sink.metric_points += n
                return metrics_service_pb2.ExportMetricsServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def take(self) -> tuple[int, int]:
        with self._lock:
            out = (self.spans, self.metric_points)
            self.spans = self.metric_points = 0
        return out

    def stop(self) -> None:
        self.server.stop(1)


# --- parent: orchestration -------------------------------------------------------------------


def _recv_any(conn: Any, kinds: tuple[str, ...], timeout: float, who: str) -> tuple[str, Any]:
    if not conn.poll(timeout):
        raise RuntimeError(f"{who}: nothing within {timeout} s (expected {kinds})")
    msg = conn.recv()
    if msg[0] == "error":
        raise RuntimeError(msg[1])
    if msg[0] not in kinds:
        raise RuntimeError(f"{who}: expected one of {kinds}, got {msg!r}")
    return msg[0], (msg[1] if len(msg) > 1 else None)


def run_one(config: str, params: dict[str, Any], sink: Sink) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    s_parent, s_child = ctx.Pipe()
    c_parent, c_child = ctx.Pipe()
    srv = ctx.Process(target=child_main, args=("server", config, params, s_child), daemon=True)
    srv.start()
    procs = [srv]
    health: dict[str, Any] = {}
    sink.take()
    try:
        kind, value = _recv_any(s_parent, ("port", "missing"), 60, "server")
        if kind == "missing":
            return {"missing": value}
        cli = ctx.Process(
            target=child_main,
            args=("client", config, dict(params, port=value), c_child),
            daemon=True,
        )
        cli.start()
        procs.append(cli)
        _recv_any(c_parent, ("ready",), 60, "client")
        _recv_any(s_parent, ("ready",), 60, "server")
        time.sleep(params["warmup"])

        def mark() -> tuple[dict[str, Any], dict[str, Any]]:
            s_parent.send("mark")
            c_parent.send("mark")
            return (
                _recv_any(s_parent, ("mark",), 30, "server")[1],
                _recv_any(c_parent, ("mark",), 30, "client")[1],
            )

        s0, c0 = mark()
        time.sleep(params["duration"])
        s1, c1 = mark()
        for p in (s_parent, c_parent):
            p.send("quit")
        for who, pipe in (("server", s_parent), ("client", c_parent)):
            with contextlib.suppress(RuntimeError):
                health[who] = _recv_any(pipe, ("health",), 60, who)[1]
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.terminate()
                p.join(5)
    spans, points = sink.take()
    count = c1["received"] - c0["received"]
    elapsed = c1["t"] - c0["t"]
    return {
        "rate": count / elapsed,
        "count": count,
        "sender_cpu_us_per_msg": (s1["cpu"] - s0["cpu"]) / count * 1e6 if count else None,
        "receiver_cpu_us_per_msg": (c1["cpu"] - c0["cpu"]) / count * 1e6 if count else None,
        "sender_cpu_util": (s1["cpu"] - s0["cpu"]) / (s1["t"] - s0["t"]),
        "receiver_cpu_util": (c1["cpu"] - c0["cpu"]) / elapsed,
        "backpressure_yields": s1["backpressure"] - s0["backpressure"],
        "sent_rate": (s1["sent"] - s0["sent"]) / (s1["t"] - s0["t"]),
        "plugin_drops": {who: sum(h.get("plugin_drops", {}).values()) for who, h in health.items()},
        "receiver_failures": {
            who: sum(h.get("receiver_failures", {}).values()) for who, h in health.items()
        },
        "otlp_spans": spans,
        "otlp_metric_points": points,
    }


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    base = None
    if runs.get(BASELINE):
        base = statistics.median(r["rate"] for r in runs[BASELINE])
    for config, rs in runs.items():
        ok = [r for r in rs if "missing" not in r]
        if not ok:
            out[config] = {"missing": rs[0].get("missing") if rs else "not run"}
            continue
        med = statistics.median(r["rate"] for r in ok)
        out[config] = {
            "median_msgs_per_s": med,
            "runs_msgs_per_s": [round(r["rate"], 1) for r in ok],
            "ratio_to_none": med / base if base else None,
            "sender_cpu_us_per_msg": statistics.median(
                r["sender_cpu_us_per_msg"] for r in ok if r["sender_cpu_us_per_msg"] is not None
            ),
            "receiver_cpu_us_per_msg": statistics.median(
                r["receiver_cpu_us_per_msg"] for r in ok if r["receiver_cpu_us_per_msg"] is not None
            ),
            "plugin_drops": [sum(r["plugin_drops"].values()) for r in ok],
            "receiver_failures": [sum(r["receiver_failures"].values()) for r in ok],
            "otlp_spans": [r["otlp_spans"] for r in ok],
            "otlp_metric_points": [r["otlp_metric_points"] for r in ok],
        }
    return out


def render_table(summary: dict[str, Any]) -> str:
    rows = [
        "| configuration | msgs/s (median) | vs. no plugins | runs | CPU µs/msg send / recv "
        "| plugin drops | OTLP spans / metric points received |",
        "|---|--:|--:|---|--:|--:|--:|",
    ]
    for config, e in summary.items():
        if "missing" in e:
            rows.append(f"| {CONFIGS[config]} | n/a | | {e['missing']} | | | |")
            continue
        ratio = e["ratio_to_none"]
        rows.append(
            "| {} | {:,.0f} | {} | {} | {:.1f} / {:.1f} | {} | {} / {} |".format(
                CONFIGS[config],
                e["median_msgs_per_s"],
                f"**{ratio:.2f}**" if ratio is not None else "-",
                ", ".join(f"{v / 1000:.1f}k" for v in e["runs_msgs_per_s"]),
                e["sender_cpu_us_per_msg"],
                e["receiver_cpu_us_per_msg"],
                ", ".join(str(d) for d in e["plugin_drops"]),
                sum(e["otlp_spans"]),
                sum(e["otlp_metric_points"]),
            )
        )
    return "\n".join(rows)


def render_docs_section(result: dict[str, Any]) -> str:
    m = result["machine"]
    p = result["params"]
    s = result["summary"]
    ins = result["inprocess"]
    verdicts = []
    target = s.get(TARGET, {})
    if target.get("ratio_to_none") is not None:
        verdicts.append(
            f"measured two-process throughput ratio **{target['ratio_to_none']:.2f}** "
            f"(cost {1 - target['ratio_to_none']:.0%})"
        )
    implied = ins.get(TARGET, {}).get("implied_ratio")
    if implied is not None:
        verdicts.append(
            f"ratio implied by the in-process CPU overhead **{implied:.2f}** "
            f"(cost {1 - implied:.0%})"
        )
    lines = [
        SECTION_START,
        "## Plugin overhead: one connection, one-way",
        "",
        "Written by `bench/plugins_overhead.py` (do not edit by hand; rerun it).",
        "",
        "Command:",
        "",
        "```",
        result["command"],
        "```",
        "",
        f"Machine: {m['nproc']} CPUs (`nproc`), {m['cpu_model']}; Python {m['python']}, "
        f"aioquic {m['aioquic']}; {m['platform']}; {m['date']}. Load average when the run "
        f"started: {result['loadavg']}.",
        "",
    ]
    if s:
        lines += [
            "### Two processes over loopback QUIC",
            "",
            "`bench/single_connection.py`'s backbone one-way scenario (server → client, "
            f"{p['payload_bytes']}-byte orjson payloads, {p['batch']} sends per loop pass, "
            "separate processes), with the same plugins in both processes. "
            f"{p['warmup']:g} s warm-up, {p['duration']:g} s measured, {p['rounds']} "
            "round(s) rotating the order; medians. Logging writes kv lines with the logger "
            "at INFO to a real file (`logging.FileHandler`; per-message lines are DEBUG "
            "unless the configuration says every message); metrics and tracing export over "
            "OTLP/gRPC to a receiver in the parent process; history writes SQLite in a temp "
            "directory. "
            '"plugin drops" are events a plugin queue refused (summed over both processes).',
            "",
            render_table(s),
            "",
        ]
    if ins:
        lines += [
            "### CPU per message, in process",
            "",
            "The same code paths without QUIC (`bench/micro_paths.py`'s back-to-back server "
            "and client links, one fresh process per configuration, plugins installed for "
            f"every sender): process CPU time (all threads) over {p['inprocess_seconds']:g} s "
            "of `send_to` one-way (send path) and of replayed frames through the client and "
            "its handler (receive path), with the plugins' queues flushed inside the window; "
            "medians. CPU time per message does not depend on how much of a CPU the process "
            "got, so this part holds on a busy machine. The implied ratio applies each "
            "path's overhead to the no-plugin CPU per message of the two-process run: "
            "`min(S/(S+Δsend), R/(R+Δreceive))`.",
            "",
            render_inprocess_table(ins),
            "",
        ]
    if verdicts:
        lines += [
            f"logging + metrics + history (aim: cost at most {TARGET_MAX_COST:.0%}): "
            + "; ".join(verdicts)
            + ".",
            "",
        ]
    lines += [
        "Reading the numbers: one-way throughput is bound by CPU; every plugin's "
        "per-message work runs in the process that emits the event: building the event "
        "objects (only when some receiver listens), the receivers themselves, and worker "
        "threads (history's SQLite writer, the OTel batch span processor), which compete "
        "for the same GIL. On a shared machine the two-process throughput varies a lot "
        "between runs (see the runs column); compare the CPU columns.",
        "",
        "Where the per-message cost goes: logging, metrics and history take the "
        "per-message steps in batches (`events.batched`, one event per client, kind and "
        "loop pass; `docs/events.md`), so the core adds a row per step (a tuple of its "
        "fields, about 0.5 µs; only for kinds a plugin declared in `batched_steps`) and "
        "builds and delivers one event per batch, not one per message. Until 2026-11-28 "
        "every step was its own event, about 2 µs to "
        "build and route in a tight loop but more between the messages of a real "
        "connection: history's receiver taking the events and doing nothing then ran at "
        "0.83 of the no-plugin rate, and logging + metrics + history at 0.59–0.68. "
        "The receiving client also drains its socket per readiness callback now (as "
        "the server does), so a batch holds a whole read's messages instead of one "
        "datagram's five. The metrics receivers bump plain integers and an own "
        "histogram per batch. History folds each batch into the client's live view "
        "and adds it to the client's open run as it is; every `pack_delay` (50 ms) a "
        "run of batches of one kind becomes packs stored as columns straight from the "
        "rows, serialised with one orjson call each, and its writer thread inserts one "
        "row per pack (about 90 bytes per event). The tracing plugin still takes each "
        "step as its own event: it starts a span per send. "
        "Tracing: a sampled-out send builds no span (about 1 µs to draw a trace id and "
        "write a not-sampled `traceparent`); a recorded span costs the OpenTelemetry SDK "
        "about 50 µs to start and end and its OTLP exporter about 100 µs more to encode, "
        "so at 100 % sampling the SDK, not backbone, sets the figure.",
        SECTION_END,
    ]
    return "\n".join(lines)


def write_docs(section: str) -> None:
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(SECTION_START) + r".*?" + re.escape(SECTION_END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOCS.write_text(text if text.endswith("\n") else text + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round x (1 s + 2 s)")
    ap.add_argument("--duration", type=float, help="measured seconds (default 5, quick 2)")
    ap.add_argument("--warmup", type=float, help="warm-up seconds (default 3, quick 1)")
    ap.add_argument("--rounds", type=int, help="rounds (default 3, quick 1)")
    ap.add_argument("--batch", type=int, default=64, help="one-way messages per loop pass")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma list")
    ap.add_argument(
        "--parts",
        default="processes,inprocess",
        help="processes (two-process throughput) and/or inprocess (CPU per message)",
    )
    ap.add_argument("--inprocess-seconds", type=float, help="per path (default 1.5, quick 0.5)")
    ap.add_argument("--no-write", action="store_true", help="print only, do not write docs")
    args = ap.parse_args(argv)

    duration = args.duration or (2.0 if args.quick else 5.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0)
    rounds = args.rounds or (1 if args.quick else 3)
    configs = [c for c in args.configs.split(",") if c]
    parts = {p for p in args.parts.split(",") if p}
    if not parts or parts - {"processes", "inprocess"}:
        ap.error("--parts takes processes and/or inprocess")
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"unknown configuration {c!r} (known: {', '.join(CONFIGS)})")

    from backbone.certs import make_dev_certs

    tmp = tempfile.TemporaryDirectory(prefix="bench-certs-")
    certs = make_dev_certs(tmp.name)
    params: dict[str, Any] = {
        "server_cert": str(certs.server_cert),
        "server_key": str(certs.server_key),
        "ca_cert": str(certs.ca_cert),
        "payload": sc.make_payload(),
        "batch": args.batch,
        "warmup": warmup,
        "duration": duration,
        "inprocess_seconds": args.inprocess_seconds or (0.5 if args.quick else 1.5),
    }
    sink = Sink()
    # children inherit this: the metrics and tracing plugins export to the sink
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{sink.port}"
    os.environ.pop("BACKBONE_PLUGINS", None)
    os.environ.pop("OTEL_TRACES_SAMPLER_ARG", None)

    command = "PYTHONPATH=. python3 bench/plugins_overhead.py" + (
        " " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else ""
    )
    machine = sc.machine_info()
    loadavg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"# {machine['nproc']} CPUs, {machine['cpu_model']}, Python {machine['python']}; "
        f"{rounds} round(s) x {warmup:g}+{duration:g} s; load {loadavg}",
        flush=True,
    )
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    inproc: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    t0 = time.time()
    try:
        for rnd in range(rounds if "processes" in parts else 0):
            k = rnd % len(configs)
            for config in configs[k:] + configs[:k]:
                waited = settle()
                if waited > 1.0:
                    print(f"(waited {waited:.1f} s for the machine to go quiet)", flush=True)
                r = run_one(config, params, sink)
                runs[config].append(r)
                if "missing" in r:
                    print(f"round {rnd + 1} {config:24s} n/a: {r['missing']}", flush=True)
                    continue
                print(
                    f"round {rnd + 1} {config:24s} {r['rate']:>9,.0f} msgs/s  cpu µs/msg "
                    f"send {r['sender_cpu_us_per_msg'] or 0:.1f} "
                    f"recv {r['receiver_cpu_us_per_msg'] or 0:.1f}  "
                    f"util {r['sender_cpu_util']:.2f}/{r['receiver_cpu_util']:.2f}  "
                    f"sent/s {r['sent_rate']:,.0f} bp {r['backpressure_yields']}  "
                    f"drops {r['plugin_drops']}  failures {r['receiver_failures']}  "
                    f"otlp spans {r['otlp_spans']} points {r['otlp_metric_points']}",
                    flush=True,
                )
        for rnd in range(rounds if "inprocess" in parts else 0):
            k = rnd % len(configs)
            for config in configs[k:] + configs[:k]:
                r = run_inprocess(config, params)
                inproc[config].append(r)
                if "missing" in r:
                    print(f"inprocess {rnd + 1} {config:24s} n/a: {r['missing']}", flush=True)
                else:
                    print(
                        f"inprocess {rnd + 1} {config:24s} CPU µs/msg send path "
                        f"{r['send']:.1f}, receive path {r['receive']:.1f}",
                        flush=True,
                    )
    finally:
        sink.stop()
    summary = summarize(runs) if "processes" in parts else {}
    none = summary.get(BASELINE, {})
    base_cpu = {
        "send": none.get("sender_cpu_us_per_msg"),
        "receive": none.get("receiver_cpu_us_per_msg"),
    }
    in_summary = summarize_inprocess(inproc, base_cpu) if "inprocess" in parts else {}
    print()
    if summary:
        print(render_table(summary))
        print()
    if in_summary:
        print(render_inprocess_table(in_summary))
    print(f"\n(total {time.time() - t0:.0f} s)")
    if args.no_write:
        return 0
    result = {
        "command": command,
        "machine": machine,
        "loadavg": loadavg,
        "params": {
            "payload_bytes": sc.PAYLOAD_SIZE,
            "batch": args.batch,
            "warmup": warmup,
            "duration": duration,
            "rounds": rounds,
            "inprocess_seconds": params["inprocess_seconds"],
        },
        "summary": summary,
        "inprocess": in_summary,
    }
    write_docs(render_docs_section(result))
    print(f"wrote {DOCS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
