"""Tracing plugin: OpenTelemetry spans for sends, handler runs and results.

Enable it with ``Server(plugins=["otel"])``, ``Client(plugins=["otel"])`` or
``BACKBONE_PLUGINS=otel``; pass a :class:`TracingPlugin` instance to choose the provider.

Span model (messaging semantic conventions, schema 1.44.0; ``messaging.system`` is
``backbone``, every span has ``network.transport=quic`` and ``backbone.client.id``)
-----------------------------------------------------------------------------------

Direction decides the destination: a message from the server to client ``alice`` has
destination name ``client/alice`` and template ``client/{client_id}``; a message from a
client to the server has destination ``server``.  Span names follow the convention
``{messaging.operation.name} {destination}``, using the *template* when there is one, so
they stay low-cardinality: ``send client/{client_id}``, never ``send client/alice``.

* **send** (sender side, kind PRODUCER), ``send client/{client_id}`` or ``send server``.
  Started by the header injector, so its context travels in the frame as ``traceparent``
  (the creation context).  It covers the whole ``send_to`` / ``send`` call as the caller
  sees it: a fire-and-forget send ends when the frame is queued (``message.sent``); a
  WaitAck send ends with its outcome, like a producer span that ends on the broker's
  acknowledgement:

  ===================================  ===========================================
  outcome                              on the span
  ===================================  ===========================================
  ``ack.received``, ok                 status unset; a Link to the ack span
  ``ack.received``, error result        ``error.type`` = the remote error type
                                       (``ValueError``...), status ERROR, Link
  ``ack.timed_out``                    ``error.type=timeout``
  ``ack.failed``                       ``error.type=client_gone`` (server side) or
                                       ``server_gone`` (client side);
                                       ``backbone.failure.reason`` = the event reason
  ``send.rejected`` (MsgID assigned)   ``error.type`` = the reason
                                       (``backpressure``, ``too_many_pending``...)
  ``ack.late`` while still open        ``error.type=cancelled`` (the caller stopped
                                       waiting, then the result came)
  frame never queued, no event         ``error.type=not_sent`` (checked on the next
                                       loop pass; e.g. headers over 8 KiB)
  ===================================  ===========================================

  The parent is the caller's active span if there is one; otherwise, if the caller put a
  ``traceparent`` in the headers, that context.

* **broadcast** (server, kind PRODUCER), ``broadcast client/*``: one span per
  ``Server.broadcast``, whose context every recipient receives, so each client's
  ``process`` span is its child and the fan-out shows as one trace.  Per-client outcomes
  are span events (``ack``, ``nack``, ``ack.timed_out``, ``ack.failed``,
  ``send.rejected``, each with ``backbone.client.id`` and ``error.type`` when failed) and
  each result adds a Link to that client's ack span.  The span ends when the last WaitAck
  outcome is in (at once for fire-and-forget).  ``backbone.broadcast.recipients`` counts
  the clients addressed, ``backbone.broadcast.failed`` those that failed; if any failed
  the status is ERROR and ``error.type`` is the failure type they share, or ``_OTHER``
  when they differ.  Span limits still apply (128 events and links by default): above
  that the SDK drops the extra events, the counts stay exact.

* **process** (receiver side, kind CONSUMER), ``process client/{client_id}`` or
  ``process server``: built from ``message.processed`` with the handler's real start and
  end (``started_at``, ``processing_time``).  Its parent is the context extracted from the
  message headers, and it also carries a Link to it.  A handler that raised sets
  ``error.type`` to the exception class and status ERROR.

* **ack / nack** (receiver side, kind CLIENT, ``messaging.operation.type=settle``),
  ``ack client/{client_id}`` (``nack`` when the result is an error): a child of ``process``,
  started when the RESULT frame is built; its context is injected into the RESULT headers
  and the sender links its send span to it.  It ends on ``ack.sent``.  A result that could
  not be encoded (``TypeError``, ``PayloadTooLarge``) sets ``error.type`` on it.

Heartbeats are never traced.  ``messaging.client.id`` is set only on spans a Client
emits (the conventions define it as the client emitting the span), together with
``server.address`` / ``server.port``; server spans name the peer in ``backbone.client.id``.

Sampling and providers
----------------------

``TracingPlugin(tracer_provider=...)`` uses that provider as is (its sampler, resource and
processors; ``sampler_ratio`` and ``service_name`` are then ignored).  Without one, the
plugin builds a private provider on first install and never touches the global one:
``BatchSpanProcessor(OTLPSpanExporter())`` over gRPC, configured by the standard
``OTEL_EXPORTER_OTLP_*`` and ``OTEL_BSP_*`` variables, and the sampler
``ParentBased(TraceIdRatioBased(ratio))`` where ratio is ``sampler_ratio``, else
``OTEL_TRACES_SAMPLER_ARG``, else **0.1** (:data:`DEFAULT_SAMPLER_RATIO`: tracing costs
about 100 µs per traced message, so by default one in ten root traces is kept).  Being
parent-based, a receiver follows the sender's decision carried in ``traceparent``.
``service.name`` is ``service_name``, else ``OTEL_SERVICE_NAME`` /
``OTEL_RESOURCE_ATTRIBUTES``, else ``backbone-server`` or ``backbone-client`` after the
first sender it is installed on.  Spans that are sampled out are not tracked at all.

Open spans are kept in maps keyed by (MsgID, client id) and ended on every outcome above;
the maps are bounded (``max_open_spans`` each; the oldest is ended with
``error.type=evicted``) and whatever a sender still has open when the plugin is
uninstalled from it is ended with ``error.type=abandoned``.  When the last sender is
uninstalled the plugin flushes: a private provider is shut down (which exports what is
queued, for at most ``flush_timeout`` seconds); a given provider is only force-flushed.
Both run synchronously, on the event loop, at ``Server.stop()`` / ``Client.close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from blinker import NamedSignal
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
    get_current_span,
    set_span_in_context,
)
from opentelemetry.trace import TracerProvider as ApiTracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from backbone import __version__, propagation, signals
from backbone.events import (
    AckFailed,
    AckReceived,
    AckSent,
    AckTimedOut,
    Event,
    LateAckDropped,
    MessageProcessed,
    MessageSent,
    SendRejected,
)
from backbone.plugins import Plugin, Receiver

log = logging.getLogger("backbone.plugins.otel")

#: sampling ratio for root traces when neither the argument nor OTEL_TRACES_SAMPLER_ARG say
DEFAULT_SAMPLER_RATIO = 0.1
SCHEMA_URL = "https://opentelemetry.io/schemas/1.44.0"
TRACER_NAME = "backbone.plugins.otel"
SYSTEM = "backbone"
BROADCAST_DESTINATION = "client/*"
CLIENT_TEMPLATE = "client/{client_id}"
SERVER_DESTINATION = "server"

_PROPAGATOR = TraceContextTextMapPropagator()
_EMPTY = Context()
_NOT_SAMPLED = "-00"  # the end of a W3C traceparent whose sampled flag is off
_TRACE_ID_LOW = (1 << 64) - 1  # TraceIdRatioBased looks at these bits of the trace id


class _PresetTraceIds(RandomIdGenerator):
    """Random ids, except that the plugin can draw the next trace id itself first: it
    then knows the provider's root sampling decision before asking for a span, and can
    skip the span entirely when the answer is no (see ``TracingPlugin._inject``)."""

    def __init__(self) -> None:
        self._preset = threading.local()

    def preset(self, trace_id: int) -> None:
        self._preset.trace_id = trace_id

    def generate_trace_id(self) -> int:
        trace_id: int | None = self._preset.__dict__.pop("trace_id", None)
        return trace_id if trace_id is not None else super().generate_trace_id()


Attrs = dict[str, AttributeValue]
K = TypeVar("K")
V = TypeVar("V")


class _Send:
    __slots__ = ("owner", "sent", "span")

    def __init__(self, span: Span, owner: int) -> None:
        self.span = span
        self.owner = owner
        self.sent = False


class _Broadcast:
    __slots__ = ("dispatched", "failures", "owner", "recipients", "span", "waiting")

    def __init__(self, span: Span, owner: int) -> None:
        self.span = span
        self.owner = owner
        self.dispatched = False
        self.recipients = 0
        self.waiting: set[str] = set()
        self.failures: Counter[str] = Counter()


class _Settle:
    __slots__ = ("owner", "processed_ok", "span")

    def __init__(self, span: Span, owner: int, processed_ok: bool) -> None:
        self.span = span
        self.owner = owner
        self.processed_ok = processed_ok


def _ratio_from(value: float | str | None, source: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        ratio = float(value)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        if source == "argument":
            raise ValueError(f"sampler_ratio must be between 0 and 1, not {value!r}")
        log.warning("%s=%r is not a ratio between 0 and 1; ignored", source, value)
        return None
    return ratio


def resolve_sampler_ratio(
    sampler_ratio: float | None, environ: dict[str, str] | os._Environ[str] | None = None
) -> float:
    """The argument, else ``OTEL_TRACES_SAMPLER_ARG``, else :data:`DEFAULT_SAMPLER_RATIO`."""
    env = os.environ if environ is None else environ
    for value, source in (
        (sampler_ratio, "argument"),
        (env.get("OTEL_TRACES_SAMPLER_ARG"), "OTEL_TRACES_SAMPLER_ARG"),
    ):
        ratio = _ratio_from(value, source)
        if ratio is not None:
            return ratio
    return DEFAULT_SAMPLER_RATIO


def _remember(store: OrderedDict[K, V], key: K, value: V, cap: int) -> list[V]:
    """Insert, and return whatever fell off the old end of a full map."""
    store[key] = value
    evicted: list[V] = []
    while len(store) > cap:
        evicted.append(store.popitem(last=False)[1])
    return evicted


def _take(store: OrderedDict[K, Any], owner: int | None) -> list[Span]:
    """Remove and return the spans of ``owner`` (all when None) from ``store``."""
    keys = [k for k, rec in store.items() if owner is None or rec.owner == owner]
    return [store.pop(k).span for k in keys]


def _fail(span: Span, error_type: str, description: str | None = None) -> None:
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, description or error_type))


def _link_to_result(span: Span, headers: dict[str, str] | None) -> None:
    if not headers or "traceparent" not in headers:
        return
    ctx = get_current_span(_PROPAGATOR.extract(headers)).get_span_context()
    if ctx.is_valid:
        span.add_link(ctx, {"messaging.operation.type": "settle"})


#: how long an export waits while an earlier one that ran out of time is still stuck (s)
STALLED_WAIT = 0.1
#: export threads that ran out of time and have not finished yet
_stalled: set[threading.Thread] = set()


class TracingPlugin(Plugin):
    """OpenTelemetry tracing of sends, handler runs and results (see the module docs)."""

    name = "otel"

    def __init__(
        self,
        tracer_provider: ApiTracerProvider | None = None,
        sampler_ratio: float | None = None,
        service_name: str | None = None,
        *,
        max_open_spans: int = 10_000,
        flush_timeout: float = 5.0,
    ) -> None:
        super().__init__()
        if max_open_spans < 1:
            raise ValueError("max_open_spans must be at least 1")
        self.sampler_ratio = resolve_sampler_ratio(sampler_ratio)
        self.service_name = service_name
        self.max_open_spans = max_open_spans
        self.flush_timeout = flush_timeout
        self._given_provider = tracer_provider
        self._provider: ApiTracerProvider | None = tracer_provider
        self._owned: TracerProvider | None = None
        self._tracer: Tracer | None = None
        self._lock = threading.Lock()
        self._sends: OrderedDict[tuple[str, str], _Send] = OrderedDict()
        self._broadcasts: OrderedDict[str, _Broadcast] = OrderedDict()
        self._settles: OrderedDict[tuple[str, str], _Settle] = OrderedDict()
        # process span context of a WaitAck message, from message.processed until its
        # RESULT is built (the next thing the link does); small, and only contexts
        self._processed: OrderedDict[tuple[str, str], tuple[SpanContext, bool]] = OrderedDict()
        #: spans ended early because a map was full
        self.evicted = 0
        # the sampled-out fast path, for a provider this plugin builds (whose sampler it
        # knows): the root decision of ParentBased(TraceIdRatioBased) on a trace id drawn
        # here; None with a provider given from outside
        self._ids = _PresetTraceIds()
        self._root_bound: int | None = None

    # --- provider -------------------------------------------------------------------------
    @property
    def tracer_provider(self) -> ApiTracerProvider | None:
        """The provider in use (None before the first install of a private one)."""
        return self._provider

    @property
    def open_spans(self) -> int:
        """Spans started and not yet ended (sends, broadcasts, acks): a health figure."""
        return len(self._sends) + len(self._broadcasts) + len(self._settles)

    def _build_provider(self, sender: Any) -> TracerProvider:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        resource = Resource.create()
        if self.service_name:
            resource = resource.merge(Resource({"service.name": self.service_name}))
        elif str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            role = getattr(sender, "role", None)
            default = f"backbone-{role}" if role in ("server", "client") else "backbone"
            resource = resource.merge(Resource({"service.name": default}))
        root = TraceIdRatioBased(self.sampler_ratio)
        provider = TracerProvider(
            resource=resource, sampler=ParentBased(root), id_generator=self._ids
        )
        self._root_bound = root.bound
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return provider

    def on_install(self, sender: Any) -> None:
        if self._tracer is None:
            if self._provider is None:
                self._owned = self._build_provider(sender)
                self._provider = self._owned
            self._tracer = self._provider.get_tracer(
                TRACER_NAME, __version__, schema_url=SCHEMA_URL
            )
        propagation.add_injector(self._inject)

    def on_uninstall(self, sender: Any) -> None:
        self._end_owned_by(None if sender is None else id(sender))
        if self._installed:
            return
        # Plugin.uninstall(sender) disconnects per sender, which blinker does without
        # dropping the receiver from signal.receivers (so signals.wants() would stay true
        # and this plugin stay referenced): with no sender left, disconnect it entirely
        for signal, receiver in self.receivers().items():
            signal.disconnect(receiver)
        propagation.remove_injector(self._inject)
        if self._owned is not None:
            self._shutdown_owned()  # exports what is queued, within flush_timeout
        else:
            self.flush()

    def flush(self) -> bool:
        """Export what the provider holds (blocking, bounded by ``flush_timeout``)."""
        flush: Callable[[int], bool] | None = getattr(self._provider, "force_flush", None)
        if flush is None:
            return True
        timeout_ms = int(self.flush_timeout * 1000)
        return self._bounded(lambda: flush(timeout_ms), "flushing spans")

    def shutdown(self) -> None:
        """Uninstall from every sender, end what is open and flush (idempotent)."""
        for key, sender in list(self._senders.items()):
            if key in self._installed:
                self.uninstall(sender)
        self._end_owned_by(None)
        if self._owned is not None:
            self._shutdown_owned()

    def _shutdown_owned(self) -> None:
        owned = self._owned
        self._owned = None
        self._provider = self._given_provider
        self._tracer = None
        assert owned is not None
        # exports what is queued, and unregisters the provider's atexit hook
        self._bounded(owned.shutdown, "shutting the tracer provider down")

    def _bounded(self, work: Callable[[], object], what: str) -> bool:
        """Run blocking export work, waiting at most ``flush_timeout`` seconds for it (the
        SDK's batch processor ignores its own timeouts); past that it goes on in a daemon
        thread and the caller is released.

        It runs on the event loop (a close, an uninstall).  While an export that ran out
        of time is still stuck in its thread (a collector that accepts and never
        answers), the next ones in the process wait only :data:`STALLED_WAIT`: many
        clients closing on one loop against such a collector cost one ``flush_timeout``,
        not one each (5 s per client before).  Once that thread is done, waits are
        whole again."""
        timeout = self.flush_timeout
        _stalled.difference_update([t for t in _stalled if not t.is_alive()])
        if _stalled:
            timeout = min(timeout, STALLED_WAIT)
        outcome: list[bool] = []

        def run() -> None:
            try:
                result = work()
                outcome.append(result is not False)
            except Exception:
                log.exception("%s failed", what)
                outcome.append(False)

        thread = threading.Thread(target=run, name="backbone-otel-flush", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            _stalled.add(thread)
            log.warning("%s takes more than %g s; not waiting any longer", what, timeout)
            return False
        return bool(outcome and outcome[0])

    def _end_owned_by(self, owner: int | None) -> None:
        """End (as abandoned) what ``owner`` (every sender when None) still has open."""
        spans: list[Span] = []
        with self._lock:
            spans += _take(self._sends, owner)
            spans += _take(self._broadcasts, owner)
            spans += _take(self._settles, owner)
            if owner is None:
                self._processed.clear()
        for span in spans:
            _fail(span, "abandoned", "still open when tracing was uninstalled")
            span.end()

    def _evicted(self, spans: list[Any]) -> None:
        for rec in spans:
            self.evicted += 1
            _fail(rec.span, "evicted", f"more than {self.max_open_spans} spans open")
            rec.span.end()

    # --- signals ----------------------------------------------------------------------
    def receivers(self) -> dict[NamedSignal, Receiver]:
        return {
            signals.on_message_sent: self._on_sent,
            signals.on_send_rejected: self._on_rejected,
            signals.on_message_processed: self._on_processed,
            signals.on_ack: self._on_ack,
            signals.on_ack_late: self._on_ack,
            signals.on_ack_timeout: self._on_timeout,
            signals.on_ack_failed: self._on_failed,
        }

    def _accepts(self, sender: Any) -> bool:
        installed = self._installed
        return id(sender) in installed or id(None) in installed

    # --- attributes -------------------------------------------------------------------
    @staticmethod
    def _attrs(
        sender: Any, role: str, to_client: bool, op_type: str, op_name: str, msg_id: str, cid: str
    ) -> tuple[str, Attrs]:
        attrs: Attrs = {
            "messaging.system": SYSTEM,
            "messaging.operation.type": op_type,
            "messaging.operation.name": op_name,
            "messaging.message.id": msg_id,
            "network.transport": "quic",
            "backbone.client.id": cid,
        }
        if to_client:
            attrs["messaging.destination.name"] = f"client/{cid}"
            attrs["messaging.destination.template"] = CLIENT_TEMPLATE
            where = CLIENT_TEMPLATE
        else:
            attrs["messaging.destination.name"] = SERVER_DESTINATION
            where = SERVER_DESTINATION
        if role == "client":
            attrs["messaging.client.id"] = cid
            config = getattr(sender, "config", None)
            host = getattr(config, "host", None)
            port = getattr(config, "port", None)
            if isinstance(host, str) and isinstance(port, int):
                attrs["server.address"] = host
                attrs["server.port"] = port
        return f"{op_name} {where}", attrs

    # --- injector: send, broadcast and ack spans start here -----------------------------
    def _inject(
        self, sender: Any, kind: str, msg_id: str, client_id: str, headers: dict[str, str]
    ) -> None:
        tracer = self._tracer
        if tracer is None or not self._accepts(sender):
            return
        if kind == "result":
            self._start_settle(tracer, sender, msg_id, client_id, headers)
            return
        parent: Context | None = None
        if not get_current_span().get_span_context().is_valid:
            if "traceparent" in headers:
                parent = _PROPAGATOR.extract(headers)
            elif self._root_bound is not None:
                # a root span: decide as the provider's sampler would, on a trace id
                # drawn here.  Sampled out, the span is never built: the message just
                # carries a not-sampled trace context, so that the peer's ParentBased
                # sampler drops its spans too (about 1 µs instead of tens).
                trace_id = random.getrandbits(128) or 1
                if trace_id & _TRACE_ID_LOW >= self._root_bound:
                    span_id = random.getrandbits(64) or 1
                    headers["traceparent"] = f"00-{trace_id:032x}-{span_id:016x}-00"
                    return
                self._ids.preset(trace_id)
        role = str(getattr(sender, "role", "server"))
        if kind == "broadcast":
            name = f"broadcast {BROADCAST_DESTINATION}"
            attrs: Attrs = {
                "messaging.system": SYSTEM,
                "messaging.operation.type": "send",
                "messaging.operation.name": "broadcast",
                "messaging.destination.name": BROADCAST_DESTINATION,
                "messaging.message.id": msg_id,
                "network.transport": "quic",
            }
        else:
            name, attrs = self._attrs(
                sender, role, role == "server", "send", "send", msg_id, client_id
            )
        span = tracer.start_span(name, context=parent, kind=SpanKind.PRODUCER, attributes=attrs)
        _PROPAGATOR.inject(headers, context=set_span_in_context(span))
        if not span.is_recording():
            return
        owner = id(sender)
        if kind == "broadcast":
            with self._lock:
                dropped: list[Any] = _remember(
                    self._broadcasts, msg_id, _Broadcast(span, owner), self.max_open_spans
                )
            check: Callable[[Any], None] = self._broadcast_dispatched
            key: Any = msg_id
        else:
            with self._lock:
                dropped = _remember(
                    self._sends, (msg_id, client_id), _Send(span, owner), self.max_open_spans
                )
            check = self._send_dispatched
            key = (msg_id, client_id)
        if dropped:
            self._evicted(dropped)
        # the send call queues its frame(s) before it next yields: check right after
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().call_soon(check, key)

    def _send_dispatched(self, key: tuple[str, str]) -> None:
        with self._lock:
            rec = self._sends.get(key)
            if rec is None or rec.sent:
                return
            del self._sends[key]
        _fail(rec.span, "not_sent", "the frame was never queued")
        rec.span.end()

    def _broadcast_dispatched(self, msg_id: str) -> None:
        with self._lock:
            rec = self._broadcasts.get(msg_id)
            if rec is None:
                return
            rec.dispatched = True
        self._maybe_end_broadcast(msg_id, rec)

    def _maybe_end_broadcast(self, msg_id: str, rec: _Broadcast) -> None:
        with self._lock:
            if not rec.dispatched or rec.waiting or self._broadcasts.get(msg_id) is not rec:
                return
            del self._broadcasts[msg_id]
        span = rec.span
        failed = sum(rec.failures.values())
        span.set_attribute("backbone.broadcast.recipients", rec.recipients)
        span.set_attribute("backbone.broadcast.failed", failed)
        if failed:
            kinds = list(rec.failures)
            error_type = kinds[0] if len(kinds) == 1 else "_OTHER"
            _fail(span, error_type, f"{failed} of {rec.recipients} recipients failed")
        span.end()

    def _broadcast_outcome(
        self,
        msg_id: str,
        client_id: str,
        event_name: str,
        error_type: str | None = None,
        result_headers: dict[str, str] | None = None,
        rejected: bool = False,
    ) -> bool:
        """Record one recipient's outcome on its broadcast span; False if not a broadcast."""
        with self._lock:
            rec = self._broadcasts.get(msg_id)
            if rec is None:
                return False
            if rejected:
                rec.recipients += 1
            elif client_id in rec.waiting:
                rec.waiting.discard(client_id)
            else:
                return True
            if error_type is not None:
                rec.failures[error_type] += 1
        attrs: Attrs = {"backbone.client.id": client_id}
        if error_type is not None:
            attrs["error.type"] = error_type
        rec.span.add_event(event_name, attrs)
        _link_to_result(rec.span, result_headers)
        self._maybe_end_broadcast(msg_id, rec)
        return True

    def _end_send(
        self,
        msg_id: str,
        client_id: str,
        error_type: str | None,
        description: str | None = None,
        attrs: Attrs | None = None,
        result_headers: dict[str, str] | None = None,
    ) -> bool:
        with self._lock:
            rec = self._sends.pop((msg_id, client_id), None)
        if rec is None:
            return False
        span = rec.span
        if attrs:
            span.set_attributes(attrs)
        _link_to_result(span, result_headers)
        if error_type is not None:
            _fail(span, error_type, description)
        span.end()
        return True

    # --- receivers ----------------------------------------------------------------------
    def _on_sent(self, sender: Any, event: Event) -> None:
        if not isinstance(event, MessageSent) or not (self._sends or self._broadcasts):
            return
        key = (event.msg_id, event.client_id)
        if event.broadcast:
            with self._lock:
                brec = self._broadcasts.get(event.msg_id)
                if brec is None:
                    return
                brec.recipients += 1
                if event.wait_ack:
                    brec.waiting.add(event.client_id)
            return
        with self._lock:
            rec = self._sends.get(key)
            if rec is None:
                return
            rec.sent = True
            if not event.wait_ack:
                del self._sends[key]
        span = rec.span
        span.set_attribute("messaging.message.body.size", event.size)
        span.set_attribute("backbone.wait_ack", event.wait_ack)
        if not event.wait_ack:
            span.end()

    def _on_rejected(self, sender: Any, event: Event) -> None:
        if not isinstance(event, SendRejected) or event.msg_id is None:
            return
        if not self._end_send(event.msg_id, event.client_id, event.reason, event.detail):
            self._broadcast_outcome(
                event.msg_id, event.client_id, "send.rejected", event.reason, rejected=True
            )

    def _on_ack(self, sender: Any, event: Event) -> None:
        if isinstance(event, AckSent):
            self._end_settle(event)
            return
        if not (self._sends or self._broadcasts):
            return
        if isinstance(event, AckReceived):
            error = None if event.ok else (event.error_type or "Error")
            if not self._end_send(
                event.msg_id, event.client_id, error, result_headers=event.headers
            ):
                self._broadcast_outcome(
                    event.msg_id,
                    event.client_id,
                    "ack" if event.ok else "nack",
                    error,
                    result_headers=event.headers,
                )
        elif isinstance(event, LateAckDropped) and not self._end_send(
            event.msg_id, event.client_id, "cancelled", "the caller stopped waiting"
        ):
            # a send still open here was abandoned by its caller (that emits no event)
            self._broadcast_outcome(event.msg_id, event.client_id, "ack.late", "cancelled")

    def _on_timeout(self, sender: Any, event: Event) -> None:
        if not isinstance(event, AckTimedOut) or not (self._sends or self._broadcasts):
            return
        desc = f"no result within {event.timeout:g} s"
        if not self._end_send(event.msg_id, event.client_id, "timeout", desc):
            self._broadcast_outcome(event.msg_id, event.client_id, "ack.timed_out", "timeout")

    def _on_failed(self, sender: Any, event: Event) -> None:
        if not isinstance(event, AckFailed) or not (self._sends or self._broadcasts):
            return
        error = event.error_type
        attrs: Attrs = {"backbone.failure.reason": event.reason}
        if not self._end_send(event.msg_id, event.client_id, error, event.reason, attrs):
            self._broadcast_outcome(event.msg_id, event.client_id, "ack.failed", error)

    # --- receiving side: process and ack spans --------------------------------------------
    def _on_processed(self, sender: Any, event: Event) -> None:
        tracer = self._tracer
        if tracer is None or not isinstance(event, MessageProcessed):
            return
        headers = event.headers
        parent = _EMPTY
        links: list[Link] | None = None
        if (
            self._root_bound is not None
            and headers
            and headers.get("traceparent", "").endswith(_NOT_SAMPLED)
        ):
            return  # our ParentBased sampler would make a span that records nothing
        if headers and "traceparent" in headers:
            parent = _PROPAGATOR.extract(headers)
            creation = get_current_span(parent).get_span_context()
            if creation.is_valid:
                links = [Link(creation)]
        name, attrs = self._attrs(
            sender,
            event.role,
            event.role == "client",
            "process",
            "process",
            event.msg_id,
            event.client_id,
        )
        start = int(event.started_at * 1e9)
        span = tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attrs,
            links=links,
            start_time=start,
        )
        if not span.is_recording():
            return
        if not event.ok:
            _fail(span, event.error_type or "_OTHER", "the handler raised")
        span.end(end_time=start + int(event.processing_time * 1e9))
        if event.wait_ack:
            with self._lock:
                _remember(
                    self._processed,
                    (event.msg_id, event.client_id),
                    (span.get_span_context(), event.ok),
                    self.max_open_spans,
                )

    def _start_settle(
        self, tracer: Tracer, sender: Any, msg_id: str, client_id: str, headers: dict[str, str]
    ) -> None:
        with self._lock:
            processed = self._processed.pop((msg_id, client_id), None)
        if processed is None:
            return
        process_ctx, ok = processed
        role = str(getattr(sender, "role", "client"))
        name, attrs = self._attrs(
            sender, role, role == "client", "settle", "ack" if ok else "nack", msg_id, client_id
        )
        parent = set_span_in_context(NonRecordingSpan(process_ctx))
        span = tracer.start_span(name, context=parent, kind=SpanKind.CLIENT, attributes=attrs)
        _PROPAGATOR.inject(headers, context=set_span_in_context(span))
        if not span.is_recording():
            return
        key = (msg_id, client_id)
        with self._lock:
            dropped = _remember(
                self._settles, key, _Settle(span, id(sender), ok), self.max_open_spans
            )
        if dropped:
            self._evicted(dropped)
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().call_soon(self._settle_dispatched, key)

    def _settle_dispatched(self, key: tuple[str, str]) -> None:
        with self._lock:
            rec = self._settles.pop(key, None)
        if rec is not None:
            _fail(rec.span, "not_sent", "the result was never queued")
            rec.span.end()

    def _end_settle(self, event: AckSent) -> None:
        if not self._settles:
            return
        with self._lock:
            rec = self._settles.pop((event.msg_id, event.client_id), None)
        if rec is None:
            return
        span = rec.span
        span.set_attribute("messaging.message.body.size", event.size)
        if not event.ok and rec.processed_ok:
            # the handler succeeded but its result could not be sent as is
            span.update_name(_nack_name(event.role))
            span.set_attribute("messaging.operation.name", "nack")
            _fail(span, event.error_type or "_OTHER", "the result could not be encoded")
        span.end()


def _nack_name(role: str) -> str:
    return f"nack {CLIENT_TEMPLATE if role == 'client' else SERVER_DESTINATION}"
