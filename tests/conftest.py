from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from backbone import Client, Server, signals
from backbone.certs import DevCerts, make_dev_certs
from backbone.events import Event


@pytest.fixture(autouse=True)
def _quiet_garbage_collector() -> Any:
    """Collect the previous tests' garbage before each test and keep what exists then out
    of the collector's reach while it runs (undone afterwards).  Ended connections are
    reference cycles, so garbage piles up over a session, and a full collection during a
    test with 0.2 s heartbeats can pause its loop past a 0.6 s timeout: seen in full-suite
    runs, never in a test run alone.  The pauses themselves are a known limit at scale
    (docs/benchmarks.md, "10,000 clients"); here they are noise."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    """The cyclic collector off for the test (after one collection): what is still alive
    then is freed by reference counting or not at all."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    return make_dev_certs(tmp_path_factory.mktemp("certs"), client_ids=("dev-1",))


FAST = dict(heartbeat_interval=0.2, heartbeat_misses=3)


class Events:
    """Records every event and lets a test wait for one (never a bare sleep)."""

    def __init__(self) -> None:
        self.items: list[Event] = []
        self._waiters: list[tuple[Callable[[Event], bool], asyncio.Future[Event]]] = []

    def __call__(self, sender: Any, event: Event) -> None:
        self.items.append(event)
        for pred, fut in list(self._waiters):
            if not fut.done() and pred(event):
                fut.set_result(event)

    def of(self, kind: str, **match: Any) -> list[Event]:
        return [
            e
            for e in self.items
            if e.kind == kind and all(getattr(e, k) == v for k, v in match.items())
        ]

    async def wait(self, kind: str, timeout: float = 10.0, **match: Any) -> Event:
        def pred(e: Event) -> bool:
            return e.kind == kind and all(getattr(e, k) == v for k, v in match.items())

        for e in self.items:
            if pred(e):
                return e
        fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._waiters.append((pred, fut))
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self._waiters.remove((pred, fut))

    async def wait_new(self, kind: str, timeout: float = 10.0, **match: Any) -> Event:
        """Like wait, but only for an event that has not happened yet."""
        return await self.expect(kind, timeout, **match)

    def expect(self, kind: str, timeout: float = 10.0, **match: Any) -> asyncio.Task[Event]:
        """Start waiting now for the next matching event (one that has not happened yet);
        await the returned task later.  For an event that the code between this call and
        the await may cause: no ``sleep(0)`` to let a waiter register first."""

        def pred(e: Event) -> bool:
            return e.kind == kind and all(getattr(e, k) == v for k, v in match.items())

        return self._register(pred, timeout)

    async def wait_count(
        self, kind: str, n: int, timeout: float = 10.0, **match: Any
    ) -> list[Event]:
        """Wait until ``n`` matching events have been recorded (those already recorded
        count); returns them all."""

        def pred(e: Event) -> bool:
            return (
                e.kind == kind
                and all(getattr(e, k) == v for k, v in match.items())
                and len(self.of(kind, **match)) >= n
            )

        if len(self.of(kind, **match)) < n:
            await self._register(pred, timeout)
        return self.of(kind, **match)

    def _register(self, pred: Callable[[Event], bool], timeout: float) -> asyncio.Task[Event]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Event] = loop.create_future()
        entry = (pred, fut)
        self._waiters.append(entry)  # registered before the caller's next line runs

        async def waiting() -> Event:
            try:
                async with asyncio.timeout(timeout):
                    return await fut
            finally:
                self._waiters.remove(entry)

        return loop.create_task(waiting())


@pytest.fixture
def events() -> Any:
    rec = Events()
    signals.on_event.connect(rec, weak=False)
    yield rec
    signals.on_event.disconnect(rec)


@pytest.fixture
def make_server(certs: DevCerts) -> Callable[..., Any]:
    @contextlib.asynccontextmanager
    async def factory(port: int = 0, **kw: Any) -> AsyncIterator[Server]:
        opts: dict[str, Any] = dict(FAST, drain_retry_after=0.1, drain_window=0.5)
        opts.update(kw)
        server = Server(
            "127.0.0.1",
            port,
            certfile=str(certs.server_cert),
            keyfile=str(certs.server_key),
            **opts,
        )
        async with server:
            yield server

    return factory


@pytest.fixture
def make_client(certs: DevCerts) -> Callable[..., Client]:
    def factory(client_id: str, port: int, **kw: Any) -> Client:
        opts: dict[str, Any] = dict(
            FAST,
            backoff_initial=0.05,
            backoff_max=0.5,
            connect_timeout=2.0,
            server_name="localhost",
        )
        opts.update(kw)
        opts.setdefault("cafile", str(certs.ca_cert))
        return Client(client_id, "127.0.0.1", port, **opts)

    return factory


def cert_path(p: Path) -> str:
    return str(p)
