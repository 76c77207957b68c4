"""The ``backbone`` command line: help, argument and configuration errors, the operator
commands against a live admin API, ``--exec``, the demo, and a real ``backbone serve`` +
``backbone client`` pair driven by ``backbone clients`` / ``send`` in subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from backbone import Client, Message, Server
from backbone.__main__ import (
    EXIT_FAILED,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    _client,
    _show_message,
    _split_server,
    iter_commands,
    main,
    parse_when,
    run_command,
)
from backbone.admin import run_admin

TOKEN = "cli-test-token-0123456789"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("BACKBONE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NO_COLOR", "1")


def cli(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input, env=env, catch_exceptions=False)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- help and usage ----------------------------------------------------------------------------


def test_every_command_has_help() -> None:
    names = [name for name, _cmd in iter_commands()]
    for expected in (
        "serve",
        "client",
        "demo",
        "certs init",
        "clients",
        "client-info",
        "history",
        "send",
        "broadcast",
        "stats",
    ):
        assert expected in names
    for name, command in iter_commands():
        result = cli(*name.split(), "--help")
        assert result.exit_code == 0, (name, result.output)
        assert "Usage: " in result.output and (command.help or "").split("\n")[0][:20] in (
            result.output
        )
    assert "Exit codes" in cli("--help").output
    assert cli("--version").output.strip() == "backbone, version 0.1.0"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["send"], "Missing argument 'ID'"),
        (["send", "dev-1"], "Missing argument 'PAYLOAD'"),
        (["send", "dev-1", "{bad"], "not valid JSON"),
        (["send", "dev-1", "1", "--timeout", "0"], "--timeout"),
        (["clients", "--admin", "localhost:8080"], "is not an http(s) URL"),
        (["clients", "--limit", "0"], "--limit"),
        (["clients", "--sort", "name"], "--sort"),
        (["history", "dev-1", "--since", "yesterday"], "expected a duration ago"),
        (["client", "dev-1", "--server", "host:port"], "is not HOST:PORT"),
        (["client", "dev-1", "--server", "host:70000"], "not in 1-65535"),
        (["serve", "--port", "x"], "'x' is not a valid integer"),
        (["frobnicate"], "No such command"),
        (["demo", "--clients", "1"], "at least 2 clients"),
    ],
)
def test_usage_errors_are_one_clear_line_and_exit_2(args: list[str], message: str) -> None:
    result = cli(*args)
    assert result.exit_code == EXIT_USAGE, result.output
    assert message in result.output
    assert "Traceback" not in result.output


# --- serve and client configuration errors, --print-config ----------------------------------------


def test_serve_refuses_a_bad_configuration_before_starting(tmp_path: Path, certs: Any) -> None:
    result = cli("serve")
    assert result.exit_code == EXIT_USAGE and "no certificate" in result.stderr
    result = cli("serve", "--certfile", str(tmp_path / "none.pem"))
    assert result.exit_code == EXIT_USAGE and "certfile = " in result.stderr
    assert "no such file" in result.stderr
    result = cli("serve", "--certs", str(certs.directory), "--port", "70000")
    assert result.exit_code == EXIT_USAGE
    assert "port = 70000 (from --port)" in result.stderr and "65535" in result.stderr
    result = cli(
        "serve",
        "--certs",
        str(certs.directory),
        "--port",
        "70000",
        env={"BACKBONE_HEARTBEAT_INTERVAL": "soon"},
    )
    assert result.exit_code == EXIT_USAGE
    assert result.stderr.splitlines() == [
        "Error: invalid configuration:",
        "  heartbeat_interval = 'soon' (from BACKBONE_HEARTBEAT_INTERVAL): Input should be a "
        "valid number, unable to parse string as a number",
        "  port = 70000 (from --port): Input should be less than or equal to 65535",
    ]
    result = cli("serve", "--certs", str(certs.directory), "--admin-host", "0.0.0.0")
    assert result.exit_code == EXIT_USAGE
    assert "admin_host '0.0.0.0' is not a loopback address" in result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("port = [\n")
    result = cli("serve", "--config", str(bad))
    assert result.exit_code == EXIT_USAGE and "not valid TOML" in result.stderr
    result = cli("serve", "--certs", str(certs.directory), "--plugin", "nope")
    assert result.exit_code == EXIT_USAGE and "unknown plugin 'nope'" in result.stderr
    assert "Traceback" not in result.output


def test_client_refuses_a_bad_configuration_before_starting(tmp_path: Path) -> None:
    result = cli("client", "dev-1", "--cafile", str(tmp_path / "none.pem"))
    assert result.exit_code == EXIT_USAGE and "cafile = " in result.stderr
    result = cli("client", " dev-1")
    assert result.exit_code == EXIT_USAGE and "whitespace" in result.stderr
    result = cli("client", "dev-1", "--exec-timeout", "-1")
    assert result.exit_code == EXIT_USAGE and "exec_timeout = -1.0 (from --exec-timeout)" in (
        result.stderr
    )


def test_print_config_shows_the_merged_layers(tmp_path: Path) -> None:
    config = tmp_path / "backbone.toml"
    config.write_text('port = 5000\nheartbeat_interval = 5.0\nplugins = ["history"]\n')
    result = cli(
        "serve",
        "--config",
        str(config),
        "--port",
        "6000",
        "-s",
        "close_grace=7",
        "--print-config",
        env={"BACKBONE_HEARTBEAT_INTERVAL": "2", "BACKBONE_ADMIN_TOKEN": "x" * 20},
    )
    assert result.exit_code == 0, result.output
    data = tomllib.loads(result.stdout)
    assert (data["port"], data["heartbeat_interval"], data["close_grace"]) == (6000, 2.0, 7)
    assert data["plugins"] == ["history"] and data["admin_token"] == "**********"
    assert data["max_payload"] == 1024 * 1024  # a default
    assert "port = 6000  # --port" in result.stdout
    assert "heartbeat_interval = 2.0  # BACKBONE_HEARTBEAT_INTERVAL" in result.stdout
    assert f'plugins = ["history"]  # {config}' in result.stdout


# --- the operator commands against a live admin API -----------------------------------------------


def _handle(msg: Message) -> Any:
    payload = msg.payload
    if isinstance(payload, dict) and payload.get("op") == "fail":
        raise ValueError("disk full")
    if isinstance(payload, dict) and payload.get("op") == "slow":
        time.sleep(1.0)
    return {"echo": payload}


@pytest.fixture
def live(certs: Any) -> Iterator[str]:
    """A server with its admin API (token required) and a client dev-1, running in a
    thread of their own; yields the admin URL."""
    loop = asyncio.new_event_loop()
    started: queue.Queue[str | BaseException] = queue.Queue()
    stop = asyncio.Event()

    async def run() -> None:
        fast = {"heartbeat_interval": 0.2}
        server = Server(
            "127.0.0.1",
            0,
            certfile=str(certs.server_cert),
            keyfile=str(certs.server_key),
            plugins=[],
            **fast,
        )
        await server.start()
        admin = await run_admin(server, "127.0.0.1", 0, TOKEN)
        client = Client(
            "dev-1",
            "127.0.0.1",
            server.port,
            cafile=str(certs.ca_cert),
            server_name="localhost",
            plugins=[],
            **fast,
        )
        client.handler(_handle)
        try:
            async with client:
                await client.wait_connected(10)
                started.put(admin.url)
                await stop.wait()
        finally:
            await admin.close()
            await server.stop(grace=0)

    def main_thread() -> None:
        try:
            loop.run_until_complete(run())
        except BaseException as exc:
            started.put(exc)

    thread = threading.Thread(target=main_thread, daemon=True)
    thread.start()
    first = started.get(timeout=20)
    if isinstance(first, BaseException):
        raise first
    try:
        yield first
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(20)
        loop.close()


def op(url: str, *args: str, token: str | None = TOKEN, input: str | None = None) -> Result:
    env = {"BACKBONE_ADMIN_URL": url}
    if token:
        env["BACKBONE_ADMIN_TOKEN"] = token
    return cli(*args, input=input, env=env)


def test_operator_commands(live: str) -> None:
    result = op(live, "clients")
    assert result.exit_code == 0, result.output
    header, row = result.stdout.splitlines()
    assert header.split() == [
        "CLIENT",
        "REMOTE",
        "UP",
        "LAST",
        "HB",
        "RTT",
        "PENDING",
        "BUFFERED",
        "SENT",
        "RECV",
    ]
    assert row.startswith("dev-1   127.0.0.1:")
    assert "\x1b[" not in result.stdout  # plain when piped
    page = json.loads(op(live, "clients", "--json", "--sort", "rtt", "--desc").stdout)
    assert [c["client_id"] for c in page["clients"]] == ["dev-1"] and page["order"] == "desc"
    assert op(live, "clients", "--prefix", "zz").stdout.strip() == (
        "no connected client id starts with 'zz'"
    )
    assert json.loads(op(live, "clients", "--all", "--json").stdout)["total"] == 1

    result = op(live, "client-info", "dev-1")
    assert result.exit_code == 0 and "remote address" in result.stdout
    assert json.loads(op(live, "client-info", "dev-1", "--json").stdout)["client_id"] == "dev-1"
    result = op(live, "client-info", "nobody")
    assert result.exit_code == EXIT_FAILED
    assert result.stderr == "Error: client 'nobody' is not connected\n"

    result = op(live, "send", "dev-1", '{"op": "x"}', "--wait-ack")
    assert result.exit_code == 0 and json.loads(result.stdout) == {"echo": {"op": "x"}}
    result = op(live, "send", "dev-1", "reboot now", "--string", "--wait-ack")
    assert json.loads(result.stdout) == {"echo": "reboot now"}
    result = op(live, "send", "dev-1", "-", "--wait-ack", input="[1, 2]\n")
    assert json.loads(result.stdout) == {"echo": [1, 2]}
    result = op(live, "send", "dev-1", "1")
    assert result.exit_code == 0 and re.fullmatch(r"[0-9a-f]{32}\n", result.stdout)
    result = op(live, "send", "dev-1", '{"op": "fail"}', "--wait-ack")
    assert result.exit_code == EXIT_FAILED
    assert "ValueError: disk full" in result.stderr and result.stderr.count("\n") == 1
    result = op(live, "send", "dev-1", '{"op": "slow"}', "--wait-ack", "--timeout", "0.2")
    assert result.exit_code == EXIT_TIMEOUT and "within 0.2 s" in result.stderr
    result = op(live, "send", "nobody", "1")
    assert result.exit_code == EXIT_FAILED and "not connected" in result.stderr

    result = op(live, "broadcast", '"hi"', "--wait-ack")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1].split(None, 2) == ["dev-1", "ok", '{"echo": "hi"}']
    assert "1 client: 1 ok, 0 failed" in result.stderr
    result = op(live, "broadcast", '{"op": "fail"}', "--wait-ack", "--json")
    assert result.exit_code == EXIT_FAILED
    assert json.loads(result.stdout)["outcomes"]["dev-1"]["error"]["code"] == "remote_error"

    result = op(live, "stats")
    assert result.exit_code == 0 and re.search(r"connections\s+1", result.stdout)
    assert json.loads(op(live, "stats", "--json").stdout)["connections"] == 1

    result = op(live, "history", "dev-1")
    assert result.exit_code == EXIT_FAILED and "history plugin is not enabled" in result.stderr

    result = op(live, "stats", token=None)
    assert result.exit_code == EXIT_UNREACHABLE and "--token" in result.stderr
    result = op(live, "stats", token="wrong-token-0123456789")
    assert result.exit_code == EXIT_UNREACHABLE


def test_an_unreachable_admin_api_is_exit_3() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["clients"], ["stats"], ["send", "dev-1", "1"]):
        result = cli(*args, "--admin", url)
        assert result.exit_code == EXIT_UNREACHABLE
        assert result.stderr.startswith(f"Error: cannot reach the admin API at {url}")
        assert "Traceback" not in result.output


# --- --exec --------------------------------------------------------------------------------------


def message(payload: Any, wait_ack: bool = True) -> Message:
    return Message("ab" * 16, "dev-1", payload, wait_ack, time.time())


async def test_exec_passes_the_payload_on_stdin_and_returns_code_and_output() -> None:
    assert await run_command("tr a-z A-Z", message({"op": "hi"})) == {
        "exit_code": 0,
        "stdout": '{"OP":"HI"}',
        "stderr": "",
    }
    result = await run_command("echo oops >&2; exit 3", message(1))
    assert result == {"exit_code": 3, "stdout": "", "stderr": "oops\n"}
    result = await run_command(
        'echo "$BACKBONE_CLIENT_ID $BACKBONE_MSG_ID $BACKBONE_WAIT_ACK $BACKBONE_PAYLOAD_TYPE"',
        message(b"\x00\x01", wait_ack=False),
    )
    assert result["stdout"] == f"dev-1 {'ab' * 16} 0 bytes\n"
    assert (await run_command("wc -c", message(b"\x00\x01\x02")))["stdout"].strip() == "3"
    # a command that ignores a large stdin is fine
    assert (await run_command("true", message("x" * 1_000_000)))["exit_code"] == 0
    assert (await run_command("no-such-command-xyz", message(1)))["exit_code"] == 127


async def test_exec_timeout_kills_and_output_is_capped() -> None:
    t0 = time.monotonic()
    result = await run_command("sleep 30", message(1), timeout=0.3)
    assert time.monotonic() - t0 < 5
    assert result["timed_out"] is True and result["exit_code"] == -signal.SIGKILL
    result = await run_command("head -c 100000 /dev/zero | tr '\\0' x", message(1), max_output=1000)
    assert result["stdout"] == "x" * 1000 and result["truncated"] is True


def test_without_exec_messages_are_printed_as_json_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _show_message(message({"op": "reboot"}))
    _show_message(message(b"\x00\xff", wait_ack=False))
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first == {"msg_id": "ab" * 16, "wait_ack": True, "payload": {"op": "reboot"}}
    assert second["payload"] == {"$base64": "AP8="} and second["wait_ack"] is False


async def test_the_client_command_exits_1_when_the_client_gives_up(
    make_server: Any, certs: Any
) -> None:
    from backbone.settings import ClientSettings

    async with make_server(require_client_cert=True, client_cafile=str(certs.ca_cert)) as server:
        settings = ClientSettings.load(
            flags={
                "client_id": "dev-9",  # no certificate: refused
                "port": server.port,
                "cafile": str(certs.ca_cert),
                "server_name": "localhost",
                "stop_on_auth_failure": True,
            }
        )
        assert await asyncio.wait_for(_client(settings), 20) == EXIT_FAILED


# --- helpers -------------------------------------------------------------------------------------


def test_server_addresses_and_times() -> None:
    assert _split_server("example.com:5000") == ("example.com", 5000)
    assert _split_server("10.0.0.1") == ("10.0.0.1", 4433)
    assert _split_server("[::1]:4434") == ("::1", 4434)
    with pytest.raises(click.BadParameter):
        _split_server("a:b:c")
    assert parse_when("10m", now=1000.0) == 400.0
    assert parse_when("2h", now=10_000.0) == 2800.0
    assert parse_when("1700000000") == 1_700_000_000.0
    assert parse_when("2024-05-01T12:00:00+00:00") == 1_714_564_800.0
    assert parse_when(None) is None


def test_demo_still_runs() -> None:
    result = cli("demo")
    assert result.exit_code == 0, result.output
    for section in ("== connected clients", "== broadcast with WaitAck", "RemoteError:", "== done"):
        assert section in result.stdout
    assert "device-1" in result.stdout and re.search(r"connections\s+3", result.stdout)


# --- a real `backbone serve` and `backbone client`, in subprocesses -------------------------------


class Proc:
    """A ``python -m backbone`` subprocess whose output lines are collected."""

    def __init__(self, *args: str, env: dict[str, str], cwd: Path | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backbone", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
        )
        self.lines: list[str] = []
        self._seen = 0  # wait_for_line's cursor
        self._cond = threading.Condition()
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """The first line matching ``pattern`` (waiting for it)."""
        found: list[re.Match[str]] = []

        def match(line: str) -> bool:
            m = re.search(pattern, line)
            if m:
                found.append(m)
            return m is not None

        self._wait(match, 0, timeout, repr(pattern))
        return found[0]

    def wait_for_line(self, predicate: Callable[[str], bool], timeout: float = 30.0) -> str:
        """The next line, after the one this found last, that satisfies ``predicate``."""
        index = self._wait(predicate, self._seen, timeout, "expected line")
        self._seen = index + 1
        return self.lines[index]

    def _wait(self, predicate: Callable[[str], bool], start: int, timeout: float, what: str) -> int:
        deadline = time.monotonic() + timeout
        checked = start
        with self._cond:
            while True:
                for i in range(checked, len(self.lines)):
                    if predicate(self.lines[i]):
                        return i
                checked = max(checked, len(self.lines))
                exited = self.proc.poll() is not None
                if exited:  # let the readers catch up with its last words
                    self._cond.wait(0.2)
                    if len(self.lines) > checked:
                        continue
                left = deadline - time.monotonic()
                if left <= 0 or exited:
                    state = f"exited {self.proc.returncode}" if exited else "still running"
                    raise AssertionError(
                        f"{' '.join(self.args)} ({state}): no {what} in:\n" + "\n".join(self.lines)
                    )
                self._cond.wait(min(left, 0.5))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKBONE_")}
    env.update(PYTHONUNBUFFERED="1", NO_COLOR="1", **extra)
    return env


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backbone", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_serve_and_client_end_to_end(certs: Any) -> None:
    serve = Proc(
        "serve",
        "--certfile",
        str(certs.server_cert),
        "--keyfile",
        str(certs.server_key),
        "--port",
        "0",
        "--admin-port",
        "0",
        "-s",
        "heartbeat_interval=0.5",
        env=subprocess_env(),
    )
    client: Proc | None = None
    try:
        ready = serve.wait_for(r"ready: QUIC on 127\.0\.0\.1:(\d+), admin API (http://[\d.:]+),")
        port, admin = ready.group(1), ready.group(2)
        client = Proc(
            "client",
            "dev-1",
            "--server",
            f"127.0.0.1:{port}",
            "--cafile",
            str(certs.ca_cert),
            "--server-name",
            "localhost",
            "--exec",
            "tr a-z A-Z",
            "-s",
            "heartbeat_interval=0.5",
            env=subprocess_env(),
        )
        client.wait_for(r"client 'dev-1' connected to 127\.0\.0\.1:")
        env = subprocess_env(BACKBONE_ADMIN_URL=admin)

        listed = run_cli("clients", "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        assert [c["client_id"] for c in json.loads(listed.stdout)["clients"]] == ["dev-1"]
        sent = run_cli("send", "dev-1", '{"op": "hi"}', "--wait-ack", env=env)
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout) == {"exit_code": 0, "stdout": '{"OP":"HI"}', "stderr": ""}
        failed = run_cli("send", "nobody", "1", env=env)
        assert failed.returncode == EXIT_FAILED
        assert failed.stderr == "Error: client 'nobody' is not connected\n"

        # SIGTERM drains: the client is told to go away, the server exits 0
        assert serve.stop(signal.SIGTERM) == 0, serve.output
        assert re.search(r"SIGTERM: draining", serve.output)
        assert serve.output.splitlines()[-1].endswith("backbone.cli: stopped")
        client.wait_for("server_going_away")
        assert client.stop(signal.SIGINT) == 0, client.output
        for proc in (serve, client):
            assert "Traceback" not in proc.output, proc.output
    finally:
        serve.kill()
        if client is not None:
            client.kill()
