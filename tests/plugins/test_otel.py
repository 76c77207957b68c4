"""The tracing plugin over real loopback QUIC: span structure (in-memory exporter), every
outcome of a send, broadcasts, sampling, and a real OTLP/gRPC export to an in-process
receiver.  Tests wait on events or on the receiver, never on timed sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Sampler
from opentelemetry.trace import SpanKind, StatusCode

from backbone import (
    AckTimeout,
    Client,
    ClientGone,
    Message,
    RemoteError,
    Server,
    TooManyPending,
    propagation,
)
from plugins.otel import (
    DEFAULT_SAMPLER_RATIO,
    SCHEMA_URL,
    TracingPlugin,
    resolve_sampler_ratio,
)

from ..otlp_receiver import OtlpReceiver

SEND = "send client/{client_id}"
PROCESS = "process client/{client_id}"
ACK = "ack client/{client_id}"
NACK = "nack client/{client_id}"


def provider(
    exporter: InMemorySpanExporter, service: str, sampler: Sampler = ALWAYS_ON
) -> TracerProvider:
    tp = TracerProvider(
        resource=Resource.create({"service.name": service}),
        sampler=sampler,
        shutdown_on_exit=False,
    )
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    return tp


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


class Traced:
    """A traced server and clients: one plugin (own provider, shared exporter) per side."""

    def __init__(self, exporter: InMemorySpanExporter) -> None:
        self.exporter = exporter
        self.server_plugin = TracingPlugin(tracer_provider=provider(exporter, "backbone-server"))
        self.client_plugins: dict[str, TracingPlugin] = {}

    def client_plugin(self, client_id: str) -> TracingPlugin:
        plugin = TracingPlugin(tracer_provider=provider(self.exporter, "backbone-client"))
        self.client_plugins[client_id] = plugin
        return plugin

    @property
    def plugins(self) -> list[TracingPlugin]:
        return [self.server_plugin, *self.client_plugins.values()]

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.spans(name)
        assert len(found) == 1, [s.name for s in self.spans()]
        return found[0]


@pytest.fixture
def traced(
    make_server: Callable[..., Any], make_client: Callable[..., Client], exporter: Any
) -> Callable[..., Any]:
    @contextlib.asynccontextmanager
    async def run(
        client_ids: Sequence[str] = ("dev-1",),
        handlers: dict[str, Callable[[Message], Any]] | None = None,
        **server_kw: Any,
    ) -> AsyncIterator[tuple[Traced, Server, list[Client]]]:
        tr = Traced(exporter)
        async with make_server(plugins=[tr.server_plugin], **server_kw) as server:
            clients = []
            for cid in client_ids:
                c = make_client(cid, server.port, plugins=[tr.client_plugin(cid)])
                if handlers and cid in handlers:
                    c.handler(handlers[cid])
                clients.append(c)
            async with contextlib.AsyncExitStack() as stack:
                for c in clients:
                    await stack.enter_async_context(c)
                for c in clients:
                    await c.wait_connected(5)
                yield tr, server, clients
        for plugin in tr.plugins:
            assert plugin.open_spans == 0
            assert plugin._inject not in propagation._injectors
            for signal, receiver in plugin.receivers().items():
                assert receiver not in signal.receivers.values()  # fully disconnected

    return run


def span_id(span: ReadableSpan) -> int:
    return span.get_span_context().span_id


def trace_id(span: ReadableSpan) -> int:
    return span.get_span_context().trace_id


def linked(span: ReadableSpan) -> set[int]:
    return {link.context.span_id for link in span.links}


def traceparent_of(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}"


class Gate:
    """A handler that blocks until released (async, on the client's loop)."""

    def __init__(self, result: Any = "late") -> None:
        self.release = asyncio.Event()
        self.result = result

    async def handler(self, msg: Message) -> Any:
        await self.release.wait()
        return self.result


# --- (a) span structure -----------------------------------------------------------------


async def test_waitack_send_process_ack_form_one_trace(traced, events):
    async with traced(handlers={"dev-1": lambda m: {"ok": True}}) as (tr, server, _):
        assert await server.send_to("dev-1", {"op": "x"}, wait_ack=True, timeout=5) == {"ok": True}
        await events.wait("heartbeat.received")  # heartbeats happen and are never traced
        port = server.port
    sent = events.of("message.sent", role="server")[0]
    received = events.of("message.received", role="client")[0]
    processed = events.of("message.processed", role="client")[0]
    acked = events.of("ack.received", role="server")[0]

    assert sorted(s.name for s in tr.spans()) == sorted([SEND, PROCESS, ACK])
    send, process, ack = tr.one(SEND), tr.one(PROCESS), tr.one(ACK)

    # kinds, one trace, parent/child, links
    assert (send.kind, process.kind, ack.kind) == (
        SpanKind.PRODUCER,
        SpanKind.CONSUMER,
        SpanKind.CLIENT,
    )
    assert trace_id(send) == trace_id(process) == trace_id(ack)
    assert send.parent is None
    assert process.parent is not None and process.parent.span_id == span_id(send)
    assert process.parent.is_remote
    assert linked(process) == {span_id(send)}
    assert ack.parent is not None and ack.parent.span_id == span_id(process)
    assert linked(send) == {span_id(ack)}

    # the context really travelled in the headers, both ways
    assert received.headers is not None
    assert received.headers["traceparent"].startswith(traceparent_of(send))
    assert acked.headers is not None
    assert acked.headers["traceparent"].startswith(traceparent_of(ack))

    common = {
        "messaging.system": "backbone",
        "messaging.destination.name": "client/dev-1",
        "messaging.destination.template": "client/{client_id}",
        "messaging.message.id": sent.msg_id,
        "network.transport": "quic",
        "backbone.client.id": "dev-1",
    }
    assert dict(send.attributes or {}) == {
        **common,
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.message.body.size": sent.size,
        "backbone.wait_ack": True,
    }
    on_client = {
        **common,
        "messaging.client.id": "dev-1",
        "server.address": "127.0.0.1",
        "server.port": port,
    }
    assert dict(process.attributes or {}) == {
        **on_client,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
    }
    ack_attrs = dict(ack.attributes or {})
    assert ack_attrs.pop("messaging.message.body.size") > 0
    assert ack_attrs == {
        **on_client,
        "messaging.operation.type": "settle",
        "messaging.operation.name": "ack",
    }
    for span in (send, process, ack):
        assert span.status.status_code is StatusCode.UNSET
        assert span.instrumentation_scope is not None
        assert span.instrumentation_scope.schema_url == SCHEMA_URL
    assert send.resource.attributes["service.name"] == "backbone-server"
    assert process.resource.attributes["service.name"] == "backbone-client"

    # the process span has the handler's own start and duration
    assert process.start_time == int(processed.started_at * 1e9)
    assert process.end_time == process.start_time + int(processed.processing_time * 1e9)
    # the send span covers the whole round trip
    assert send.start_time is not None and send.end_time is not None
    assert ack.end_time is not None
    assert send.start_time <= process.start_time and send.end_time >= ack.end_time


async def test_client_to_server_waitack(traced, events):
    async with traced() as (tr, server, (client,)):
        server.handler(lambda m: {"seen": m.payload})
        assert await client.send({"temp": 21}, wait_ack=True) == {"seen": {"temp": 21}}
    send, process, ack = tr.one("send server"), tr.one("process server"), tr.one("ack server")
    assert send.resource.attributes["service.name"] == "backbone-client"
    assert process.resource.attributes["service.name"] == "backbone-server"
    assert process.parent is not None and process.parent.span_id == span_id(send)
    assert ack.parent is not None and ack.parent.span_id == span_id(process)
    assert linked(send) == {span_id(ack)}
    assert send.attributes is not None and process.attributes is not None
    assert send.attributes["messaging.destination.name"] == "server"
    assert "messaging.destination.template" not in send.attributes
    assert send.attributes["messaging.client.id"] == "dev-1"
    # a server span does not claim to be a messaging client; the peer is named apart
    assert "messaging.client.id" not in process.attributes
    assert process.attributes["backbone.client.id"] == "dev-1"


async def test_fire_and_forget_ends_when_queued(traced, events):
    async with traced(handlers={"dev-1": lambda m: None}) as (tr, server, _):
        msg_id = await server.send_to("dev-1", {"op": "fire"})
        send = tr.one(SEND)  # already ended: nothing to wait for
        await events.wait("message.processed", role="client", msg_id=msg_id)
    process = tr.one(PROCESS)
    assert not tr.spans(ACK)
    assert send.attributes is not None and send.attributes["backbone.wait_ack"] is False
    assert process.parent is not None and process.parent.span_id == span_id(send)


async def test_remote_error_sets_error_type(traced, events):
    def fail(msg: Message) -> None:
        raise ValueError("disk full")

    async with traced(handlers={"dev-1": fail}) as (tr, server, _):
        with pytest.raises(RemoteError):
            await server.send_to("dev-1", {"op": "fail"}, wait_ack=True, timeout=5)
    send, process, nack = tr.one(SEND), tr.one(PROCESS), tr.one(NACK)
    for span in (send, process):
        assert span.attributes is not None and span.attributes["error.type"] == "ValueError"
        assert span.status.status_code is StatusCode.ERROR
    # the nack itself was sent fine: the failure belongs to process (and to send)
    assert nack.attributes is not None
    assert nack.attributes["messaging.operation.name"] == "nack"
    assert "error.type" not in nack.attributes
    assert nack.status.status_code is StatusCode.UNSET
    assert linked(send) == {span_id(nack)}


async def test_unserialisable_result_fails_the_settle_span(traced, events):
    async with traced(handlers={"dev-1": lambda m: object()}) as (tr, server, _):
        with pytest.raises(RemoteError):
            await server.send_to("dev-1", {"op": "x"}, wait_ack=True, timeout=5)
    process, nack = tr.one(PROCESS), tr.one(NACK)
    assert process.status.status_code is StatusCode.UNSET
    assert nack.attributes is not None and nack.attributes["error.type"] == "TypeError"
    assert (tr.one(SEND).attributes or {})["error.type"] == "TypeError"


async def test_ack_timeout_then_late_result(traced, events):
    gate = Gate()
    async with traced(handlers={"dev-1": gate.handler}) as (tr, server, _):
        with pytest.raises(AckTimeout):
            await server.send_to("dev-1", {"op": "slow"}, wait_ack=True, timeout=0.2)
        send = tr.one(SEND)
        assert send.attributes is not None and send.attributes["error.type"] == "timeout"
        assert send.status.status_code is StatusCode.ERROR
        gate.release.set()
        await events.wait("ack.late", role="server")
        assert tr.server_plugin.open_spans == 0
    # the late result is still traced on the client, in the same trace; send ended once
    assert len(tr.spans(SEND)) == 1
    assert trace_id(tr.one(ACK)) == trace_id(tr.one(PROCESS)) == trace_id(send)


async def test_client_gone_mid_command(traced, events):
    gate = Gate()
    async with traced(handlers={"dev-1": gate.handler}) as (tr, server, (client,)):
        task = asyncio.create_task(server.send_to("dev-1", {"op": "x"}, wait_ack=True, timeout=5))
        await events.wait("message.received", role="client")
        await client.close()
        with pytest.raises(ClientGone):
            await task
        send = tr.one(SEND)
        assert send.attributes is not None
        assert send.attributes["error.type"] == "client_gone"
        assert send.attributes["backbone.failure.reason"] == "closed_by_client"
        assert send.status.status_code is StatusCode.ERROR
    assert not tr.spans(PROCESS)  # the handler was cancelled with its connection


async def test_rejected_after_msg_id_ends_the_span(traced, events):
    gate = Gate()
    async with traced(handlers={"dev-1": gate.handler}, max_pending_per_client=1) as (
        tr,
        server,
        _,
    ):
        first = asyncio.create_task(server.send_to("dev-1", "a", wait_ack=True, timeout=5))
        await events.wait("message.sent", role="server")
        with pytest.raises(TooManyPending):
            await server.send_to("dev-1", "b", wait_ack=True, timeout=5)
        rejected = events.of("send.rejected")[0]
        (span,) = tr.spans(SEND)
        assert span.attributes is not None
        assert span.attributes["error.type"] == "too_many_pending"
        assert span.attributes["messaging.message.id"] == rejected.msg_id
        gate.release.set()
        assert await first == "late"
    assert len(tr.spans(SEND)) == 2


async def test_frame_never_queued_still_ends_the_span(traced, events):
    async with traced() as (tr, server, _):
        with pytest.raises(ValueError):  # headers over 8 KiB: refused, send.rejected
            await server.send_to("dev-1", "x", headers={"big": "a" * 9000})
        await events.wait("send.rejected", reason="invalid_headers")
        span = tr.one(SEND)
        assert span.attributes is not None
        assert span.attributes["error.type"] == "invalid_headers"


async def test_cancelled_wait_ends_on_the_late_result(traced, events):
    gate = Gate()
    async with traced(handlers={"dev-1": gate.handler}) as (tr, server, _):
        task = asyncio.create_task(server.send_to("dev-1", "x", wait_ack=True, timeout=5))
        await events.wait("message.received", role="client")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await events.wait("ack.failed", role="server", reason="cancelled")
        assert tr.server_plugin.open_spans == 0  # the cancellation ended the span
        span = tr.one(SEND)
        assert span.attributes is not None and span.attributes["error.type"] == "cancelled"
        gate.release.set()
        await events.wait("ack.late", role="server")


async def test_open_spans_are_bounded(make_server, make_client, exporter, events):
    gate = Gate()
    plugin = TracingPlugin(tracer_provider=provider(exporter, "s"), max_open_spans=2)
    async with make_server(plugins=[plugin]) as server:
        client = make_client("dev-1", server.port)
        client.handler(gate.handler)
        async with client:
            await client.wait_connected(5)
            sends = [
                asyncio.create_task(server.send_to("dev-1", i, wait_ack=True, timeout=5))
                for i in range(3)
            ]
            while len(events.of("message.sent", role="server")) < 3:
                await events.wait_new("message.sent", role="server")
            assert plugin.open_spans == 2 and plugin.evicted == 1
            (evicted,) = exporter.get_finished_spans()
            assert evicted.attributes is not None
            assert evicted.attributes["error.type"] == "evicted"
            gate.release.set()
            assert await asyncio.gather(*sends) == ["late"] * 3
            assert plugin.open_spans == 0
    assert len(exporter.get_finished_spans()) == 3


def test_uninstall_ends_what_is_left(exporter):
    plugin = TracingPlugin(tracer_provider=provider(exporter, "s"))

    class Owner:
        role = "server"

    owner = Owner()
    plugin.install(owner)
    headers = propagation.inject(owner, "message", "ab" * 16, "dev-1", None)
    assert plugin.open_spans == 1 and headers is not None and "traceparent" in headers
    plugin.uninstall(owner)
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None and span.attributes["error.type"] == "abandoned"
    assert plugin.open_spans == 0 and not propagation.active()


async def test_broadcast_one_span_per_broadcast(traced, events):
    def fail(msg: Message) -> None:
        raise ValueError("nope")

    ids = ("c0", "c1", "c2")
    handlers = {"c0": lambda m: "c0", "c1": fail, "c2": lambda m: "c2"}
    async with traced(client_ids=ids, handlers=handlers) as (tr, server, _):
        report = await server.broadcast({"op": "refresh"}, wait_ack=True, timeout=5)
        assert report.results == {"c0": "c0", "c2": "c2"} and list(report.errors) == ["c1"]
        span = tr.one("broadcast client/*")
        fire = await server.broadcast({"op": "ping"})
        for cid in ids:
            await events.wait("message.processed", role="client", msg_id=fire.msg_id, client_id=cid)
    assert span.kind is SpanKind.PRODUCER
    attrs = dict(span.attributes or {})
    assert attrs["messaging.operation.name"] == "broadcast"
    assert attrs["messaging.operation.type"] == "send"
    assert attrs["messaging.destination.name"] == "client/*"
    assert attrs["messaging.message.id"] == report.msg_id
    assert attrs["backbone.broadcast.recipients"] == 3
    assert attrs["backbone.broadcast.failed"] == 1
    assert attrs["error.type"] == "ValueError"
    assert span.status.status_code is StatusCode.ERROR
    outcomes = sorted((e.name, (e.attributes or {})["backbone.client.id"]) for e in span.events)
    assert outcomes == [("ack", "c0"), ("ack", "c2"), ("nack", "c1")]
    # every client processed it as a child of the broadcast span; every result is linked
    processes = [
        p
        for p in tr.spans(PROCESS)
        if (p.attributes or {}).get("messaging.message.id") == report.msg_id
    ]
    assert len(processes) == 3
    for p in processes:
        assert p.parent is not None and p.parent.span_id == span_id(span)
        assert trace_id(p) == trace_id(span)
    settles = tr.spans(ACK) + tr.spans(NACK)
    assert linked(span) == {span_id(s) for s in settles}
    # fire-and-forget: ended once queued to everyone, nothing failed
    (fire_span,) = [s for s in tr.spans("broadcast client/*") if s is not span]
    assert fire_span.attributes is not None
    assert fire_span.attributes["backbone.broadcast.recipients"] == 3
    assert fire_span.attributes["backbone.broadcast.failed"] == 0
    assert fire_span.status.status_code is StatusCode.UNSET


# --- sampling ----------------------------------------------------------------------------


def test_sampler_ratio_resolution(monkeypatch, caplog):
    assert resolve_sampler_ratio(None, {}) == DEFAULT_SAMPLER_RATIO == 0.1
    assert resolve_sampler_ratio(None, {"OTEL_TRACES_SAMPLER_ARG": "0.5"}) == 0.5
    assert resolve_sampler_ratio(0.25, {"OTEL_TRACES_SAMPLER_ARG": "0.5"}) == 0.25
    assert resolve_sampler_ratio(0, {"OTEL_TRACES_SAMPLER_ARG": "1"}) == 0.0
    assert resolve_sampler_ratio(None, {"OTEL_TRACES_SAMPLER_ARG": "lots"}) == 0.1
    assert "OTEL_TRACES_SAMPLER_ARG" in caplog.text
    with pytest.raises(ValueError):
        TracingPlugin(sampler_ratio=2)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "1")
    assert TracingPlugin().sampler_ratio == 1.0
    assert TracingPlugin().tracer_provider is None  # built on first install only


@pytest.fixture
def receiver(monkeypatch) -> Any:
    """An OTLP receiver the plugins' own providers export to (standard env vars)."""
    with OtlpReceiver() as rx:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")  # only flushes export
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
        monkeypatch.delenv("OTEL_TRACES_SAMPLER_ARG", raising=False)
        yield rx


async def test_ratio_zero_traces_nothing_and_messages_flow(
    make_server, make_client, events, receiver
):
    server_plugin, client_plugin = TracingPlugin(sampler_ratio=0), TracingPlugin(sampler_ratio=1)
    async with make_server(plugins=[server_plugin]) as server:
        client = make_client("dev-1", server.port, plugins=[client_plugin])
        client.handler(lambda m: m.payload * 2)
        async with client:
            await client.wait_connected(5)
            for i in range(5):
                assert await server.send_to("dev-1", i, wait_ack=True, timeout=5) == 2 * i
            assert server_plugin.open_spans == client_plugin.open_spans == 0
    # the decision (not sampled) still travels, so the client follows it
    for ev in events.of("message.received", role="client"):
        assert ev.headers is not None
        assert int(ev.headers["traceparent"][-2:], 16) & 1 == 0
    # stop() and close() shut the private providers down, which exports what they hold
    assert receiver.spans() == []


async def test_parent_based_client_follows_the_server(make_server, make_client, receiver):
    server_plugin, client_plugin = TracingPlugin(sampler_ratio=1), TracingPlugin(sampler_ratio=0)
    async with make_server(plugins=[server_plugin]) as server:
        server.handler(lambda m: "ok")
        client = make_client("dev-1", server.port, plugins=[client_plugin])
        client.handler(lambda m: "ok")
        async with client:
            await client.wait_connected(5)
            assert await server.send_to("dev-1", "x", wait_ack=True, timeout=5) == "ok"
            # the client's own root decision is 0: its send, and what follows, is not traced
            assert await client.send("y", wait_ack=True, timeout=5) == "ok"
    # exported when the providers were shut down by stop() / close()
    spans = {s.name: s for s in receiver.spans()}
    assert sorted(spans) == sorted([SEND, PROCESS, ACK])
    assert len({s.trace_id for s in spans.values()}) == 1
    assert spans[SEND].resource["service.name"] == "backbone-server"
    assert spans[PROCESS].resource["service.name"] == "backbone-client"
    assert spans[PROCESS].parent_span_id == spans[SEND].span_id


async def test_partial_sampling_keeps_whole_traces(make_server, make_client, receiver):
    """At ratio 0.5 the server decides each root itself (sampled-out sends build no span)
    and the client, whose own ratio is 1, follows that decision: every exported trace
    has its send, process and ack, and no other trace has any span."""
    server_plugin, client_plugin = TracingPlugin(sampler_ratio=0.5), TracingPlugin(sampler_ratio=1)
    n = 200
    async with make_server(plugins=[server_plugin]) as server:
        client = make_client("dev-1", server.port, plugins=[client_plugin])
        client.handler(lambda m: m.payload)
        async with client:
            await client.wait_connected(5)
            for i in range(n):
                assert await server.send_to("dev-1", i, wait_ack=True, timeout=5) == i
    by_trace: dict[str, set[str]] = {}
    for span in receiver.spans():
        by_trace.setdefault(span.trace_id, set()).add(span.name)
    assert all(names == {SEND, PROCESS, ACK} for names in by_trace.values()), by_trace
    assert 60 < len(by_trace) < 140  # binomial(200, 0.5): far outside is a bug, not luck
    bound = round(0.5 * 2**64)
    assert all(int(t, 16) & (2**64 - 1) < bound for t in by_trace)  # the ratio sampler's rule


# --- (b) a real export over the network --------------------------------------------------


async def test_real_otlp_grpc_export(make_server, make_client):
    with OtlpReceiver() as rx:
        providers = []
        for service in ("backbone-server", "backbone-client"):
            tp = TracerProvider(
                resource=Resource.create({"service.name": service}),
                sampler=ALWAYS_ON,
                shutdown_on_exit=False,
            )
            tp.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=rx.endpoint, insecure=True))
            )
            providers.append(tp)
        server_tp, client_tp = providers
        try:
            async with make_server(plugins=[TracingPlugin(tracer_provider=server_tp)]) as server:
                client = make_client(
                    "dev-1", server.port, plugins=[TracingPlugin(tracer_provider=client_tp)]
                )
                client.handler(lambda m: {"done": m.payload})
                async with client:
                    await client.wait_connected(5)
                    result = await server.send_to("dev-1", "job", wait_ack=True, timeout=5)
                    assert result == {"done": "job"}
                    for tp in providers:
                        assert await asyncio.to_thread(tp.force_flush)
                    assert await rx.until(lambda r: len(r.spans()) >= 3)
        finally:
            for tp in providers:
                await asyncio.to_thread(tp.shutdown)
        spans = {s.name: s for s in rx.spans()}
    assert sorted(spans) == sorted([SEND, PROCESS, ACK])
    send, process, ack = spans[SEND], spans[PROCESS], spans[ACK]
    assert send.trace_id == process.trace_id == ack.trace_id
    assert (send.kind, process.kind, ack.kind) == ("PRODUCER", "CONSUMER", "CLIENT")
    assert process.parent_span_id == send.span_id and ack.parent_span_id == process.span_id
    assert process.links == [(send.trace_id, send.span_id)]
    assert send.links == [(ack.trace_id, ack.span_id)]
    assert send.resource["service.name"] == "backbone-server"
    assert process.resource["service.name"] == ack.resource["service.name"] == "backbone-client"
    assert send.schema_url == SCHEMA_URL and send.scope_name == "backbone.plugins.otel"
    assert send.attributes["messaging.destination.name"] == "client/dev-1"
    assert send.attributes["messaging.system"] == "backbone"
    assert send.end_ns >= ack.end_ns > ack.start_ns >= process.end_ns >= process.start_ns


def test_a_stalled_collector_costs_one_flush_timeout_not_one_per_close(monkeypatch) -> None:
    """Each client's tracing plugin flushes on close, on the event loop, for up to
    flush_timeout.  Against a collector that never answers, N clients closing cost N
    timeouts; while the first stuck export is still stuck, the others wait only briefly,
    and once it is done, waits are whole again."""
    import time

    import plugins.otel as otel_mod

    monkeypatch.setattr(otel_mod, "_stalled", set())
    hung = threading.Event()
    plugins = [otel_mod.TracingPlugin(flush_timeout=0.5) for _ in range(5)]
    try:
        took = []
        for plugin in plugins:
            started = time.monotonic()
            assert plugin._bounded(lambda: hung.wait(10), "exporting") is False
            took.append(time.monotonic() - started)
        assert took[0] >= 0.5
        assert all(t < 0.3 for t in took[1:]), took
    finally:
        hung.set()
    for thread in list(otel_mod._stalled):
        thread.join(5)
    # the collector answers again: a slower export gets its whole time
    started = time.monotonic()
    assert plugins[0]._bounded(lambda: time.sleep(0.2), "exporting") is True
    assert time.monotonic() - started >= 0.2
