"""The admin HTTP API: the monitoring and operator API of a running server (aiohttp).

``create_app(server)`` builds the :class:`aiohttp.web.Application`; ``run_admin(server,
host, port, token)`` serves it and returns an :class:`AdminServer` to close.  The API is
described in ``docs/openapi.json`` (OpenAPI 3.1; a test checks the two agree):

=======  ===============================  ============================================
GET      /healthz                         the process answers (always 200)
GET      /readyz                          200 when listening and not draining, else 503
GET      /metrics                         Prometheus text (the metrics plugin's, or basic
                                          figures from ``server.stats()``)
GET      /stats                           ``server.stats()``
GET      /clients                         connected clients: paging, sorting, id prefix
GET      /clients/{client_id}             one client (404 if not connected)
GET      /clients/{client_id}/history     its stored events (needs the history plugin)
POST     /clients/{client_id}/messages    send, optionally waiting for the result
POST     /broadcast                       send to every client
=======  ===============================  ============================================

Every error is JSON: ``{"error": {"code": "...", "message": "..."}}`` with a 4xx/5xx
status; a bad request never gets a 500.  When a token is configured every endpoint but
``/healthz`` and ``/readyz`` requires ``Authorization: Bearer <token>``; binding to a
non-loopback address without a token is refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar, get_args

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import (
    AckTimeout,
    BackboneError,
    Backpressure,
    ClientGone,
    ClientNotConnected,
    ConfigError,
    InvalidHeaders,
    InvalidPayload,
    NotConnected,
    PayloadTooLarge,
    PeerGone,
    RemoteError,
    TooManyPending,
)
from .events import AnyEvent
from .message import ClientInfo
from .server import Server
from .settings import is_loopback

log = logging.getLogger("backbone.admin")

#: endpoints that answer without a token (probes disclose nothing)
OPEN_PATHS: Final = frozenset({"/healthz", "/readyz"})
SORT_KEYS: Final = ("client_id", "connected_at", "last_heartbeat_at", "rtt", "pending_acks")
MAX_PAGE: Final = 1000
MAX_HISTORY: Final = 10_000
MAX_TIMEOUT: Final = 86_400.0
PROMETHEUS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: every event kind backbone emits (for validating ``kind=`` filters)
EVENT_KINDS: Final = frozenset(
    str(cls.model_fields["kind"].default) for cls in get_args(get_args(AnyEvent)[0])
)

# (exception, HTTP status, error code): the first match wins, so subclasses come first
ERROR_STATUS: Final[tuple[tuple[type[BackboneError], int, str], ...]] = (
    (ClientNotConnected, 404, "not_connected"),
    (ClientGone, 409, "client_gone"),
    (PeerGone, 409, "client_gone"),
    (NotConnected, 404, "not_connected"),
    (AckTimeout, 504, "ack_timeout"),
    (RemoteError, 502, "remote_error"),
    (Backpressure, 429, "backpressure"),
    (TooManyPending, 503, "too_many_pending"),
    (PayloadTooLarge, 413, "payload_too_large"),
    (InvalidHeaders, 422, "invalid_headers"),
    (InvalidPayload, 422, "invalid_payload"),
    (BackboneError, 500, "backbone_error"),
)


# --- JSON ----------------------------------------------------------------------------------


def _default(obj: Any) -> Any:
    if isinstance(obj, bytes | bytearray | memoryview):
        return {"$base64": base64.b64encode(bytes(obj)).decode("ascii")}
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def dumps(data: Any) -> bytes:
    """JSON as the API writes it: raw bytes become ``{"$base64": "..."}``."""
    return orjson.dumps(data, default=_default, option=orjson.OPT_NON_STR_KEYS)


def result_problem(result: Any) -> str | None:
    """Why a client's result cannot be written in a response, or None if it can (a
    client may answer with JSON nested deeper than orjson writes: 254 levels).  Asked
    only once writing a whole response has failed, so a result is written once."""
    try:
        dumps(result)
    except TypeError as exc:
        return _not_json(exc)
    return None


def _not_json(exc: TypeError) -> str:
    return f"the client's result cannot be written as JSON: {exc}"


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=dumps(data), status=status, content_type="application/json", headers=headers
    )


class ApiError(Exception):
    """Answered as ``{"error": {"code", "message", ...extra}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.extra = extra

    def response(self) -> web.Response:
        body = {"code": self.code, "message": self.message, **self.extra}
        return json_response({"error": body}, self.status, self.headers)


def error_object(exc: BackboneError) -> dict[str, Any]:
    """``{"code", "message"}`` (plus ``remote_type``/``remote_message`` for a
    :class:`RemoteError`) for one backbone error."""
    code = next(c for cls, _s, c in ERROR_STATUS if isinstance(exc, cls))
    out: dict[str, Any] = {"code": code, "message": str(exc)}
    if isinstance(exc, RemoteError):
        out["remote_type"] = exc.error_type
        out["remote_message"] = exc.message
    return out


def api_error(exc: BackboneError) -> ApiError:
    status = next(s for cls, s, _c in ERROR_STATUS if isinstance(exc, cls))
    obj = error_object(exc)
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return ApiError(status, obj.pop("code"), obj.pop("message"), headers, **obj)


# --- request parsing ---------------------------------------------------------------------------


class Query:
    """Strict query parameters: unknown names, repeated names and bad values are 400s."""

    def __init__(
        self, request: web.Request, allowed: Iterable[str], repeatable: Iterable[str] = ()
    ) -> None:
        self.allowed = set(allowed)
        self.repeatable = set(repeatable)
        self.query = request.query
        for name in self.query:
            if name not in self.allowed:
                known = ", ".join(sorted(self.allowed)) or "none"
                raise ApiError(
                    400, "bad_query", f"unknown query parameter {name!r} (known: {known})"
                )
            if name not in self.repeatable and len(self.query.getall(name)) > 1:
                raise ApiError(400, "bad_query", f"query parameter {name!r} is repeated")

    def _bad(self, name: str, value: str, why: str) -> ApiError:
        return ApiError(400, "bad_query", f"query parameter {name}={value!r}: {why}")

    def integer(self, name: str, default: int, lo: int, hi: int) -> int:
        raw = self.query.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise self._bad(name, raw, "not an integer") from None
        if not lo <= value <= hi:
            raise self._bad(name, raw, f"must be between {lo} and {hi}")
        return value

    def number(self, name: str) -> float | None:
        raw = self.query.get(name)
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            raise self._bad(name, raw, "not a number (Unix seconds)") from None
        if not math.isfinite(value):
            raise self._bad(name, raw, "must be finite")
        return value

    def choice(self, name: str, default: str | None, choices: Iterable[str]) -> str | None:
        raw = self.query.get(name)
        if raw is None:
            return default
        options = list(choices)
        if raw not in options:
            raise self._bad(name, raw, f"must be one of {', '.join(options)}")
        return raw

    def text(self, name: str) -> str | None:
        return self.query.get(name)

    def items(self, name: str) -> list[str]:
        """A repeatable, comma-separable parameter."""
        out: list[str] = []
        for raw in self.query.getall(name, []):
            out.extend(p.strip() for p in raw.split(",") if p.strip())
        return out


class SendBody(BaseModel):
    """The body of a send or broadcast request."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    payload: Any = None
    payload_base64: str | None = None
    wait_ack: bool = False
    timeout: float | None = Field(None, gt=0, le=MAX_TIMEOUT)
    headers: dict[str, str] | None = None

    @model_validator(mode="after")
    def _one_payload(self) -> SendBody:
        given = {"payload", "payload_base64"} & self.model_fields_set
        if len(given) != 1:
            raise ValueError("give exactly one of payload (any JSON) or payload_base64 (bytes)")
        if self.payload_base64 is not None:
            try:
                base64.b64decode(self.payload_base64, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("payload_base64 is not valid base64") from None
        if self.timeout is not None and not math.isfinite(self.timeout):
            raise ValueError("timeout must be finite")
        return self

    def data(self) -> Any:
        """What goes on the wire: the JSON payload, or the decoded bytes."""
        if self.payload_base64 is not None:
            return base64.b64decode(self.payload_base64, validate=True)
        return self.payload


M = TypeVar("M", bound=BaseModel)


async def read_body(request: web.Request, model: type[M]) -> M:
    """The JSON body as ``model`` (whatever the Content-Type says): 400 if it is not
    JSON, 422 if it does not fit, 413 if it is too large."""
    raw = await request.read()
    if not raw.strip():
        raise ApiError(400, "bad_json", "the request needs a JSON object body")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_request", "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = [
            {
                "field": ".".join(str(p) for p in err["loc"]),
                "message": str(err["msg"]).removeprefix("Value error, "),
            }
            for err in exc.errors(include_url=False)
        ]
        summary = "; ".join(f"{d['field'] or 'body'}: {d['message']}" for d in details)
        raise ApiError(422, "invalid_request", summary, details=details) from None


# --- the app -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _State:
    server: Server
    token: str | None


STATE: Final = web.AppKey("backbone_admin", _State)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _state(request: web.Request) -> _State:
    return request.app[STATE]


def find_plugin(server: Server, name: str) -> Any | None:
    """The first plugin of ``server`` named ``name``."""
    return next((p for p in server.plugins if getattr(p, "name", None) == name), None)


def server_state(server: Server) -> tuple[bool, bool]:
    """(listening, draining)."""
    return server.listening, server.draining


def client_json(info: ClientInfo) -> dict[str, Any]:
    return info.model_dump(mode="json")


def to_json_obj(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        if exc.status == 404:
            error = ApiError(404, "not_found", f"no such endpoint: {request.path}")
        elif exc.status == 405:
            error = ApiError(
                405, "method_not_allowed", f"{request.method} is not allowed on {request.path}"
            )
        elif exc.status == 413:
            error = ApiError(
                413,
                "payload_too_large",
                f"the request body is larger than {request.client_max_size} bytes",
            )
        else:
            error = ApiError(exc.status, "http_error", exc.reason or "error")
        error.headers.update(headers)
        return error.response()
    except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
        raise
    except Exception:
        log.exception("admin API: %s %s failed", request.method, request.path)
        return ApiError(500, "internal", "internal error (see the server log)").response()


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = _state(request).token
    if token and request.path not in OPEN_PATHS:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            raise ApiError(
                401,
                "unauthorized",
                "this endpoint needs the header Authorization: Bearer <admin_token>",
                {"WWW-Authenticate": 'Bearer realm="backbone"'},
            )
    return await handler(request)


# --- handlers ---------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    Query(request, ())
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    Query(request, ())
    listening, draining = server_state(_state(request).server)
    ready = listening and not draining
    return json_response(
        {"ready": ready, "listening": listening, "draining": draining}, 200 if ready else 503
    )


async def stats(request: web.Request) -> web.Response:
    Query(request, ())
    return json_response(dataclasses.asdict(_state(request).server.stats()))


# (Stats field, metric name, type, help) of the basic /metrics page
BASIC_METRICS: Final[tuple[tuple[str, str, Literal["gauge", "counter"], str], ...]] = (
    ("connections", "backbone_connections", "gauge", "Clients connected now."),
    ("messages_out", "backbone_messages_sent_total", "counter", "Messages sent to clients."),
    (
        "messages_in",
        "backbone_messages_received_total",
        "counter",
        "Messages received from clients.",
    ),
    (
        "msgs_out_per_s",
        "backbone_messages_sent_per_second",
        "gauge",
        "Messages sent per second over the last ~10 s.",
    ),
    (
        "msgs_in_per_s",
        "backbone_messages_received_per_second",
        "gauge",
        "Messages received per second over the last ~10 s.",
    ),
    ("pending_acks", "backbone_pending_acks", "gauge", "WaitAck results pending."),
    ("acks", "backbone_acks_total", "counter", "WaitAck results received."),
    ("ack_timeouts", "backbone_ack_timeouts_total", "counter", "WaitAck results timed out."),
    (
        "ack_latency_avg",
        "backbone_ack_latency_avg_seconds",
        "gauge",
        "Average WaitAck latency over the last 10,000 results.",
    ),
    (
        "ack_latency_p99",
        "backbone_ack_latency_p99_seconds",
        "gauge",
        "99th percentile WaitAck latency over the last 10,000 results.",
    ),
    ("rejected", "backbone_sends_rejected_total", "counter", "Sends refused at once."),
    (
        "stateless_resets",
        "backbone_stateless_resets_total",
        "counter",
        "Stateless resets sent to packets of unknown connections.",
    ),
)


def basic_metrics(server: Server) -> str:
    """``server.stats()`` (and readiness) in the Prometheus text format."""
    figures = dataclasses.asdict(server.stats())
    listening, draining = server_state(server)
    known = {field for field, *_ in BASIC_METRICS}
    rows: list[tuple[str, str, str, Any]] = [
        (name, kind, doc, figures.get(field)) for field, name, kind, doc in BASIC_METRICS
    ]
    rows += [
        (f"backbone_{field}", "gauge", f"Stats.{field}.", value)
        for field, value in figures.items()
        if field not in known and isinstance(value, int | float)
    ]
    ready = int(listening and not draining)
    rows.append(("backbone_ready", "gauge", "1 when listening and not draining.", ready))
    rows.append(("backbone_draining", "gauge", "1 while the server drains.", int(draining)))
    lines: list[str] = []
    for name, kind, doc, value in rows:
        if value is None:
            continue
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name} {float(value)!r}" if isinstance(value, float) else f"{name} {value}")
    return "\n".join(lines) + "\n"


async def metrics(request: web.Request) -> web.Response:
    Query(request, ())
    server = _state(request).server
    plugin = find_plugin(server, "metrics")
    text: str | None = None
    if plugin is not None and callable(getattr(plugin, "prometheus_text", None)):
        try:
            text = str(plugin.prometheus_text())
        except RuntimeError as exc:  # no own provider: serve the basic figures
            log.debug("metrics plugin has no Prometheus text (%s); basic figures", exc)
    if text is None:
        text = basic_metrics(server)
    return web.Response(
        body=text.encode(), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE}, status=200
    )


async def list_clients(request: web.Request) -> web.Response:
    q = Query(request, ("limit", "offset", "sort", "order", "prefix"))
    limit = q.integer("limit", 100, 1, MAX_PAGE)
    offset = q.integer("offset", 0, 0, 2**31)
    sort = q.choice("sort", "client_id", SORT_KEYS) or "client_id"
    descending = q.choice("order", "asc", ("asc", "desc")) == "desc"
    prefix = q.text("prefix") or ""
    server = _state(request).server
    if sort == "client_id":  # the cheap path: only the page's infos are built
        ids = sorted(
            (cid for cid in server.client_ids() if cid.startswith(prefix)), reverse=descending
        )
        total = len(ids)
        page = [i for i in (server.client(cid) for cid in ids[offset : offset + limit]) if i]
    else:
        infos = [i for i in server.clients() if i.client_id.startswith(prefix)]
        known = [i for i in infos if getattr(i, sort) is not None]
        unknown = sorted((i for i in infos if getattr(i, sort) is None), key=lambda i: i.client_id)
        known.sort(key=lambda i: (getattr(i, sort), i.client_id), reverse=descending)
        total = len(infos)
        page = (known + unknown)[offset : offset + limit]
    return json_response(
        {
            "total": total,
            "offset": offset,
            "limit": limit,
            "sort": sort,
            "order": "desc" if descending else "asc",
            "clients": [client_json(i) for i in page],
        }
    )


def _not_connected(client_id: str) -> ApiError:
    return ApiError(404, "not_connected", f"client {client_id!r} is not connected")


async def get_client(request: web.Request) -> web.Response:
    Query(request, ())
    client_id = request.match_info["client_id"]
    info = _state(request).server.client(client_id)
    if info is None:
        raise _not_connected(client_id)
    return json_response(client_json(info))


def _check_kinds(kinds: list[str]) -> None:
    for kind in kinds:
        if kind.endswith(".*"):
            ok = any(k.startswith(kind[:-1]) for k in EVENT_KINDS)
        else:
            ok = kind in EVENT_KINDS
        if not ok:
            raise ApiError(
                400,
                "bad_query",
                f"query parameter kind={kind!r}: unknown event kind "
                f"(known: {', '.join(sorted(EVENT_KINDS))}; 'ack.*' matches a family)",
            )


async def client_history(request: web.Request) -> web.Response:
    q = Query(request, ("since", "until", "limit", "kind", "role"), repeatable=("kind",))
    since, until = q.number("since"), q.number("until")
    limit = q.integer("limit", 1000, 1, MAX_HISTORY)
    kinds = q.items("kind")
    _check_kinds(kinds)
    role = q.choice("role", None, ("server", "client"))
    client_id = request.match_info["client_id"]
    plugin = find_plugin(_state(request).server, "history")
    if plugin is None or not callable(getattr(plugin, "history", None)):
        raise ApiError(
            501,
            "history_unavailable",
            "the history plugin is not enabled on this server "
            '(add "history" to plugins, e.g. `backbone serve --plugin history`)',
        )
    options: dict[str, Any] = {"since": since, "until": until, "limit": limit}
    options["kinds"] = kinds or None
    if role is not None:
        options["role"] = role
    events = await asyncio.to_thread(plugin.history, client_id, **options)
    view: Any = None
    if callable(getattr(plugin, "session_view", None)):
        view = await asyncio.to_thread(plugin.session_view, client_id)
    return json_response(
        {
            "client_id": client_id,
            "count": len(events),
            "events": [to_json_obj(e) for e in events],
            "session": to_json_obj(view),
        }
    )


async def send_message(request: web.Request) -> web.Response:
    Query(request, ())
    client_id = request.match_info["client_id"]
    body = await read_body(request, SendBody)
    server = _state(request).server
    try:
        if body.wait_ack:
            result = await server.send_to(
                client_id, body.data(), wait_ack=True, timeout=body.timeout, headers=body.headers
            )
            try:
                return json_response({"client_id": client_id, "wait_ack": True, "result": result})
            except TypeError as exc:  # the only thing in there that orjson may refuse
                raise ApiError(502, "result_not_json", _not_json(exc)) from None
        msg_id = await server.send_to(client_id, body.data(), headers=body.headers)
    except BackboneError as exc:
        raise api_error(exc) from None
    return json_response({"client_id": client_id, "wait_ack": False, "msg_id": msg_id})


async def broadcast(request: web.Request) -> web.Response:
    Query(request, ())
    body = await read_body(request, SendBody)
    server = _state(request).server
    try:
        report = await server.broadcast(
            body.data(), wait_ack=body.wait_ack, timeout=body.timeout, headers=body.headers
        )
    except BackboneError as exc:  # e.g. a payload no client could take
        raise api_error(exc) from None
    outcomes: dict[str, Any] = {}
    for cid, outcome in sorted(report.outcomes.items()):
        if outcome.error is not None:
            outcomes[cid] = {"ok": False, "error": error_object(outcome.error)}
        elif body.wait_ack:
            outcomes[cid] = {"ok": True, "result": outcome.result}
        else:
            outcomes[cid] = {"ok": True}

    def response() -> web.Response:
        failed = sum(1 for o in outcomes.values() if not o["ok"])
        return json_response(
            {
                "msg_id": report.msg_id,
                "wait_ack": report.wait_ack,
                "clients": len(report),
                "ok": len(report) - failed,
                "failed": failed,
                "sent_to": sorted(report.sent_to),
                "outcomes": outcomes,
            }
        )

    try:
        return response()
    except TypeError:
        # a client answered with JSON too deep to write: that outcome fails, not all
        for cid, o in outcomes.items():
            problem = result_problem(o["result"]) if "result" in o else None
            if problem is not None:
                error = {"code": "result_not_json", "message": problem}
                outcomes[cid] = {"ok": False, "error": error}
        return response()


#: (method, path, handler): the whole API; ``docs/openapi.json`` describes each
ROUTES: Final[tuple[tuple[str, str, Handler], ...]] = (
    ("GET", "/healthz", healthz),
    ("GET", "/readyz", readyz),
    ("GET", "/metrics", metrics),
    ("GET", "/stats", stats),
    ("GET", "/clients", list_clients),
    ("GET", "/clients/{client_id}", get_client),
    ("GET", "/clients/{client_id}/history", client_history),
    ("POST", "/clients/{client_id}/messages", send_message),
    ("POST", "/broadcast", broadcast),
)


def create_app(server: Server, token: str | None = None) -> web.Application:
    """The admin API of ``server``; with ``token``, every endpoint but the probes
    requires ``Authorization: Bearer <token>``."""
    max_body = 4 * server.config.max_payload + 64 * 1024  # JSON and base64 overhead
    app = web.Application(middlewares=[_errors, _auth], client_max_size=max_body)
    app[STATE] = _State(server, token or None)
    for method, path, handler in ROUTES:
        if method == "GET":
            app.router.add_get(path, handler, allow_head=False)
        else:
            app.router.add_route(method, path, handler)
    return app


class AdminServer:
    """A running admin API (see :func:`run_admin`)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self.runner = runner
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        await self.runner.cleanup()


async def run_admin(
    server: Server,
    host: str = "127.0.0.1",
    port: int = 8080,
    token: str | None = None,
    *,
    access_log: bool = False,
    shutdown_timeout: float = 5.0,
) -> AdminServer:
    """Serve the admin API of ``server`` on ``host:port`` (0: any free port) until
    ``close()``.  Refuses (``ConfigError``) a non-loopback ``host`` without a token."""
    if not token and not is_loopback(host):
        raise ConfigError(
            f"the admin API on {host!r} (not a loopback address) needs a token (admin_token)"
        )
    app = create_app(server, token)
    runner = web.AppRunner(
        app,
        access_log=logging.getLogger("backbone.admin.access") if access_log else None,
        shutdown_timeout=shutdown_timeout,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = port
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            bound = int(address[1])
            break
    log.info("admin API on http://%s:%d%s", host, bound, " (token required)" if token else "")
    return AdminServer(runner, host, bound)
