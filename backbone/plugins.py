"""Plugins: small observers of the signal bus, enabled explicitly or by configuration.

A plugin subclasses :class:`Plugin`, names itself and says which signals it listens to::

    class CountConnects(Plugin):
        name = "count-connects"

        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def receivers(self):
            return {signals.on_connected: self.connected}

        def connected(self, sender, event):
            self.count += 1

``install(sender)`` connects its receivers for that sender (a Server or Client; None
means every sender) and ``uninstall(sender)`` disconnects them; both are idempotent.
Plugins are found by name through the ``backbone.plugins`` entry-point group, so a
third-party plugin installs with pip; ``BACKBONE_PLUGINS=logging,metrics`` enables them
for every Server and Client that is not given an explicit ``plugins=`` list.

Plugins only observe.  A receiver that raises is logged and counted, and after
:data:`backbone.signals.MAX_RECEIVER_FAILURES` failures it is disconnected.  Work that
is slow (disk, network) goes through a :class:`BoundedWorker`: a bounded queue drained
by a thread, whose drops are counted and logged, never silent.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from blinker import ANY, NamedSignal

from . import signals

log = logging.getLogger("backbone.plugins")

ENTRY_POINT_GROUP = "backbone.plugins"
ENV_VAR = "BACKBONE_PLUGINS"

Receiver = Callable[..., None]

#: events plugins lost, by plugin name: dropped from a full queue, or in a batch whose
#: handling raised (also exported by the metrics plugin as ``backbone.plugin.dropped``).
#: Add to it with :func:`count_drops` (the loop and writer threads both do).
plugin_drops: Counter[str] = Counter()
_drops_lock = threading.Lock()


def count_drops(name: str, n: int) -> None:
    with _drops_lock:
        plugin_drops[name] += n


class Plugin:
    name: str = "plugin"
    #: the per-message kinds this plugin's receiver of ``signals.on_events_batched`` uses
    #: (None: all of ``events.BATCHED_KINDS``); the core builds no row of a kind that
    #: no batch receiver wants
    batched_steps: frozenset[str] | None = None

    def __init__(self) -> None:
        self._installed: set[int] = set()
        self._senders: dict[int, Any] = {}
        #: the receivers connected at each install: uninstall disconnects exactly these
        #: (receivers() may answer differently by then, e.g. after a log level change)
        self._receivers_of: dict[int, dict[NamedSignal, Receiver]] = {}
        #: every (signal, receiver) an install connected, once each
        self._ever_connected: dict[tuple[NamedSignal, Receiver], None] = {}

    def receivers(self) -> dict[NamedSignal, Receiver]:
        """The signals this plugin listens to, and the callable for each."""
        return {}

    def on_install(self, sender: Any) -> None:
        """Hook: called once per sender when installed (start threads, open files...)."""

    def on_uninstall(self, sender: Any) -> None:
        """Hook: called once per sender when uninstalled (flush, close...)."""

    def install(self, sender: Any = None) -> None:
        key = id(sender)
        if key in self._installed:
            return
        self._installed.add(key)
        self._senders[key] = sender
        # per-message steps already taken go to the receivers of their time, not to us
        signals.flush_steps()
        target = ANY if sender is None else sender
        connected = self._receivers_of[key] = dict(self.receivers())
        for signal, receiver in connected.items():
            signal.connect(receiver, sender=target, weak=False)
            self._ever_connected[(signal, receiver)] = None
        self.on_install(sender)

    def uninstall(self, sender: Any = None) -> None:
        key = id(sender)
        if key not in self._installed:
            return
        self._installed.discard(key)
        self._senders.pop(key, None)
        signals.flush_steps()  # the steps taken while we listened reach us first
        target = ANY if sender is None else sender
        for signal, receiver in self._receivers_of.pop(key, {}).items():
            signal.disconnect(receiver, sender=target)
        if not self._installed:
            # blinker keeps a receiver listed after a per-sender disconnect: with no
            # sender left, drop every receiver any install connected, so no event is
            # built for nobody
            for signal, receiver in self._ever_connected:
                signal.disconnect(receiver)
            self._ever_connected.clear()
        self.on_uninstall(sender)

    @property
    def installed(self) -> bool:
        return bool(self._installed)


def install_plugin(plugin: Plugin, sender: Any) -> None:
    """Install, isolated: a plugin whose install hook raises is logged and left out; it
    never stops a server or client from starting."""
    try:
        plugin.install(sender)
    except signals.RECEIVER_FAILURES:
        log.exception("plugin %s failed to install; running without it", plugin.name)
        try:
            plugin.uninstall(sender)
        except signals.RECEIVER_FAILURES:
            log.exception("plugin %s failed to uninstall", plugin.name)


def uninstall_plugin(plugin: Plugin, sender: Any) -> None:
    try:
        plugin.uninstall(sender)
    except signals.RECEIVER_FAILURES:
        log.exception("plugin %s failed to uninstall", plugin.name)


def available_plugins() -> dict[str, Any]:
    """Entry points of the ``backbone.plugins`` group, by name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_plugin(name: str, **options: Any) -> Plugin:
    eps = available_plugins()
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none"
        raise ValueError(f"unknown plugin {name!r} (installed: {known})")
    cls = eps[name].load()
    plugin = cls(**options)
    if not isinstance(plugin, Plugin):
        raise TypeError(f"plugin {name!r} ({cls!r}) is not a backbone.plugins.Plugin")
    return plugin


def parse_plugin_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"history:path=/var/lib/bb.sqlite3:max_rows=1000000"`` → name and options (values
    are JSON when they parse as JSON, else strings)."""
    name, *pairs = spec.strip().split(":")
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"plugin option {pair!r} in {spec!r} is not key=value")
        try:
            options[key.strip()] = json.loads(raw)
        except ValueError:
            options[key.strip()] = raw
    return name.strip(), options


def plugins_from_env(environ: dict[str, str] | None = None) -> list[Plugin]:
    """``BACKBONE_PLUGINS=logging,metrics,history:path=/var/lib/bb.sqlite3``"""
    specs = (os.environ if environ is None else environ).get(ENV_VAR, "")
    out = []
    for spec in specs.split(","):
        if spec.strip():
            name, options = parse_plugin_spec(spec)
            out.append(load_plugin(name, **options))
    return out


def resolve_plugins(plugins: Iterable[Plugin | str] | None) -> list[Plugin]:
    """What ``Server(plugins=...)`` / ``Client(plugins=...)`` accept: None means the
    environment decides; names are loaded through entry points."""
    if plugins is None:
        return plugins_from_env()
    return [load_plugin(p) if isinstance(p, str) else p for p in plugins]


T = TypeVar("T")


class BoundedWorker(Generic[T]):
    """A bounded queue drained in batches by a daemon thread.

    ``put`` never blocks: when the queue is full the item is dropped, counted in
    :data:`plugin_drops` and logged (at most every 10 s).  ``handle`` receives lists of
    items; if it raises, the batch is logged, counted as failed (its items in
    :data:`plugin_drops` too: they are lost) and the worker goes on.

    ``put`` is one ``deque.append`` (atomic under the GIL, no lock): it runs on the event
    loop once per event.  The thread sleeps ``interval`` seconds between drains, and is
    woken early only when a full batch is waiting, so a busy queue costs one wake-up per
    ``batch`` items rather than one per item.

    With ``weigh``, an item stands for ``weigh(item)`` units (e.g. a chunk of events):
    ``maxsize`` and ``batch`` are then in units, and so are the counts (``dropped``,
    :data:`plugin_drops`, ``handled``, ``backlog``).  A batch holds at least one item.
    """

    def __init__(
        self,
        name: str,
        handle: Callable[[list[T]], None],
        maxsize: int = 100_000,
        batch: int = 1000,
        interval: float = 0.1,
        weigh: Callable[[T], int] | None = None,
    ) -> None:
        self.name = name
        self.maxsize = maxsize
        self._handle = handle
        self._weigh = weigh
        self._taken = 0  # units taken off the queue by the thread (only it writes this)
        self._items: deque[T] = deque()
        self._batch = batch
        self._interval = interval
        self._last_drop_log = 0.0
        self.dropped = 0
        self.failed_batches = 0
        self.failed = 0  # units in the failed batches
        self.handled = 0
        self._accepted = 0  # items put; ``_finished`` counts those handled (or failed)
        self._finished = 0
        self._progress = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"backbone-{name}", daemon=True)
        self._thread.start()

    @property
    def backlog(self) -> int:
        """Items accepted and not yet handled."""
        return self._accepted - self._finished

    def put(self, item: T) -> None:
        weight = 1 if self._weigh is None else self._weigh(item)
        # units waiting; each counter has one writer, so no update is lost
        queued = self._accepted - self._taken
        if queued + weight > self.maxsize and queued:
            self._drop(weight)
            return
        self._items.append(item)
        self._accepted += weight
        if queued < self._batch <= queued + weight:
            self._wake.set()

    def _drop(self, weight: int = 1) -> None:
        self.dropped += weight
        count_drops(self.name, weight)
        now = time.monotonic()
        if now - self._last_drop_log >= 10.0:
            self._last_drop_log = now
            log.warning(
                "plugin %s is not keeping up: its queue of %d is full; %d events dropped so far",
                self.name,
                self.maxsize,
                self.dropped,
            )

    def _run(self) -> None:
        items = self._items
        while True:
            if not items:
                if self._stop.is_set():
                    return
                self._wake.wait(self._interval)
                self._wake.clear()
                continue
            weigh = self._weigh
            pop = items.popleft
            if weigh is None:
                n = min(len(items), self._batch)
                batch: list[T] = [pop() for _ in range(n)]
            else:
                batch = [pop()]
                n = weigh(batch[0])
                while items and n + weigh(items[0]) <= self._batch:
                    batch.append(pop())
                    n += weigh(batch[-1])
            self._taken += n
            try:
                self._handle(batch)
                self.handled += n
            except Exception:
                self.failed_batches += 1
                self.failed += n
                count_drops(self.name, n)  # lost: counted with the drops
                log.exception("plugin %s failed on a batch of %d", self.name, n)
            with self._progress:
                self._finished += n
                self._progress.notify_all()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything accepted so far was handled; False on timeout."""
        target = self._accepted
        self._wake.set()
        with self._progress:
            return self._progress.wait_for(lambda: self._finished >= target, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Drain what is queued (up to ``timeout``), then stop the thread.  Never blocks
        on a full queue."""
        if not self._thread.is_alive():
            return
        self.flush(timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout + self._interval)
        if self.backlog:
            log.warning("plugin %s closed with %d events not written", self.name, self.backlog)


def names(plugins: Sequence[Plugin]) -> list[str]:
    return [p.name for p in plugins]
