"""The example plugin of ``docs/plugins.md`` works as printed.

Contract with the doc: its first ```python block is short (under 20 lines of code) and
defines a :class:`backbone.plugins.Plugin` subclass that can be built with no arguments
(or an instance of one).  Run against a real server and client, the plugin must observe
the connections: its state changes, or it prints or logs the client id."""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

from backbone.plugins import Plugin

from ..test_e2e import running

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def first_python_block(text: str) -> str:
    match = re.search(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert match, f"no ```python block in {DOC}"
    return match.group(1)


def code_lines(block: str) -> list[str]:
    """Lines that are code: not blank, not comments, not docstring-only lines."""
    out = []
    for line in block.splitlines():
        s = line.strip()
        if s and not s.startswith("#") and not (s.startswith('"""') and s.endswith('"""')):
            out.append(line)
    return out


def the_plugin(namespace: dict[str, Any]) -> Plugin:
    instances = [v for v in namespace.values() if isinstance(v, Plugin)]
    if instances:
        return instances[0]
    classes = [
        v
        for v in namespace.values()
        if isinstance(v, type) and issubclass(v, Plugin) and v is not Plugin
    ]
    assert classes, "the example defines no backbone.plugins.Plugin subclass"
    return classes[0]()


def public_state(plugin: Plugin) -> dict[str, Any]:
    return {
        k: copy.deepcopy(v)
        for k, v in vars(plugin).items()
        if not k.startswith("_") and not callable(v)
    }


async def test_the_example_plugin_observes_connections(
    make_server, make_client, events, capsys, caplog
):
    caplog.set_level(logging.DEBUG)
    block = first_python_block(DOC.read_text())
    assert len(code_lines(block)) < 20, "the doc promises a plugin in under 20 lines"
    namespace: dict[str, Any] = {"__name__": "docs_plugins_example"}
    exec(compile(block, f"{DOC}:first python block", "exec"), namespace)
    plugin = the_plugin(namespace)
    assert plugin.name and plugin.name != Plugin.name

    before = public_state(plugin)
    async with make_server(plugins=[plugin]) as server:
        client = make_client("docs-client", server.port, plugins=[plugin])
        client.handler(lambda m: m.payload)
        async with running(client):
            assert plugin.installed
            assert await server.send_to("docs-client", "hi", wait_ack=True) == "hi"
        await events.wait("disconnected", role="server", client_id="docs-client")
    assert not plugin.installed

    after = public_state(plugin)
    printed = capsys.readouterr().out
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name != "backbone.server")
    assert after != before or "docs-client" in printed or "docs-client" in logged, (
        "the example plugin observed nothing",
        after,
    )
    if after != before and "docs-client" in repr(after):  # it keeps per-client state
        assert "connected" in repr(after), after
