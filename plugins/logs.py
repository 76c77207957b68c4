"""Logging plugin: one structured line per event, through stdlib :mod:`logging`.

Enable it with ``Server(plugins=["logging"])``, ``Client(plugins=["logging"])`` or
``BACKBONE_PLUGINS=logging``; pass a :class:`LoggingPlugin` to choose its options.  Lines
go to the ``backbone.events`` logger (or the one given), so the application's logging
configuration decides where they end up.

Two formats, chosen by ``format=`` or else by the environment variable
``BACKBONE_LOG_FORMAT`` (default ``kv``)::

    event=message.sent role=server client_id=dev-1 msg_id=0f3c…9a size=200 wait_ack=true
    {"event":"message.sent","role":"server","client_id":"dev-1","msg_id":"0f3c…9a",…}

``kv`` is logfmt: values with a space, ``=``, ``"`` or ``\\`` are double-quoted with
backslash escapes, booleans are ``true``/``false``, fields whose value is ``None`` are
left out.  ``json`` is one JSON object per line, with the same keys.  The first two keys
are always ``event`` (the event kind) and ``role``.  The time, level and logger name are
the log handler's business, as usual.  Each record also carries the event object itself
as ``record.backbone_event``, for filters and custom formatters.

What is logged (FR-023), and at which level (``level`` is the constructor argument,
``INFO`` by default; the warning level is ``max(WARNING, level)``):

======================================================  =============================
events                                                  level
======================================================  =============================
``server.started``, ``server.stopped``, ``connected``,  ``level``
``disconnected`` (with its reason), ``state.changed``,
``reconnect.scheduled`` (reason and delay),
``goaway.sent``, ``goaway.received``
``message.sent`` and ``message.received`` (MsgID and       ``message_level``
size), ``ack.sent`` and ``ack.received`` (the result:      (``DEBUG`` by default)
ok or error type)
``heartbeat.timed_out`` (eviction / dead server),       warning
``connect.failed`` (reason), ``protocol.violated``,
``send.rejected``, ``ack.timed_out``, ``ack.failed``,
``ack.late``, ``session.refused``
``heartbeat.received`` / ``heartbeat.acknowledged``     ``DEBUG``, only with
                                                        ``heartbeats=True``
======================================================  =============================

An event kind this module does not know yet (from a newer core) is logged at
``level`` with all its fields.  ``message.processed`` is not logged: ``ack.sent`` carries
the outcome of WaitAck messages, and the core itself logs a handler that raised on a
fire-and-forget message.

Payloads are never logged: events do not carry them.  Message headers (which may hold
trace context or application metadata) are logged only with ``payloads=True``.

Per-message lines are what costs: two or more records per message, each a
``LogRecord`` plus whatever the handlers do (a ``FileHandler`` formats, writes and
flushes every record), which would cut a busy connection's throughput by a third
(``bench/plugins_overhead.py`` measures it).  So, as brokers do, the per-message lines
(``message.sent``, ``message.received``, ``ack.sent``, ``ack.received``) are logged at
``message_level``, ``DEBUG`` by default, while connections, reconnects and every
failure are logged at ``level``.  Pass ``message_level="INFO"`` to see every message.
If the logger is not enabled for ``message_level`` when the plugin is installed, the
plugin does not even subscribe to the per-message steps (``message.sent``,
``message.received``, ``ack.sent``, ``ack.received``), so they are not built on its
account; enabling that level later takes effect at the next install.  (Raising the level
later does stop those lines at once.)

Cost: a receiver first asks the logger whether that level is enabled (a cached lookup)
and returns at once if not; the line is built only for records that will be handled.
The record is made with ``Logger.makeRecord`` and passed to ``Logger.handle`` directly,
skipping the stack walk that ``Logger.info`` does to find the caller (which would only
ever be this module).  The plugin subscribes only to the signals it logs, so with
``heartbeats=False`` no heartbeat event is built on its account.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Final

import orjson
from blinker import NamedSignal

from backbone import signals
from backbone.events import Event, EventsBatched
from backbone.plugins import Plugin, Receiver

LOGGER_NAME: Final = "backbone.events"
ENV_FORMAT: Final = "BACKBONE_LOG_FORMAT"
FORMATS: Final = ("kv", "json")

#: the fields logged for each event kind, in order, after ``event`` and ``role``
FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "server.started": ("host", "port"),
    "server.stopped": ("host", "port", "reason"),
    "connected": ("client_id", "session_id", "peer", "setup_time"),
    "disconnected": ("client_id", "session_id", "reason", "code", "detail", "duration"),
    "heartbeat.timed_out": ("client_id", "session_id", "silent_for", "last_heartbeat_at"),
    "state.changed": ("client_id", "old", "new", "reason"),
    "connect.failed": ("client_id", "reason", "detail", "attempt"),
    "reconnect.scheduled": ("client_id", "attempt", "delay", "reason"),
    "protocol.violated": ("client_id", "peer", "code", "code_name", "reason"),
    "heartbeat.received": ("client_id", "session_id"),
    "heartbeat.acknowledged": ("client_id", "session_id", "rtt"),
    "message.sent": ("client_id", "msg_id", "size", "wait_ack", "broadcast"),
    "message.received": ("client_id", "msg_id", "size", "wait_ack"),
    "ack.sent": ("client_id", "msg_id", "ok", "error_type", "size", "processing_time"),
    "ack.received": ("client_id", "msg_id", "ok", "error_type", "latency"),
    "ack.late": ("client_id", "msg_id"),
    "ack.timed_out": ("client_id", "msg_id", "timeout"),
    "ack.failed": ("client_id", "msg_id", "reason", "latency"),
    "send.rejected": ("client_id", "reason", "detail", "msg_id"),
    "goaway.received": ("client_id", "reason", "retry_after", "window"),
    "goaway.sent": ("client_id", "reason", "retry_after", "window"),
    "session.refused": ("client_id", "peer", "reason", "retry_after", "window"),
}
#: envelope fields, never repeated in a line (``kind`` and ``role`` come first; the time
#: is the log record's)
ENVELOPE: Final = frozenset({"kind", "seq", "at", "role"})

#: the per-message kinds, logged at ``message_level``
MESSAGE_KINDS: Final = frozenset({"message.sent", "message.received", "ack.sent", "ack.received"})
#: kinds logged at the warning level
WARNING_KINDS: Final = frozenset(
    {
        "heartbeat.timed_out",
        "connect.failed",
        "protocol.violated",
        "send.rejected",
        "ack.timed_out",
        "ack.failed",
        "ack.late",
        "session.refused",
    }
)
HEARTBEAT_KINDS: Final = frozenset({"heartbeat.received", "heartbeat.acknowledged"})

# every signal the plugin logs, except on_heartbeat (only with heartbeats=True)
_SIGNALS: Final = (
    signals.on_server_started,
    signals.on_server_stopped,
    signals.on_connected,
    signals.on_disconnected,
    signals.on_timeout,
    signals.on_state_changed,
    signals.on_connect_failed,
    signals.on_reconnect_scheduled,
    signals.on_protocol_error,
    signals.on_ack_late,
    signals.on_ack_timeout,
    signals.on_ack_failed,
    signals.on_send_rejected,
    signals.on_goaway,
)
# signals newer than this plugin's oldest supported core: subscribed to when they exist
_OPTIONAL_SIGNALS: Final = ("on_session_refused",)

_NEEDS_QUOTES: Final = frozenset(' ="\\\t\n\r')
_quoted_cache: dict[str, str] = {}


def _kv_str(value: str) -> str:
    """A logfmt value: bare if it can be, else double-quoted with backslash escapes."""
    cached = _quoted_cache.get(value)
    if cached is not None:
        return cached
    if value and _NEEDS_QUOTES.isdisjoint(value):
        out = value
    else:
        out = (
            '"'
            + value.replace("\\", "\\\\")
            .replace('"', '\\"')
            .replace("\n", "\\n")
            .replace("\r", "\\r")
            .replace("\t", "\\t")
            + '"'
        )
    if len(value) <= 64:  # client ids, reasons: few distinct values, worth remembering
        if len(_quoted_cache) >= 4096:
            _quoted_cache.clear()
        _quoted_cache[value] = out
    return out


def _kv_value(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _kv_str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return _kv_str(orjson.dumps(value).decode())
    return str(value)


def format_kv(event: Event, fields: tuple[str, ...]) -> str:
    parts = [f"event={event.kind} role={event.role}"]
    for name in fields:
        value = getattr(event, name)
        if value is not None:
            parts.append(f"{name}={_kv_value(value)}")
    return " ".join(parts)


def format_json(event: Event, fields: tuple[str, ...]) -> str:
    out: dict[str, Any] = {"event": event.kind, "role": event.role}
    for name in fields:
        value = getattr(event, name)
        if value is not None:
            out[name] = value
    return orjson.dumps(out).decode()


def resolve_level(level: int | str) -> int:
    """A level number, or a level name (``"DEBUG"``, as ``BACKBONE_PLUGINS`` options
    give it)."""
    if isinstance(level, int):
        return level
    levels = logging.getLevelNamesMapping()
    name = level.strip().upper()
    if name.isdigit():
        return int(name)
    if name not in levels:
        raise ValueError(f"unknown log level {level!r}")
    return levels[name]


def resolve_format(fmt: str | None, environ: dict[str, str] | None = None) -> str:
    """``fmt`` if given, else ``$BACKBONE_LOG_FORMAT``, else ``kv``; checked."""
    if fmt is None:
        fmt = (os.environ if environ is None else environ).get(ENV_FORMAT, "").strip() or "kv"
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (use one of: {', '.join(FORMATS)})")
    return fmt


class LoggingPlugin(Plugin):
    """Logs every connection, message, result and failure event as one line.

    ``format``: ``"kv"`` or ``"json"`` (default: ``$BACKBONE_LOG_FORMAT`` or ``kv``).
    ``level``: level of routine lines (a number or a name); problems are logged at
    ``max(WARNING, level)``.
    ``message_level``: level of the per-message lines (``message.sent``,
    ``message.received``, ``ack.sent``, ``ack.received``); default ``DEBUG``.
    ``logger``: a :class:`logging.Logger` or a logger name (default ``backbone.events``).
    ``payloads``: also log message headers (payloads themselves are never logged).
    ``heartbeats``: also log every heartbeat, at ``DEBUG``.
    """

    name = "logging"
    batched_steps = MESSAGE_KINDS

    def __init__(
        self,
        format: str | None = None,
        level: int | str = logging.INFO,
        logger: logging.Logger | str | None = None,
        payloads: bool = False,
        heartbeats: bool = False,
        message_level: int | str = logging.DEBUG,
    ) -> None:
        super().__init__()
        self.format = resolve_format(format)
        self.level = level = resolve_level(level)
        self.message_level = resolve_level(message_level)
        if logger is None or isinstance(logger, str):
            logger = logging.getLogger(logger or LOGGER_NAME)
        self.logger = logger
        self.payloads = payloads
        self.heartbeats = heartbeats
        warning = max(logging.WARNING, level)
        self._levels: dict[str, int] = {}
        for kind in FIELDS:
            if kind in HEARTBEAT_KINDS:
                self._levels[kind] = logging.DEBUG
            elif kind in WARNING_KINDS:
                self._levels[kind] = warning
            elif kind in MESSAGE_KINDS:
                self._levels[kind] = self.message_level
            else:
                self._levels[kind] = level
        self._fields: dict[str, tuple[str, ...]] = dict(FIELDS)
        if payloads:
            for kind in ("message.sent", "message.received", "ack.received"):
                self._fields[kind] = (*FIELDS[kind], "headers")
        self._format_line = format_json if self.format == "json" else format_kv

    def receivers(self) -> dict[NamedSignal, Receiver]:
        out: dict[NamedSignal, Receiver] = dict.fromkeys(_SIGNALS, self.log_event)
        if self.logger.isEnabledFor(self.message_level):
            # decided at install: the per-message lines (MESSAGE_KINDS) come in batches
            out[signals.on_events_batched] = self.log_batch
        for name in _OPTIONAL_SIGNALS:
            signal = getattr(signals, name, None)
            if isinstance(signal, NamedSignal):
                out[signal] = self.log_event
        if self.heartbeats:
            out[signals.on_heartbeat] = self.log_event
        return out

    def log_event(self, sender: Any, event: Event) -> None:
        """The receiver: one line for ``event`` if its level is enabled."""
        kind = event.kind
        level = self._levels.get(kind, self.level)
        if not self.logger.isEnabledFor(level):
            return
        fields = self._fields.get(kind)
        if fields is None:
            fields = self._fields[kind] = self._fields_of(event)
        logger = self.logger
        record = logger.makeRecord(
            logger.name,
            level,
            __file__,
            0,
            self._format_line(event, fields),
            (),
            None,
            "log_event",
        )
        record.backbone_event = event
        logger.handle(record)

    def log_batch(self, sender: Any, event: EventsBatched) -> None:
        """The receiver of per-message steps: a line for each step of a kind this
        plugin logs (:data:`MESSAGE_KINDS`)."""
        if event.step not in MESSAGE_KINDS or not self.logger.isEnabledFor(
            self._levels.get(event.step, self.level)
        ):
            return
        for step in event.events():
            self.log_event(sender, step)

    def line(self, event: Event) -> str:
        """The text this plugin logs for ``event`` (whatever the level)."""
        return self._format_line(event, self._fields.get(event.kind) or self._fields_of(event))

    def _fields_of(self, event: Event) -> tuple[str, ...]:
        """A kind this plugin does not know (a newer core): all its own fields."""
        return tuple(
            name
            for name in type(event).model_fields
            if name not in ENVELOPE and (self.payloads or name != "headers")
        )
