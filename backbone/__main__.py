"""Command line: ``backbone demo``, ``backbone certs init``.  Also ``python -m backbone``."""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from . import __version__, signals
from .certs import make_dev_certs
from .client import Client
from .errors import AckTimeout, RemoteError
from .events import Event
from .message import Message
from .server import Server


@click.group()
@click.version_option(__version__, prog_name="backbone")
def main() -> None:
    """backbone — a QUIC command backbone: unicast, broadcast, WaitAck results."""


@main.group()
def certs() -> None:
    """Development certificates."""


@certs.command("init")
@click.argument("directory", default="certs", type=click.Path(file_okay=False))
@click.option("--client", "clients", multiple=True, help="also issue a certificate for this ID")
@click.option("--force", is_flag=True, help="overwrite existing files")
def certs_init(directory: str, clients: tuple[str, ...], force: bool) -> None:
    """Make a dev CA, a server certificate (localhost, 127.0.0.1, ::1) and client
    certificates whose identity is the client ID."""
    try:
        made = make_dev_certs(directory, client_ids=clients, overwrite=force)
    except FileExistsError as exc:
        raise click.ClickException(f"{exc} (use --force)") from None
    click.echo(f"CA:     {made.ca_cert}")
    click.echo(f"server: {made.server_cert} {made.server_key}")
    for cid, (cert, key) in made.clients.items():
        click.echo(f"client {cid}: {cert} {key}")


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


def _print_event(sender: Any, event: Event) -> None:
    if event.kind not in _SHOWN:
        return
    fields = event.model_dump(exclude={"kind", "seq", "at", "role"}, exclude_none=True)
    text = " ".join(f"{k}={v}" for k, v in fields.items() if v not in ("", 0.0))
    click.echo(f"  · {event.role:6} {event.kind:20} {text}")


async def _demo(n_clients: int, port: int) -> int:
    with tempfile.TemporaryDirectory(prefix="backbone-demo-") as tmp:
        certs = make_dev_certs(Path(tmp))
        signals.on_event.connect(_print_event, weak=False)
        click.echo(f"== backbone demo: 1 server, {n_clients} clients on 127.0.0.1 (QUIC, TLS 1.3)")
        server = Server(
            "127.0.0.1",
            port,
            certfile=str(certs.server_cert),
            keyfile=str(certs.server_key),
            heartbeat_interval=1.0,
        )
        async with server:
            clients = []
            for i in range(n_clients):
                client = Client(
                    f"device-{i + 1}",
                    "127.0.0.1",
                    server.port,
                    cafile=str(certs.ca_cert),
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
            await asyncio.gather(*(one(i) for i in range(1000)))
            dt = time.perf_counter() - t0
            click.echo(f"  1000 results in {dt:.2f} s ({1000 / dt:,.0f}/s)")

            click.echo("\n== client → server with WaitAck")
            server.handler(lambda m: {"seen": m.payload, "from": m.client_id})
            click.echo(f"  {await clients[0].send({'temp': 21}, wait_ack=True)}")

            click.echo("\n== shutting down")
            for c in clients:
                await c.close()
        signals.on_event.disconnect(_print_event)
    click.echo("== done")
    return 0


@main.command()
@click.option("--clients", "n_clients", default=3, show_default=True, help="how many clients")
@click.option("--port", default=0, show_default=True, help="UDP port (0: any free port)")
@click.option("-v", "--verbose", is_flag=True, help="debug logs on stderr")
def demo(n_clients: int, port: int, verbose: bool) -> None:
    """Run an embedded server and a few clients: unicast, broadcast, WaitAck."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if n_clients < 2:
        raise click.BadParameter("the demo needs at least 2 clients", param_hint="--clients")
    sys.exit(asyncio.run(_demo(n_clients, port)))


if __name__ == "__main__":
    main()
