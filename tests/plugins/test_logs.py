"""The logging plugin over real loopback QUIC: one line per event (FR-023), kv and JSON
lines that parse back, the right levels, no payload ever, nothing built when disabled."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pytest

from backbone import RemoteError
from backbone.events import (
    AckTimedOut,
    Connected,
    Disconnected,
    Event,
    HeartbeatReceived,
    MessageSent,
)
from backbone.plugins import load_plugin, plugins_from_env
from plugins.logs import FIELDS, MESSAGE_KINDS, WARNING_KINDS, LoggingPlugin, format_kv

from ..test_e2e import running
from .test_metrics import SECRET_HEADER, SECRET_PAYLOAD, run_scenario

_PAIR = re.compile(r'([A-Za-z_][\w.]*)=("(?:[^"\\]|\\.)*"|[^\s"]+)')

#: what FR-023 asks to see in the log, all produced by run_scenario
FR_023 = {
    "server.started",
    "server.stopped",
    "connected",
    "disconnected",
    "heartbeat.timed_out",
    "state.changed",
    "connect.failed",
    "reconnect.scheduled",
    "protocol.violated",
    "message.sent",
    "message.received",
    "ack.sent",
    "ack.received",
    "ack.timed_out",
    "ack.failed",
    "ack.late",
    "send.rejected",
}
NOT_LOGGED = {"message.processed", "heartbeat.received", "heartbeat.acknowledged"}


def parse_kv(line: str) -> dict[str, str]:
    """A logfmt line back into a dict; every byte of the line must be accounted for."""
    pairs = list(_PAIR.finditer(line))
    assert " ".join(m.group(0) for m in pairs) == line, line
    out: dict[str, str] = {}
    for m in pairs:
        key, raw = m.groups()
        assert key not in out, (key, line)
        out[key] = json.loads(raw) if raw.startswith('"') else raw
    return out


def event_lines(caplog: pytest.LogCaptureFixture, name: str = "backbone.events") -> list[Any]:
    return [r for r in caplog.records if r.name == name]


def from_plugin_senders(e: Event) -> bool:
    """run_scenario's ``victim`` client runs no plugin; everything else does."""
    return not (e.role == "client" and getattr(e, "client_id", None) == "victim")


async def test_one_kv_line_per_event(make_server, make_client, events, certs, caplog):
    caplog.set_level(logging.DEBUG, logger="backbone.events")
    plugin = LoggingPlugin(format="kv")
    await run_scenario(make_server, make_client, events, certs, [plugin])

    records = event_lines(caplog)
    expected = [e for e in events.items if e.kind not in NOT_LOGGED and from_plugin_senders(e)]
    # exactly one line per event, in order (each record carries its event)
    assert [r.backbone_event for r in records] == expected
    assert {e.kind for e in expected} >= FR_023

    for r in records:
        e = r.backbone_event
        line = r.getMessage()
        d = parse_kv(line)
        assert (d["event"], d["role"]) == (e.kind, e.role)
        if e.kind in WARNING_KINDS:
            assert r.levelno == logging.WARNING
        else:  # per-message lines at DEBUG by default, the rest at INFO
            assert r.levelno == (logging.DEBUG if e.kind in MESSAGE_KINDS else logging.INFO)
        for name in FIELDS.get(e.kind, ()):
            v = getattr(e, name)
            if v is None:
                assert name not in d
            elif isinstance(v, bool):
                assert d[name] == ("true" if v else "false")
            elif isinstance(v, float):
                assert float(d[name]) == pytest.approx(v, rel=1e-5)
            else:
                assert d[name] == str(v), (name, line)
        if e.kind in ("message.sent", "message.received"):
            assert d["msg_id"] == e.msg_id and len(d["msg_id"]) == 32
            assert int(d["size"]) == e.size > 0
        assert "headers" not in d
        assert SECRET_PAYLOAD not in line and SECRET_HEADER not in line

    def one(kind: str, **match: Any) -> dict[str, str]:
        found = [
            parse_kv(r.getMessage())
            for r in records
            if r.backbone_event.kind == kind
            and all(getattr(r.backbone_event, k) == v for k, v in match.items())
        ]
        assert found, (kind, match)
        return found[0]

    evicted = one("disconnected", role="server", client_id="victim")
    assert evicted["reason"] == "heartbeat_timeout"
    assert one("heartbeat.timed_out", role="server")["client_id"] == "victim"
    retry = one("reconnect.scheduled", client_id="lonely")
    assert retry["reason"] in ("refused", "timeout") and float(retry["delay"]) > 0
    assert one("ack.received", role="server", ok=False)["error_type"] == "ValueError"
    assert one("ack.timed_out", role="server")["timeout"] == "0.2"
    assert one("ack.failed", role="server")["reason"] == "heartbeat_timeout"
    assert one("send.rejected", reason="backpressure")["client_id"] == "slow"
    assert one("protocol.violated")["code_name"] == "PROTOCOL_ERROR"
    # nothing of the payload anywhere in the captured logs, from any logger
    assert SECRET_PAYLOAD not in caplog.text and SECRET_HEADER not in caplog.text


async def test_json_lines_and_headers_only_when_asked(make_server, make_client, events, caplog):
    caplog.set_level(logging.INFO)
    quiet = LoggingPlugin(format="json", logger="test.quiet", message_level="INFO")
    loud = LoggingPlugin(format="json", logger="test.loud", payloads=True, message_level="INFO")
    async with make_server(plugins=[quiet, loud]) as server:
        client = make_client("dev-1", server.port, plugins=[quiet, loud])

        @client.handler
        def handle(m: Any) -> Any:
            if m.payload == "fail":
                raise RuntimeError("no")
            return m.payload

        async with running(client):
            assert await server.send_to("dev-1", SECRET_PAYLOAD, wait_ack=True) == SECRET_PAYLOAD
            with pytest.raises(RemoteError):
                await server.send_to("dev-1", "fail", wait_ack=True)
            mid = await server.send_to("dev-1", {"p": SECRET_PAYLOAD}, headers={"x": SECRET_HEADER})
            await events.wait("message.processed", msg_id=mid)

    for name, with_headers in (("test.quiet", False), ("test.loud", True)):
        records = event_lines(caplog, name)
        assert records
        for r in records:
            d = json.loads(r.getMessage())
            e = r.backbone_event
            assert (d["event"], d["role"]) == (e.kind, e.role)
            assert SECRET_PAYLOAD not in r.getMessage()
            assert ("headers" in d) == (
                with_headers and e.kind in ("message.sent", "message.received") and e.msg_id == mid
            )
        sent = [
            json.loads(r.getMessage()) for r in records if r.backbone_event.kind == "message.sent"
        ]
        assert [(d["size"], d["wait_ack"]) for d in sent][-1] == (
            len(json.dumps({"p": SECRET_PAYLOAD}, separators=(",", ":"))),
            False,
        )
        assert all(len(d["msg_id"]) == 32 for d in sent)
        result = [
            json.loads(r.getMessage()) for r in records if r.backbone_event.kind == "ack.received"
        ]
        assert [(d["ok"], d.get("error_type")) for d in result] == [
            (True, None),
            (False, "RuntimeError"),
        ]
        if with_headers:
            got = [
                json.loads(r.getMessage())
                for r in records
                if r.backbone_event.kind == "message.received" and r.backbone_event.msg_id == mid
            ]
            assert got[0]["headers"] == {"x": SECRET_HEADER}


async def test_heartbeats_only_when_enabled(make_server, make_client, events, caplog):
    caplog.set_level(logging.DEBUG, logger="backbone.events")
    plugin = LoggingPlugin(heartbeats=True)
    assert not {s.name for s in LoggingPlugin().receivers()} & {"heartbeat"}
    async with make_server(plugins=[plugin]) as server:
        client = make_client("dev-1", server.port, plugins=[plugin])
        async with running(client):
            await events.wait("heartbeat.received", role="server")
            await events.wait("heartbeat.acknowledged", role="client")
    beats = [r for r in event_lines(caplog) if r.backbone_event.kind.startswith("heartbeat.")]
    assert {r.backbone_event.kind for r in beats} == {
        "heartbeat.received",
        "heartbeat.acknowledged",
    }
    assert {r.levelno for r in beats} == {logging.DEBUG}
    rtt = [
        parse_kv(r.getMessage()) for r in beats if r.backbone_event.kind == "heartbeat.acknowledged"
    ]
    assert float(rtt[0]["rtt"]) > 0


def test_no_line_is_built_below_the_logger_level(caplog):
    caplog.set_level(logging.WARNING, logger="backbone.events")
    plugin = LoggingPlugin()
    built: list[str] = []
    real = plugin._format_line

    def counting(event: Event, fields: tuple[str, ...]) -> str:
        built.append(event.kind)
        return real(event, fields)

    plugin._format_line = counting  # type: ignore[method-assign]
    sent = MessageSent(role="server", msg_id="ab" * 16, client_id="c", size=3, wait_ack=False)
    beat = HeartbeatReceived(role="server", client_id="c", session_id="s")
    timeout = AckTimedOut(role="server", msg_id="ab" * 16, client_id="c", timeout=1.0)
    for e in (sent, beat, timeout):
        plugin.log_event(None, e)
    assert built == ["ack.timed_out"]
    assert [r.backbone_event for r in event_lines(caplog)] == [timeout]


def test_message_lines_can_have_their_own_level(caplog):
    caplog.set_level(logging.INFO, logger="backbone.events")
    plugin = LoggingPlugin(message_level=logging.DEBUG)
    sent = MessageSent(role="server", msg_id="ab" * 16, client_id="c", size=3, wait_ack=True)
    up = Connected(role="server", client_id="c", session_id="s", peer="h:1")
    timeout = AckTimedOut(role="server", msg_id="ab" * 16, client_id="c", timeout=1.0)
    for e in (sent, up, timeout):
        plugin.log_event(None, e)
    assert [(r.backbone_event, r.levelno) for r in event_lines(caplog)] == [
        (up, logging.INFO),
        (timeout, logging.WARNING),
    ]
    caplog.set_level(logging.DEBUG, logger="backbone.events")
    plugin.log_event(None, sent)
    assert event_lines(caplog)[-1].levelno == logging.DEBUG
    loud = LoggingPlugin(message_level="INFO")
    loud.log_event(None, sent)
    assert event_lines(caplog)[-1].levelno == logging.INFO


def test_message_events_are_not_built_for_a_logger_that_would_drop_them(caplog):
    """By default per-message lines are DEBUG; with the logger at INFO the plugin does
    not subscribe to the per-message steps (message.sent, message.received, acks), so
    the core builds neither their events nor their batches."""
    from backbone import signals

    sender = object()
    caplog.set_level(logging.INFO, logger="backbone.events")
    quiet = LoggingPlugin()
    quiet.install(sender)
    try:
        assert not signals.wants(signals.on_message_received)
        assert not signals.wants(signals.on_message_sent)
        assert not signals.wants(signals.on_ack) and not signals.batching()
        assert signals.wants(signals.on_connected) and signals.wants(signals.on_ack_timeout)
        assert signals.wants(signals.on_ack_late)
    finally:
        quiet.uninstall(sender)
    loud = LoggingPlugin(message_level="INFO")
    loud.install(sender)
    try:
        assert signals.batching("message.sent")  # the per-message lines come from batches
        assert not signals.batching("message.processed")  # which it does not log
        assert not signals.wants(signals.on_message_sent)
    finally:
        loud.uninstall(sender)


def test_kv_values_are_quoted_and_escaped():
    odd = 'we "ird"=id \\ x'
    e = Disconnected(
        role="server",
        client_id=odd,
        session_id="s-1",
        reason="protocol_error",
        code=7,
        detail="line one\nline\ttwo",
        duration=1.5,
    )
    d = parse_kv(format_kv(e, FIELDS["disconnected"]))
    assert d == {
        "event": "disconnected",
        "role": "server",
        "client_id": odd,
        "session_id": "s-1",
        "reason": "protocol_error",
        "code": "7",
        "detail": "line one\nline\ttwo",
        "duration": "1.5",
    }
    plain = Connected(role="client", client_id="dev-1", session_id="s", peer="h:1")
    assert format_kv(plain, FIELDS["connected"]) == (
        "event=connected role=client client_id=dev-1 session_id=s peer=h:1"
    )
    empty = parse_kv(
        format_kv(
            Disconnected(role="server", client_id="c", session_id="s", reason="closed", detail=""),
            ("detail",),
        )
    )
    assert empty["detail"] == ""


def test_format_from_environment_and_entry_point(monkeypatch):
    monkeypatch.setenv("BACKBONE_LOG_FORMAT", "json")
    assert LoggingPlugin().format == "json"
    assert LoggingPlugin(format="kv").format == "kv"  # the argument wins
    plugin = load_plugin("logging")
    assert isinstance(plugin, LoggingPlugin) and plugin.name == "logging"
    assert plugin.format == "json" and plugin.logger.name == "backbone.events"
    # BACKBONE_PLUGINS options arrive as JSON or strings: level names work
    monkeypatch.setenv("BACKBONE_PLUGINS", "logging:level=DEBUG:message_level=5:payloads=true")
    (configured,) = plugins_from_env()
    assert isinstance(configured, LoggingPlugin)
    assert (configured.level, configured.message_level, configured.payloads) == (
        logging.DEBUG,
        5,
        True,
    )
    with pytest.raises(ValueError, match="unknown log level"):
        LoggingPlugin(level="LOUD")
    monkeypatch.setenv("BACKBONE_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        LoggingPlugin()
    monkeypatch.delenv("BACKBONE_LOG_FORMAT")
    assert LoggingPlugin().format == "kv"


def test_an_unknown_kind_is_logged_with_all_its_fields(caplog):
    """A newer core may add event kinds: they are logged at ``level`` with every field."""

    class Invented(Event):
        kind: str = "invented.thing"
        client_id: str
        how_many: int
        headers: dict[str, str] | None = None

    caplog.set_level(logging.INFO, logger="backbone.events")
    e = Invented(role="server", client_id="c", how_many=3, headers={"h": SECRET_HEADER})
    LoggingPlugin().log_event(None, e)
    (r,) = event_lines(caplog)
    assert r.levelno == logging.INFO
    assert parse_kv(r.getMessage()) == {
        "event": "invented.thing",
        "role": "server",
        "client_id": "c",
        "how_many": "3",
    }


def test_uninstall_disconnects_what_install_connected_whatever_the_level_now() -> None:
    """Installed with DEBUG on (so it takes the per-message batches), then the level is
    raised: uninstall asked receivers() again, missed the batch receiver, and left it
    connected - the core kept building rows for every message for nobody."""
    from backbone import signals

    logger = logging.getLogger("backbone.test.uninstall")
    logger.setLevel(logging.DEBUG)
    plugin = LoggingPlugin(logger=logger)
    sender = object()
    plugin.install(sender)
    try:
        assert plugin.log_batch in signals.on_events_batched.receivers.values()
        logger.setLevel(logging.INFO)
    finally:
        plugin.uninstall(sender)
    assert plugin.log_batch not in signals.on_events_batched.receivers.values()
    assert not signals.batching("message.sent")


def test_the_last_uninstall_drops_what_any_install_connected() -> None:
    """One instance on two senders: installed on A with DEBUG on (batches taken), on B
    after the level was raised (no batches).  Uninstalling both must leave nothing
    connected: the batch receiver of A's install stayed listed."""
    from backbone import signals

    logger = logging.getLogger("backbone.test.two-senders")
    logger.setLevel(logging.DEBUG)
    plugin = LoggingPlugin(logger=logger)
    a, b = object(), object()
    plugin.install(a)
    logger.setLevel(logging.INFO)
    plugin.install(b)
    plugin.uninstall(a)
    plugin.uninstall(b)
    assert plugin.log_batch not in signals.on_events_batched.receivers.values()
    assert plugin.log_event not in signals.on_connected.receivers.values()
    assert not signals.batching("message.sent")


def test_what_installs_connected_is_remembered_once_each() -> None:
    """One instance on a long-lived sender and on many short-lived ones: the record of
    what installs connected must not grow by a row per install."""
    logger = logging.getLogger("backbone.test.many-senders")
    plugin = LoggingPlugin(logger=logger)
    server = object()
    plugin.install(server)
    try:
        for _ in range(200):
            client = object()
            plugin.install(client)
            plugin.uninstall(client)
        assert len(plugin._ever_connected) == len(plugin.receivers())
    finally:
        plugin.uninstall(server)
    assert not plugin._ever_connected
