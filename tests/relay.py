"""A user-space UDP impairment relay for tests: seeded random loss both ways, and a
blackhole switch that drops everything (a network outage)."""

from __future__ import annotations

import asyncio
import random
from typing import Any


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay, client_addr: Any) -> None:
        self.relay = relay
        self.client_addr = client_addr
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # server -> client
        if self.relay.drop("down"):
            return
        assert self.relay.transport is not None
        self.relay.transport.sendto(data, self.client_addr)


class UdpRelay(asyncio.DatagramProtocol):
    def __init__(self, target: tuple[str, int], loss: float = 0.0, seed: int = 1) -> None:
        self.target = target
        self.loss = loss
        self.rng = random.Random(seed)
        self.blackhole = False
        self.transport: asyncio.DatagramTransport | None = None
        self._upstreams: dict[Any, _Upstream] = {}
        self._pending: dict[Any, list[bytes]] = {}
        self.forwarded = {"up": 0, "down": 0}
        self.dropped = {"up": 0, "down": 0}

    @classmethod
    async def start(cls, target: tuple[str, int], **kw: Any) -> UdpRelay:
        loop = asyncio.get_running_loop()
        _, relay = await loop.create_datagram_endpoint(
            lambda: cls(target, **kw), local_addr=("127.0.0.1", 0)
        )
        return relay

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def drop(self, direction: str) -> bool:
        if self.blackhole or (self.loss and self.rng.random() < self.loss):
            self.dropped[direction] += 1
            return True
        self.forwarded[direction] += 1
        return False

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # client -> server
        if self.drop("up"):
            return
        up = self._upstreams.get(addr)
        if up is None:
            if addr in self._pending:
                self._pending[addr].append(data)
                return
            self._pending[addr] = [data]
            asyncio.get_running_loop().create_task(self._open(addr))
            return
        assert up.transport is not None
        up.transport.sendto(data, self.target)

    async def _open(self, addr: Any) -> None:
        loop = asyncio.get_running_loop()
        _, up = await loop.create_datagram_endpoint(
            lambda: _Upstream(self, addr), local_addr=("127.0.0.1", 0)
        )
        self._upstreams[addr] = up
        for data in self._pending.pop(addr, []):
            assert up.transport is not None
            up.transport.sendto(data, self.target)

    def close(self) -> None:
        for up in self._upstreams.values():
            if up.transport is not None:
                up.transport.close()
        if self.transport is not None:
            self.transport.close()
