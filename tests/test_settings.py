"""Configuration: defaults < TOML < BACKBONE_* environment < flags; invalid values are
refused with the field, the value, where it came from and why; the generated
documentation lists every field."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from backbone.config import ClientConfig, ServerConfig
from backbone.settings import (
    DOC_BEGIN,
    DOC_END,
    ClientSettings,
    ServeSettings,
    SettingsError,
    is_loopback,
    parse_assignments,
    render_config_doc,
    update_doc,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BACKBONE_* variable of the developer's shell leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("BACKBONE_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "backbone.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(**load: Any) -> list[str]:
    model = load.pop("model", ServeSettings)
    with pytest.raises(SettingsError) as info:
        model.load(**load)
    return info.value.problems


# --- defaults are the models' -----------------------------------------------------------------


#: where ``backbone serve`` differs from an embedded Server on purpose: gc.freeze is
#: process-wide, so only the process that is backbone's own turns it on by default
SERVE_OWN_DEFAULTS = {"gc_freeze": True}


def test_defaults_are_those_of_server_config_and_client_config() -> None:
    serve = ServeSettings.load()
    assert serve.server_config() == ServerConfig(**SERVE_OWN_DEFAULTS)
    for name, field in ServerConfig.model_fields.items():
        assert getattr(serve, name) == SERVE_OWN_DEFAULTS.get(name, field.default), name
    assert (serve.admin_host, serve.admin_port, serve.admin_token) == ("127.0.0.1", 8080, None)
    assert serve.plugins == [] and serve.plugin_options == {} and serve.admin_enabled
    client = ClientSettings.load(flags={"client_id": "dev-1"})
    # the process is backbone's: its setup is frozen out of the collector's reach
    assert client.client_config() == ClientConfig(client_id="dev-1", gc_freeze=True)
    assert client.exec is None


# --- precedence -------------------------------------------------------------------------------


def test_toml_over_defaults_env_over_toml_flags_over_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(
        tmp_path,
        'port = 5000\nheartbeat_interval = 5\nhost = "0.0.0.0"\nack_timeout = 9\n'
        'admin_token = "from-the-file-0123456789"\n',
    )
    s = ServeSettings.load(config)
    assert (s.port, s.heartbeat_interval, s.host, s.ack_timeout) == (5000, 5.0, "0.0.0.0", 9.0)
    assert s.close_grace == ServerConfig().close_grace  # untouched: the default
    monkeypatch.setenv("BACKBONE_PORT", "6000")
    monkeypatch.setenv("BACKBONE_HEARTBEAT_INTERVAL", "2.5")
    s = ServeSettings.load(config)
    assert (s.port, s.heartbeat_interval, s.host) == (6000, 2.5, "0.0.0.0")
    s = ServeSettings.load(config, {"port": 7000, "host": None})
    assert (s.port, s.heartbeat_interval, s.host) == (7000, 2.5, "0.0.0.0")
    assert s.token == "from-the-file-0123456789"
    assert s.server_config().port == 7000


def test_plugins_from_toml_environment_and_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(
        tmp_path,
        'plugins = ["history"]\n[plugin_options.history]\npath = "/tmp/h.sqlite3"\nmax_rows = 5\n',
    )
    s = ServeSettings.load(config)
    assert s.plugins == ["history"]
    assert s.plugin_options == {"history": {"path": "/tmp/h.sqlite3", "max_rows": 5}}
    monkeypatch.setenv("BACKBONE_PLUGINS", "logging, metrics")  # the library's own format
    assert ServeSettings.load(config).plugins == ["logging", "metrics"]
    monkeypatch.setenv("BACKBONE_PLUGINS", '["otel"]')
    assert ServeSettings.load(config).plugins == ["otel"]
    assert ServeSettings.load(config, {"plugins": ["history"]}).plugins == ["history"]
    # tables merge key by key across the layers
    monkeypatch.setenv("BACKBONE_PLUGIN_OPTIONS", '{"history": {"path": "x"}}')
    assert ServeSettings.load(config).plugin_options == {"history": {"path": "x", "max_rows": 5}}


def test_client_reads_its_table_and_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(
        tmp_path,
        'port = 5000\n[client]\nhost = "10.0.0.1"\nport = 4500\nexec = "cat"\n'
        "heartbeat_interval = 4\n",
    )
    serve = ServeSettings.load(config)  # the [client] table is not the server's
    assert serve.port == 5000 and serve.host == "127.0.0.1"
    c = ClientSettings.load(config, {"client_id": "dev-1"})
    assert (c.host, c.port, c.exec, c.heartbeat_interval) == ("10.0.0.1", 4500, "cat", 4.0)
    monkeypatch.setenv("BACKBONE_CLIENT_PORT", "4600")
    monkeypatch.setenv("BACKBONE_PORT", "1")  # the server's: ignored by the client
    c = ClientSettings.load(config, {"client_id": "dev-1"})
    assert c.port == 4600
    c = ClientSettings.load(config, {"client_id": "dev-1", "port": 4700})
    assert c.port == 4700 and c.client_config().port == 4700


# --- refusals: field, value, origin, why ------------------------------------------------------


def test_an_invalid_value_names_field_value_origin_and_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path, "port = 70000\n")
    [line] = problems(config_file=config)
    assert line.startswith("port = 70000 (from ") and str(config) in line
    assert "less than or equal to 65535" in line

    monkeypatch.setenv("BACKBONE_HEARTBEAT_INTERVAL", "soon")
    [line] = problems()
    assert line.startswith("heartbeat_interval = 'soon' (from BACKBONE_HEARTBEAT_INTERVAL)")
    assert "valid number" in line
    monkeypatch.delenv("BACKBONE_HEARTBEAT_INTERVAL")

    [line] = problems(flags={"heartbeat_misses": 0}, flag_names={"heartbeat_misses": "--misses"})
    assert (
        line.startswith("heartbeat_misses = 0 (from --misses)")
        and "greater than or equal to 2" in line
    )

    [line] = problems(flags={"slow_consumer_policy": "drop"})
    assert "slow_consumer_policy = 'drop'" in line and "'reject' or 'disconnect'" in line


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    config = write(tmp_path, 'port = -1\nack_timeout = 0\nlog_level = "loud"\n')
    found = problems(config_file=config)
    assert [p.split(" ")[0] for p in found] == ["ack_timeout", "port", "log_level"]


def test_an_unknown_key_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    [line] = problems(config_file=write(tmp_path, "heartbeat_intervall = 3\n"))
    assert line.startswith("heartbeat_intervall: unknown setting")
    assert "did you mean 'heartbeat_interval'" in line


def test_cross_field_rules_of_the_models_apply() -> None:
    [line] = problems(flags={"max_payload": 10_000_000})
    assert line.startswith("invalid configuration: outbound_buffer_limit")
    [line] = problems(model=ClientSettings, flags={"client_id": "d", "backoff_max": 0.5})
    assert "backoff_max must be at least backoff_initial" in line
    [line] = problems(model=ClientSettings, flags={"client_id": " dev-1"})
    assert line == "invalid configuration: client id has leading or trailing whitespace"


def test_the_admin_api_off_loopback_needs_a_long_enough_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    [line] = problems(flags={"admin_host": "0.0.0.0"})
    assert "admin_host '0.0.0.0' is not a loopback address" in line and "admin_token" in line
    [line] = problems(flags={"admin_host": "0.0.0.0", "admin_token": "short"})
    assert line.startswith("admin_token = '**********'") and "16 characters" in line
    assert "short" not in line  # the secret is never printed
    monkeypatch.setenv("BACKBONE_ADMIN_TOKEN", "t" * 20)
    s = ServeSettings.load(flags={"admin_host": "0.0.0.0"})
    assert s.token == "t" * 20
    assert ServeSettings.load(flags={"admin_host": "0.0.0.0", "admin_enabled": False})
    monkeypatch.delenv("BACKBONE_ADMIN_TOKEN")
    assert ServeSettings.load(flags={"admin_host": "localhost"}).admin_host == "localhost"


def test_broken_files_and_environment_are_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert problems(config_file=tmp_path / "none.toml") == [
        f"{tmp_path / 'none.toml'}: no such configuration file"
    ]
    [line] = problems(config_file=write(tmp_path, "port = \n"))
    assert "not valid TOML" in line
    [line] = problems(config_file=tmp_path)
    assert "is a directory" in line
    [line] = problems(config_file=write(tmp_path, "client = 3\n"), model=ClientSettings)
    assert "[client] must be a table" in line
    monkeypatch.setenv("BACKBONE_PLUGIN_OPTIONS", "{nope")
    [line] = problems()
    assert line.startswith("BACKBONE_PLUGIN_OPTIONS: not valid JSON")


# --- --set, printing --------------------------------------------------------------------------


def test_set_assignments_read_values_as_toml() -> None:
    assert parse_assignments(
        [
            "port=5000",
            "host=0.0.0.0",
            "admin_enabled=false",
            'plugins=["history"]',
            "plugin_options.history.path=/var/h.sqlite3",
            "plugin_options.history.max_rows=10",
            "heartbeat-interval=0.5",
        ]
    ) == {
        "port": 5000,
        "host": "0.0.0.0",
        "admin_enabled": False,
        "plugins": ["history"],
        "plugin_options": {"history": {"path": "/var/h.sqlite3", "max_rows": 10}},
        "heartbeat_interval": 0.5,
    }
    with pytest.raises(SettingsError, match="KEY=VALUE"):
        parse_assignments(["port"])


def test_the_printed_configuration_is_toml_that_loads_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(
        tmp_path,
        'port = 5000\nplugins = ["history"]\n[plugin_options.history]\npath = "h.db"\n',
    )
    monkeypatch.setenv("BACKBONE_ADMIN_TOKEN", "a" * 20)
    flags = {"heartbeat_interval": 0.5}
    s = ServeSettings.load(config, flags)
    text = s.to_toml(s.origins(config, flags))
    assert 'admin_token = "**********"  # BACKBONE_ADMIN_TOKEN' in text
    assert f"port = 5000  # {config}" in text
    assert "heartbeat_interval = 0.5  # --set heartbeat_interval" in text
    assert "# certfile = (not set)" in text
    data = tomllib.loads(text)
    data.pop("admin_token")
    again = ServeSettings.load(write(tmp_path, text.replace("a" * 20, ""), "again.toml"))
    assert again.model_dump(exclude={"admin_token"}) == s.model_dump(exclude={"admin_token"})
    client = ClientSettings.load(flags={"client_id": "dev-1", "exec": 'echo "hi"'})
    data = tomllib.loads(client.to_toml())
    assert data["client"]["client_id"] == "dev-1" and data["client"]["exec"] == 'echo "hi"'


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("example.com", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# --- the documentation stays true -------------------------------------------------------------


def test_configuration_doc_is_generated_from_the_models_and_lists_every_field() -> None:
    text = DOC.read_text()
    assert DOC_BEGIN in text and DOC_END in text
    assert update_doc(text) == text, (
        "docs/configuration.md is out of date: run python -m backbone.settings "
        "docs/configuration.md"
    )
    generated = render_config_doc()
    for model in (ServeSettings, ClientSettings):
        for name in model.model_fields:
            assert f"| `{name}` | `{model.env_name(name)}` |" in generated, name
    for name, field in ServerConfig.model_fields.items():
        row = next(r for r in generated.splitlines() if r.startswith(f"| `{name}` | `BACKBONE_"))
        default = SERVE_OWN_DEFAULTS.get(name, field.default)
        assert str(default).lower().replace("none", "not set") in row.lower() or ("MiB" in row), row


def test_the_example_file_of_the_configuration_doc_loads(tmp_path: Path) -> None:
    import re

    [example] = re.findall(r"```toml\n(.*?)```", DOC.read_text(), re.S)
    config = write(tmp_path, example)
    serve = ServeSettings.load(config)
    assert serve.host == "0.0.0.0" and serve.plugins == ["logging", "metrics", "history"]
    assert serve.plugin_options["history"]["path"] == "/var/lib/backbone/history.sqlite3"
    client = ClientSettings.load(config, {"client_id": "dev-7"})
    assert client.host == "backbone.example.com" and client.exec_timeout == 60.0


def test_one_heartbeat_miss_is_refused() -> None:
    """With heartbeat_misses = 1 a ping a moment late (timer lateness, the ping grid)
    evicted live clients: a review's simulation evicted 43 of 2,000."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="greater than or equal to 2"):
        ServerConfig(heartbeat_misses=1)
    with pytest.raises(ValidationError, match="greater than or equal to 2"):
        ClientConfig(client_id="dev-1", heartbeat_misses=1)
    assert ServerConfig(heartbeat_misses=2).heartbeat_timeout == 30.0


def test_an_endless_ack_timeout_is_refused() -> None:
    """An infinite default timeout passed the config and then broke every WaitAck send
    (the per-call check refuses it): it is refused where it is set."""
    from pydantic import ValidationError

    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValidationError):
            ServerConfig(ack_timeout=bad)
