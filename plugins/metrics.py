"""Metrics plugin: OpenTelemetry metrics from backbone's events.

Enable it with ``Server(plugins=["metrics"])``, ``Client(plugins=["metrics"])`` or
``BACKBONE_PLUGINS=metrics``; pass a :class:`MetricsPlugin` to choose where metrics go.

Instruments
-----------

Semantic-convention names where one exists (messaging conventions, still
*Development*), backbone's own otherwise.  Every ``messaging.*`` point carries
``messaging.system=backbone``, ``messaging.operation.name`` and
``messaging.operation.type``; every point carries ``backbone.role`` (``server`` or
``client``: the side that emitted the event), so a process running both does not mix
them.  No message id or client id is ever an attribute (unbounded cardinality).

=====================================  ===================  ==================================
name (unit)                            kind                 attributes, meaning
=====================================  ===================  ==================================
``messaging.client.sent.messages``     Counter              operation ``send`` (``broadcast``
({message})                                                 for each recipient of a
                                                            broadcast); refused sends
                                                            (``send.rejected``) are counted
                                                            too, with ``error.type`` = the
                                                            reason (``backpressure``...)
``messaging.client.consumed.messages`` Counter              operation ``process``: messages
({message})                                                 handed to the handler, counted
                                                            when it returns
``messaging.client.operation.duration`` Histogram           operation ``send``, **WaitAck
(s)                                                         sends only: the send → result
                                                            round trip** (see below);
                                                            ``error.type``: the remote error
                                                            type, ``timeout``,
                                                            ``client_gone`` / ``server_gone``,
                                                            ``cancelled`` (the caller
                                                            stopped waiting)
``messaging.process.duration`` (s)     Histogram            operation ``process``: handler
                                                            time (``processing_time``);
                                                            ``error.type`` if it raised
``backbone.connections``               UpDownCounter        open sessions (server: connected
({connection})                         (observable)         clients; client: 0 or 1)
``backbone.ack.duration`` (s)          Histogram            results received: send → result
                                                            latency, finer buckets;
                                                            ``error.type`` for error results
``backbone.ack.timeouts`` ({message})  Counter              WaitAck timeouts
``backbone.ack.failures`` ({message})  Counter              ``backbone.reason``: pending
                                                            results failed because the peer
                                                            went away or we are closing
``backbone.ack.late`` ({message})      Counter              results that came after their
                                                            timeout
``backbone.heartbeat.rtt`` (s)         Histogram            client side: ping → pong
``backbone.evictions`` ({client})      Counter              server: clients evicted for
                                                            silence; client: server declared
                                                            dead
``backbone.reconnects`` ({attempt})    Counter              ``backbone.reason``: scheduled
                                                            reconnects
``backbone.connect.failures``          Counter              ``backbone.reason``: failed
({attempt})                                                 connection attempts
``backbone.send.rejected`` ({message}) Counter              ``backbone.reason``: sends
                                                            refused (``not_connected``,
                                                            ``backpressure``...)
``backbone.protocol.violations``       Counter              ``backbone.reason``: the close
({connection})                                              code name (``PROTOCOL_ERROR``...)
``backbone.sessions.refused``          Counter              ``backbone.reason``: sessions the
({connection})                                              server refused (admission
                                                            control, shutting down)
``backbone.plugin.dropped`` ({event})  Counter              ``backbone.plugin``: events
                                                            plugins lost: a full queue, or
                                                            a batch whose handling raised
                                                            (:data:`backbone.plugins.plugin_drops`)
``backbone.receiver.failures``         Counter              ``backbone.receiver``: receivers
({failure})                                                 that raised, by qualified name
                                                            (:data:`backbone.signals.receiver_failures`,
                                                            summed over plugin instances)
=====================================  ===================  ==================================

Every label's values are bounded.  A remote error type (``error.type`` of a result) is
whatever the peer's RESULT says, so the first 64 distinct ones are labels
(:data:`MAX_ERROR_TYPES`) and the rest ``_OTHER`` (each new one would be a series kept for
ever); backbone's own labels (``timeout``, ``client_gone``...) and the local handler's
exception types are not capped.  Client ids are never labels.

Histogram buckets are passed as advisories (a View still wins): the semantic-convention
ones ``[0.005 … 10]`` for ``messaging.*``, and ``[0.0005 … 10]`` for ``backbone.ack.duration``
and ``backbone.heartbeat.rtt``.  (The SDK's default buckets, ``0, 5, 10 … 10000``, would
put every second-scale value in one bucket.)

``messaging.client.operation.duration``: there is no semantic-convention metric for a
send → ack round trip, and a fire-and-forget send only queues bytes (its duration is a
few microseconds and not reported by any event).  So this histogram records WaitAck
sends, from sending to the outcome (result, timeout or failure), the duration the caller
of ``send_to(..., wait_ack=True)`` waits; ``backbone.ack.duration`` records the same
latency for results that came back, with finer buckets.

Cost and concurrency
--------------------

Receivers run on the event loop for every event, so nothing in them calls the
OpenTelemetry SDK per message when it can be avoided (a ``record``/``add`` call costs
several microseconds, mostly cleaning and hashing the attributes):

* counters are plain ``int`` tallies in dicts; observable instruments read them when a
  reader collects (on the reader's thread; copying a dict is atomic under the GIL);
* with the plugin's own provider, histograms are aggregated by :class:`OwnHistogram`
  (``bisect`` into the explicit buckets, about 0.3 µs a value) and added to each
  export: the Prometheus reader and the OTLP exporter get them alongside the SDK's
  instruments, always with cumulative temporality;
* with a ``meter_provider`` given by the caller the plugin cannot reach its readers, so
  histograms are SDK instruments and each value is one ``Histogram.record`` call.
  That is the slower path: ``messaging.process.duration`` costs one call per handled
  message.

Export
------

With ``meter_provider`` the plugin only creates instruments on it; exporting is the
caller's business.  Without one it builds a private :class:`MeterProvider` (never a
global one) with:

* a Prometheus reader on a :class:`~prometheus_client.CollectorRegistry` of its own:
  :meth:`MetricsPlugin.prometheus_text` renders it (for an admin ``/metrics``), and
  with ``prometheus_port`` (or ``$BACKBONE_PROMETHEUS_PORT``; ``0`` picks a free port)
  a scrape endpoint serves it on ``prometheus_host`` (or
  ``$BACKBONE_PROMETHEUS_HOST``, default ``127.0.0.1``);
* with ``otlp=True``, ``otlp="<endpoint>"``, or ``otlp=None`` and
  ``$OTEL_EXPORTER_OTLP_ENDPOINT`` / ``$OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` set, a
  periodic OTLP export every ``export_interval`` seconds (gRPC; HTTP/protobuf if
  ``$OTEL_EXPORTER_OTLP_METRICS_PROTOCOL`` or ``$OTEL_EXPORTER_OTLP_PROTOCOL`` is
  ``http/protobuf``).

``service.name`` is ``$OTEL_SERVICE_NAME`` or ``backbone``.  Plugins that build their own
provider with the same settings share it, with its tallies and its endpoint:
``BACKBONE_PLUGINS=metrics`` makes one plugin per Server and Client, and they must not
each try to bind the same port.  :meth:`MetricsPlugin.shutdown` releases it (the last
user shuts the provider down, exporting what is left); otherwise the SDK does so at exit.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from blinker import NamedSignal
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.export import Histogram as SdkHistogram
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.util.types import AttributeValue

from backbone import signals
from backbone.events import (
    STEP_FIELDS,
    AckFailed,
    AckTimedOut,
    Connected,
    ConnectFailed,
    Disconnected,
    Event,
    EventsBatched,
    HeartbeatAcknowledged,
    HeartbeatTimedOut,
    LateAckDropped,
    ProtocolViolated,
    ReconnectScheduled,
    SendRejected,
)
from backbone.plugins import Plugin, Receiver, plugin_drops

log = logging.getLogger("backbone.plugins.metrics")

# where a batched step's values are in a batch's rows (EventsBatched)
_SENT_BROADCAST: Final = STEP_FIELDS["message.sent"].index("broadcast")
_PROCESSED_TIME: Final = STEP_FIELDS["message.processed"].index("processing_time")
_PROCESSED_ERROR: Final = STEP_FIELDS["message.processed"].index("error_type")
_ACK_LATENCY: Final = STEP_FIELDS["ack.received"].index("latency")
_ACK_ERROR: Final = STEP_FIELDS["ack.received"].index("error_type")

SYSTEM: Final = "backbone"
METER_NAME: Final = "backbone.plugins.metrics"
SCHEMA_URL: Final = "https://opentelemetry.io/schemas/1.44.0"

#: semantic-convention buckets for messaging durations (seconds)
MESSAGING_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
#: finer buckets for backbone's ack latency and heartbeat round trip (seconds)
FINE_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

ENV_PROMETHEUS_PORT: Final = "BACKBONE_PROMETHEUS_PORT"
ENV_PROMETHEUS_HOST: Final = "BACKBONE_PROMETHEUS_HOST"
_OTLP_ENDPOINT_VARS: Final = ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_OTLP_PROTOCOL_VARS: Final = ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")

Attrs = Mapping[str, AttributeValue]


def _messaging(op: str, op_type: str, role: str, error: str | None = None) -> Attrs:
    attrs: dict[str, AttributeValue] = {
        "messaging.system": SYSTEM,
        "messaging.operation.name": op,
        "messaging.operation.type": op_type,
        "backbone.role": role,
    }
    if error is not None:
        attrs["error.type"] = error
    return attrs


#: distinct ``error.type`` values a metrics plugin labels series with; more are ``_OTHER``
MAX_ERROR_TYPES: Final = 64


# --- histograms ---------------------------------------------------------------------------

#: (name, unit, description, bucket boundaries) of every histogram
HISTOGRAMS: Final = (
    (
        "messaging.client.operation.duration",
        "s",
        "WaitAck sends: time from sending to the result, timeout or failure",
        MESSAGING_BUCKETS,
    ),
    (
        "messaging.process.duration",
        "s",
        "Time the handler took to process a message",
        MESSAGING_BUCKETS,
    ),
    (
        "backbone.ack.duration",
        "s",
        "Send to result latency of the results received",
        FINE_BUCKETS,
    ),
    (
        "backbone.heartbeat.rtt",
        "s",
        "Client side: heartbeat ping to pong round trip",
        FINE_BUCKETS,
    ),
)


class _Recorder(Protocol):
    def record(self, amount: float, attributes: Attrs) -> None: ...


class _Series:
    __slots__ = ("attributes", "counts", "max", "min", "start", "sum")

    def __init__(self, attributes: Attrs, buckets: int) -> None:
        self.attributes = attributes
        self.counts = [0] * buckets
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.start = time.time_ns()


class OwnHistogram:
    """A cumulative explicit-bucket histogram aggregated in plain Python: about 0.3 µs a
    value, against several µs for the SDK's ``Histogram.record`` (attribute cleaning and
    hashing on every call).  Series are keyed by the identity of their attributes
    mapping, which the plugin builds once per distinct set and keeps."""

    def __init__(self, name: str, unit: str, description: str, bounds: Sequence[float]):
        self.name = name
        self.unit = unit
        self.description = description
        self.bounds = tuple(bounds)
        self._series: dict[int, _Series] = {}

    def record(self, amount: float, attributes: Attrs) -> None:
        s = self._series.get(id(attributes))
        if s is None:
            s = self._series[id(attributes)] = _Series(attributes, len(self.bounds) + 1)
        s.counts[bisect_left(self.bounds, amount)] += 1  # bucket i: (b[i-1], b[i]]
        s.sum += amount
        if amount < s.min:
            s.min = amount
        if amount > s.max:
            s.max = amount

    def metric(self, now_ns: int) -> Metric | None:
        """The cumulative state as an SDK :class:`Metric` (``None`` before any value).
        Read from another thread: each series' count is the sum of its bucket copy, so
        a point is always self-consistent."""
        points = []
        for s in list(self._series.values()):
            counts = list(s.counts)
            count = sum(counts)
            if not count:
                continue
            points.append(
                HistogramDataPoint(
                    attributes=dict(s.attributes),
                    start_time_unix_nano=s.start,
                    time_unix_nano=now_ns,
                    count=count,
                    sum=s.sum,
                    bucket_counts=counts,
                    explicit_bounds=list(self.bounds),
                    min=s.min,
                    max=s.max,
                    exemplars=[],
                )
            )
        if not points:
            return None
        return Metric(
            name=self.name,
            description=self.description,
            unit=self.unit,
            data=SdkHistogram(
                data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE
            ),
        )


class OwnHistograms:
    """The histograms of a provider the plugin built, and how they join its exports:
    :meth:`inject` adds them to the scope of the plugin's meter in a ``MetricsData``."""

    def __init__(self, resource: Resource, scope: InstrumentationScope) -> None:
        self.resource = resource
        self.scope = scope
        self.all = [OwnHistogram(*h) for h in HISTOGRAMS]

    def inject(self, data: MetricsData | None) -> MetricsData | None:
        now = time.time_ns()
        ours = [m for m in (h.metric(now) for h in self.all) if m is not None]
        if not ours:
            return data
        if data is None or not data.resource_metrics:
            return MetricsData(
                resource_metrics=[
                    ResourceMetrics(
                        resource=self.resource,
                        scope_metrics=[ScopeMetrics(self.scope, ours, SCHEMA_URL)],
                        schema_url="",
                    )
                ]
            )
        first, *rest = data.resource_metrics
        scopes = list(first.scope_metrics)
        for i, sm in enumerate(scopes):
            if sm.scope.name == self.scope.name:
                scopes[i] = ScopeMetrics(sm.scope, [*sm.metrics, *ours], sm.schema_url)
                break
        else:
            scopes.append(ScopeMetrics(self.scope, ours, SCHEMA_URL))
        merged = ResourceMetrics(first.resource, scopes, first.schema_url)
        return MetricsData(resource_metrics=[merged, *rest])


class _Tallies:
    """The instruments on one meter, and the plain-int tallies the receivers bump.

    Receivers (event loop) only add to dicts; the observable callbacks (reader thread)
    copy them, which is atomic under the GIL.  Histograms are :class:`OwnHistogram` when
    the plugin built the provider (``own``), SDK instruments otherwise."""

    def __init__(self, meter: Meter, own: OwnHistograms | None = None) -> None:
        self.sent: defaultdict[tuple[str, bool, str | None], int] = defaultdict(int)
        self.consumed: defaultdict[str, int] = defaultdict(int)
        self.connections: defaultdict[str, int] = defaultdict(int)
        self.ack_timeouts: defaultdict[str, int] = defaultdict(int)
        self.ack_failures: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.ack_late: defaultdict[str, int] = defaultdict(int)
        self.evictions: defaultdict[str, int] = defaultdict(int)
        self.reconnects: defaultdict[str, int] = defaultdict(int)
        self.connect_failures: defaultdict[str, int] = defaultdict(int)
        self.rejected: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.violations: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.refused: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._attrs: dict[tuple[Any, ...], Attrs] = {}
        self._error_types: set[str] = set()

        m = meter
        histograms: list[_Recorder]
        if own is not None:
            histograms = list(own.all)
        else:
            histograms = [
                m.create_histogram(
                    name,
                    unit=unit,
                    description=description,
                    explicit_bucket_boundaries_advisory=bounds,
                )
                for name, unit, description, bounds in HISTOGRAMS
            ]
        (
            self.operation_duration,
            self.process_duration,
            self.ack_duration,
            self.heartbeat_rtt,
        ) = histograms
        counters: list[tuple[str, str, str, Callable[[], Iterable[Observation]]]] = [
            (
                "messaging.client.sent.messages",
                "{message}",
                "Messages sent (and sends refused, with error.type)",
                self._observe_sent,
            ),
            (
                "messaging.client.consumed.messages",
                "{message}",
                "Messages delivered to the handler",
                self._observe_consumed,
            ),
            (
                "backbone.ack.timeouts",
                "{message}",
                "WaitAck messages whose result did not come in time",
                self._by_role(self.ack_timeouts),
            ),
            (
                "backbone.ack.failures",
                "{message}",
                "Pending results failed because the peer went away or the owner closed",
                self._by_role_reason(self.ack_failures),
            ),
            (
                "backbone.ack.late",
                "{message}",
                "Results that arrived after their timeout and were dropped",
                self._by_role(self.ack_late),
            ),
            (
                "backbone.evictions",
                "{client}",
                "Server: clients evicted for missed heartbeats; client: server declared dead",
                self._by_role(self.evictions),
            ),
            (
                "backbone.reconnects",
                "{attempt}",
                "Reconnects scheduled by clients, by reason",
                self._by_reason(self.reconnects),
            ),
            (
                "backbone.connect.failures",
                "{attempt}",
                "Failed connection attempts, by reason",
                self._by_reason(self.connect_failures),
            ),
            (
                "backbone.send.rejected",
                "{message}",
                "Sends refused before anything was written, by reason",
                self._by_role_reason(self.rejected),
            ),
            (
                "backbone.protocol.violations",
                "{connection}",
                "Connections closed because the peer broke the protocol, by close code",
                self._by_role_reason(self.violations),
            ),
            (
                "backbone.sessions.refused",
                "{connection}",
                "Sessions the server refused (admission control, shutting down), by reason",
                self._by_role_reason(self.refused),
            ),
            (
                "backbone.plugin.dropped",
                "{event}",
                "Events plugins lost: dropped from a full queue, or in a batch that failed",
                self._from_counter(plugin_drops, "backbone.plugin"),
            ),
            (
                "backbone.receiver.failures",
                "{failure}",
                "Signal receivers that raised",
                self._from_counter(signals.receiver_failures, "backbone.receiver", by_name=True),
            ),
        ]
        for name, unit, description, observe in counters:
            m.create_observable_counter(
                name, [_callback(observe)], unit=unit, description=description
            )
        m.create_observable_up_down_counter(
            "backbone.connections",
            [_callback(self._by_role(self.connections))],
            unit="{connection}",
            description="Open sessions: server, connected clients; client, 0 or 1",
        )

    # --- attributes, built once per distinct key ------------------------------------------
    def remote_error(self, error: str | None) -> str | None:
        """A remote error type (what the peer's RESULT says) as an ``error.type`` label:
        the first :data:`MAX_ERROR_TYPES` distinct ones, then ``_OTHER``.  Left
        unbounded, a peer could make a series (and its memory, for ever) per message.
        backbone's own labels and the local handler's exception types are not capped."""
        if error is None or error in self._error_types:
            return error
        if len(self._error_types) >= MAX_ERROR_TYPES:
            return "_OTHER"
        self._error_types.add(error)
        return error

    def messaging(self, op: str, role: str, error: str | None) -> Attrs:
        key = (op, role, error)
        a = self._attrs.get(key)
        if a is None:
            a = self._attrs[key] = _messaging(
                op, "process" if op == "process" else "send", role, error
            )
        return a

    def own(self, role: str, error: str | None) -> Attrs:
        key = ("own", role, error)
        a = self._attrs.get(key)
        if a is None:
            a = {"backbone.role": role}
            if error is not None:
                a["error.type"] = error
            self._attrs[key] = a
        return a

    def seed(self, role: str) -> None:
        """Zero series for ``role``, so rates work from the first scrape."""
        for tally in (self.consumed, self.connections, self.ack_timeouts, self.ack_late):
            tally[role] += 0
        self.sent[(role, False, None)] += 0
        if role == "server":
            self.evictions[role] += 0

    # --- observable callbacks -------------------------------------------------------------
    def _observe_sent(self) -> Iterable[Observation]:
        for (role, broadcast, error), n in self.sent.copy().items():
            op = "broadcast" if broadcast else "send"
            yield Observation(n, _messaging(op, "send", role, error))

    def _observe_consumed(self) -> Iterable[Observation]:
        for role, n in self.consumed.copy().items():
            yield Observation(n, _messaging("process", "process", role))

    @staticmethod
    def _by_role(tally: Mapping[str, int]) -> Callable[[], Iterable[Observation]]:
        def observe() -> Iterable[Observation]:
            return [Observation(n, {"backbone.role": r}) for r, n in dict(tally).items()]

        return observe

    @staticmethod
    def _by_reason(tally: Mapping[str, int]) -> Callable[[], Iterable[Observation]]:
        def observe() -> Iterable[Observation]:
            return [
                Observation(n, {"backbone.role": "client", "backbone.reason": r})
                for r, n in dict(tally).items()
            ]

        return observe

    @staticmethod
    def _by_role_reason(
        tally: Mapping[tuple[str, str], int],
    ) -> Callable[[], Iterable[Observation]]:
        def observe() -> Iterable[Observation]:
            return [
                Observation(n, {"backbone.role": role, "backbone.reason": reason})
                for (role, reason), n in dict(tally).items()
            ]

        return observe

    @staticmethod
    def _from_counter(
        counter: Mapping[str, int], label: str, by_name: bool = False
    ) -> Callable[[], Iterable[Observation]]:
        """``by_name``: keys may end in ``@<instance id>`` (one count per plugin
        instance); summed per name, so no object id becomes an attribute value."""

        def observe() -> Iterable[Observation]:
            totals: dict[str, int] = {}
            for key, n in dict(counter).items():
                name = key.partition("@")[0] if by_name else key
                totals[name] = totals.get(name, 0) + n
            return [Observation(n, {label: name}) for name, n in totals.items()]

        return observe


def _callback(
    observe: Callable[[], Iterable[Observation]],
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        return list(observe())

    return callback


# --- the private provider, shared by plugins with the same settings -----------------------


@dataclass(eq=False)
class _Owned:
    key: tuple[Any, ...]
    provider: SdkMeterProvider
    registry: Any  # prometheus_client.CollectorRegistry
    tallies: _Tallies
    http: Any = None  # wsgiref server of the scrape endpoint
    http_thread: threading.Thread | None = None
    port: int | None = None
    refs: int = 0
    closed: bool = field(default=False)


_owned: dict[tuple[Any, ...], _Owned] = {}
_owned_lock = threading.Lock()


def _env_port() -> int | None:
    raw = os.environ.get(ENV_PROMETHEUS_PORT, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"${ENV_PROMETHEUS_PORT} must be a port number, not {raw!r}")


def _otlp_setting(otlp: bool | str | None) -> bool | str:
    """False (no OTLP), True (the exporter's default or env endpoint) or an endpoint."""
    if otlp is None:
        return any(os.environ.get(v, "").strip() for v in _OTLP_ENDPOINT_VARS)
    return otlp


def _otlp_exporter(endpoint: str | None) -> MetricExporter:
    protocol = next(
        (os.environ[v].strip() for v in _OTLP_PROTOCOL_VARS if os.environ.get(v, "").strip()),
        "grpc",
    )
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpExporter,
        )

        return HttpExporter(endpoint=endpoint)
    if protocol != "grpc":
        raise ValueError(f"unsupported OTLP protocol {protocol!r} (use grpc or http/protobuf)")
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
        OTLPMetricExporter as GrpcExporter,
    )

    return GrpcExporter(endpoint=endpoint)


def _build(
    key: tuple[Any, ...],
    port: int | None,
    host: str,
    otlp: bool | str,
    export_interval: float,
) -> _Owned:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from prometheus_client import CollectorRegistry, start_http_server

    class _PrometheusReader(PrometheusMetricReader):
        """The SDK's Prometheus reader, plus the plugin's own histograms."""

        def _receive_metrics(
            self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
        ) -> None:
            super()._receive_metrics(
                own.inject(metrics_data),  # type: ignore[arg-type]
                timeout_millis,
                **kwargs,
            )

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or SYSTEM})
    own = OwnHistograms(resource, InstrumentationScope(METER_NAME, _version(), SCHEMA_URL))
    registry = CollectorRegistry(auto_describe=True)
    readers: list[MetricReader] = [_PrometheusReader(registry=registry)]
    if otlp is not False:
        exporter = _InjectingExporter(_otlp_exporter(otlp if isinstance(otlp, str) else None), own)
        readers.append(
            PeriodicExportingMetricReader(exporter, export_interval_millis=export_interval * 1000)
        )
    provider = SdkMeterProvider(metric_readers=readers, resource=resource)
    owned = _Owned(key, provider, registry, _Tallies(_meter(provider), own))
    if port is not None:
        try:
            owned.http, owned.http_thread = start_http_server(port, host, registry)
        except BaseException:
            provider.shutdown()
            raise
        owned.port = int(owned.http.server_address[1])
        log.info("metrics: Prometheus endpoint on http://%s:%d/metrics", host, owned.port)
    return owned


class _InjectingExporter(MetricExporter):
    """Wraps an exporter to add the plugin's own histograms to every export."""

    def __init__(self, inner: MetricExporter, own: OwnHistograms) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self._inner = inner
        self._own = own

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        data = self._own.inject(metrics_data)
        if data is None:
            return MetricExportResult.SUCCESS
        return self._inner.export(data, timeout_millis=timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("backbone")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return None


def _meter(provider: MeterProvider) -> Meter:
    return provider.get_meter(METER_NAME, _version(), schema_url=SCHEMA_URL)


def _release(owned: _Owned, timeout_millis: float) -> None:
    with _owned_lock:
        owned.refs -= 1
        if owned.refs > 0 or owned.closed:
            return
        owned.closed = True
        if _owned.get(owned.key) is owned:
            del _owned[owned.key]
    if owned.http is not None:
        owned.http.shutdown()
        owned.http.server_close()
        if owned.http_thread is not None:
            owned.http_thread.join(5)
    owned.provider.shutdown(timeout_millis=timeout_millis)


# --- the plugin ----------------------------------------------------------------------------


class MetricsPlugin(Plugin):
    """Counts and times what backbone does, as OpenTelemetry metrics.

    ``meter_provider``: where instruments are created; if ``None`` the plugin builds a
    private provider with a Prometheus reader (``prometheus_port`` / ``prometheus_host``
    for a scrape endpoint) and, if asked (``otlp``), an OTLP exporter every
    ``export_interval`` seconds.
    """

    name = "metrics"
    batched_steps = frozenset({"message.sent", "message.processed", "ack.received"})

    def __init__(
        self,
        meter_provider: MeterProvider | None = None,
        prometheus_port: int | None = None,
        prometheus_host: str = "127.0.0.1",
        otlp: bool | str | None = None,
        export_interval: float = 10.0,
    ) -> None:
        super().__init__()
        self._owned: _Owned | None = None
        self._closed = False
        if meter_provider is not None:
            self._provider: MeterProvider = meter_provider
            self._tallies = _Tallies(_meter(meter_provider))
            return
        if export_interval <= 0:
            raise ValueError("export_interval must be positive")
        port = prometheus_port if prometheus_port is not None else _env_port()
        host = os.environ.get(ENV_PROMETHEUS_HOST, "").strip() or prometheus_host
        otlp_setting = _otlp_setting(otlp)
        key = (port, host if port is not None else None, otlp_setting, float(export_interval))
        with _owned_lock:
            owned = _owned.get(key)
            if owned is None or owned.closed:
                owned = _build(key, port, host, otlp_setting, export_interval)
                _owned[key] = owned
            owned.refs += 1
        self._owned = owned
        self._provider = owned.provider
        self._tallies = owned.tallies

    # --- public -----------------------------------------------------------------------
    @property
    def meter_provider(self) -> MeterProvider:
        return self._provider

    @property
    def prometheus_port(self) -> int | None:
        """The port of the scrape endpoint, once bound (``None`` if there is none)."""
        return self._owned.port if self._owned is not None else None

    def prometheus_text(self) -> str:
        """The current metrics in the Prometheus text format (for a ``/metrics`` page).
        Only when the plugin built its own provider."""
        if self._owned is None:
            raise RuntimeError(
                "prometheus_text() needs the plugin's own provider; with meter_provider= "
                "add a PrometheusMetricReader to that provider instead"
            )
        from prometheus_client import generate_latest

        return generate_latest(self._owned.registry).decode()

    def force_flush(self, timeout: float = 10.0) -> bool:
        """Export now (OTLP); blocking, so call it off the event loop."""
        flush = getattr(self._provider, "force_flush", None)
        return bool(flush(timeout_millis=timeout * 1000)) if flush is not None else True

    def shutdown(self, timeout: float = 10.0) -> None:
        """Release the private provider: the last plugin using it stops the endpoint and
        shuts the provider down (a final export).  Blocking; idempotent.  A provider
        given to the constructor is left alone."""
        if self._closed:
            return
        self._closed = True
        if self._owned is not None:
            _release(self._owned, timeout * 1000)

    # --- receivers ----------------------------------------------------------------------
    def receivers(self) -> dict[NamedSignal, Receiver]:
        out: dict[NamedSignal, Receiver] = {
            signals.on_events_batched: self._batch,
            signals.on_ack_late: self._ack_late,
            signals.on_ack_timeout: self._ack_timeout,
            signals.on_ack_failed: self._ack_failed,
            signals.on_send_rejected: self._send_rejected,
            signals.on_connected: self._connected,
            signals.on_disconnected: self._disconnected,
            signals.on_timeout: self._evicted,
            signals.on_reconnect_scheduled: self._reconnect,
            signals.on_connect_failed: self._connect_failed,
            signals.on_heartbeat: self._heartbeat,
            signals.on_protocol_error: self._violation,
        }
        refused = getattr(signals, "on_session_refused", None)  # a newer core
        if isinstance(refused, NamedSignal):
            out[refused] = self._session_refused
        return out

    def on_install(self, sender: Any) -> None:
        role = getattr(sender, "role", None)
        if role in ("server", "client"):
            self._tallies.seed(role)

    def _batch(self, sender: Any, event: EventsBatched) -> None:
        """The per-message steps, a loop pass's worth at a time."""
        step = event.step
        t = self._tallies
        role = event.role
        rows = event.rows
        if step == "message.sent":
            broadcast = sum(1 for row in rows if row[_SENT_BROADCAST])
            if broadcast:
                t.sent[(role, True, None)] += broadcast
            if broadcast < len(rows):
                t.sent[(role, False, None)] += len(rows) - broadcast
        elif step == "message.processed":
            t.consumed[role] += len(rows)
            record = t.process_duration.record
            for row in rows:
                record(row[_PROCESSED_TIME], t.messaging("process", role, row[_PROCESSED_ERROR]))
        elif step == "ack.received":
            for row in rows:
                error = t.remote_error(row[_ACK_ERROR])
                latency = row[_ACK_LATENCY]
                t.operation_duration.record(latency, t.messaging("send", role, error))
                t.ack_duration.record(latency, t.own(role, error))

    def _ack_late(self, sender: Any, event: LateAckDropped) -> None:
        self._tallies.ack_late[event.role] += 1

    def _ack_timeout(self, sender: Any, event: AckTimedOut) -> None:
        t = self._tallies
        t.ack_timeouts[event.role] += 1
        t.operation_duration.record(event.timeout, t.messaging("send", event.role, "timeout"))

    def _ack_failed(self, sender: Any, event: AckFailed) -> None:
        t = self._tallies
        role = event.role
        t.ack_failures[(role, event.reason)] += 1
        t.operation_duration.record(event.latency, t.messaging("send", role, event.error_type))

    def _send_rejected(self, sender: Any, event: SendRejected) -> None:
        t = self._tallies
        t.rejected[(event.role, event.reason)] += 1
        t.sent[(event.role, False, event.reason)] += 1

    def _connected(self, sender: Any, event: Connected) -> None:
        self._tallies.connections[event.role] += 1

    def _disconnected(self, sender: Any, event: Disconnected) -> None:
        self._tallies.connections[event.role] -= 1

    def _evicted(self, sender: Any, event: HeartbeatTimedOut) -> None:
        self._tallies.evictions[event.role] += 1

    def _reconnect(self, sender: Any, event: ReconnectScheduled) -> None:
        self._tallies.reconnects[event.reason] += 1

    def _connect_failed(self, sender: Any, event: ConnectFailed) -> None:
        self._tallies.connect_failures[event.reason] += 1

    def _heartbeat(self, sender: Any, event: Event) -> None:
        if type(event) is HeartbeatAcknowledged:
            t = self._tallies
            t.heartbeat_rtt.record(event.rtt, t.own(event.role, None))

    def _violation(self, sender: Any, event: ProtocolViolated) -> None:
        self._tallies.violations[(event.role, event.code_name)] += 1

    def _session_refused(self, sender: Any, event: Event) -> None:
        self._tallies.refused[(event.role, str(event.__dict__.get("reason", "")))] += 1
