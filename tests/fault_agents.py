"""Processes for fault-injection tests and the soak benchmark.

Each agent is started with ``python3 -m tests.fault_agents ROLE ...`` (possibly inside a
network namespace: ``ip netns exec NS python3 -m ...``), prints JSON lines on stdout —
events as they happen and one answer per command — and reads commands, one JSON object
per line, on stdin.  Logs go to stderr.

Roles:

* ``server``: a backbone Server.  Commands: ``wait_clients``, ``clients``, ``send`` (WaitAck
  traffic with per-client sequence numbers and a result check), ``broadcast``, ``soak``
  (continuous random WaitAck traffic), ``stats``, ``stop``.
* ``clients``: N backbone Clients in one process.  Handler ``echo`` returns the payload and
  checks the per-client order; ``hang`` never returns (so every WaitAck times out).
  Optional churn: every client closes and reopens at random.  Commands: ``report``,
  ``stop``.
* ``relay``: a :class:`tests.relay.UdpRelay` in its own process.  Commands: ``stats``,
  ``set`` (impairment fields, blackhole), ``stop``.

:class:`Agent` is the parent's handle on one such process (asyncio subprocess).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
import random
import resource
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _out(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def rss_kib() -> int:
    """Current resident set size of this process, KiB (from /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def udp_rx_queue(port: int) -> int | None:
    """Bytes waiting in the receive queue of this process's UDP socket on ``port``
    (IPv4, from /proc/net/udp; kernel accounting, so per-datagram overhead included)."""
    try:
        with open("/proc/net/udp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if int(parts[1].split(":")[1], 16) == port:
                    return int(parts[4].split(":")[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return None


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    s = sorted(values)

    def q(p: float) -> float:
        return s[min(len(s) - 1, int(p * len(s)))]

    return {"n": len(s), "p50": q(0.5), "p95": q(0.95), "p99": q(0.99), "max": s[-1]}


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 22)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _command_loop(handlers: dict[str, Callable[[dict[str, Any]], Any]]) -> None:
    """Read commands until ``stop`` or EOF; each answer carries the command's ``id``."""
    reader = await _stdin_lines()
    running: set[asyncio.Task[None]] = set()

    async def run(cmd: dict[str, Any]) -> None:
        try:
            result = await handlers[cmd["cmd"]](cmd)
            _out({"id": cmd.get("id"), "ok": True, **(result or {})})
        except Exception as exc:  # report, keep serving
            logging.exception("command %s failed", cmd.get("cmd"))
            _out({"id": cmd.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}"})

    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        if cmd["cmd"] == "stop":
            for t in running:
                t.cancel()
            await run(cmd)
            return
        task = asyncio.ensure_future(run(cmd))
        running.add(task)
        task.add_done_callback(running.discard)


# --- server ----------------------------------------------------------------------------


async def server_main(args: argparse.Namespace) -> None:
    from backbone import Server, signals

    server = Server(
        args.host,
        args.port,
        certfile=args.cert,
        keyfile=args.key,
        heartbeat_interval=args.hb,
        heartbeat_misses=args.misses,
        max_pending_per_client=args.max_pending_per_client,
        max_pending_total=max(args.max_pending_total, args.max_pending_per_client),
        close_grace=0.2,
    )

    @server.handler
    async def echo(msg: Any) -> Any:
        return msg.payload

    last_change = [time.perf_counter()]

    def on_event(sender: Any, event: Any) -> None:
        if event.kind in ("connected", "disconnected"):
            last_change[0] = time.perf_counter()
        if args.events:
            _out(
                {
                    "event": event.kind,
                    "client_id": event.client_id,
                    "t": time.time(),
                    "reason": getattr(event, "reason", None),
                }
            )

    # only these signals: building every event would cost the data path
    for sig in (signals.on_connected, signals.on_disconnected, signals.on_timeout):
        sig.connect(on_event, weak=False)

    await server.start()
    _out({"event": "listening", "port": server.port, "pid": os.getpid(), "t": time.time()})

    async def wait_clients(cmd: dict[str, Any]) -> dict[str, Any]:
        n = int(cmd["n"])
        t0 = time.perf_counter()
        deadline = t0 + float(cmd.get("within", 60))
        while len(server) < n:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{len(server)} of {n} clients connected")
            await asyncio.sleep(0.02)
        return {"clients": len(server), "elapsed": time.perf_counter() - t0}

    async def wait_stable(cmd: dict[str, Any]) -> dict[str, Any]:
        """Until ``n`` clients are connected and none connected or left for ``quiet`` s."""
        n, quiet = int(cmd["n"]), float(cmd.get("quiet", 2.0))
        t0 = time.perf_counter()
        deadline = t0 + float(cmd.get("within", 60))
        while len(server) != n or time.perf_counter() - last_change[0] < quiet:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{len(server)} of {n} clients connected, not stable")
            await asyncio.sleep(0.05)
        return {"clients": len(server), "elapsed": time.perf_counter() - t0}

    async def clients(cmd: dict[str, Any]) -> dict[str, Any]:
        return {"clients": sorted(server.client_ids())}

    async def send(cmd: dict[str, Any]) -> dict[str, Any]:
        return await run_waitack_plan(
            server,
            cmd["plan"],
            ack_timeout=float(cmd.get("ack_timeout", 60)),
            inflight=int(cmd.get("inflight", 16)),
            fast=float(cmd.get("fast", 5.0)),
        )

    async def broadcast(cmd: dict[str, Any]) -> dict[str, Any]:
        report = await server.broadcast(
            cmd.get("payload", "ping"), wait_ack=True, timeout=float(cmd.get("ack_timeout", 10))
        )
        errs = collections.Counter(type(e).__name__ for e in report.errors.values())
        return {"results": len(report.results), "errors": dict(errs)}

    async def stats(cmd: dict[str, Any]) -> dict[str, Any]:
        import gc

        if cmd.get("gc"):
            gc.collect()
        return {
            "clients": len(server),
            "pending": len(server.pending),
            "pending_table": server.pending.snapshot(),
            "rss_kib": rss_kib(),
            "fds": len(os.listdir("/proc/self/fd")),
            "ack_timeouts": server.figures.ack_timeouts,
            **(_connection_census(server) if cmd.get("census") else {}),
        }

    async def soak(cmd: dict[str, Any]) -> dict[str, Any]:
        return await _soak(server, cmd)

    marks: list[Any] = []

    async def mem_mark(cmd: dict[str, Any]) -> dict[str, Any]:
        """Diagnostics: start tracemalloc (if needed) and remember a snapshot."""
        import gc
        import tracemalloc

        if not tracemalloc.is_tracing():
            tracemalloc.start(int(cmd.get("frames", 8)))
        gc.collect()
        marks[:] = [tracemalloc.take_snapshot()]
        return {"traced": tracemalloc.get_traced_memory()[0]}

    async def mem_diff(cmd: dict[str, Any]) -> dict[str, Any]:
        """Diagnostics: the allocation sites that grew most since ``mem_mark``."""
        import gc
        import tracemalloc

        gc.collect()
        snap = tracemalloc.take_snapshot()
        key = cmd.get("key", "lineno")
        top = snap.compare_to(marks[0], key)[: int(cmd.get("top", 15))]
        return {
            "traced": tracemalloc.get_traced_memory()[0],
            "top": [
                {
                    "size_diff": d.size_diff,
                    "count_diff": d.count_diff,
                    "where": "\n".join(d.traceback.format()[-6:]),
                }
                for d in top
            ],
        }

    async def stop(cmd: dict[str, Any]) -> dict[str, Any]:
        await server.stop(grace=0)
        return {}

    await _command_loop(
        {
            "wait_clients": wait_clients,
            "wait_stable": wait_stable,
            "clients": clients,
            "send": send,
            "broadcast": broadcast,
            "stats": stats,
            "soak": soak,
            "mem_mark": mem_mark,
            "mem_diff": mem_diff,
            "stop": stop,
        }
    )


def _connection_census(server: Any) -> dict[str, Any]:
    """Diagnostics: QUIC connection objects alive in this process, by state."""
    import gc

    from aioquic.quic.connection import QuicConnection

    gc.collect()
    states: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        if isinstance(obj, QuicConnection):
            states[obj._state.name] += 1
    protocols = server._quic_server._protocols if server._quic_server is not None else {}
    return {
        "quic_connections": dict(states),
        "server_protocols": len(set(protocols.values())),
        "sessions": len(server._sessions),
    }


async def run_waitack_plan(
    server: Any,
    plan: dict[str, int],
    *,
    ack_timeout: float = 60,
    inflight: int = 16,
    fast: float = 5.0,
) -> dict[str, Any]:
    """WaitAck traffic: ``plan`` maps client id -> count.  Each client gets the payloads
    ``{"cid": id, "seq": 0..n-1}`` in order, at most ``inflight`` outstanding; the echo
    handler must return each payload unchanged.  Counts results, wrong results, errors by
    type, and results that took at most ``fast`` seconds."""
    from backbone import BackboneError

    ok = wrong = within = 0
    errors: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []

    async def one(cid: str, seq: int) -> None:
        nonlocal ok, wrong, within
        payload = {"cid": cid, "seq": seq}
        t0 = time.perf_counter()
        try:
            result = await server.send_to(cid, payload, wait_ack=True, timeout=ack_timeout)
        except BackboneError as exc:
            errors[type(exc).__name__] += 1
            return
        dt = time.perf_counter() - t0
        latencies.append(dt)
        if result == payload:
            ok += 1
            within += dt <= fast
        else:
            wrong += 1

    async def drive(cid: str, n: int) -> None:
        window: set[asyncio.Task[None]] = set()
        for seq in range(n):
            while len(window) >= inflight:
                done, _ = await asyncio.wait(window, return_when=asyncio.FIRST_COMPLETED)
                window -= done
            # tasks run their first step in creation order: send_to is called in seq order
            window.add(asyncio.ensure_future(one(cid, seq)))
        if window:
            await asyncio.wait(window)

    t0 = time.perf_counter()
    await asyncio.gather(*(drive(cid, n) for cid, n in plan.items()))
    return {
        "sent": sum(plan.values()),
        "results_ok": ok,
        "wrong": wrong,
        "within_fast": within,
        "errors": dict(errors),
        "latency": percentiles(latencies),
        "elapsed": time.perf_counter() - t0,
        "pending": len(server.pending),
    }


async def _soak(server: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    """Continuous WaitAck traffic to random connected clients for ``seconds``: at most
    ``inflight`` outstanding, each with ``timeout``.  Every send must end in a correct
    result or a definite error; RSS is sampled every ``sample_every`` seconds."""
    from backbone import BackboneError

    seconds = float(cmd["seconds"])
    inflight = int(cmd.get("inflight", 64))
    timeout = float(cmd.get("ack_timeout", 10))
    rate = float(cmd.get("rate", 200))  # sends per second, at most
    sample_every = float(cmd.get("sample_every", 10))
    rng = random.Random(int(cmd.get("seed", 1)))
    started = issued = ok = wrong = 0
    outcomes: collections.Counter[str] = collections.Counter()
    latencies: collections.deque[float] = collections.deque(maxlen=200_000)
    rss: list[tuple[float, int]] = []
    window: set[asyncio.Task[None]] = set()
    t0 = time.perf_counter()

    async def one(cid: str, seq: int) -> None:
        nonlocal ok, wrong
        payload = {"cid": cid, "seq": seq}
        s = time.perf_counter()
        try:
            result = await server.send_to(cid, payload, wait_ack=True, timeout=timeout)
        except BackboneError as exc:
            outcomes[type(exc).__name__] += 1
            return
        latencies.append(time.perf_counter() - s)
        if result == payload:
            ok += 1
            outcomes["result"] += 1
        else:
            wrong += 1
            outcomes["wrong_result"] += 1

    rxq: list[int] = []

    async def sampler() -> None:
        while True:
            rss.append((time.perf_counter() - t0, rss_kib()))
            await asyncio.sleep(sample_every)

    async def rx_sampler() -> None:
        while True:
            q = udp_rx_queue(server.port)
            if q is not None:
                rxq.append(q)
            await asyncio.sleep(1.0)

    sampling = asyncio.ensure_future(sampler())
    rx_sampling = asyncio.ensure_future(rx_sampler())
    seq = itertools.count()
    try:
        while time.perf_counter() - t0 < seconds:
            while len(window) >= inflight:
                done, _ = await asyncio.wait(window, return_when=asyncio.FIRST_COMPLETED)
                window -= done
            ids = server.client_ids()
            if not ids:
                await asyncio.sleep(0.05)
                continue
            started += 1
            issued += 1
            window.add(asyncio.ensure_future(one(rng.choice(ids), next(seq))))
            await asyncio.sleep(1.0 / rate)
        if window:
            # every send must end: results, AckTimeout or ClientGone, all within timeout
            await asyncio.wait(window, timeout=timeout + 30)
        unresolved = sum(1 for t in window if not t.done())
    finally:
        sampling.cancel()
        rx_sampling.cancel()
    rss.append((time.perf_counter() - t0, rss_kib()))
    resolved = sum(outcomes.values())
    return {
        "sent": started,
        "resolved": resolved,
        "unresolved": unresolved,
        "lost": started - resolved,
        "results_ok": ok,
        "wrong": wrong,
        "outcomes": dict(outcomes),
        "latency": percentiles(list(latencies)),
        "rss": rss,
        "rx_queue": percentiles([float(q) for q in rxq]),
        "pending": len(server.pending),
        "elapsed": time.perf_counter() - t0,
    }


# --- clients ---------------------------------------------------------------------------


async def clients_main(args: argparse.Namespace) -> None:
    from backbone import Client, Message, signals

    ids = [f"{args.prefix}{i}" for i in range(args.start, args.start + args.count)]
    seen: dict[str, list[int]] = {cid: [] for cid in ids}
    order_errors: collections.Counter[str] = collections.Counter()
    connects: collections.Counter[str] = collections.Counter()
    churns: collections.Counter[str] = collections.Counter()
    losses: collections.Counter[str] = collections.Counter()  # disconnects we did not ask for
    hang = asyncio.Event()
    rng = random.Random(args.seed)

    def make(cid: str) -> Any:
        client = Client(
            cid,
            args.host,
            args.port,
            cafile=args.ca,
            server_name=args.server_name,
            heartbeat_interval=args.hb,
            heartbeat_misses=args.misses,
            backoff_initial=args.backoff_initial,
            backoff_max=args.backoff_max,
            connect_timeout=args.connect_timeout,
            max_inbound_queue=args.max_inbound,
            rng=random.Random(f"{args.seed}-{cid}"),
        )

        @client.handler
        async def handle(msg: Message) -> Any:
            if args.handler == "hang":
                await hang.wait()
            p = msg.payload
            if isinstance(p, dict) and "seq" in p:
                got = seen[cid]
                if got and p["seq"] <= got[-1]:
                    order_errors[cid] += 1
                got.append(p["seq"])
            return p

        return client

    def on_event(sender: Any, event: Any) -> None:
        if event.role != "client":
            return
        if event.kind == "connected":
            connects[event.client_id] += 1
            if not args.quiet:
                _out(
                    {
                        "event": "connected",
                        "client_id": event.client_id,
                        "t": time.time(),
                        "n": connects[event.client_id],
                    }
                )
        elif event.kind == "disconnected" and event.reason != "closed":
            losses[event.reason] += 1
        if event.kind in ("connect.failed", "reconnect.scheduled") and not args.quiet:
            _out(
                {
                    "event": event.kind,
                    "client_id": event.client_id,
                    "t": time.time(),
                    "reason": event.reason,
                    "delay": getattr(event, "delay", None),
                }
            )
        if event.kind in ("disconnected", "heartbeat.timed_out") and not args.quiet:
            _out(
                {
                    "event": event.kind,
                    "client_id": event.client_id,
                    "t": time.time(),
                    "reason": getattr(event, "reason", None),
                }
            )

    for sig in (
        signals.on_connected,
        signals.on_disconnected,
        signals.on_timeout,
        signals.on_connect_failed,
        signals.on_reconnect_scheduled,
    ):
        sig.connect(on_event, weak=False)
    live: dict[str, Any] = {}
    for cid in ids:
        live[cid] = make(cid)
        await live[cid].start()
    _out({"event": "started", "count": len(ids), "pid": os.getpid(), "t": time.time()})
    # BB_AGENT_DEBUG=1: log loop lag and each connection's QUIC state every 0.25 s
    monitor = None
    if os.environ.get("BB_AGENT_DEBUG"):
        monitor = asyncio.ensure_future(_debug_monitor(live))

    async def churn(cid: str) -> None:
        """Close and reopen this client at random moments (mean ``churn_mean`` s)."""
        while True:
            await asyncio.sleep(rng.expovariate(1.0 / args.churn_mean))
            old = live[cid]
            await old.close()
            churns[cid] += 1
            await asyncio.sleep(rng.uniform(0.0, args.churn_down))
            live[cid] = make(cid)
            await live[cid].start()

    churners = [asyncio.ensure_future(churn(cid)) for cid in ids] if args.churn_mean else []

    async def report(cmd: dict[str, Any]) -> dict[str, Any]:
        per = {}
        for cid in ids:
            got = seen[cid]
            per[cid] = {
                "received": len(got),
                "unique": len(set(got)),
                "in_order": got == sorted(got) and len(got) == len(set(got)),
                "first": got[0] if got else None,
                "last": got[-1] if got else None,
                "contiguous": got == list(range(got[0], got[0] + len(got))) if got else True,
                "connects": connects[cid],
                "connected": live[cid].connected,
            }
        return {
            "clients": per,
            "order_errors": sum(order_errors.values()),
            "connects": sum(connects.values()),
            "churns": sum(churns.values()),
            "losses": dict(losses),
            "connected": sum(1 for c in live.values() if c.connected),
            "rss_kib": rss_kib(),
        }

    async def stop(cmd: dict[str, Any]) -> dict[str, Any]:
        for t in churners:
            t.cancel()
        if monitor is not None:
            monitor.cancel()
        await asyncio.gather(*(c.close() for c in live.values()))
        return {}

    await _command_loop({"report": report, "stop": stop})


async def _debug_monitor(live: dict[str, Any]) -> None:
    last = time.perf_counter()
    while True:
        await asyncio.sleep(0.25)
        now = time.perf_counter()
        parts = []
        for cid, c in live.items():
            conn = c._conn
            if conn is None or conn.link is None:
                parts.append(f"{cid}:-")
                continue
            q = conn._quic
            rs = q._streams[0].receiver
            parts.append(
                f"{cid}:inbox{len(conn.link._inbox)} off{rs.highest_offset} "
                f"cw{q._loss._cc.congestion_window} if{q._loss._cc.bytes_in_flight} "
                f"pto{q._loss._pto_count} st={c.state.value}"
            )
        logging.warning("lag=%.3f %s", now - last - 0.25, " | ".join(parts))
        last = now


# --- relay -----------------------------------------------------------------------------


async def relay_main(args: argparse.Namespace) -> None:
    from tests.relay import Impairment, UdpRelay

    imp = dict(
        loss=args.loss,
        delay=args.delay,
        jitter=args.jitter,
        duplicate=args.duplicate,
        reorder=args.reorder,
    )
    relay = await UdpRelay.start(
        (args.target_host, args.target_port),
        seed=args.seed,
        up=Impairment(**imp),
        down=Impairment(**imp),
        idle_timeout=args.idle_timeout,
    )
    _out({"event": "listening", "port": relay.port, "pid": os.getpid()})

    async def stats(cmd: dict[str, Any]) -> dict[str, Any]:
        return relay.stats()

    async def set_(cmd: dict[str, Any]) -> dict[str, Any]:
        for direction in ("up", "down"):
            imp = getattr(relay, direction)
            for k, v in cmd.get("fields", {}).items():
                setattr(imp, k, v)
        return {}

    async def stop(cmd: dict[str, Any]) -> dict[str, Any]:
        relay.close()
        return relay.stats()

    await _command_loop({"stats": stats, "set": set_, "stop": stop})


# --- the parent's handle ------------------------------------------------------------------


class Agent:
    """A running agent process: its JSON events, and request/answer over stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str, log_path: Path | None):
        self.proc = proc
        self.name = name
        self.log_path = log_path
        self.events: list[dict[str, Any]] = []
        self._answers: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._watchers: list[tuple[Callable[[dict[str, Any]], bool], asyncio.Future[Any]]] = []
        self._ids = itertools.count(1)
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(
        cls,
        role: str,
        argv: Sequence[str],
        *,
        netns: str | None = None,
        log_path: Path | None = None,
        name: str | None = None,
    ) -> Agent:
        cmd = [sys.executable, "-m", "tests.fault_agents", role, *argv]
        if netns is not None:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        stderr: Any = asyncio.subprocess.DEVNULL
        if log_path is not None:
            stderr = open(log_path, "ab")  # noqa: SIM115 - owned by the child from here
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                cwd=str(ROOT),
                env=env,
                limit=1 << 22,
            )
        finally:
            if log_path is not None:
                stderr.close()
        return cls(proc, name or role, log_path)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "event" in msg:
                msg["_recv"] = time.time()
                self.events.append(msg)
                for pred, fut in list(self._watchers):
                    if not fut.done() and pred(msg):
                        fut.set_result(msg)
            elif msg.get("id") in self._answers:
                fut = self._answers.pop(msg["id"])
                if not fut.done():
                    fut.set_result(msg)
        eof = ConnectionError(f"agent {self.name} exited\n{self.log_tail()}")
        for fut in self._answers.values():
            if not fut.done():
                fut.set_exception(eof)
        for _, fut in self._watchers:
            if not fut.done():
                fut.set_exception(eof)

    def log_tail(self, n: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    async def request(self, cmd: str, timeout: float = 60, **fields: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._answers[rid] = fut
        self.proc.stdin.write((json.dumps({"cmd": cmd, "id": rid, **fields}) + "\n").encode())
        await self.proc.stdin.drain()
        async with asyncio.timeout(timeout):
            answer = await fut
        if not answer.get("ok"):
            raise RuntimeError(
                f"agent {self.name}: {cmd} failed: {answer.get('error')}\n{self.log_tail()}"
            )
        return answer

    async def wait_event(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 30, new: bool = False
    ) -> dict[str, Any]:
        if not new:
            for e in self.events:
                if pred(e):
                    return e
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        item = (pred, fut)
        self._watchers.append(item)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self._watchers.remove(item)

    async def wait_count(
        self, pred: Callable[[dict[str, Any]], bool], n: int, timeout: float = 30
    ) -> list[dict[str, Any]]:
        """Wait until ``n`` events match ``pred``; returns them."""
        async with asyncio.timeout(timeout):
            while True:
                hits = [e for e in self.events if pred(e)]
                if len(hits) >= n:
                    return hits
                with contextlib.suppress(TimeoutError):
                    await self.wait_event(pred, timeout=1.0, new=True)

    def kill(self) -> None:
        """SIGKILL: the process vanishes without closing anything."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)

    async def stop(self, timeout: float = 10) -> None:
        """Ask it to stop; kill it if it does not exit in time."""
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.request("stop", timeout=timeout)
        try:
            async with asyncio.timeout(timeout):
                await self.proc.wait()
        except TimeoutError:
            self.kill()
            await self.proc.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


def server_args(
    *,
    host: str,
    port: int,
    cert: str,
    key: str,
    hb: float,
    misses: int,
    max_pending_per_client: int = 1000,
    max_pending_total: int = 100_000,
    events: bool = True,
) -> list[str]:
    argv = [
        "--host",
        host,
        "--port",
        str(port),
        "--cert",
        cert,
        "--key",
        key,
        "--hb",
        str(hb),
        "--misses",
        str(misses),
        "--max-pending-per-client",
        str(max_pending_per_client),
        "--max-pending-total",
        str(max_pending_total),
    ]
    return [*argv, "--events"] if events else argv


def clients_args(
    *,
    host: str,
    port: int,
    ca: str,
    count: int,
    prefix: str = "c",
    start: int = 0,
    hb: float = 1.0,
    misses: int = 3,
    backoff_initial: float = 0.1,
    backoff_max: float = 2.0,
    connect_timeout: float = 5.0,
    handler: str = "echo",
    max_inbound: int = 10_000,
    churn_mean: float = 0.0,
    churn_down: float = 1.0,
    seed: int = 1,
    quiet: bool = False,
) -> list[str]:
    argv = [
        "--host",
        host,
        "--port",
        str(port),
        "--ca",
        ca,
        "--count",
        str(count),
        "--prefix",
        prefix,
        "--start",
        str(start),
        "--hb",
        str(hb),
        "--misses",
        str(misses),
        "--backoff-initial",
        str(backoff_initial),
        "--backoff-max",
        str(backoff_max),
        "--connect-timeout",
        str(connect_timeout),
        "--handler",
        handler,
        "--max-inbound",
        str(max_inbound),
        "--churn-mean",
        str(churn_mean),
        "--churn-down",
        str(churn_down),
        "--seed",
        str(seed),
    ]
    return [*argv, "--quiet"] if quiet else argv


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m tests.fault_agents")
    sub = p.add_subparsers(dest="role", required=True)

    s = sub.add_parser("server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--hb", type=float, default=1.0)
    s.add_argument("--misses", type=int, default=3)
    s.add_argument("--max-pending-per-client", type=int, default=1000)
    s.add_argument("--max-pending-total", type=int, default=100_000)
    s.add_argument("--events", action="store_true")

    c = sub.add_parser("clients")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--ca", required=True)
    c.add_argument("--server-name", default="localhost")
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--prefix", default="c")
    c.add_argument("--start", type=int, default=0)
    c.add_argument("--hb", type=float, default=1.0)
    c.add_argument("--misses", type=int, default=3)
    c.add_argument("--backoff-initial", type=float, default=0.1)
    c.add_argument("--backoff-max", type=float, default=2.0)
    c.add_argument("--connect-timeout", type=float, default=5.0)
    c.add_argument("--handler", choices=("echo", "hang"), default="echo")
    c.add_argument("--max-inbound", type=int, default=10_000)
    c.add_argument("--churn-mean", type=float, default=0.0)
    c.add_argument("--churn-down", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--quiet", action="store_true")

    r = sub.add_parser("relay")
    r.add_argument("--target-host", default="127.0.0.1")
    r.add_argument("--target-port", type=int, required=True)
    r.add_argument("--loss", type=float, default=0.0)
    r.add_argument("--delay", type=float, default=0.0)
    r.add_argument("--jitter", type=float, default=0.0)
    r.add_argument("--duplicate", type=float, default=0.0)
    r.add_argument("--reorder", type=float, default=0.0)
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--idle-timeout", type=float, default=None)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format=f"%(asctime)s {args.role}[{os.getpid()}] %(name)s %(levelname)s %(message)s",
    )
    runner = {"server": server_main, "clients": clients_main, "relay": relay_main}[args.role]
    asyncio.run(runner(args))


if __name__ == "__main__":
    main()
