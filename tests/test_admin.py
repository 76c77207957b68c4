"""The admin HTTP API against a real server with real clients over loopback QUIC, and
its agreement with docs/openapi.json: the same routes, and every response validates
against the documented schema for its status."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from backbone import (
    AckTimeout,
    Backpressure,
    ClientGone,
    ClientNotConnected,
    ConfigError,
    InvalidHeaders,
    InvalidPayload,
    Message,
    PayloadTooLarge,
    RemoteError,
    TooManyPending,
    signals,
)
from backbone.admin import ROUTES, api_error, create_app, run_admin
from backbone.events import Event
from backbone.message import ClientInfo
from backbone.plugins import Plugin
from backbone.stats import Stats

from .test_e2e import running

OPENAPI = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
DOC: dict[str, Any] = json.loads(OPENAPI.read_text())


# --- a small JSON Schema (2020-12 subset) validator, plus jsonschema when installed -----------


def _resolve(ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = DOC
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _is(value: Any, kind: str) -> bool:
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    if kind == "array":
        return isinstance(value, list)
    if kind == "object":
        return isinstance(value, dict)
    raise AssertionError(f"unknown type {kind}")


def problems(schema: dict[str, Any], value: Any, at: str = "$") -> list[str]:
    """Why ``value`` does not fit ``schema`` (empty: it fits)."""
    if "$ref" in schema:
        return problems(_resolve(schema["$ref"]), value, at)
    out: list[str] = []
    if "type" in schema:
        kinds = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
        if not any(_is(value, k) for k in kinds):
            return [f"{at}: {value!r} is not of type {kinds}"]
    if "const" in schema and (value != schema["const"] or type(value) is not type(schema["const"])):
        out.append(f"{at}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{at}: {value!r} not in {schema['enum']}")
    if "oneOf" in schema:
        fits = sum(not problems(s, value, at) for s in schema["oneOf"])
        if fits != 1:
            out.append(f"{at}: fits {fits} of oneOf, not exactly 1")
    if "anyOf" in schema and not any(not problems(s, value, at) for s in schema["anyOf"]):
        out.append(f"{at}: fits none of anyOf")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                out.append(f"{at}: {name!r} is missing")
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in props:
                out += problems(props[name], item, f"{at}.{name}")
            elif extra is False:
                out.append(f"{at}: unexpected property {name!r}")
            elif isinstance(extra, dict):
                out += problems(extra, item, f"{at}.{name}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += problems(schema["items"], item, f"{at}[{i}]")
    if _is(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            out.append(f"{at}: {value} < {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            out.append(f"{at}: {value} > {schema['maximum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            out.append(f"{at}: {value} <= {schema['exclusiveMinimum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            out.append(f"{at}: {value!r} does not match {schema['pattern']}")
        if "minLength" in schema and len(value) < schema["minLength"]:
            out.append(f"{at}: {value!r} is too short")
    return out


def validate(schema: dict[str, Any], value: Any) -> None:
    found = problems(schema, value)
    assert not found, found
    try:
        import jsonschema
    except ImportError:  # the small validator above already checked
        return
    jsonschema.Draft202012Validator({**DOC, **schema}).validate(value)


def _template(path: str) -> str:
    """The documented path of a concrete request path."""
    for _method, route, _h in ROUTES:
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", route) + "$"
        if re.match(pattern, path):
            return route
    return path


async def checked(resp: aiohttp.ClientResponse, path: str | None = None) -> Any:
    """The response body, after checking that its status is documented for the
    operation and that the body validates against the documented schema."""
    template = path or _template(resp.url.path)
    operation = DOC["paths"].get(template, {}).get(resp.method.lower())
    body: Any
    if resp.content_type == "application/json":
        body = await resp.json()
    else:
        body = await resp.text()
    if operation is None:  # an undocumented path or method: must be a JSON error
        assert resp.status in (404, 405), (resp.status, body)
        validate({"$ref": "#/components/schemas/Error"}, body)
        return body
    documented = operation["responses"]
    assert str(resp.status) in documented, (
        f"{resp.method} {template} answered {resp.status}, not documented: {body}"
    )
    spec = documented[str(resp.status)]
    if "$ref" in spec:
        spec = _resolve(spec["$ref"])
    content = spec["content"]
    assert resp.content_type in content, (resp.content_type, list(content))
    validate(content[resp.content_type]["schema"], body)
    return body


# --- fixtures -------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def api(server: Any, token: str | None = None) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(create_app(server, token))) as http:
        yield http


def echo_handler(msg: Message) -> Any:
    payload = msg.payload
    if isinstance(payload, bytes):
        return payload[::-1]
    if isinstance(payload, dict) and payload.get("op") == "fail":
        raise ValueError("disk full")
    return {"echo": payload}


class FakeMetrics(Plugin):
    name = "metrics"

    def prometheus_text(self) -> str:
        return "# HELP fake_total A fake.\n# TYPE fake_total counter\nfake_total 7.0\n"


# --- the document and the app agree -------------------------------------------------------------


def test_every_route_is_documented_and_every_documented_route_exists(certs: Any) -> None:
    from backbone import Server

    server = Server("127.0.0.1", 0, certfile=str(certs.server_cert), keyfile=str(certs.server_key))
    app = create_app(server)
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
    }
    documented = {
        (method, path)
        for path, operations in DOC["paths"].items()
        for method in operations
        if method in ("get", "post", "put", "patch", "delete")
    }
    assert served == documented
    assert DOC["openapi"].startswith("3.1")


def test_the_document_is_valid_openapi() -> None:
    import openapi_spec_validator  # a dev dependency: never skipped

    openapi_spec_validator.validate(DOC)


def test_schemas_list_every_field_of_the_models() -> None:
    schemas = DOC["components"]["schemas"]
    assert set(schemas["ClientInfo"]["properties"]) == set(ClientInfo.model_fields)
    assert set(schemas["ClientInfo"]["required"]) == set(ClientInfo.model_fields)
    stats_fields = {f.name for f in dataclasses.fields(Stats)}
    assert set(schemas["Stats"]["properties"]) == stats_fields


# --- every endpoint, checked against the document -------------------------------------------------


class MemoryHistory(Plugin):
    """The history plugin's query interface over events kept in memory."""

    name = "history"

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Event] = []

    def receivers(self) -> dict[Any, Any]:
        return {signals.on_event: self._record}

    def _record(self, sender: Any, event: Event) -> None:
        if getattr(event, "client_id", None) is not None:
            self.events.append(event)

    def history(
        self,
        client_id: str,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
        kinds: list[str] | None = None,
        role: str | None = None,
    ) -> list[Event]:
        def wanted(kind: str) -> bool:
            return kinds is None or any(
                kind == k or (k.endswith(".*") and kind.startswith(k[:-1])) for k in kinds
            )

        found = [
            e
            for e in self.events
            if getattr(e, "client_id", None) == client_id
            and (since is None or e.at >= since)
            and (until is None or e.at < until)
            and (role is None or e.role == role)
            and wanted(e.kind)
        ]
        return found[-limit:]

    def session_view(self, client_id: str) -> dict[str, Any]:
        return {"client_id": client_id, "connected": True, "disconnects": 0}

    def flush(self, timeout: float) -> bool:
        return True


async def test_every_endpoint_answers_as_documented(make_server: Any, make_client: Any) -> None:
    history = MemoryHistory()
    async with make_server(plugins=[history]) as server:
        client = make_client("dev-1", server.port)
        client.handler(echo_handler)
        async with running(client), api(server) as http:
            assert await checked(await http.get("/healthz")) == {"status": "ok"}
            assert await checked(await http.get("/readyz")) == {
                "ready": True,
                "listening": True,
                "draining": False,
            }
            page = await checked(await http.get("/clients"))
            assert page["total"] == 1 and page["clients"][0]["client_id"] == "dev-1"
            info = await checked(await http.get("/clients/dev-1"))
            assert info["client_id"] == "dev-1" and info["remote_address"].startswith("127.0.0.1:")

            # send: fire and forget, WaitAck, bytes, errors
            queued = await checked(
                await http.post("/clients/dev-1/messages", json={"payload": {"op": "x"}})
            )
            assert queued["wait_ack"] is False and len(queued["msg_id"]) == 32
            done = await checked(
                await http.post(
                    "/clients/dev-1/messages", json={"payload": {"op": "y"}, "wait_ack": True}
                )
            )
            assert done == {"client_id": "dev-1", "wait_ack": True, "result": {"echo": {"op": "y"}}}
            raw = await checked(
                await http.post(
                    "/clients/dev-1/messages",
                    json={
                        "payload_base64": base64.b64encode(b"\x00\x01\xff").decode(),
                        "wait_ack": True,
                    },
                )
            )
            assert base64.b64decode(raw["result"]["$base64"]) == b"\xff\x01\x00"
            resp = await http.post(
                "/clients/dev-1/messages", json={"payload": {"op": "fail"}, "wait_ack": True}
            )
            assert resp.status == 502
            error = (await checked(resp))["error"]
            assert error["code"] == "remote_error"
            assert (error["remote_type"], error["remote_message"]) == ("ValueError", "disk full")
            resp = await http.post("/clients/nobody/messages", json={"payload": 1})
            assert resp.status == 404
            assert (await checked(resp))["error"]["code"] == "not_connected"
            resp = await http.get("/clients/nobody")
            assert resp.status == 404
            assert (await checked(resp))["error"]["code"] == "not_connected"

            # broadcast
            report = await checked(
                await http.post("/broadcast", json={"payload": "hi", "wait_ack": True})
            )
            assert report["clients"] == report["ok"] == 1 and report["failed"] == 0
            assert report["outcomes"] == {"dev-1": {"ok": True, "result": {"echo": "hi"}}}
            report = await checked(await http.post("/broadcast", json={"payload": "hi"}))
            assert report["sent_to"] == ["dev-1"] and report["outcomes"]["dev-1"] == {"ok": True}

            # figures
            stats = await checked(await http.get("/stats"))
            assert stats["connections"] == 1 and stats["acks"] >= 4
            metrics = await checked(await http.get("/metrics"))
            families = {f.name: f for f in text_string_to_metric_families(metrics)}
            assert families["backbone_connections"].samples[0].value == 1
            assert families["backbone_ready"].samples[0].value == 1

            # history (the plugin writes in a thread: let it catch up)
            assert await asyncio.to_thread(history.flush, 5.0)
            hist = await checked(await http.get("/clients/dev-1/history"))
            kinds = [e["kind"] for e in hist["events"]]
            assert "connected" in kinds and "ack.received" in kinds
            assert hist["count"] == len(hist["events"])
            assert hist["session"]["client_id"] == "dev-1" and hist["session"]["connected"]
            hist = await checked(await http.get("/clients/dev-1/history?kind=ack.*&limit=2"))
            assert len(hist["events"]) == 2
            assert all(e["kind"].startswith("ack.") for e in hist["events"])
            hist = await checked(
                await http.get(
                    "/clients/dev-1/history", params={"kind": "connected", "role": "server"}
                )
            )
            assert [e["kind"] for e in hist["events"]] == ["connected"]

            # unknown endpoint and method: JSON errors too
            resp = await http.get("/nope")
            assert resp.status == 404
            assert (await checked(resp, "/nope"))["error"]["code"] == "not_found"
            resp = await http.delete("/clients")
            assert resp.status == 405
            assert (await checked(resp, "/x"))["error"]["code"] == "method_not_allowed"


async def test_waitack_timeout_is_504(make_server: Any, make_client: Any) -> None:
    async with make_server() as server:
        client = make_client("slow", server.port)
        release = asyncio.Event()

        @client.handler
        async def slow(msg: Message) -> str:
            await release.wait()
            return "late"

        async with running(client), api(server) as http:
            resp = await http.post(
                "/clients/slow/messages", json={"payload": 1, "wait_ack": True, "timeout": 0.2}
            )
            assert resp.status == 504
            assert (await checked(resp))["error"]["code"] == "ack_timeout"
            release.set()


async def test_history_without_the_plugin_is_501(make_server: Any) -> None:
    async with make_server() as server, api(server) as http:
        resp = await http.get("/clients/dev-1/history")
        assert resp.status == 501
        error = (await checked(resp))["error"]
        assert error["code"] == "history_unavailable" and "history" in error["message"]


async def test_metrics_come_from_the_metrics_plugin_when_there_is_one(make_server: Any) -> None:
    async with make_server(plugins=[FakeMetrics()]) as server, api(server) as http:
        resp = await http.get("/metrics")
        assert resp.headers["Content-Type"].startswith("text/plain")
        assert "fake_total 7.0" in await checked(resp)


async def test_client_list_pages_sorts_and_filters(make_server: Any, make_client: Any) -> None:
    async with make_server() as server:
        clients = [make_client(cid, server.port) for cid in ("a-1", "a-2", "a-3", "b-1")]
        async with running(*clients), api(server) as http:

            async def ids(**query: Any) -> list[str]:
                page = await checked(await http.get("/clients", params=query))
                return [c["client_id"] for c in page["clients"]]

            assert await ids() == ["a-1", "a-2", "a-3", "b-1"]
            assert await ids(order="desc") == ["b-1", "a-3", "a-2", "a-1"]
            assert await ids(prefix="a-", limit=2, offset=1) == ["a-2", "a-3"]
            page = await checked(await http.get("/clients", params={"prefix": "a-", "limit": 1}))
            assert page["total"] == 3 and len(page["clients"]) == 1
            by_time = [i.client_id for i in sorted(server.clients(), key=lambda i: i.connected_at)]
            assert await ids(sort="connected_at") == by_time
            assert await ids(sort="connected_at", order="desc") == by_time[::-1]
            for key in ("rtt", "last_heartbeat_at", "pending_acks"):
                assert sorted(await ids(sort=key)) == ["a-1", "a-2", "a-3", "b-1"]
            assert await ids(prefix="zzz") == []


BAD_QUERIES = [
    "/clients?limit=0",
    "/clients?limit=1001",
    "/clients?limit=ten",
    "/clients?offset=-1",
    "/clients?sort=name",
    "/clients?order=up",
    "/clients?sorted=rtt",
    "/clients?limit=1&limit=2",
    "/stats?verbose=1",
    "/clients/dev-1?x=1",
    "/clients/dev-1/history?since=yesterday",
    "/clients/dev-1/history?until=nan",
    "/clients/dev-1/history?kind=nope",
    "/clients/dev-1/history?kind=zzz.*",
    "/clients/dev-1/history?role=both",
    "/clients/dev-1/history?limit=100000",
]

BAD_BODIES: list[tuple[bytes | str, int]] = [
    (b"", 400),
    (b"{not json", 400),
    (b"\xff\xfe", 400),
    (b"[1, 2]", 422),
    (b'"payload"', 422),
    (b"{}", 422),
    (b'{"payload": 1, "payload_base64": "AA=="}', 422),
    (b'{"payload_base64": "not base64!"}', 422),
    (b'{"payload": 1, "wait_ack": "yes"}', 422),
    (b'{"payload": 1, "wait_ack": 1}', 422),
    (b'{"payload": 1, "timeout": "5"}', 422),
    (b'{"payload": 1, "timeout": -1}', 422),
    (b'{"payload": 1, "timeout": 0}', 422),
    (b'{"payload": 1, "timeout": 1e9}', 422),
    (b'{"payload": 1, "headers": {"a": 1}}', 422),
    (b'{"payload": 1, "colour": "red"}', 422),
]


async def test_bad_requests_get_a_4xx_json_error_never_a_500(make_server: Any) -> None:
    async with make_server(plugins=[FakeHistory()]) as server, api(server) as http:
        for url in BAD_QUERIES:
            resp = await http.get(url)
            assert resp.status == 400, url
            error = (await checked(resp))["error"]
            assert error["code"] == "bad_query" and error["message"], url
        for path in ("/clients/dev-1/messages", "/broadcast"):
            for body, status in BAD_BODIES:
                resp = await http.post(path, data=body)
                assert resp.status == status, (path, body, await resp.text())
                error = (await checked(resp))["error"]
                assert error["code"] in ("bad_json", "invalid_request"), error
        resp = await http.post("/broadcast", data=b'{"payload": 1, "wait_ack": "x"}')
        details = (await checked(resp))["error"]["details"]
        assert details[0]["field"] == "wait_ack"


class FakeHistory(Plugin):
    """Answers queries without storing anything (for request validation)."""

    name = "history"

    def history(self, client_id: str, **options: Any) -> list[Any]:
        return []

    def session_view(self, client_id: str) -> None:
        return None


async def test_payload_too_large_is_413(make_server: Any, make_client: Any) -> None:
    async with make_server(max_payload=1000) as server:
        client = make_client("dev-1", server.port)
        async with running(client), api(server) as http:
            resp = await http.post("/clients/dev-1/messages", json={"payload": "x" * 2000})
            assert resp.status == 413
            assert (await checked(resp))["error"]["code"] == "payload_too_large"
            # a body past the request size limit is refused before it is parsed
            resp = await http.post("/clients/dev-1/messages", data=b"x" * 200_000)
            assert resp.status == 413
            assert (await checked(resp))["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (ClientNotConnected("d"), 404, "not_connected"),
        (ClientGone("m", "d", "closed"), 409, "client_gone"),
        (AckTimeout("m", "d", 1.0), 504, "ack_timeout"),
        (RemoteError("m", "d", "KeyError", "k"), 502, "remote_error"),
        (Backpressure("d", 10, 5), 429, "backpressure"),
        (TooManyPending("client", 5), 503, "too_many_pending"),
        (PayloadTooLarge(10, 5), 413, "payload_too_large"),
        (InvalidHeaders("too long"), 422, "invalid_headers"),
        (InvalidPayload("too deep"), 422, "invalid_payload"),
    ],
)
def test_backbone_errors_map_to_documented_statuses(exc: Any, status: int, code: str) -> None:
    error = api_error(exc)
    assert (error.status, error.code) == (status, code)
    send = DOC["paths"]["/clients/{client_id}/messages"]["post"]["responses"]
    assert str(status) in send
    validate(
        {"$ref": "#/components/schemas/Error"},
        {"error": {"code": code, **error.extra, "message": error.message}},
    )
    if status in (429, 503):
        assert error.headers["Retry-After"] == "1"


# --- readiness, tokens, binding ----------------------------------------------------------------


async def test_readyz_is_503_while_draining(
    make_server: Any, make_client: Any, events: Any
) -> None:
    async with make_server(close_grace=10.0) as server:
        client = make_client("dev-1", server.port)
        release = asyncio.Event()
        started = asyncio.Event()

        @client.handler
        async def hold(msg: Message) -> str:
            started.set()
            await release.wait()
            return "done"

        async with running(client), api(server) as http:
            pending = asyncio.ensure_future(server.send_to("dev-1", 1, wait_ack=True, timeout=10))
            await started.wait()
            stopping = asyncio.ensure_future(server.stop())
            # stop() marks the server draining, then tells the client to go away
            await events.wait("goaway.sent", client_id="dev-1")
            resp = await http.get("/readyz")
            assert resp.status == 503
            body = await checked(resp)
            assert body["draining"] is True and body["ready"] is False
            families = {
                f.name: f
                for f in text_string_to_metric_families(await (await http.get("/metrics")).text())
            }
            assert families["backbone_draining"].samples[0].value == 1
            assert (await http.get("/healthz")).status == 200
            release.set()
            assert await pending == "done"
            await stopping
            resp = await http.get("/readyz")
            assert resp.status == 503 and (await checked(resp))["listening"] is False


async def test_a_token_guards_everything_but_the_probes(make_server: Any) -> None:
    token = "s3cret-token-0123456789"
    async with make_server() as server, api(server, token) as http:
        for path in ("/clients", "/stats", "/metrics", "/clients/x", "/clients/x/history"):
            resp = await http.get(path)
            assert resp.status == 401, path
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await checked(resp))["error"]["code"] == "unauthorized"
        resp = await http.post("/broadcast", json={"payload": 1})
        assert resp.status == 401
        for wrong in ("Bearer nope", f"Basic {token}", token, ""):
            resp = await http.get("/stats", headers={"Authorization": wrong})
            assert resp.status == 401, wrong
        assert (await http.get("/healthz")).status == 200
        assert (await http.get("/readyz")).status == 200
        resp = await http.get("/stats", headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 200
        await checked(resp)


async def test_run_admin_serves_real_http_and_refuses_an_open_bind(make_server: Any) -> None:
    async with make_server() as server:
        with pytest.raises(ConfigError, match="token"):
            await run_admin(server, "0.0.0.0", 0)
        admin = await run_admin(server, "127.0.0.1", 0)
        try:
            assert admin.port > 0 and admin.url == f"http://127.0.0.1:{admin.port}"
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{admin.url}/clients") as resp,
            ):
                assert resp.status == 200
                assert (await resp.json())["total"] == 0
        finally:
            await admin.close()
        # with a token, any address is allowed
        admin = await run_admin(server, "0.0.0.0", 0, token="x" * 16)
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{admin.port}/stats") as resp,
            ):
                assert resp.status == 401
        finally:
            await admin.close()


async def test_client_ids_with_slashes_spaces_and_unicode(
    make_server: Any, make_client: Any
) -> None:
    from urllib.parse import quote

    async with make_server() as server:
        ids = ("site/dev 1", "é-ü?#%")
        clients = [make_client(cid, server.port) for cid in ids]
        for c in clients:
            c.handler(echo_handler)
        async with running(*clients), api(server) as http:
            for cid in ids:
                path = f"/clients/{quote(cid, safe='')}"
                assert (await checked(await http.get(path), "/clients/{client_id}"))[
                    "client_id"
                ] == cid
                resp = await http.post(f"{path}/messages", json={"payload": 1, "wait_ack": True})
                body = await checked(resp, "/clients/{client_id}/messages")
                assert body == {"client_id": cid, "wait_ack": True, "result": {"echo": 1}}


async def test_history_with_the_real_history_plugin(
    make_server: Any, make_client: Any, tmp_path: Path
) -> None:
    history_module = pytest.importorskip("plugins.history")
    history = history_module.HistoryPlugin(tmp_path / "history.sqlite3", retention_every=0)
    async with make_server(plugins=[history]) as server:
        client = make_client("dev-1", server.port)
        client.handler(echo_handler)
        async with running(client), api(server) as http:
            await server.send_to("dev-1", 1, wait_ack=True)
            assert await asyncio.to_thread(history.flush, 5.0)
            hist = await checked(await http.get("/clients/dev-1/history?role=server"))
            kinds = [e["kind"] for e in hist["events"]]
            assert "connected" in kinds and "ack.received" in kinds
            assert hist["session"]["client_id"] == "dev-1" and hist["session"]["connected"]
            assert hist["session"]["acks_ok"] == 1
            hist = await checked(await http.get("/clients/dev-1/history?kind=ack.*&limit=1"))
            assert [e["kind"] for e in hist["events"]] == ["ack.received"]


# --- what cannot be sent, or cannot be shown ------------------------------------------------------

DEEP = 300  # JSON nesting orjson reads (up to 1,024) but does not write (over 254)


def _deep() -> Any:
    value: Any = []
    for _ in range(DEEP - 1):
        value = [value]
    return value


async def test_headers_or_a_payload_that_cannot_be_sent_are_422_not_500(
    make_server: Any, make_client: Any, events: Any
) -> None:
    async with make_server() as server:
        client = make_client("dev-1", server.port)
        client.handler(echo_handler)
        async with running(client), api(server) as http:
            for path in ("/clients/dev-1/messages", "/broadcast"):
                resp = await http.post(path, json={"payload": 1, "headers": {"k": "x" * 9000}})
                assert resp.status == 422, path
                assert (await checked(resp))["error"]["code"] == "invalid_headers"
                resp = await http.post(path, json={"payload": _deep()})
                assert resp.status == 422, path
                assert (await checked(resp))["error"]["code"] == "invalid_payload"
            rejected = events.of("send.rejected", reason="invalid_payload")
            assert [e.client_id for e in rejected] == ["dev-1", "*"]
            rejected = events.of("send.rejected", reason="invalid_headers")
            assert [e.client_id for e in rejected] == ["dev-1", "*"]
            # the library raises it as a TypeError too, as before
            with pytest.raises(TypeError, match="cannot be encoded"):
                await server.send_to("dev-1", _deep())
            assert await server.send_to("dev-1", 1, wait_ack=True) == {"echo": 1}


async def test_a_result_too_deep_to_show_fails_that_client_only(
    make_server: Any, make_client: Any, certs: Any
) -> None:
    """A client may answer with JSON the server reads but cannot write back: that
    send is a 502, and in a broadcast that client's outcome only, not a 500 for all."""
    from aioquic.quic.connection import QuicConnection

    from backbone.frames import (
        FLAG_WAIT_ACK,
        FrameDecoder,
        FrameType,
        encode_data_frame,
        parse_data_frame,
    )

    from .test_bad_input import RawPeer, _raw_peer, hello

    class DeepAnswers(RawPeer):
        def __init__(self, quic: QuicConnection, **kw: Any) -> None:
            super().__init__(quic)
            self.decoder = FrameDecoder(1 << 20)

        def stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
            super().stream_data(stream_id, data, end_stream)
            if stream_id != 0:
                return
            for ftype, body in self.decoder.feed(data):
                if ftype == FrameType.MESSAGE:
                    df = parse_data_frame(ftype, body)
                    if df.flags & FLAG_WAIT_ACK:
                        deep = b"[" * DEEP + b"]" * DEEP
                        self.write(0, encode_data_frame(FrameType.RESULT, 0, df.msg_id, deep))

    async with make_server() as server:
        good = make_client("dev-1", server.port)
        good.handler(echo_handler)
        async with running(good), api(server) as http:
            peer = await _raw_peer(server.port, certs, DeepAnswers)
            try:
                peer.write(0, hello("deep"))
                await asyncio.wait_for(peer.data_arrived.wait(), 5)  # the WELCOME
                resp = await http.post(
                    "/clients/deep/messages", json={"payload": 1, "wait_ack": True}
                )
                assert resp.status == 502
                assert (await checked(resp))["error"]["code"] == "result_not_json"
                resp = await http.post("/broadcast", json={"payload": 2, "wait_ack": True})
                assert resp.status == 200
                report = await checked(resp)
                assert report["outcomes"]["dev-1"] == {"ok": True, "result": {"echo": 2}}
                assert report["outcomes"]["deep"]["error"]["code"] == "result_not_json"
                assert (report["ok"], report["failed"]) == (1, 1)
            finally:
                peer.close_with(0, "done")
