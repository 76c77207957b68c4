"""A user-space UDP impairment relay for tests (and bench/soak.py).

Clients talk to the relay's port; the relay opens one upstream socket per client address
and forwards to the target.  Each direction ("up" = client → server, "down" = server →
client) has its own :class:`Impairment`: seeded random loss, delay with jitter,
duplication, reordering, and a blackhole switch.  :meth:`UdpRelay.partition` cuts off a
chosen set of client flows (both directions) while the others keep flowing.

The relay only ever binds 127.0.0.1 and only sends to its ``target`` and to the client
addresses it heard from.

The original API still works::

    relay = await UdpRelay.start(("127.0.0.1", port), loss=0.2, seed=42)
    relay.port; relay.blackhole = True; relay.dropped["up"]; relay.forwarded["down"]
    relay.close()

Richer use::

    relay = await UdpRelay.start(target, seed=7, up=Impairment(loss=0.05),
                                 down=Impairment(delay=0.02, jitter=0.01, duplicate=0.02,
                                                 reorder=0.05))
    relay.down.blackhole = True           # the client stops hearing the server
    cut = relay.partition(["127.0.0.1:40001"])   # client side or upstream side address
    cut.heal()
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

Addr = tuple[str, int]
DIRECTIONS = ("up", "down")


@dataclass
class Impairment:
    """What happens to datagrams going one way.  Probabilities are per datagram.

    * ``loss``: dropped.
    * ``delay`` ± ``jitter``: held back this long (uniform jitter, never below 0).
    * ``duplicate``: sent twice (the copy after ``duplicate_gap`` more seconds).
    * ``reorder``: held back ``reorder_gap`` seconds longer than the rest, so datagrams
      sent after it overtake it.
    * ``blackhole``: every datagram is dropped (an outage in this direction).
    """

    loss: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0
    duplicate: float = 0.0
    duplicate_gap: float = 0.001
    reorder: float = 0.0
    reorder_gap: float = 0.01
    blackhole: bool = False

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate", "reorder"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability, got {p}")
        for name in ("delay", "jitter", "duplicate_gap", "reorder_gap"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


def _addr(a: Addr | str) -> Addr:
    if isinstance(a, str):
        host, _, port = a.rpartition(":")
        return host, int(port)
    return str(a[0]), int(a[1])


@dataclass
class Partition:
    """A set of client flows that the relay drops, both ways, until :meth:`heal`."""

    relay: UdpRelay
    addresses: set[Addr] = field(default_factory=set)
    healed: bool = False

    def heal(self) -> None:
        self.healed = True
        if self in self.relay._partitions:
            self.relay._partitions.remove(self)

    def covers(self, flow: _Flow) -> bool:
        return flow.client_addr in self.addresses or flow.upstream_addr in self.addresses


class _Flow(asyncio.DatagramProtocol):
    """One client address and its upstream socket."""

    def __init__(self, relay: UdpRelay, client_addr: Addr) -> None:
        self.relay = relay
        self.client_addr = client_addr
        self.upstream_addr: Addr | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.backlog: list[bytes] | None = []  # until the upstream socket is open
        self.last_seen = asyncio.get_running_loop().time()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.upstream_addr = _addr(transport.get_extra_info("sockname"))

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # server -> client
        self.last_seen = self.relay._loop.time()
        self.relay._pass("down", self, data)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable from a dead server: like a lost datagram

    def send_up(self, data: bytes) -> None:
        if self.backlog is not None:
            self.backlog.append(data)
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, self.relay.target)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class UdpRelay(asyncio.DatagramProtocol):
    def __init__(
        self,
        target: Addr,
        loss: float = 0.0,
        seed: int = 1,
        *,
        up: Impairment | None = None,
        down: Impairment | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self.target = target
        self.up = up if up is not None else Impairment(loss=loss)
        self.down = down if down is not None else Impairment(loss=loss)
        self.seed = seed
        # one generator per direction: what happens to the upstream traffic does not
        # shift the random sequence of the downstream traffic
        self._rng = {"up": random.Random(f"{seed}-up"), "down": random.Random(f"{seed}-down")}
        self.transport: asyncio.DatagramTransport | None = None
        self.flows: dict[Addr, _Flow] = {}
        self._partitions: list[Partition] = []
        self.idle_timeout = idle_timeout
        self._reaper: asyncio.TimerHandle | None = None
        self._timers: set[asyncio.TimerHandle] = set()
        self._closed = False
        self.forwarded = {"up": 0, "down": 0}
        self.dropped = {"up": 0, "down": 0}  # loss, blackhole and partitions together
        self.lost = {"up": 0, "down": 0}  # random loss only
        self.cut = {"up": 0, "down": 0}  # blackhole or partition
        self.duplicated = {"up": 0, "down": 0}
        self.reordered = {"up": 0, "down": 0}
        self.delayed = {"up": 0, "down": 0}
        self._watchers: list[tuple[Any, asyncio.Future[None]]] = []

    @classmethod
    async def start(cls, target: Addr, **kw: Any) -> UdpRelay:
        loop = asyncio.get_running_loop()
        _, relay = await loop.create_datagram_endpoint(
            lambda: cls(target, **kw), local_addr=("127.0.0.1", 0)
        )
        return relay

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    @property
    def address(self) -> Addr:
        return ("127.0.0.1", self.port)

    # --- switches ----------------------------------------------------------------------
    @property
    def blackhole(self) -> bool:
        """True when both directions are blackholed; setting it switches both."""
        return self.up.blackhole and self.down.blackhole

    @blackhole.setter
    def blackhole(self, on: bool) -> None:
        self.up.blackhole = on
        self.down.blackhole = on

    @property
    def loss(self) -> float:
        return max(self.up.loss, self.down.loss)

    @loss.setter
    def loss(self, p: float) -> None:
        self.up.loss = p
        self.down.loss = p

    def partition(self, addresses: Iterable[Addr | str]) -> Partition:
        """Cut off these client flows, both directions, until ``.heal()``.  An address
        is a ``(host, port)`` or ``"host:port"``: either the client's own address or the
        relay's upstream address for it (what ``Server.client(id).remote_address``
        shows).  New flows from other addresses are not affected."""
        part = Partition(self, {_addr(a) for a in addresses})
        self._partitions.append(part)
        return part

    def client_address_for(self, upstream: Addr | str) -> Addr | None:
        """The client address behind an upstream address the server sees."""
        up = _addr(upstream)
        for flow in self.flows.values():
            if flow.upstream_addr == up:
                return flow.client_addr
        return None

    # --- the data path -------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        if self.idle_timeout:
            self._reaper = self._loop.call_later(self.idle_timeout, self._reap)

    def error_received(self, exc: Exception) -> None:
        pass

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # client -> server
        client = (str(addr[0]), int(addr[1]))
        flow = self.flows.get(client)
        if flow is None:
            flow = _Flow(self, client)
            self.flows[client] = flow
            self._loop.create_task(self._open(flow))
        flow.last_seen = self._loop.time()
        self._pass("up", flow, data)

    async def _open(self, flow: _Flow) -> None:
        try:
            await self._loop.create_datagram_endpoint(lambda: flow, local_addr=("127.0.0.1", 0))
        except OSError:
            self.flows.pop(flow.client_addr, None)
            return
        backlog, flow.backlog = flow.backlog or [], None
        if self._closed:
            flow.close()
            return
        for data in backlog:
            flow.send_up(data)

    # --- waiting for traffic (tests wait on what crossed, never on a bare sleep) -----------
    async def wait_until(self, pred: Any, timeout: float = 10.0) -> None:
        """Return once ``pred(relay)`` is true: checked now and after every datagram the
        relay forwards or drops.  TimeoutError after ``timeout`` seconds."""
        if pred(self):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (pred, fut)
        self._watchers.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await fut
        finally:
            self._watchers.remove(entry)

    async def wait_quiet(self, quiet: float = 0.15, timeout: float = 5.0) -> dict[str, int]:
        """Return the forwarded counts once no datagram has crossed for ``quiet`` seconds
        (each datagram restarts the wait).  TimeoutError if traffic never pauses that
        long within ``timeout``."""
        loop = asyncio.get_running_loop()
        quiet_now: asyncio.Future[None] = loop.create_future()

        def done() -> None:
            if not quiet_now.done():
                quiet_now.set_result(None)

        timer = loop.call_later(quiet, done)

        def restart(_: UdpRelay) -> bool:
            nonlocal timer
            timer.cancel()
            timer = loop.call_later(quiet, done)
            return False

        entry = (restart, loop.create_future())
        self._watchers.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await quiet_now
        finally:
            timer.cancel()
            self._watchers.remove(entry)
        return dict(self.forwarded)

    def _notify(self) -> None:
        for pred, fut in list(self._watchers):
            if not fut.done() and pred(self):
                fut.set_result(None)

    # --- the data path (continued) -----------------------------------------------------
    def _verdict(self, direction: str, flow: _Flow) -> bool:
        """Count and decide whether a datagram is dropped."""
        imp = self.up if direction == "up" else self.down
        cut = imp.blackhole or any(p.covers(flow) for p in self._partitions)
        if cut:
            self.dropped[direction] += 1
            self.cut[direction] += 1
            self._notify()
            return True
        if imp.loss and self._rng[direction].random() < imp.loss:
            self.dropped[direction] += 1
            self.lost[direction] += 1
            self._notify()
            return True
        return False

    def _pass(self, direction: str, flow: _Flow, data: bytes) -> None:
        if self._closed or self._verdict(direction, flow):
            return
        self.forwarded[direction] += 1
        self._notify()
        imp = self.up if direction == "up" else self.down
        rng = self._rng[direction]
        delay = imp.delay
        if imp.jitter:
            delay = max(0.0, delay + rng.uniform(-imp.jitter, imp.jitter))
        if imp.reorder and rng.random() < imp.reorder:
            delay += imp.reorder_gap
            self.reordered[direction] += 1
        copies = [delay]
        if imp.duplicate and rng.random() < imp.duplicate:
            copies.append(delay + imp.duplicate_gap)
            self.duplicated[direction] += 1
        for d in copies:
            if d > 0:
                self.delayed[direction] += 1
                self._later(d, self._emit, direction, flow, data)
            else:
                self._emit(direction, flow, data)

    def _later(self, delay: float, fn: Any, *args: Any) -> None:
        handle: asyncio.TimerHandle

        def run() -> None:
            self._timers.discard(handle)
            fn(*args)

        handle = self._loop.call_later(delay, run)
        self._timers.add(handle)

    def _emit(self, direction: str, flow: _Flow, data: bytes) -> None:
        if self._closed:
            return
        if direction == "up":
            flow.send_up(data)
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, flow.client_addr)

    def _reap(self) -> None:
        """Close upstream sockets of flows idle for ``idle_timeout`` (long-running use)."""
        assert self.idle_timeout
        now = self._loop.time()
        for addr, flow in list(self.flows.items()):
            if flow.backlog is None and now - flow.last_seen > self.idle_timeout:
                flow.close()
                del self.flows[addr]
        self._reaper = self._loop.call_later(self.idle_timeout, self._reap)

    def stats(self) -> dict[str, Any]:
        return {
            "flows": len(self.flows),
            "forwarded": dict(self.forwarded),
            "dropped": dict(self.dropped),
            "lost": dict(self.lost),
            "cut": dict(self.cut),
            "duplicated": dict(self.duplicated),
            "reordered": dict(self.reordered),
        }

    def close(self) -> None:
        self._closed = True
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        if self._reaper is not None:
            self._reaper.cancel()
        for flow in self.flows.values():
            flow.close()
        self.flows.clear()
        if self.transport is not None:
            self.transport.close()
