"""The metrics plugin over real loopback QUIC: names, units, buckets, values and attributes
read back through an InMemoryMetricReader, a Prometheus scrape and a real OTLP/gRPC export.

``run_scenario`` drives one server and a few clients through everything the plugins
report (results, a remote error, a timeout and its late result, an eviction, a refused
send, backpressure, a protocol violation, reconnects); ``test_logs`` reuses it."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricsData,
    NumberDataPoint,
    Sum,
)
from prometheus_client.parser import text_string_to_metric_families

from backbone import (
    AckTimeout,
    Backpressure,
    ClientGone,
    ClientNotConnected,
    Message,
    RemoteError,
    signals,
)
from backbone._quic import client_configuration, open_connection
from backbone.plugins import load_plugin, plugin_drops
from plugins.metrics import FINE_BUCKETS, MESSAGING_BUCKETS, MetricsPlugin

from ..otlp_receiver import MetricPoint, OtlpReceiver
from ..test_bad_input import RawPeer
from ..test_e2e import running

SECRET_PAYLOAD = "s3cr3t-payload-value"
SECRET_HEADER = "s3cr3t-header-value"
SLOW_WINDOW = 4  # the slow client's max_inbound_queue: the server gets Backpressure after it


def closed_udp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


async def run_scenario(
    make_server: Any,
    make_client: Any,
    events: Any,
    certs: Any,
    plugins: Sequence[Any],
    while_connected: Callable[[], None] | None = None,
) -> None:
    """Server and clients ``dev-1`` and ``slow`` run ``plugins``; ``victim`` (no plugins)
    crashes and is evicted; a raw QUIC peer sends garbage; ``lonely`` dials a closed port.
    ``while_connected`` runs at the end, with dev-1 and slow still connected."""
    async with make_server(plugins=list(plugins)) as server:

        @server.handler
        def echo(msg: Message) -> Any:
            return msg.payload

        dev = make_client("dev-1", server.port, plugins=list(plugins))
        release = asyncio.Event()

        @dev.handler
        async def handle(msg: Message) -> Any:
            op = msg.payload.get("op")
            if op == "fail":
                raise ValueError("disk full")
            if op == "slow":
                await release.wait()
                return "late"
            return {"done": op}

        slow = make_client(
            "slow", server.port, plugins=list(plugins), max_inbound_queue=SLOW_WINDOW
        )
        gate = asyncio.Event()

        @slow.handler
        async def gated(msg: Message) -> None:
            await gate.wait()

        victim = make_client("victim", server.port)
        stuck = asyncio.Event()

        @victim.handler
        async def never(msg: Message) -> None:
            await stuck.wait()

        async with running(dev, slow, victim):
            # results, an error result, a timeout and its late result
            for i in range(3):
                assert await server.send_to("dev-1", {"op": i}, wait_ack=True) == {"done": i}
            with pytest.raises(RemoteError):
                await server.send_to("dev-1", {"op": "fail"}, wait_ack=True)
            with pytest.raises(AckTimeout):
                await server.send_to("dev-1", {"op": "slow"}, wait_ack=True, timeout=0.2)
            release.set()
            await events.wait("ack.late", role="server", client_id="dev-1")
            # fire-and-forget with a secret in the payload and in a header
            fire = await server.send_to(
                "dev-1", {"op": "fire", "secret": SECRET_PAYLOAD}, headers={"x": SECRET_HEADER}
            )
            await events.wait("message.processed", role="client", msg_id=fire)
            # client -> server
            assert await dev.send({"op": "up"}, wait_ack=True) == {"op": "up"}
            # refused sends: nobody there, then backpressure from a handler that is behind
            with pytest.raises(ClientNotConnected):
                await server.send_to("nobody", {"op": 1})
            with pytest.raises(Backpressure):
                for i in range(SLOW_WINDOW + 1):
                    await server.send_to("slow", {"op": i})
            gate.set()
            for _ in range(SLOW_WINDOW):
                if len(events.of("message.processed", role="client", client_id="slow")) < (
                    SLOW_WINDOW
                ):
                    await events.wait_new("message.processed", role="client", client_id="slow")
            # a crashed client is evicted; its pending result fails
            pending = asyncio.ensure_future(
                server.send_to("victim", {"op": 1}, wait_ack=True, timeout=30)
            )
            await events.wait("message.received", role="client", client_id="victim")
            victim._conn._transport.abort()
            victim._task.cancel()
            await events.wait("heartbeat.timed_out", role="server", client_id="victim")
            with pytest.raises(ClientGone):
                await pending
            # a peer that breaks the protocol
            conf = client_configuration(
                server_name="localhost", cafile=str(certs.ca_cert), verify=True, idle_timeout=10.0
            )
            peer = await open_connection("127.0.0.1", server.port, conf, RawPeer)
            assert isinstance(peer, RawPeer)
            try:
                peer.write(0, b"\x00\x00\x00\x09garbage!!")
                await events.wait("protocol.violated", role="server")
            finally:
                peer.close_with(0, "done")
            # a client that cannot connect retries
            lonely = make_client(
                "lonely",
                closed_udp_port(),
                plugins=list(plugins),
                backoff_initial=0.05,
                backoff_max=0.1,
            )
            async with lonely:
                await events.wait("reconnect.scheduled", client_id="lonely")
            await events.wait("heartbeat.acknowledged", role="client", client_id="dev-1")
            if while_connected is not None:
                while_connected()


# --- reading metrics, whichever way they left the plugin ---------------------------------------

Points = dict[str, list[MetricPoint]]  # by metric name


def from_sdk(data: MetricsData | None) -> Points:
    """What an InMemoryMetricReader collected, in the OTLP receiver's flat form."""
    assert data is not None
    out: Points = defaultdict(list)
    for rm in data.resource_metrics:
        resource = dict(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                common = dict(name=m.name, unit=m.unit, resource=resource, scope_name=sm.scope.name)
                for p in m.data.data_points:
                    attrs = dict(p.attributes or {})
                    if isinstance(p, HistogramDataPoint):
                        out[m.name].append(
                            MetricPoint(
                                type="histogram",
                                attributes=attrs,
                                count=p.count,
                                sum=p.sum,
                                bucket_counts=tuple(p.bucket_counts),
                                explicit_bounds=tuple(p.explicit_bounds),
                                **common,
                            )
                        )
                    else:
                        assert isinstance(p, NumberDataPoint)
                        is_sum = isinstance(m.data, Sum)
                        out[m.name].append(
                            MetricPoint(
                                type="sum" if is_sum else "gauge",
                                attributes=attrs,
                                value=p.value,
                                monotonic=m.data.is_monotonic if is_sum else None,
                                **common,
                            )
                        )
    return out


def from_otlp(rx: OtlpReceiver) -> Points:
    out: Points = defaultdict(list)
    for p in rx.metrics():
        out[p.name].append(p)
    return out


def point(points: Points, name: str, **attrs: Any) -> MetricPoint:
    """The one data point of ``name`` whose attributes are exactly ``attrs``
    (keyword names use ``_`` for ``.``)."""
    want = {k.replace("_", "."): v for k, v in attrs.items()}
    found = [p for p in points[name] if p.attributes == want]
    assert len(found) == 1, (name, want, [p.attributes for p in points[name]])
    return found[0]


def value(points: Points, name: str, **attrs: Any) -> float | int:
    p = point(points, name, **attrs)
    assert p.type == "sum" and p.value is not None, p
    return p.value


def hist(points: Points, name: str, **attrs: Any) -> MetricPoint:
    p = point(points, name, **attrs)
    assert p.type == "histogram" and p.count is not None and p.sum is not None, p
    return p


def msg(op: str, role: str, error: str | None = None) -> dict[str, Any]:
    """Attributes of a messaging.* point (as keywords for ``point``)."""
    op_type = "process" if op == "process" else "send"
    out = {
        "messaging_system": "backbone",
        "messaging_operation_name": op,
        "messaging_operation_type": op_type,
        "backbone_role": role,
    }
    if error is not None:
        out["error_type"] = error
    return out


UNITS = {
    "messaging.client.sent.messages": "{message}",
    "messaging.client.consumed.messages": "{message}",
    "messaging.client.operation.duration": "s",
    "messaging.process.duration": "s",
    "backbone.connections": "{connection}",
    "backbone.ack.duration": "s",
    "backbone.ack.timeouts": "{message}",
    "backbone.ack.failures": "{message}",
    "backbone.ack.late": "{message}",
    "backbone.heartbeat.rtt": "s",
    "backbone.evictions": "{client}",
    "backbone.reconnects": "{attempt}",
    "backbone.connect.failures": "{attempt}",
    "backbone.send.rejected": "{message}",
    "backbone.protocol.violations": "{connection}",
    "backbone.plugin.dropped": "{event}",
    "backbone.receiver.failures": "{failure}",
}
BUCKETS = {
    "messaging.client.operation.duration": MESSAGING_BUCKETS,
    "messaging.process.duration": MESSAGING_BUCKETS,
    "backbone.ack.duration": FINE_BUCKETS,
    "backbone.heartbeat.rtt": FINE_BUCKETS,
}


@pytest.fixture(params=["sdk", "own"])
def source(request: pytest.FixtureRequest) -> Any:
    """(plugin, snapshot): ``sdk`` is a caller's MeterProvider read by an
    InMemoryMetricReader (histograms recorded through the SDK); ``own`` is the plugin's
    own provider exporting over OTLP/gRPC to a real receiver (its own histograms)."""
    if request.param == "sdk":
        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
        yield MetricsPlugin(meter_provider=provider), lambda: from_sdk(reader.get_metrics_data())
        provider.shutdown()
        return
    with OtlpReceiver() as rx:
        plugin = MetricsPlugin(otlp=rx.endpoint, export_interval=3600)

        def snapshot() -> Points:
            rx.clear()
            assert plugin.force_flush()
            return from_otlp(rx)

        yield plugin, snapshot
        plugin.shutdown()


# --- the scenario, read back both ways --------------------------------------------------------


async def test_metrics_of_a_real_scenario(make_server, make_client, events, certs, source):
    plugin, snapshot = source
    plugin_drops["metrics-test-queue"] += 7

    def broken(sender: Any, event: Any) -> None:
        raise RuntimeError("a plugin bug")

    signals.on_connected.connect(broken, weak=False)
    during: Points = {}
    try:
        await run_scenario(
            make_server,
            make_client,
            events,
            certs,
            [plugin],
            while_connected=lambda: during.update(snapshot()),
        )
    finally:
        signals.on_connected.disconnect(broken)
        del plugin_drops["metrics-test-queue"]
    after = snapshot()
    m = during
    assert {p.scope_name for ps in m.values() for p in ps} == {"backbone.plugins.metrics"}

    # every instrument, with its unit; histograms with their explicit buckets
    assert set(UNITS) <= set(m)
    for name, unit in UNITS.items():
        assert {p.unit for p in m[name]} == {unit}, name
    for name, bounds in BUCKETS.items():
        for p in m[name]:
            assert p.explicit_bounds == bounds, name
            assert len(p.bucket_counts) == len(bounds) + 1 and sum(p.bucket_counts) == p.count

    # sends: 3 results + error + timeout + fire + victim + SLOW_WINDOW to slow; refusals
    # are counted as sends with error.type (and in backbone.send.rejected)
    server_sent = len(events.of("message.sent", role="server"))
    assert server_sent == 7 + SLOW_WINDOW
    assert value(m, "messaging.client.sent.messages", **msg("send", "server")) == server_sent
    assert value(m, "messaging.client.sent.messages", **msg("send", "client")) == 1
    for reason in ("not_connected", "backpressure"):
        assert value(m, "messaging.client.sent.messages", **msg("send", "server", reason)) == 1
        assert (
            value(m, "backbone.send.rejected", backbone_role="server", backbone_reason=reason) == 1
        )

    # handled messages: dev-1 six (one raised), slow SLOW_WINDOW; the server one
    assert value(m, "messaging.client.consumed.messages", **msg("process", "client")) == (
        6 + SLOW_WINDOW
    )
    assert value(m, "messaging.client.consumed.messages", **msg("process", "server")) == 1
    ok = hist(m, "messaging.process.duration", **msg("process", "client"))
    failed = hist(m, "messaging.process.duration", **msg("process", "client", "ValueError"))
    assert (ok.count, failed.count) == (5 + SLOW_WINDOW, 1)
    processed = [e for e in events.of("message.processed", role="client") if e.ok]
    assert ok.sum == pytest.approx(sum(e.processing_time for e in processed))

    # the WaitAck round trip, by outcome
    rt = "messaging.client.operation.duration"
    assert hist(m, rt, **msg("send", "server")).count == 3
    assert hist(m, rt, **msg("send", "server", "ValueError")).count == 1
    timeout = hist(m, rt, **msg("send", "server", "timeout"))
    assert (timeout.count, timeout.sum) == (1, pytest.approx(0.2))
    assert timeout.bucket_counts[MESSAGING_BUCKETS.index(0.25)] == 1  # (0.1, 0.25]
    assert hist(m, rt, **msg("send", "server", "client_gone")).count == 1
    assert hist(m, rt, **msg("send", "client")).count == 1
    latencies = [e.latency for e in events.of("ack.received", role="server", ok=True)]
    assert hist(m, rt, **msg("send", "server")).sum == pytest.approx(sum(latencies))

    # backbone's own
    ack = hist(m, "backbone.ack.duration", backbone_role="server")
    assert ack.count == 3 and ack.sum == pytest.approx(sum(latencies))
    assert (
        hist(m, "backbone.ack.duration", backbone_role="server", error_type="ValueError").count == 1
    )
    assert hist(m, "backbone.ack.duration", backbone_role="client").count == 1
    assert value(m, "backbone.ack.timeouts", backbone_role="server") == 1
    assert value(m, "backbone.ack.late", backbone_role="server") == 1
    failure = events.of("ack.failed", role="server")
    assert [e.reason for e in failure] == ["heartbeat_timeout"]
    assert (
        value(
            m, "backbone.ack.failures", backbone_role="server", backbone_reason="heartbeat_timeout"
        )
        == 1
    )
    assert value(m, "backbone.evictions", backbone_role="server") == 1
    assert value(m, "backbone.connections", backbone_role="server") == 2  # dev-1 and slow
    assert value(m, "backbone.connections", backbone_role="client") == 2  # one each
    rtt = hist(m, "backbone.heartbeat.rtt", backbone_role="client")
    # dev-1's and slow's pongs until the snapshot (the victim has no plugin; heartbeats
    # go on after the snapshot)
    pongs = [e for e in events.of("heartbeat.acknowledged") if e.client_id in ("dev-1", "slow")]
    assert 1 <= rtt.count <= len(pongs)
    assert rtt.sum <= sum(e.rtt for e in pongs)
    assert (
        value(
            m,
            "backbone.protocol.violations",
            backbone_role="server",
            backbone_reason="PROTOCOL_ERROR",
        )
        == 1
    )
    fails = events.of("connect.failed", client_id="lonely")
    reason = fails[0].reason
    assert value(
        m, "backbone.connect.failures", backbone_role="client", backbone_reason=reason
    ) == (len(fails))
    scheduled = events.of("reconnect.scheduled", client_id="lonely")
    assert value(m, "backbone.reconnects", backbone_role="client", backbone_reason=reason) == len(
        scheduled
    )
    assert value(m, "backbone.plugin.dropped", backbone_plugin="metrics-test-queue") == 7
    assert (
        value(m, "backbone.receiver.failures", backbone_receiver=broken.__qualname__)
        == (signals.receiver_failures[broken.__qualname__])
        >= 3
    )

    # no message id, client id or payload ever becomes an attribute
    ids = {e.msg_id for e in events.items if getattr(e, "msg_id", None)}
    for ps in m.values():
        for p in ps:
            attrs = p.attributes
            assert not {"messaging.message.id", "messaging.client.id"} & set(attrs)
            for v in attrs.values():
                assert v not in ids and v not in ("dev-1", "slow", "victim", "lonely")
                assert SECRET_PAYLOAD not in str(v) and SECRET_HEADER not in str(v)

    # once everybody is gone, no connection is left open
    assert value(after, "backbone.connections", backbone_role="server") == 0
    assert value(after, "backbone.connections", backbone_role="client") == 0


# --- Prometheus ----------------------------------------------------------------------------


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        return str(resp.read().decode())


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text as {(sample name, labels without the otel_scope ones): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = frozenset((k, v) for k, v in s.labels.items() if not k.startswith("otel_"))
            out[(s.name, labels)] = s.value
    return out


async def test_prometheus_scrape_endpoint_and_text(make_server, make_client, events):
    plugin = MetricsPlugin(prometheus_port=0)
    try:
        port = plugin.prometheus_port
        assert port
        async with make_server(plugins=[plugin]) as server:
            client = make_client("dev-1", server.port, plugins=[plugin])
            client.handler(lambda m: m.payload)
            async with running(client):
                for i in range(3):
                    assert await server.send_to("dev-1", i, wait_ack=True) == i
                await server.send_to("dev-1", "fire")
                await events.wait("message.processed", role="client", wait_ack=False)
                body = await asyncio.to_thread(fetch, f"http://127.0.0.1:{port}/metrics")
                text = plugin.prometheus_text()
        for page in (body, text):
            got = samples(page)
            server_send = frozenset(
                {
                    ("messaging_system", "backbone"),
                    ("messaging_operation_name", "send"),
                    ("messaging_operation_type", "send"),
                    ("backbone_role", "server"),
                }
            )
            assert got[("messaging_client_sent_messages_total", server_send)] == 4
            process = frozenset(
                {
                    ("messaging_system", "backbone"),
                    ("messaging_operation_name", "process"),
                    ("messaging_operation_type", "process"),
                    ("backbone_role", "client"),
                }
            )
            assert got[("messaging_client_consumed_messages_total", process)] == 4
            assert got[("messaging_process_duration_seconds_count", process)] == 4
            buckets = {
                dict(labels)["le"]
                for (name, labels) in got
                if name == "messaging_process_duration_seconds_bucket"
            }
            assert buckets == {str(float(b)) for b in MESSAGING_BUCKETS} | {"+Inf"}
            assert got[("messaging_client_operation_duration_seconds_count", server_send)] == 3
            assert (
                got[
                    (
                        "backbone_ack_duration_seconds_count",
                        frozenset({("backbone_role", "server")}),
                    )
                ]
                == 3
            )
            assert got[("backbone_connections", frozenset({("backbone_role", "server")}))] == 1
            assert any(name == "target_info" for name, _ in got)
    finally:
        plugin.shutdown()
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(fetch, f"http://127.0.0.1:{port}/metrics")


async def test_env_plugins_share_one_provider_and_one_endpoint(
    make_server, make_client, monkeypatch
):
    """BACKBONE_PLUGINS makes one plugin per Server/Client; with a port they would all try
    to bind it, so plugins with the same settings share the provider and endpoint."""
    monkeypatch.setenv("BACKBONE_PLUGINS", "metrics")
    monkeypatch.setenv("BACKBONE_PROMETHEUS_PORT", "0")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", raising=False)
    async with make_server() as server:
        client = make_client("dev-1", server.port)
        client.handler(lambda m: m.payload)
        (sp,) = server.plugins
        (cp,) = client.plugins
        assert isinstance(sp, MetricsPlugin) and isinstance(cp, MetricsPlugin) and sp is not cp
        try:
            assert sp.prometheus_port is not None and sp.prometheus_port == cp.prometheus_port
            assert sp.meter_provider is cp.meter_provider
            async with running(client):
                assert await server.send_to("dev-1", "x", wait_ack=True) == "x"
                got = samples(
                    await asyncio.to_thread(fetch, f"http://127.0.0.1:{sp.prometheus_port}/metrics")
                )
            for role in ("server", "client"):
                assert got[("backbone_connections", frozenset({("backbone_role", role)}))] == 1
            sp.shutdown()
            sp.shutdown()  # idempotent; the client's plugin still holds the endpoint
            assert "backbone_connections" in await asyncio.to_thread(
                fetch, f"http://127.0.0.1:{cp.prometheus_port}/metrics"
            )
        finally:
            sp.shutdown()
            cp.shutdown()
    again = MetricsPlugin(prometheus_port=0)  # after the last release: a fresh provider
    try:
        assert again.meter_provider is not sp.meter_provider
    finally:
        again.shutdown()


# --- OTLP --------------------------------------------------------------------------------------


async def test_otlp_export_to_a_real_receiver(make_server, make_client, monkeypatch):
    with OtlpReceiver() as rx:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "metrics-test")
        plugin = MetricsPlugin(export_interval=3600)  # otlp=None: on, from the environment
        try:
            async with make_server(plugins=[plugin]) as server:
                client = make_client("dev-1", server.port, plugins=[plugin])
                client.handler(lambda m: m.payload)
                async with running(client):
                    for i in range(5):
                        assert await server.send_to("dev-1", i, wait_ack=True) == i
        finally:
            await asyncio.to_thread(plugin.shutdown)  # the final export
        assert await rx.until(lambda r: "backbone.ack.duration" in r.metric_names())
    points = rx.metrics()
    assert {p.resource.get("service.name") for p in points} == {"metrics-test"}
    by = {(p.name, tuple(sorted(p.attributes.items()))): p for p in points}
    send = tuple(
        sorted(
            {
                "messaging.system": "backbone",
                "messaging.operation.name": "send",
                "messaging.operation.type": "send",
                "backbone.role": "server",
            }.items()
        )
    )
    sent = by[("messaging.client.sent.messages", send)]
    assert (sent.type, sent.value, sent.monotonic, sent.unit) == ("sum", 5, True, "{message}")
    rt = by[("messaging.client.operation.duration", send)]
    assert (rt.type, rt.count, rt.unit) == ("histogram", 5, "s")
    assert rt.explicit_bounds == MESSAGING_BUCKETS
    ack = by[("backbone.ack.duration", (("backbone.role", "server"),))]
    assert ack.count == 5 and ack.explicit_bounds == FINE_BUCKETS
    conns = by[("backbone.connections", (("backbone.role", "server"),))]
    assert (conns.type, conns.value, conns.monotonic) == ("sum", 0, False)


# --- configuration --------------------------------------------------------------------------


def test_entry_point_and_configuration(monkeypatch):
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("BACKBONE_PROMETHEUS_PORT", raising=False)
    plugin = load_plugin("metrics")
    try:
        assert isinstance(plugin, MetricsPlugin) and plugin.name == "metrics"
        assert plugin.prometheus_port is None  # no endpoint unless asked
        assert "target_info" in plugin.prometheus_text()
    finally:
        plugin.shutdown()

    reader = InMemoryMetricReader()
    given = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    try:
        with pytest.raises(RuntimeError, match="own provider"):
            MetricsPlugin(meter_provider=given).prometheus_text()
        # failures are counted per plugin instance (name@id); the metric sums them by name
        signals.receiver_failures["Gone.receive@7f01"] += 2
        signals.receiver_failures["Gone.receive@7f02"] += 3
        got = from_sdk(reader.get_metrics_data())
        assert value(got, "backbone.receiver.failures", backbone_receiver="Gone.receive") == 5
    finally:
        given.shutdown()
        for key in ("Gone.receive@7f01", "Gone.receive@7f02"):
            del signals.receiver_failures[key]

    monkeypatch.setenv("BACKBONE_PROMETHEUS_PORT", "ninety")
    with pytest.raises(ValueError, match="BACKBONE_PROMETHEUS_PORT"):
        MetricsPlugin()
    with pytest.raises(ValueError, match="export_interval"):
        MetricsPlugin(export_interval=0)


def test_remote_error_type_labels_are_bounded() -> None:
    """A remote error type is whatever the peer's RESULT says: 5,000 different ones made
    5,000 series, kept for ever.  The first MAX_ERROR_TYPES are labels, then _OTHER;
    backbone's own labels and local handler errors are not capped by them."""
    from plugins.metrics import MAX_ERROR_TYPES, _Tallies

    tallies = _Tallies(MeterProvider().get_meter("test"))
    labels = [tallies.remote_error(f"Peer{i}Error") for i in range(500)]
    assert labels[:MAX_ERROR_TYPES] == [f"Peer{i}Error" for i in range(MAX_ERROR_TYPES)]
    assert set(labels[MAX_ERROR_TYPES:]) == {"_OTHER"}
    assert tallies.remote_error("Peer0Error") == "Peer0Error"
    assert tallies.remote_error(None) is None
    assert tallies.messaging("send", "server", "timeout")["error.type"] == "timeout"
    assert tallies.own("client", "ValueError")["error.type"] == "ValueError"


def test_a_wait_the_caller_gave_up_is_labelled_cancelled() -> None:
    """An ack.failed because the caller cancelled its wait is not the peer going away
    (the trace said cancelled; the histogram said client_gone)."""
    from backbone.events import AckFailed

    reader = InMemoryMetricReader()
    plugin = MetricsPlugin(meter_provider=MeterProvider(metric_readers=[reader]))
    for reason in ("cancelled", "heartbeat_timeout"):
        event = AckFailed(role="server", msg_id="00", client_id="c", reason=reason, latency=0.1)
        plugin._ack_failed(None, event)
    points = [
        p
        for m in reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics
        if m.name == "messaging.client.operation.duration"
        for p in m.data.data_points
    ]
    assert sorted(p.attributes["error.type"] for p in points) == ["cancelled", "client_gone"]
