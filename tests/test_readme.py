"""The README's send-and-get-result example (SC-013) runs against a real server."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parent.parent / "README.md"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


async def test_readme_example_sends_and_gets_the_result(make_server, certs):
    server_code, client_code = snippets()[:2]
    ns: dict[str, Any] = {}
    exec(compile(server_code, "README-server", "exec"), ns)
    # the device snippet, pointed at the test server
    client_code = client_code.replace(
        '"server.example", 4433, cafile="ca.pem"',
        '"127.0.0.1", PORT, cafile=CAFILE, server_name="localhost"',
    )
    client_code = client_code.replace("    ...\n", "    return await reboot(SERVER)\n")
    body = "async def device_main():\n" + "\n".join(
        "    " + line for line in client_code.splitlines()
    )
    assert len([ln for ln in server_code.splitlines()[2:] if ln.strip()]) <= 5
    async with make_server() as server:
        ns.update(PORT=server.port, CAFILE=str(certs.ca_cert), SERVER=server)
        exec(compile(body, "README-client", "exec"), ns)
        assert await ns["device_main"]() == {"ok": True}
