"""The ``backbone`` command (also ``python -m backbone``).

Run things:      ``serve``, ``client``, ``demo``, ``certs init``.
Operate things:  ``clients``, ``client-info``, ``history``, ``send``, ``broadcast``,
                 ``stats`` — they talk to a running server's admin API (``--admin URL``,
                 ``BACKBONE_ADMIN_URL``; ``--token``, ``BACKBONE_ADMIN_TOKEN``).

Errors are one line on stderr and a non-zero exit code (see :data:`EXIT_CODES`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import click

from . import __version__

if TYPE_CHECKING:  # the rest is imported where used: operator commands start faster
    from .client import Client
    from .message import Message
    from .plugins import Plugin
    from .server import Server
    from .settings import ClientSettings, ServeSettings, SettingsError

log = logging.getLogger("backbone.cli")

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1  # the request failed (not connected, remote error, refused...)
EXIT_USAGE: Final = 2  # a bad command line or configuration
EXIT_UNREACHABLE: Final = 3  # the admin API cannot be reached or refused the token
EXIT_TIMEOUT: Final = 4  # no result within the timeout
EXIT_CODES: Final = {
    EXIT_OK: "success",
    EXIT_FAILED: "the request failed (client not connected, handler error, refused...)",
    EXIT_USAGE: "bad command line or configuration",
    EXIT_UNREACHABLE: "the admin API cannot be reached, or refused the token",
    EXIT_TIMEOUT: "no result within the timeout",
}
DEFAULT_ADMIN_URL: Final = "http://127.0.0.1:8080"
LOG_FORMAT: Final = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

F = TypeVar("F", bound=Callable[..., Any])


class CliError(click.ClickException):
    """One line on stderr (``Error: ...``) and ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _config_error(exc: SettingsError) -> CliError:
    lines = exc.problems
    text = lines[0] if len(lines) == 1 else "invalid configuration:\n  " + "\n  ".join(lines)
    return CliError(text, EXIT_USAGE)


# --- terminal output --------------------------------------------------------------------------


def _color() -> bool | None:
    """None: let click decide (colours on a terminal, plain when piped); NO_COLOR: never."""
    return False if os.environ.get("NO_COLOR") else None


def out(text: str = "") -> None:
    click.echo(text, color=_color())


def err(text: str) -> None:
    click.echo(text, err=True, color=_color())


def print_json(data: Any) -> None:
    out(json.dumps(data, indent=2, ensure_ascii=False))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _width(text: str) -> int:
    return len(_ANSI.sub("", text))


def table(headers: list[str], rows: list[list[str]], right: frozenset[int] = frozenset()) -> str:
    """A plain text table; cells may carry click styles (stripped when piped)."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], _width(cell))

    def line(cells: list[str]) -> str:
        parts = []
        for i, cell in enumerate(cells):
            pad = " " * (widths[i] - _width(cell))
            parts.append(pad + cell if i in right else cell + pad)
        return "  ".join(parts).rstrip()

    head = click.style(line(headers), bold=True)
    return "\n".join([head, *(line(r) for r in rows)])


def key_values(pairs: list[tuple[str, str]]) -> str:
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{click.style(k.ljust(width), bold=True)}  {v}" for k, v in pairs)


def age(seconds: float | None) -> str:
    """12.3s, 4m05s, 2h03m, 3d04h."""
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    if s < 86400:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{int(s // 86400)}d{int(s % 86400 // 3600):02d}h"


def ago(timestamp: float | None) -> str:
    return "-" if timestamp is None else age(time.time() - timestamp)


def millis(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def size(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 / 1024:.1f} MiB"


def clock(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="milliseconds")


class Spinner:
    """``label … 1.2 s`` on stderr while something runs, only on a terminal."""

    FRAMES: Final = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, label: str) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() and not os.environ.get("NO_COLOR")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        t0 = time.monotonic()
        i = 0
        while not self._stop.wait(0.1):
            frame = self.FRAMES[i % len(self.FRAMES)]
            sys.stderr.write(f"\r{frame} {self.label} {time.monotonic() - t0:.1f} s")
            sys.stderr.flush()
            i += 1
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()

    def __enter__(self) -> Spinner:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# --- the group --------------------------------------------------------------------------------

_EPILOG = (
    "Exit codes: "
    + "; ".join(f"{code} {what}" for code, what in EXIT_CODES.items())
    + ".  Colours follow the terminal (NO_COLOR turns them off)."
)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=_EPILOG,
)
@click.version_option(__version__, prog_name="backbone")
def main() -> None:
    """backbone — a QUIC command backbone: unicast, broadcast, WaitAck results.

    \b
    Try it:    backbone demo
    Run it:    backbone certs init --client dev-1
               backbone serve --certs certs
               backbone client dev-1 --certs certs --exec 'tr a-z A-Z'
    Operate:   backbone clients
               backbone send dev-1 '{"op": "hello"}' --wait-ack
    """


# --- certs ------------------------------------------------------------------------------------


@main.group()
def certs() -> None:
    """Development certificates."""


@certs.command("init")
@click.argument("directory", default="certs", type=click.Path(file_okay=False))
@click.option("--client", "clients", multiple=True, help="also issue a certificate for this ID")
@click.option("--force", is_flag=True, help="overwrite existing files")
def certs_init(directory: str, clients: tuple[str, ...], force: bool) -> None:
    """Make a dev CA, a server certificate (localhost, 127.0.0.1, ::1) and client
    certificates whose identity is the client ID, in DIRECTORY (default: certs)."""
    from .certs import make_dev_certs

    try:
        made = make_dev_certs(directory, client_ids=clients, overwrite=force)
    except FileExistsError as exc:
        raise click.ClickException(f"{exc} (use --force)") from None
    except OSError as exc:
        raise click.ClickException(f"cannot write certificates in {directory}: {exc}") from None
    click.echo(f"CA:     {made.ca_cert}")
    click.echo(f"server: {made.server_cert} {made.server_key}")
    for cid, (cert, key) in made.clients.items():
        click.echo(f"client {cid}: {cert} {key}")


# --- shared by serve and client ---------------------------------------------------------------


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()), format=LOG_FORMAT, stream=sys.stderr, force=True
    )
    if level != "debug":  # aioquic and aiohttp are chatty
        logging.getLogger("quic").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _build_plugins(names: list[str], options: Mapping[str, Mapping[str, Any]]) -> list[Plugin]:
    from .plugins import load_plugin

    unused = set(options) - set(names)
    if unused:
        raise CliError(
            f"plugin_options for {', '.join(sorted(unused))}, which is not in plugins",
            EXIT_USAGE,
        )
    plugins: list[Plugin] = []
    for name in names:
        try:
            plugins.append(load_plugin(name, **dict(options.get(name, {}))))
        except (ValueError, TypeError) as exc:
            raise CliError(f"plugins: {exc}", EXIT_USAGE) from None
    return plugins


def _common_run_options(fn: F) -> F:
    for option in reversed(
        [
            click.option(
                "--config",
                "config_file",
                type=click.Path(dir_okay=False),
                envvar="BACKBONE_CONFIG",
                help="TOML configuration file [env BACKBONE_CONFIG]",
            ),
            click.option(
                "--plugin",
                "plugins",
                multiple=True,
                metavar="NAME",
                help="enable a plugin (repeat for several): logging, metrics, history, otel",
            ),
            click.option(
                "--log-level",
                type=click.Choice(["debug", "info", "warning", "error"]),
                help="log level on stderr",
            ),
            click.option("-v", "--verbose", is_flag=True, help="debug logs (--log-level debug)"),
            click.option(
                "-s",
                "--set",
                "assignments",
                multiple=True,
                metavar="KEY=VALUE",
                help="set any configuration field (VALUE is read as TOML; repeatable)",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def _flags(params: Mapping[str, Any], assignments: tuple[str, ...]) -> dict[str, Any]:
    """--set values, then explicit flags over them."""
    from .settings import SettingsError, parse_assignments

    try:
        flags = parse_assignments(assignments)
    except SettingsError as exc:
        raise _config_error(exc) from None
    for field, value in params.items():
        if value is not None and value != ():
            flags[field] = list(value) if isinstance(value, tuple) else value
    return flags


def _install_stop_signals(stop: asyncio.Event, what: str) -> Callable[[], bool]:
    """SIGTERM/SIGINT set ``stop``; a second one asks to give up waiting (returned
    callable tells whether it came)."""
    loop = asyncio.get_running_loop()
    forced = threading.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("%s again: not waiting any longer", sig.name)
            forced.set()
            for task in asyncio.all_tasks(loop):
                if task.get_name() == "backbone-drain":
                    task.cancel()
            return
        log.info("%s: %s (send it again to stop at once)", sig.name, what)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)
    return forced.is_set


# --- serve ------------------------------------------------------------------------------------


@main.command()
@_common_run_options
@click.option("--host", help="address to listen on (UDP)")
@click.option("--port", type=int, help="UDP port (0: any free port)  [default: 4433]")
@click.option("--certfile", help="server certificate chain (PEM)")
@click.option("--keyfile", help="server private key (PEM)")
@click.option(
    "--certs",
    "certs_dir",
    type=click.Path(file_okay=False),
    help="shortcut: --certfile DIR/server.pem --keyfile DIR/server.key (from `certs init`)",
)
@click.option("--admin-host", help="admin API address  [default: 127.0.0.1]")
@click.option(
    "--admin-port", type=int, help="admin API TCP port (0: any free port)  [default: 8080]"
)
@click.option(
    "--admin-token",
    help="admin API bearer token; prefer BACKBONE_ADMIN_TOKEN (the command line is visible)",
)
@click.option("--no-admin", is_flag=True, default=None, help="do not serve the admin API")
@click.option("--print-config", is_flag=True, help="print the effective configuration and exit")
def serve(
    config_file: str | None,
    plugins: tuple[str, ...],
    log_level: str | None,
    verbose: bool,
    assignments: tuple[str, ...],
    host: str | None,
    port: int | None,
    certfile: str | None,
    keyfile: str | None,
    certs_dir: str | None,
    admin_host: str | None,
    admin_port: int | None,
    admin_token: str | None,
    no_admin: bool | None,
    print_config: bool,
) -> None:
    """Run a server: QUIC on HOST:PORT, the admin HTTP API on 127.0.0.1:8080.

    Configuration: defaults < TOML file (--config) < BACKBONE_* environment < flags;
    see docs/configuration.md.  Logs go to stderr.  SIGTERM or Ctrl-C drains: clients
    are told to reconnect elsewhere, pending results get close_grace seconds.
    """
    from .reset import is_hex_key
    from .settings import ServeSettings, SettingsError, missing_files

    if certs_dir is not None:
        certfile = certfile or str(Path(certs_dir) / "server.pem")
        keyfile = keyfile or str(Path(certs_dir) / "server.key")
    params: dict[str, Any] = {
        "host": host,
        "port": port,
        "certfile": certfile,
        "keyfile": keyfile,
        "admin_host": admin_host,
        "admin_port": admin_port,
        "admin_token": admin_token,
        "admin_enabled": False if no_admin else None,
        "plugins": plugins,
        "log_level": "debug" if verbose else log_level,
    }
    names = {k: "--" + k.replace("_", "-") for k in params}
    names.update(admin_enabled="--no-admin", log_level="--log-level/-v", plugins="--plugin")
    if certs_dir is not None:
        names.update(certfile="--certs", keyfile="--certs")
    flags = _flags(params, assignments)
    try:
        settings = ServeSettings.load(config_file, flags, flag_names=names)
    except SettingsError as exc:
        raise _config_error(exc) from None
    if print_config:
        click.echo(settings.to_toml(settings.origins(config_file, flags, names)), nl=False)
        return
    if settings.certfile is None:
        raise CliError(
            "no certificate: set certfile (and keyfile) in the config file, BACKBONE_CERTFILE "
            "or --certfile, or --certs DIR (`backbone certs init` makes development ones)",
            EXIT_USAGE,
        )
    reset_key = settings.stateless_reset_key
    reset_key_file = reset_key.get_secret_value() if reset_key is not None else None
    problems = missing_files(
        certfile=settings.certfile,
        keyfile=settings.keyfile,
        client_cafile=settings.client_cafile,
        stateless_reset_key=None
        if reset_key_file is None or is_hex_key(reset_key_file)
        else reset_key_file,
    )
    if problems:
        raise CliError("; ".join(problems), EXIT_USAGE)
    _setup_logging(settings.log_level)
    sys.exit(asyncio.run(_serve(settings)))


async def _serve(settings: ServeSettings) -> int:
    from .admin import AdminServer, run_admin
    from .server import Server

    plugins = _build_plugins(settings.plugins, settings.plugin_options)
    try:
        server = Server(config=settings.server_config(), plugins=plugins)
    except Exception as exc:
        raise CliError(f"cannot create the server: {exc}", EXIT_USAGE) from None
    stop = asyncio.Event()
    forced = _install_stop_signals(stop, "draining")
    try:
        await server.start()
    except OSError as exc:
        await _stop_quietly(server)
        raise CliError(
            f"cannot listen on {settings.host}:{settings.port} (UDP): {exc.strerror or exc}"
        ) from None
    except Exception as exc:  # e.g. a certificate that does not load
        await _stop_quietly(server)
        raise CliError(f"cannot start the server: {exc}", EXIT_USAGE) from None
    admin: AdminServer | None = None
    if settings.admin_enabled:
        try:
            admin = await run_admin(
                server,
                settings.admin_host,
                settings.admin_port,
                settings.token,
                access_log=settings.log_level == "debug",
            )
        except OSError as exc:
            await _stop_quietly(server)
            raise CliError(
                f"cannot serve the admin API on {settings.admin_host}:{settings.admin_port} "
                f"(TCP): {exc.strerror or exc}"
            ) from None
    host, port = server.address
    log.info(
        "ready: QUIC on %s:%d, admin API %s, plugins: %s",
        host,
        port,
        admin.url if admin else "off",
        ", ".join(p.name for p in server.plugins) or "none",
    )
    await stop.wait()
    log.info("draining %d clients", len(server))
    drain = asyncio.get_running_loop().create_task(server.stop(), name="backbone-drain")
    try:
        await drain
    except asyncio.CancelledError:
        if not forced():
            raise
        log.warning("drain cut short")
    finally:
        if admin is not None:
            await admin.close()
    log.info("stopped")
    return EXIT_FAILED if forced() else EXIT_OK


async def _stop_quietly(server: Server) -> None:
    with contextlib.suppress(Exception):
        await server.stop(grace=0)


# --- client -----------------------------------------------------------------------------------


def _split_server(value: str) -> tuple[str, int]:
    """HOST:PORT, [v6]:PORT or HOST (default port)."""
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", value.strip())
    if m is None:
        raise click.BadParameter(f"{value!r} is not HOST:PORT", param_hint="--server")
    host = m.group(1) or m.group(3)
    port = m.group(2) or m.group(4)
    if port is None:
        return host, 4433
    if not 1 <= int(port) <= 65535:
        raise click.BadParameter(f"port {port} is not in 1-65535", param_hint="--server")
    return host, int(port)


def _bytes_text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


async def _read_capped(stream: asyncio.StreamReader | None, cap: int) -> tuple[bytes, bool]:
    """All of ``stream``, keeping the first ``cap`` bytes; (kept, truncated)."""
    if stream is None:
        return b"", False
    kept = bytearray()
    truncated = False
    while chunk := await stream.read(65536):
        room = cap - len(kept)
        if room > 0:
            kept += chunk[:room]
        if len(chunk) > room:
            truncated = True
    return bytes(kept), truncated


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


async def run_command(
    command: str, msg: Message, timeout: float | None = None, max_output: int = 65536
) -> dict[str, Any]:
    """Run ``command`` in a shell with the payload on stdin (JSON, or the raw bytes);
    the result is ``{"exit_code", "stdout", "stderr"}`` (+ ``timed_out``/``truncated``)."""
    import orjson

    raw = isinstance(msg.payload, bytes | bytearray)
    data = bytes(msg.payload) if raw else orjson.dumps(msg.payload)
    env = dict(
        os.environ,
        BACKBONE_CLIENT_ID=msg.client_id,
        BACKBONE_MSG_ID=msg.msg_id,
        BACKBONE_WAIT_ACK="1" if msg.wait_ack else "0",
        BACKBONE_PAYLOAD_TYPE="bytes" if raw else "json",
    )
    proc = await asyncio.create_subprocess_shell(
        command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,  # its own process group: a timeout kills all of it
    )

    async def feed() -> None:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.write(data)
            await proc.stdin.drain()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.close()

    timed_out = False
    t0 = time.monotonic()
    try:
        work = asyncio.gather(
            feed(),
            _read_capped(proc.stdout, max_output),
            _read_capped(proc.stderr, max_output),
            proc.wait(),
        )
        try:
            _, (stdout, cut_out), (stderr, cut_err), _ = await asyncio.wait_for(work, timeout)
        except TimeoutError:
            timed_out = True
            _kill_group(proc)
            await proc.wait()
            stdout, cut_out, stderr, cut_err = b"", False, b"", False
    finally:
        _kill_group(proc)
    result: dict[str, Any] = {
        "exit_code": proc.returncode,
        "stdout": _bytes_text(stdout),
        "stderr": _bytes_text(stderr),
    }
    if timed_out:
        result["timed_out"] = True
        result["stderr"] = f"killed after {timeout:g} s"
    if cut_out or cut_err:
        result["truncated"] = True
    log.info(
        "message %s: %r exited %s in %.0f ms",
        msg.msg_id,
        command,
        proc.returncode,
        (time.monotonic() - t0) * 1000,
    )
    return result


def _show_message(msg: Message) -> None:
    from .admin import dumps

    if sys.stdout.isatty():
        stamp = click.style(clock(time.time()), dim=True)
        flag = click.style(" wait-ack", fg="yellow") if msg.wait_ack else ""
        body = dumps(msg.payload).decode()
        out(f"{stamp} {click.style(msg.msg_id[:12], fg='cyan')}{flag} {body}")
    else:
        line = {"msg_id": msg.msg_id, "wait_ack": msg.wait_ack, "payload": msg.payload}
        out(dumps(line).decode())
    sys.stdout.flush()


@main.command("client")
@click.argument("client_id", metavar="ID")
@_common_run_options
@click.option(
    "--server", "server_addr", metavar="HOST:PORT", help="server address  [default: 127.0.0.1:4433]"
)
@click.option("--cafile", help="CA that signed the server certificate (PEM)")
@click.option("--server-name", help="TLS server name (default: the host)")
@click.option("--certfile", help="client certificate (PEM), if the server asks for one")
@click.option("--keyfile", help="client private key (PEM)")
@click.option(
    "--certs",
    "certs_dir",
    type=click.Path(file_okay=False),
    help="shortcut: --cafile DIR/ca.pem, and DIR/client-ID.pem/.key if they exist",
)
@click.option(
    "--insecure", is_flag=True, default=None, help="do not verify the server (development only)"
)
@click.option(
    "--exec",
    "command",
    metavar="CMD",
    help="run CMD (a shell command) for each message: payload on stdin, "
    'result {"exit_code", "stdout", "stderr"}',
)
@click.option("--exec-timeout", type=float, help="kill CMD after this many seconds")
def client_cmd(
    client_id: str,
    config_file: str | None,
    plugins: tuple[str, ...],
    log_level: str | None,
    verbose: bool,
    assignments: tuple[str, ...],
    server_addr: str | None,
    cafile: str | None,
    server_name: str | None,
    certfile: str | None,
    keyfile: str | None,
    certs_dir: str | None,
    insecure: bool | None,
    command: str | None,
    exec_timeout: float | None,
) -> None:
    """Run a client with id ID: connect, reconnect with backoff, handle messages.

    With --exec, each message runs CMD with the payload (JSON, or raw bytes) on stdin
    and BACKBONE_CLIENT_ID, BACKBONE_MSG_ID, BACKBONE_WAIT_ACK, BACKBONE_PAYLOAD_TYPE in
    its environment; its exit code and output become the WaitAck result.  Without it,
    each message is printed (JSON lines when piped) and the result is {"ok": true}.
    Messages are handled one at a time, in order.  Ctrl-C or SIGTERM stops.
    """
    from .settings import ClientSettings, SettingsError, missing_files

    host, port = _split_server(server_addr) if server_addr else (None, None)
    if certs_dir is not None:
        d = Path(certs_dir)
        cafile = cafile or str(d / "ca.pem")
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in client_id)
        if (d / f"client-{safe}.pem").exists() and certfile is None:
            certfile, keyfile = str(d / f"client-{safe}.pem"), str(d / f"client-{safe}.key")
    params: dict[str, Any] = {
        "client_id": client_id,
        "host": host,
        "port": port,
        "cafile": cafile,
        "server_name": server_name,
        "certfile": certfile,
        "keyfile": keyfile,
        "verify": False if insecure else None,
        "exec": command,
        "exec_timeout": exec_timeout,
        "plugins": plugins,
        "log_level": "debug" if verbose else log_level,
    }
    names = {k: "--" + k.replace("_", "-") for k in params}
    names.update(
        client_id="ID",
        host="--server",
        port="--server",
        verify="--insecure",
        plugins="--plugin",
        log_level="--log-level/-v",
    )
    flags = _flags(params, assignments)
    try:
        settings = ClientSettings.load(config_file, flags, flag_names=names)
    except SettingsError as exc:
        raise _config_error(exc) from None
    problems = missing_files(
        cafile=settings.cafile, certfile=settings.certfile, keyfile=settings.keyfile
    )
    if problems:
        raise CliError("; ".join(problems), EXIT_USAGE)
    _setup_logging(settings.log_level)
    sys.exit(asyncio.run(_client(settings)))


async def _client(settings: ClientSettings) -> int:
    from . import signals
    from .client import Client

    plugins = _build_plugins(settings.plugins, settings.plugin_options)
    try:
        client: Client = Client(config=settings.client_config(), plugins=plugins)
    except Exception as exc:
        raise CliError(f"cannot create the client: {exc}", EXIT_USAGE) from None
    command = settings.exec

    @client.handler
    async def handle(msg: Message) -> Any:
        if command is not None:
            return await run_command(command, msg, settings.exec_timeout, settings.max_output)
        _show_message(msg)
        return {"ok": True}

    stop = asyncio.Event()
    gave_up = False

    def on_state(sender: Any, event: Any) -> None:
        # the client stopped by itself (e.g. stop_on_auth_failure): so does the command
        nonlocal gave_up
        if event.new == "closed" and not stop.is_set():
            gave_up = True
            stop.set()

    signals.on_state_changed.connect(on_state, sender=client, weak=False)
    _install_stop_signals(stop, "closing")
    log.info(
        "client %r: connecting to %s:%d%s",
        settings.client_id,
        settings.host,
        settings.port,
        f", running {command!r} for each message" if command else "",
    )
    try:
        async with client:
            await stop.wait()
    finally:
        signals.on_state_changed.disconnect(on_state, sender=client)
    if gave_up:
        log.error("client %r gave up; exiting", settings.client_id)
        return EXIT_FAILED
    log.info("stopped")
    return EXIT_OK


# --- demo -------------------------------------------------------------------------------------

_SHOWN = {
    "server.started",
    "connected",
    "disconnected",
    "heartbeat.timed_out",
    "state.changed",
    "ack.timed_out",
    "ack.failed",
    "reconnect.scheduled",
    "server.stopped",
    "goaway.received",
}


def _print_event(sender: Any, event: Any) -> None:
    if event.kind not in _SHOWN:
        return
    fields = event.model_dump(exclude={"kind", "seq", "at", "role"}, exclude_none=True)
    text = " ".join(f"{k}={v}" for k, v in fields.items() if v not in ("", 0.0))
    click.echo(f"  · {event.role:6} {event.kind:20} {text}")


def clients_table(infos: list[dict[str, Any]]) -> str:
    rows = [
        [
            click.style(str(c["client_id"]), fg="cyan"),
            str(c["remote_address"]),
            ago(c["connected_at"]),
            ago(c["last_heartbeat_at"]),
            millis(c["rtt"]),
            _highlight(c["pending_acks"]),
            size(c["outbound_buffered"]),
            str(c["messages_sent"]),
            str(c["messages_received"]),
        ]
        for c in infos
    ]
    headers = ["CLIENT", "REMOTE", "UP", "LAST HB", "RTT", "PENDING", "BUFFERED", "SENT", "RECV"]
    return table(headers, rows, right=frozenset({2, 3, 4, 5, 6, 7, 8}))


def _highlight(n: int) -> str:
    return click.style(str(n), fg="yellow") if n else str(n)


def stats_pairs(stats: Mapping[str, Any]) -> list[tuple[str, str]]:
    def rate(v: float | None) -> str:
        return "-" if v is None else f"{v:,.1f}/s"

    return [
        ("connections", str(stats.get("connections"))),
        ("messages out", f"{stats.get('messages_out')} ({rate(stats.get('msgs_out_per_s'))})"),
        ("messages in", f"{stats.get('messages_in')} ({rate(stats.get('msgs_in_per_s'))})"),
        ("pending results", str(stats.get("pending_acks"))),
        ("results", str(stats.get("acks"))),
        ("result timeouts", str(stats.get("ack_timeouts"))),
        ("result latency avg", millis(stats.get("ack_latency_avg"))),
        ("result latency p99", millis(stats.get("ack_latency_p99"))),
        ("sends refused", str(stats.get("rejected"))),
        ("stateless resets sent", str(stats.get("stateless_resets", 0))),
    ]


async def _demo(n_clients: int, port: int) -> int:
    import dataclasses

    from . import signals
    from .certs import make_dev_certs
    from .client import Client
    from .errors import AckTimeout, RemoteError
    from .server import Server

    with tempfile.TemporaryDirectory(prefix="backbone-demo-") as tmp:
        dev = make_dev_certs(Path(tmp))
        signals.on_event.connect(_print_event, weak=False)
        click.echo(f"== backbone demo: 1 server, {n_clients} clients on 127.0.0.1 (QUIC, TLS 1.3)")
        server = Server(
            "127.0.0.1",
            port,
            certfile=str(dev.server_cert),
            keyfile=str(dev.server_key),
            heartbeat_interval=1.0,
        )
        async with server:
            clients: list[Client] = []
            for i in range(n_clients):
                client = Client(
                    f"device-{i + 1}",
                    "127.0.0.1",
                    server.port,
                    cafile=str(dev.ca_cert),
                    server_name="localhost",
                    heartbeat_interval=1.0,
                )

                @client.handler
                async def handle(msg: Message, me: str = client.client_id) -> Any:
                    op = msg.payload.get("op") if isinstance(msg.payload, dict) else None
                    if op == "version":
                        return {"client": me, "version": __version__}
                    if op == "slow":
                        await asyncio.sleep(0.5)
                    if op == "fail":
                        raise RuntimeError("simulated failure")
                    return {"client": me, "done": op}

                clients.append(client)
            for c in clients:
                await c.start()
            for c in clients:
                await c.wait_connected(10)

            click.echo("\n== connected clients")
            for info in server.clients():
                click.echo(
                    f"  {info.client_id:10} from {info.remote_address:22} session {info.session_id}"
                )

            click.echo("\n== unicast, fire and forget")
            msg_id = await server.send_to("device-1", {"op": "reboot"})
            click.echo(f"  send_to(device-1) -> MsgID {msg_id}")

            click.echo("\n== unicast with WaitAck")
            t0 = time.perf_counter()
            result = await server.send_to("device-1", {"op": "reboot"}, wait_ack=True, timeout=5)
            click.echo(f"  result {result} in {(time.perf_counter() - t0) * 1000:.2f} ms")

            click.echo("\n== broadcast with WaitAck")
            report = await server.broadcast({"op": "version"}, wait_ack=True, timeout=5)
            for cid, outcome in sorted(report.outcomes.items()):
                click.echo(f"  {cid:10} {outcome.result if outcome.ok else outcome.error}")

            click.echo("\n== a handler that fails, and one that is too slow")
            try:
                await server.send_to("device-2", {"op": "fail"}, wait_ack=True, timeout=5)
            except RemoteError as exc:
                click.echo(f"  RemoteError: {exc}")
            try:
                await server.send_to("device-2", {"op": "slow"}, wait_ack=True, timeout=0.3)
            except AckTimeout as exc:
                click.echo(f"  AckTimeout: {exc}")

            click.echo("\n== 1000 WaitAck round trips, 32 in flight")
            sem = asyncio.Semaphore(32)

            async def one(i: int) -> None:
                async with sem:
                    await server.send_to(f"device-{i % n_clients + 1}", {"op": i}, wait_ack=True)

            t0 = time.perf_counter()
            live = asyncio.ensure_future(_live_figures(server))
            try:
                await asyncio.gather(*(one(i) for i in range(1000)))
            finally:
                live.cancel()
                await asyncio.gather(live, return_exceptions=True)
            dt = time.perf_counter() - t0
            click.echo(f"  1000 results in {dt:.2f} s ({1000 / dt:,.0f}/s)")

            click.echo("\n== client → server with WaitAck")
            server.handler(lambda m: {"seen": m.payload, "from": m.client_id})
            click.echo(f"  {await clients[0].send({'temp': 21}, wait_ack=True)}")

            click.echo("\n== clients and figures (what `backbone clients` / `stats` show)")
            infos = [i.model_dump() for i in sorted(server.clients(), key=lambda i: i.client_id)]
            out(_indent(clients_table(infos)))
            out("")
            out(_indent(key_values(stats_pairs(dataclasses.asdict(server.stats())))))

            click.echo("\n== shutting down")
            for c in clients:
                await c.close()
        signals.on_event.disconnect(_print_event)
    click.echo("== done")
    return 0


async def _live_figures(server: Server, every: float = 0.25) -> None:
    """One line of live figures, rewritten in place on a terminal (a line per second when
    piped), until cancelled."""
    tty = sys.stdout.isatty()
    shown = 0.0
    try:
        while True:
            await asyncio.sleep(every)
            s = server.stats()
            avg = f"{s.ack_latency_avg * 1000:.2f}" if s.ack_latency_avg is not None else "-"
            p99 = f"{s.ack_latency_p99 * 1000:.2f}" if s.ack_latency_p99 is not None else "-"
            line = (
                f"  live: {s.connections} clients  {s.msgs_out_per_s:,.0f} msg/s out  "
                f"{s.msgs_in_per_s:,.0f} msg/s in  {s.pending_acks} pending  "
                f"ack avg {avg} ms  p99 {p99} ms"
            )
            if tty:
                click.echo("\r" + line.ljust(100), nl=False)
            elif time.monotonic() - shown >= 1.0:
                shown = time.monotonic()
                click.echo(line)
    finally:
        if tty:
            click.echo("")


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


@main.command()
@click.option("--clients", "n_clients", default=3, show_default=True, help="how many clients")
@click.option("--port", default=0, show_default=True, help="UDP port (0: any free port)")
@click.option("-v", "--verbose", is_flag=True, help="debug logs on stderr")
def demo(n_clients: int, port: int, verbose: bool) -> None:
    """Run an embedded server and a few clients: unicast, broadcast, WaitAck."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format=LOG_FORMAT, stream=sys.stderr
    )
    if n_clients < 2:
        raise click.BadParameter("the demo needs at least 2 clients", param_hint="--clients")
    sys.exit(asyncio.run(_demo(n_clients, port)))


# --- operator commands: the admin API ---------------------------------------------------------


class AdminClient:
    """A small synchronous client of the admin API (stdlib only)."""

    def __init__(self, url: str, token: str | None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(
        self,
        method: str,
        path: str,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        timeout: float | None = None,
    ) -> Any:
        """The decoded JSON answer of a 2xx; otherwise a :class:`CliError` with the API's
        message and the matching exit code."""
        pairs = [(k, v) for k, v in (query or {}).items() if v is not None and v != []]
        url = self.url + path + ("?" + urllib.parse.urlencode(pairs, doseq=True) if pairs else "")
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as resp:
                status, raw, ctype = resp.status, resp.read(), resp.headers.get_content_type()
        except urllib.error.HTTPError as exc:
            status, raw, ctype = exc.code, exc.read(), exc.headers.get_content_type()
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise self._timeout() from None
            raise CliError(
                f"cannot reach the admin API at {self.url}: {_reason(reason)} "
                "(is `backbone serve` running? see --admin / BACKBONE_ADMIN_URL)",
                EXIT_UNREACHABLE,
            ) from None
        except TimeoutError:
            raise self._timeout() from None
        except (OSError, ValueError) as exc:
            raise CliError(
                f"cannot reach the admin API at {self.url}: {exc}", EXIT_UNREACHABLE
            ) from None
        payload: Any = raw.decode("utf-8", errors="replace")
        if ctype == "application/json":
            with contextlib.suppress(ValueError):
                payload = json.loads(raw)
        if 200 <= status < 300:
            return payload
        raise self._api_error(status, payload)

    def _timeout(self) -> CliError:
        return CliError(f"the admin API at {self.url} did not answer in time", EXIT_TIMEOUT)

    @staticmethod
    def _api_error(status: int, payload: Any) -> CliError:
        error = payload.get("error") if isinstance(payload, dict) else None
        if not isinstance(error, dict):
            return CliError(f"admin API answered HTTP {status}: {str(payload)[:200]}")
        message = str(error.get("message", f"HTTP {status}"))
        if status == 401:
            return CliError(f"{message} (use --token or BACKBONE_ADMIN_TOKEN)", EXIT_UNREACHABLE)
        if status == 504:
            return CliError(message, EXIT_TIMEOUT)
        return CliError(message, EXIT_FAILED)


def _reason(reason: object) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason)


def _check_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    parsed = urllib.parse.urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise click.BadParameter(f"{value!r} is not an http(s) URL, e.g. {DEFAULT_ADMIN_URL}")
    return value


def _admin_options(fn: F) -> F:
    fn = click.option(
        "--token",
        envvar="BACKBONE_ADMIN_TOKEN",
        help="admin API bearer token [env BACKBONE_ADMIN_TOKEN]",
    )(fn)
    fn = click.option(
        "--admin",
        "admin_url",
        default=DEFAULT_ADMIN_URL,
        envvar="BACKBONE_ADMIN_URL",
        show_default=True,
        callback=_check_url,
        help="admin API of the server [env BACKBONE_ADMIN_URL]",
    )(fn)
    return fn


def _json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="print JSON")(fn)


def _path(client_id: str) -> str:
    return urllib.parse.quote(client_id, safe="")


@main.command("clients")
@_admin_options
@_json_option
@click.option(
    "--sort",
    type=click.Choice(["client_id", "connected_at", "last_heartbeat_at", "rtt", "pending_acks"]),
    default="client_id",
    show_default=True,
    help="order of the list",
)
@click.option("--desc", is_flag=True, help="descending order")
@click.option("--prefix", default="", help="only ids starting with this")
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=100, show_default=True, help="page size"
)
@click.option("--offset", type=click.IntRange(0), default=0, help="skip this many")
@click.option("--all", "everything", is_flag=True, help="every page")
def clients_cmd(
    admin_url: str,
    token: str | None,
    as_json: bool,
    sort: str,
    desc: bool,
    prefix: str,
    limit: int,
    offset: int,
    everything: bool,
) -> None:
    """List the connected clients (a table; --json for scripts)."""
    api = AdminClient(admin_url, token)
    query: dict[str, Any] = {
        "sort": sort,
        "order": "desc" if desc else "asc",
        "prefix": prefix or None,
        "limit": 1000 if everything else limit,
        "offset": offset,
    }
    page = api.call("GET", "/clients", query)
    found: list[dict[str, Any]] = list(page["clients"])
    total = int(page["total"])
    if everything and len(found) < total - offset:
        with click.progressbar(
            length=total - offset, label="fetching clients", file=sys.stderr
        ) as bar:
            bar.update(len(found))
            while len(found) < total - offset:
                query["offset"] = offset + len(found)
                more = api.call("GET", "/clients", query)["clients"]
                if not more:
                    break
                found.extend(more)
                bar.update(len(more))
    if as_json:
        print_json({**page, "clients": found, "limit": len(found) if everything else limit})
        return
    if not found:
        out(
            "no clients connected"
            if not prefix
            else f"no connected client id starts with {prefix!r}"
        )
        return
    out(clients_table(found))
    shown_to = offset + len(found)
    if offset or shown_to < total:
        err(f"{offset + 1}-{shown_to} of {total} clients (--offset, --limit, --all)")


@main.command("client-info")
@click.argument("client_id", metavar="ID")
@_admin_options
@_json_option
def client_info_cmd(client_id: str, admin_url: str, token: str | None, as_json: bool) -> None:
    """Show one connected client."""
    info = AdminClient(admin_url, token).call("GET", f"/clients/{_path(client_id)}")
    if as_json:
        print_json(info)
        return
    pairs = [
        ("client", str(info["client_id"])),
        ("session", str(info["session_id"])),
        ("remote address", str(info["remote_address"])),
        ("connected", f"{clock(info['connected_at'])} ({ago(info['connected_at'])} ago)"),
        (
            "last heartbeat",
            "-"
            if info["last_heartbeat_at"] is None
            else f"{ago(info['last_heartbeat_at'])} ago ({info['heartbeats']} in all)",
        ),
        ("rtt", millis(info["rtt"])),
        ("pending results", _highlight(int(info["pending_acks"]))),
        ("outbound buffered", size(info["outbound_buffered"])),
        ("messages sent", str(info["messages_sent"])),
        ("messages received", str(info["messages_received"])),
    ]
    out(key_values(pairs))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)")
_UNITS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_when(value: str | None, now: float | None = None) -> float | None:
    """``10m`` / ``2h`` / ``1d`` ago, an ISO 8601 time (local if naive), or Unix seconds."""
    if value is None:
        return None
    text = value.strip()
    m = _DURATION.fullmatch(text)
    if m:
        return (time.time() if now is None else now) - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: expected a duration ago (30s, 10m, 2h, 1d), an ISO time "
            "(2024-05-01T12:00) or Unix seconds"
        ) from None


def _when_option(name: str, what: str) -> Callable[[F], F]:
    def convert(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
        return parse_when(value)

    return click.option(name, callback=convert, metavar="WHEN", help=what)


_EVENT_DETAILS_SKIP: Final = {"kind", "seq", "at", "role", "client_id"}


@main.command("history")
@click.argument("client_id", metavar="ID")
@_admin_options
@_json_option
@_when_option("--since", "from this time: 10m (ago), ISO time or Unix seconds")
@_when_option("--until", "up to this time")
@click.option(
    "--limit", type=click.IntRange(1, 10_000), default=100, show_default=True, help="most recent N"
)
@click.option("--kind", "kinds", multiple=True, help="only these kinds (repeatable; 'ack.*')")
@click.option("--role", type=click.Choice(["server", "client"]), help="one side's events")
def history_cmd(
    client_id: str,
    admin_url: str,
    token: str | None,
    as_json: bool,
    since: float | None,
    until: float | None,
    limit: int,
    kinds: tuple[str, ...],
    role: str | None,
) -> None:
    """Show a client's recorded events (the server needs the history plugin)."""
    query = {"since": since, "until": until, "limit": limit, "kind": list(kinds), "role": role}
    data = AdminClient(admin_url, token).call("GET", f"/clients/{_path(client_id)}/history", query)
    if as_json:
        print_json(data)
        return
    events = data["events"]
    if not events:
        out(f"no recorded events for {client_id!r}")
    else:
        rows = []
        for e in events:
            details = " ".join(
                f"{k}={v}"
                for k, v in e.items()
                if k not in _EVENT_DETAILS_SKIP and v not in (None, "", {})
            )
            rows.append([clock(e["at"]), e["role"], click.style(e["kind"], fg="cyan"), details])
        out(table(["TIME", "ROLE", "KIND", "DETAILS"], rows))
    view = data.get("session")
    if isinstance(view, dict):
        out("")
        pairs = [
            (k.replace("_", " "), _fmt_view(k, v))
            for k, v in view.items()
            if k not in ("client_id", "role")
        ]
        out(key_values(pairs))


def _fmt_view(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("_at") or key.endswith("_since"):
        return f"{clock(float(value))} ({ago(float(value))} ago)"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
    return str(value)


def _read_payload(text: str, as_string: bool) -> Any:
    if text == "-":
        text = sys.stdin.read()
    if as_string:
        return text
    try:
        return json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(
            f"not valid JSON ({exc}); use --string to send it as text", param_hint="PAYLOAD"
        ) from None


def _send_options(fn: F) -> F:
    fn = click.option(
        "--string", "as_string", is_flag=True, help="send PAYLOAD as a JSON string, not parsed"
    )(fn)
    fn = click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True, max=86400),
        help="seconds to wait for the result (default: the server's ack_timeout)",
    )(fn)
    fn = click.option("--wait-ack", is_flag=True, help="wait for the result and print it")(fn)
    return fn


def _http_timeout(timeout: float | None, wait_ack: bool) -> float:
    # the server gives up at `timeout` (or its ack_timeout, 30 s by default) and answers 504
    return (timeout if timeout is not None else 300.0) + 15.0 if wait_ack else 30.0


@main.command("send")
@click.argument("client_id", metavar="ID")
@click.argument("payload", metavar="PAYLOAD")
@_admin_options
@_send_options
def send_cmd(
    client_id: str,
    payload: str,
    admin_url: str,
    token: str | None,
    wait_ack: bool,
    timeout: float | None,
    as_string: bool,
) -> None:
    """Send PAYLOAD (JSON; - reads stdin) to client ID.  With --wait-ack, print the
    client's result; the exit code is non-zero on a timeout (4) or an error (1)."""
    body: dict[str, Any] = {"payload": _read_payload(payload, as_string), "wait_ack": wait_ack}
    if timeout is not None:
        body["timeout"] = timeout
    api = AdminClient(admin_url, token)
    label = f"waiting for {client_id}'s result" if wait_ack else "sending"
    with Spinner(label):
        answer = api.call(
            "POST",
            f"/clients/{_path(client_id)}/messages",
            body=body,
            timeout=_http_timeout(timeout, wait_ack),
        )
    if wait_ack:
        print_json(answer["result"])
    else:
        out(str(answer["msg_id"]))


@main.command("broadcast")
@click.argument("payload", metavar="PAYLOAD")
@_admin_options
@_send_options
@_json_option
def broadcast_cmd(
    payload: str,
    admin_url: str,
    token: str | None,
    wait_ack: bool,
    timeout: float | None,
    as_string: bool,
    as_json: bool,
) -> None:
    """Send PAYLOAD (JSON; - reads stdin) to every connected client; with --wait-ack,
    show each client's result.  Exit code 1 if any client failed."""
    body: dict[str, Any] = {"payload": _read_payload(payload, as_string), "wait_ack": wait_ack}
    if timeout is not None:
        body["timeout"] = timeout
    api = AdminClient(admin_url, token)
    with Spinner("waiting for the results" if wait_ack else "sending"):
        report = api.call("POST", "/broadcast", body=body, timeout=_http_timeout(timeout, wait_ack))
    if as_json:
        print_json(report)
    else:
        rows = []
        for cid, outcome in report["outcomes"].items():
            if outcome["ok"]:
                mark = click.style("ok", fg="green")
                detail = json.dumps(outcome["result"]) if wait_ack else ""
            else:
                mark = click.style(outcome["error"]["code"], fg="red")
                detail = outcome["error"]["message"]
            rows.append([cid, mark, detail])
        if rows:
            out(table(["CLIENT", "OUTCOME", "RESULT" if wait_ack else ""], rows))
        n = report["clients"]
        summary = f"{n} client{'' if n == 1 else 's'}: {report['ok']} ok, {report['failed']} failed"
        err(f"message {report['msg_id']}: {summary}")
    if report["failed"]:
        sys.exit(EXIT_FAILED)


@main.command("stats")
@_admin_options
@_json_option
def stats_cmd(admin_url: str, token: str | None, as_json: bool) -> None:
    """Show the server's live figures: connections, rates, result latency."""
    data = AdminClient(admin_url, token).call("GET", "/stats")
    if as_json:
        print_json(data)
        return
    out(key_values(stats_pairs(data)))


def iter_commands() -> Iterator[tuple[str, click.Command]]:
    """Every command, with its full name (for tests and docs)."""

    def walk(prefix: str, cmd: click.Command) -> Iterator[tuple[str, click.Command]]:
        yield prefix, cmd
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(f"{prefix} {name}".strip(), sub)

    yield from walk("", main)


if __name__ == "__main__":
    main()
