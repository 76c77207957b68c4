"""Run-time configuration of ``backbone serve`` and ``backbone client``.

One validated model per command, fed from four layers (later wins)::

    defaults  <  TOML file  <  BACKBONE_* environment variables  <  command-line flags

* :class:`ServeSettings` is a :class:`~backbone.config.ServerConfig` (same fields, same
  defaults, same checks) plus what the ``serve`` command adds: the admin API, plugins,
  log level.  Environment variables are ``BACKBONE_<FIELD>`` (``BACKBONE_PORT``,
  ``BACKBONE_ADMIN_TOKEN``...); the TOML file holds the fields as top-level keys.
* :class:`ClientSettings` is a :class:`~backbone.config.ClientConfig` plus ``exec``,
  plugins and log level.  Environment variables are ``BACKBONE_CLIENT_<FIELD>``; the TOML
  file holds them in a ``[client]`` table (so one file can serve both commands).

An invalid value is refused with the field, the value, where it came from and why:
:meth:`ServeSettings.load` raises :class:`SettingsError` whose ``str`` is that report.

``docs/configuration.md`` is generated from these models; regenerate it with
``python -m backbone.settings docs/configuration.md`` (a test checks it is up to date).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import sys
import tomllib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self, get_args, get_origin

import annotated_types
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings import SettingsError as _PydanticSettingsError

from .config import ClientConfig, ServerConfig

LogLevel = Literal["debug", "info", "warning", "error"]

#: descriptions for the fields whose model has none (config.py stays the source of the
#: defaults and checks; these only fill gaps in the generated documentation)
SERVER_DOC: dict[str, str] = {
    "host": "address to listen on (UDP)",
    "port": "UDP port to listen on (0: any free port)",
    "certfile": "TLS certificate chain, PEM (required)",
    "keyfile": "private key of certfile, PEM (omit if certfile holds both)",
    "max_pending_per_client": "WaitAck results pending from one client",
    "max_pending_total": "WaitAck results pending from all clients together",
}
CLIENT_DOC: dict[str, str] = {
    "client_id": "this client's id (the `ID` argument)",
    "host": "server address (the host of `--server HOST:PORT`)",
    "port": "server UDP port (the port of `--server HOST:PORT`)",
    "cafile": "CA bundle that signed the server certificate (default: the system store)",
    "keyfile": "private key of certfile, PEM",
    "connect_timeout": "seconds for one connection attempt (handshake and HELLO)",
    "backoff_initial": "first reconnect delay, seconds",
    "backoff_max": "largest reconnect delay, seconds",
    "backoff_factor": "reconnect delay multiplier per failed attempt",
    "backoff_jitter": "random share of each reconnect delay (0.2: ±20 %)",
}


class SettingsError(Exception):
    """Configuration refused.  ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --- where values come from -----------------------------------------------------------

# the TOML layer of the model being built (pydantic-settings sources are per class, the
# file is per call)
_toml_layer: ContextVar[Mapping[str, Any] | None] = ContextVar("_toml_layer", default=None)


class _MappingSource(PydanticBaseSettingsSource):
    """A settings source backed by a mapping (here: the TOML file)."""

    def __init__(self, settings_cls: type[BaseSettings], data: Mapping[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = dict(data)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def read_toml(path: str | Path) -> dict[str, Any]:
    """The TOML file as a dict; a missing or broken file is a :class:`SettingsError`."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise SettingsError([f"{p}: no such configuration file"]) from None
    except IsADirectoryError:
        raise SettingsError([f"{p}: is a directory, not a configuration file"]) from None
    except PermissionError:
        raise SettingsError([f"{p}: permission denied"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError([f"{p}: not valid TOML: {exc}"]) from None
    except UnicodeDecodeError as exc:
        raise SettingsError([f"{p}: not valid TOML (not UTF-8: {exc.reason})"]) from None


def parse_value(text: str) -> Any:
    """A ``--set`` value: read as a TOML value (``5``, ``true``, ``["a"]``, ``"x"``),
    else taken as a plain string (``0.0.0.0``, ``certs/server.pem``)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_assignments(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``("port=5000", "plugin_options.history.path=/x")`` → a (nested) dict."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise SettingsError([f"--set {item!r}: expected KEY=VALUE"])
        *parents, leaf = key.split(".")
        target = out
        for part in parents:
            nxt = target.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise SettingsError([f"--set {item!r}: {part} is already a value"])
            target = nxt
        target[leaf] = parse_value(value)
    return out


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return parse_value(text)
        return [p.strip() for p in text.split(",") if p.strip()]
    return value


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- the models -------------------------------------------------------------------------


class _Layered(BaseSettings):
    """Defaults < TOML (from :func:`_toml_layer`) < environment < init keywords (flags)."""

    #: the TOML table this model reads (None: the top level)
    toml_table: ClassVar[str | None] = None
    #: top-level TOML keys this model ignores (they belong to another command)
    toml_ignore: ClassVar[frozenset[str]] = frozenset()
    #: documentation of the fields whose model has no description
    fallback_doc: ClassVar[dict[str, str]] = {}

    log_level: LogLevel = Field("info", description="log level of the messages on stderr")
    plugins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description='plugins to enable, by entry-point name (e.g. `["logging", "history"]`; '
        "in the environment: `logging,history`)",
    )
    plugin_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="keyword arguments per plugin: a `[plugin_options.history]` table with "
        '`path = "/var/lib/backbone/history.sqlite3"`; in the environment: JSON',
    )

    @field_validator("plugins", mode="before")
    @classmethod
    def _plugins_list(cls, value: Any) -> Any:
        return _split_list(value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _MappingSource(settings_cls, _toml_layer.get() or {})

    # --- loading ------------------------------------------------------------------------
    @classmethod
    def env_name(cls, field: str) -> str:
        return f"{cls.model_config.get('env_prefix', '')}{field}".upper()

    @classmethod
    def toml_layer(cls, document: Mapping[str, Any], source: str) -> dict[str, Any]:
        """The part of a TOML document this model reads."""
        if cls.toml_table is None:
            return {k: v for k, v in document.items() if k not in cls.toml_ignore}
        table = document.get(cls.toml_table, {})
        if not isinstance(table, dict):
            raise SettingsError([f"{source}: [{cls.toml_table}] must be a table"])
        return dict(table)

    @classmethod
    def load(
        cls,
        config_file: str | Path | None = None,
        flags: Mapping[str, Any] | None = None,
        *,
        flag_names: Mapping[str, str] | None = None,
    ) -> Self:
        """Build the settings: ``flags`` (field → value, None values ignored) over the
        environment over ``config_file`` over the defaults.  ``flag_names`` maps a field
        to the flag that set it, for error messages.  Raises :class:`SettingsError`."""
        toml: dict[str, Any] = {}
        source = str(config_file) if config_file is not None else ""
        if config_file is not None:
            toml = cls.toml_layer(read_toml(config_file), source)
        given = {k: v for k, v in (flags or {}).items() if v is not None}
        token = _toml_layer.set(toml)
        try:
            return cls(**given)
        except ValidationError as exc:
            raise SettingsError(cls._explain(exc, toml, source, given, flag_names or {})) from None
        except _PydanticSettingsError as exc:
            # an environment value that is not valid JSON for a structured field
            cause = exc.__cause__
            found = re.search(r'field "(\w+)"', str(exc))
            where = cls.env_name(found.group(1)) if found else "environment"
            why = f"not valid JSON ({cause})" if cause else str(exc)
            raise SettingsError([f"{where}: {why}"]) from None
        finally:
            _toml_layer.reset(token)

    @classmethod
    def _origin(
        cls,
        field: str,
        toml: Mapping[str, Any],
        source: str,
        given: Mapping[str, Any],
        flag_names: Mapping[str, str],
    ) -> str:
        if field in given:
            return flag_names.get(field, f"--set {field}")
        if cls.env_name(field) in {k.upper() for k in os.environ}:
            return cls.env_name(field)
        if field in toml:
            where = f"[{cls.toml_table}] in " if cls.toml_table else ""
            return f"{where}{source}"
        return "default"

    @classmethod
    def _explain(
        cls,
        exc: ValidationError,
        toml: Mapping[str, Any],
        source: str,
        given: Mapping[str, Any],
        flag_names: Mapping[str, str],
    ) -> list[str]:
        problems: list[str] = []
        for err in exc.errors(include_url=False):
            loc = [str(p) for p in err["loc"]]
            msg = str(err["msg"]).removeprefix("Value error, ")
            if not loc:
                problems.append(f"invalid configuration: {msg}")
                continue
            field = loc[0]
            name = ".".join(loc)
            origin = cls._origin(field, toml, source, given, flag_names)
            if err["type"] == "extra_forbidden":
                near = difflib.get_close_matches(field, list(cls.model_fields), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                problems.append(f"{name}: unknown setting, from {origin}{hint}")
                continue
            value = err.get("input")
            if field in ("admin_token", "stateless_reset_key"):
                value = "**********"
            problems.append(f"{name} = {value!r} (from {origin}): {msg}")
        return problems

    def origins(
        self,
        config_file: str | Path | None,
        flags: Mapping[str, Any],
        flag_names: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """Where each field's effective value came from (for ``--print-config``)."""
        toml: dict[str, Any] = {}
        if config_file is not None:
            toml = self.toml_layer(read_toml(config_file), str(config_file))
        given = {k: v for k, v in flags.items() if v is not None}
        return {
            name: self._origin(name, toml, str(config_file or ""), given, flag_names or {})
            for name in type(self).model_fields
        }

    def to_toml(self, origins: Mapping[str, str] | None = None) -> str:
        """The effective configuration as a TOML document (secrets masked)."""
        lines: list[str] = []
        tables: list[tuple[str, dict[str, Any]]] = []
        if self.toml_table:
            lines.append(f"[{self.toml_table}]")
        for name in type(self).model_fields:
            value = getattr(self, name)
            note = f"  # {origins[name]}" if origins and origins[name] != "default" else ""
            if isinstance(value, SecretStr):
                value = "**********" if value.get_secret_value() else ""
            if value is None:
                lines.append(f"# {name} = (not set){note}")
            elif isinstance(value, dict) and not value:
                lines.append(f"{name} = {{}}{note}")
            elif isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
                tables.extend(
                    (f"{self.toml_table + '.' if self.toml_table else ''}{name}.{k}", v)
                    for k, v in value.items()
                )
                if note:
                    lines.append(f"# {name}: see below{note}")
            else:
                lines.append(f"{name} = {toml_value(value)}{note}")
        for header, table in tables:
            lines.append("")
            lines.append(f"[{header}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in table.items())
        return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    """A Python value as a TOML value (str, bool, int, float, list, flat dict)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if value is None:
        return '""'
    return toml_value(str(value))


class ServeSettings(_Layered, ServerConfig):  # type: ignore[misc]
    """What ``backbone serve`` runs: a :class:`ServerConfig` plus the admin API,
    plugins and logging.  Environment variables: ``BACKBONE_<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix="BACKBONE_", extra="forbid", frozen=True, validate_default=True
    )
    toml_ignore: ClassVar[frozenset[str]] = frozenset({"client"})
    fallback_doc: ClassVar[dict[str, str]] = SERVER_DOC

    gc_freeze: bool = Field(
        True,
        description="move live connections out of the cyclic garbage collector's reach "
        "(gc.freeze) as clients connect, and raise its thresholds to 50,000/20/100 while the "
        "server runs; on here because the process is backbone's (see docs/scaling.md)",
    )
    admin_enabled: bool = Field(True, description="serve the admin HTTP API")
    admin_host: str = Field(
        "127.0.0.1",
        description="address of the admin API; anything but loopback requires admin_token",
    )
    admin_port: int = Field(8080, ge=0, le=65535, description="TCP port of the admin API")
    admin_token: SecretStr | None = Field(
        None,
        description="bearer token the admin API requires (at least 16 characters); "
        "`/healthz` and `/readyz` stay open",
    )

    @field_validator("admin_token")
    @classmethod
    def _token_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value() == "":
            return None
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("a token must have at least 16 characters")
        return value

    @model_validator(mode="after")
    def _check_admin(self) -> Self:
        if self.admin_enabled and not is_loopback(self.admin_host) and self.admin_token is None:
            raise ValueError(
                f"admin_host {self.admin_host!r} is not a loopback address: set admin_token "
                "(BACKBONE_ADMIN_TOKEN) so the admin API is not open to anyone"
            )
        return self

    def server_config(self) -> ServerConfig:
        """The :class:`ServerConfig` part."""
        return ServerConfig(**self.model_dump(include=set(ServerConfig.model_fields)))

    @property
    def token(self) -> str | None:
        return None if self.admin_token is None else self.admin_token.get_secret_value()


class ClientSettings(_Layered, ClientConfig):  # type: ignore[misc]
    """What ``backbone client`` runs: a :class:`ClientConfig` plus ``exec``, plugins and
    logging.  Environment variables: ``BACKBONE_CLIENT_<FIELD>``; TOML: ``[client]``."""

    model_config = SettingsConfigDict(
        env_prefix="BACKBONE_CLIENT_", extra="forbid", frozen=True, validate_default=True
    )
    toml_table: ClassVar[str | None] = "client"
    fallback_doc: ClassVar[dict[str, str]] = CLIENT_DOC

    gc_freeze: bool = Field(
        True,
        description="when the client starts, move what the process has set up out of the "
        "cyclic garbage collector's reach (gc.freeze), so a full collection no longer "
        "pauses message handling for about 14 ms; on here because the process is "
        "backbone's",
    )
    exec: str | None = Field(
        None,
        description="shell command run for each message: payload on stdin, exit code and "
        "output become the WaitAck result",
    )
    exec_timeout: float | None = Field(
        None, gt=0, description="kill the exec command after this many seconds"
    )
    max_output: int = Field(
        65536, ge=0, description="keep at most this many bytes of the command's stdout and stderr"
    )

    def client_config(self) -> ClientConfig:
        """The :class:`ClientConfig` part."""
        return ClientConfig(**self.model_dump(include=set(ClientConfig.model_fields)))


def missing_files(**paths: str | None) -> list[str]:
    """``field: no such file 'x'`` for each given path that is not a readable file."""
    out: list[str] = []
    for field, path in paths.items():
        if path is None:
            continue
        p = Path(path)
        if not p.exists():
            out.append(f"{field} = {path!r}: no such file")
        elif not p.is_file():
            out.append(f"{field} = {path!r}: not a file")
        elif not os.access(p, os.R_OK):
            out.append(f"{field} = {path!r}: not readable")
    return out


# --- documentation ------------------------------------------------------------------------

DOC_BEGIN = "<!-- BEGIN GENERATED: python -m backbone.settings docs/configuration.md -->"
DOC_END = "<!-- END GENERATED -->"


_TYPE_NAMES: dict[Any, str] = {
    str: "string",
    SecretStr: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
}


def _type_name(ann: Any) -> str:
    origin = get_origin(ann)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(ann))
    if origin is list:
        return f"list of {_type_name(get_args(ann)[0])}s"
    if origin is dict:
        return "table"
    if origin is Annotated:
        return _type_name(get_args(ann)[0])
    args = get_args(ann)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return f"{' or '.join(_type_name(a) for a in rest)}, optional"
    return _TYPE_NAMES.get(ann, getattr(ann, "__name__", str(ann)))


def describe_type(info: FieldInfo) -> str:
    return _type_name(info.annotation)


def describe_constraints(info: FieldInfo) -> str:
    parts: list[str] = []
    for m in info.metadata:
        if isinstance(m, annotated_types.Gt):
            parts.append(f"> {m.gt}")
        elif isinstance(m, annotated_types.Ge):
            parts.append(f"≥ {m.ge}")
        elif isinstance(m, annotated_types.Lt):
            parts.append(f"< {m.lt}")
        elif isinstance(m, annotated_types.Le):
            parts.append(f"≤ {m.le}")
    return ", ".join(parts)


def describe_default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        value: Any = info.default_factory()  # type: ignore[call-arg]
    else:
        value = info.default
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return f"`{'true' if value else 'false'}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, int) and value >= 1024 * 1024 and value % (1024 * 1024) == 0:
        return f"`{value}` ({value // (1024 * 1024)} MiB)"
    if isinstance(value, list | dict) and not value:
        return "`[]`" if isinstance(value, list) else "`{}`"
    return f"`{value}`"


def field_rows(model: type[_Layered]) -> Iterator[tuple[str, str, str, str, str]]:
    """(key, env var, type, default, description) for every field of ``model``."""
    for name, info in model.model_fields.items():
        doc = info.description or model.fallback_doc.get(name, "")
        limits = describe_constraints(info)
        if limits:
            doc = f"{doc} ({limits})" if doc else limits
        yield (
            f"`{name}`",
            f"`{model.env_name(name)}`",
            describe_type(info),
            describe_default(info),
            doc.replace("|", "\\|"),
        )


def _table(model: type[_Layered], names: list[str]) -> list[str]:
    out = ["| key | environment | type | default | description |", "|---|---|---|---|---|"]
    rows = {r[0].strip("`"): r for r in field_rows(model)}
    out.extend("| " + " | ".join(rows[n]) + " |" for n in names)
    return out


def render_config_doc() -> str:
    """The generated part of ``docs/configuration.md``: every field of both models."""
    serve_only = [n for n in ServeSettings.model_fields if n not in ServerConfig.model_fields]
    server = [n for n in ServeSettings.model_fields if n in ServerConfig.model_fields]
    client_only = [n for n in ClientSettings.model_fields if n not in ClientConfig.model_fields]
    client = [n for n in ClientSettings.model_fields if n in ClientConfig.model_fields]
    lines = [
        DOC_BEGIN,
        "",
        "### `backbone serve`: the server (top-level keys of the TOML file)",
        "",
        *_table(ServeSettings, server),
        "",
        "### `backbone serve`: admin API, plugins, logging",
        "",
        *_table(ServeSettings, serve_only),
        "",
        "### `backbone client` (the `[client]` table of the TOML file)",
        "",
        *_table(ClientSettings, client),
        "",
        "### `backbone client`: exec, plugins, logging",
        "",
        *_table(ClientSettings, client_only),
        "",
        DOC_END,
    ]
    return "\n".join(lines)


def update_doc(text: str) -> str:
    """``text`` with its generated section replaced by :func:`render_config_doc`."""
    start, end = text.find(DOC_BEGIN), text.find(DOC_END)
    if start < 0 or end < start:
        raise ValueError(f"no generated section ({DOC_BEGIN!r} … {DOC_END!r}) found")
    return text[:start] + render_config_doc() + text[end + len(DOC_END) :]


if __name__ == "__main__":  # pragma: no cover - a maintenance helper
    if len(sys.argv) != 2:
        print("usage: python -m backbone.settings docs/configuration.md", file=sys.stderr)
        sys.exit(2)
    doc = Path(sys.argv[1])
    doc.write_text(update_doc(doc.read_text()))
    print(f"updated {doc}")
