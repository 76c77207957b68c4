"""An in-process OTLP/gRPC receiver for tests: a real collector endpoint without Docker.

It serves the official ``TraceService`` and ``MetricsService`` (from opentelemetry-proto)
with grpcio on ``127.0.0.1:0`` and keeps every export request it gets.  Point a real
``OTLPSpanExporter(endpoint=rx.endpoint, insecure=True)`` or ``OTLPMetricExporter`` at
it, flush, then read :meth:`OtlpReceiver.spans` / :meth:`OtlpReceiver.metrics`::

    with OtlpReceiver() as rx:
        exporter = OTLPSpanExporter(endpoint=rx.endpoint, insecure=True)
        ...
        provider.force_flush()
        assert rx.wait_for(lambda r: len(r.spans()) >= 3)

Waiting is on a condition variable fed by the export calls (``wait_for`` blocks a thread;
``until`` is its asyncio form), never on a sleep.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1 import trace_pb2

__all__ = ["MetricPoint", "OtlpReceiver", "SpanRecord", "attributes", "value_of"]


def value_of(v: AnyValue) -> Any:
    """An OTLP ``AnyValue`` as plain Python."""
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [value_of(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return attributes(v.kvlist_value.values)
    return getattr(v, which)


def attributes(kvs: Any) -> dict[str, Any]:
    """Repeated ``KeyValue`` as a dict."""
    out: dict[str, Any] = {}
    kv: KeyValue
    for kv in kvs:
        out[kv.key] = value_of(kv.value)
    return out


@dataclass(frozen=True)
class SpanRecord:
    """One received span, flattened; ids are lower-case hex ("" when absent)."""

    name: str
    kind: str  # "PRODUCER", "CONSUMER", "CLIENT", "SERVER", "INTERNAL"
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope_name: str
    schema_url: str
    status_code: str  # "UNSET", "OK", "ERROR"
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace_id, span_id)
    events: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MetricPoint:
    """One received data point, flattened.  ``value`` is set for sums and gauges;
    ``count``, ``sum``, ``bucket_counts`` and ``explicit_bounds`` for histograms."""

    name: str
    unit: str
    type: str  # "sum", "gauge", "histogram", "exponential_histogram", "summary"
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope_name: str
    value: float | int | None = None
    count: int | None = None
    sum: float | None = None
    bucket_counts: tuple[int, ...] = ()
    explicit_bounds: tuple[float, ...] = ()
    monotonic: bool | None = None


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self, rx: OtlpReceiver) -> None:
        self.rx = rx

    def Export(self, request: Any, context: Any) -> Any:
        self.rx._got(self.rx.trace_requests, request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):  # type: ignore[misc]
    def __init__(self, rx: OtlpReceiver) -> None:
        self.rx = rx

    def Export(self, request: Any, context: Any) -> Any:
        self.rx._got(self.rx.metrics_requests, request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class OtlpReceiver:
    """OTLP/gRPC traces and metrics receiver on ``host:0`` (see the module docs)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.trace_requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metrics_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> OtlpReceiver:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(self), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(self), server)
        self.port = server.add_insecure_port(f"{self.host}:0")
        server.start()
        self._server = server
        return self

    def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """What an OTLP/gRPC exporter takes (``http``: no TLS)."""
        return f"http://{self.host}:{self.port}"

    # --- waiting -------------------------------------------------------------------------
    def _got(self, store: list[Any], request: Any) -> None:
        with self._cond:
            store.append(request)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[OtlpReceiver], bool], timeout: float = 10.0) -> bool:
        """Block until ``predicate(self)`` holds (re-checked at each export); its last value."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    async def until(self, predicate: Callable[[OtlpReceiver], bool], timeout: float = 10.0) -> bool:
        return await asyncio.to_thread(self.wait_for, predicate, timeout)

    def clear(self) -> None:
        with self._cond:
            self.trace_requests.clear()
            self.metrics_requests.clear()

    # --- reading ---------------------------------------------------------------------------
    def spans(self) -> list[SpanRecord]:
        with self._cond:
            requests = list(self.trace_requests)
        out: list[SpanRecord] = []
        for req in requests:
            for rs in req.resource_spans:
                resource = attributes(rs.resource.attributes)
                for ss in rs.scope_spans:
                    schema_url = ss.schema_url or rs.schema_url
                    for s in ss.spans:
                        out.append(
                            SpanRecord(
                                name=s.name,
                                kind=trace_pb2.Span.SpanKind.Name(s.kind).removeprefix(
                                    "SPAN_KIND_"
                                ),
                                trace_id=s.trace_id.hex(),
                                span_id=s.span_id.hex(),
                                parent_span_id=s.parent_span_id.hex(),
                                start_ns=s.start_time_unix_nano,
                                end_ns=s.end_time_unix_nano,
                                attributes=attributes(s.attributes),
                                resource=resource,
                                scope_name=ss.scope.name,
                                schema_url=schema_url,
                                status_code=trace_pb2.Status.StatusCode.Name(
                                    s.status.code
                                ).removeprefix("STATUS_CODE_"),
                                links=[(ln.trace_id.hex(), ln.span_id.hex()) for ln in s.links],
                                events=[e.name for e in s.events],
                            )
                        )
        return out

    def metrics(self) -> list[MetricPoint]:
        with self._cond:
            requests = list(self.metrics_requests)
        out: list[MetricPoint] = []
        for req in requests:
            for rm in req.resource_metrics:
                resource = attributes(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        out.extend(_points(m, resource, sm.scope.name))
        return out

    def metric_names(self) -> set[str]:
        return {p.name for p in self.metrics()}


def _points(m: Any, resource: dict[str, Any], scope: str) -> list[MetricPoint]:
    which = m.WhichOneof("data")
    if which is None:
        return []
    data = getattr(m, which)
    out: list[MetricPoint] = []
    for dp in data.data_points:
        common: dict[str, Any] = dict(
            name=m.name,
            unit=m.unit,
            type=which,
            attributes=attributes(dp.attributes),
            resource=resource,
            scope_name=scope,
        )
        if which in ("sum", "gauge"):
            value = dp.as_int if dp.WhichOneof("value") == "as_int" else dp.as_double
            monotonic = data.is_monotonic if which == "sum" else None
            out.append(MetricPoint(value=value, monotonic=monotonic, **common))
        elif which == "histogram":
            out.append(
                MetricPoint(
                    count=dp.count,
                    sum=dp.sum,
                    bucket_counts=tuple(dp.bucket_counts),
                    explicit_bounds=tuple(dp.explicit_bounds),
                    **common,
                )
            )
        else:
            out.append(MetricPoint(count=dp.count, sum=dp.sum, **common))
    return out
