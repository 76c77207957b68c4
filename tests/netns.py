"""Kernel-level packet loss for tests: two network namespaces joined by a veth pair.

::

    with NetnsPair(loss=0.2) as pair:            # needs root, `ip` and `iptables`
        pair.server_ns, pair.client_ns          # run processes with `ip netns exec NS ...`
        pair.server_ip, pair.client_ip          # 10.200.x.y/30, inside the namespaces only
        pair.drops()                            # packets the iptables rules dropped

Both ends of the veth pair live inside the two namespaces, so the 10.200.x.0/30
addresses exist nowhere else and nothing here can reach the host's networks.  Loss is
``iptables -A INPUT -i VETH -p udp -m statistic --mode random --probability P -j DROP``
in each namespace (so ``loss`` applies both ways; ``server_loss`` / ``client_loss`` set
one direction: what the server / the client receives).

:func:`unavailable` says why the kernel tests cannot run here (not root, no ``ip`` or
``iptables``, namespaces not permitted), or returns None.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
from typing import Any

PREFIX = "bbt"  # every namespace and interface this module creates starts with it
_counter = itertools.count()


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


def unavailable() -> str | None:
    """None if network namespaces with iptables loss can be used, else the reason."""
    if os.geteuid() != 0:
        return "needs root and iptables: not running as root"
    missing = [tool for tool in ("ip", "iptables") if shutil.which(tool) is None]
    if missing:
        return (
            f"needs root and iptables: {' and '.join(missing)} not found "
            "(apt-get install iptables iproute2)"
        )
    probe = f"{PREFIX}probe{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
        try:
            r = _run(
                "ip",
                "netns",
                "exec",
                probe,
                "iptables",
                "-A",
                "INPUT",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                "0.5",
                "-j",
                "DROP",
                check=False,
            )
            if r.returncode != 0:
                return (
                    f"needs root and iptables: iptables statistic match failed: {r.stderr.strip()}"
                )
        finally:
            _run("ip", "netns", "del", probe, check=False)
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        return f"needs root and iptables: cannot create a network namespace: {detail.strip()}"
    return None


def cleanup_stale() -> None:
    """Delete namespaces left by earlier runs whose process is gone."""
    r = _run("ip", "netns", "list", check=False)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}(\d+)x\d+[sc]|{PREFIX}probe(\d+)", name)
        if not m:
            continue
        pid = int(m.group(1) or m.group(2))
        if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            _run("ip", "netns", "del", name, check=False)


class NetnsPair:
    """A server namespace and a client namespace joined by a veth pair, with optional
    random UDP loss applied by iptables on the receiving side of each."""

    def __init__(
        self,
        loss: float = 0.0,
        *,
        server_loss: float | None = None,
        client_loss: float | None = None,
    ) -> None:
        n = next(_counter)
        pid = os.getpid()
        tag = f"{PREFIX}{pid}x{n}"
        if len(tag) + 1 > 15:  # interface names are at most 15 characters
            tag = f"{PREFIX}{pid % 10_000_000}x{n % 10}"
        self.server_ns = f"{tag}s"
        self.client_ns = f"{tag}c"
        self.server_if = f"{tag}s"
        self.client_if = f"{tag}c"
        # one /30 per pair out of 10.200.0.0/16, private to the two namespaces
        index = (pid * 8 + n) % 16384
        base = index * 4
        net = f"10.200.{base // 256}.{base % 256}"
        self.network = f"{net}/30"
        self.server_ip = f"10.200.{base // 256}.{base % 256 + 1}"
        self.client_ip = f"10.200.{base // 256}.{base % 256 + 2}"
        self.server_loss = loss if server_loss is None else server_loss
        self.client_loss = loss if client_loss is None else client_loss
        self._up = False

    def ns_exec(self, ns: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *cmd]

    def __enter__(self) -> NetnsPair:
        cleanup_stale()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _setup(self) -> None:
        s, c = self.server_ns, self.client_ns
        _run("ip", "netns", "add", s)
        _run("ip", "netns", "add", c)
        self._up = True
        # create the pair inside the server namespace and move one end: it never
        # exists in the host namespace
        _run(
            "ip",
            "-n",
            s,
            "link",
            "add",
            self.server_if,
            "type",
            "veth",
            "peer",
            "name",
            self.client_if,
            "netns",
            c,
        )
        for ns, ifname, ip in (
            (s, self.server_if, self.server_ip),
            (c, self.client_if, self.client_ip),
        ):
            _run("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", ifname)
            _run("ip", "-n", ns, "link", "set", ifname, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        for ns, ifname, p in (
            (s, self.server_if, self.server_loss),
            (c, self.client_if, self.client_loss),
        ):
            if p > 0:
                _run(
                    *self.ns_exec(
                        ns,
                        "iptables",
                        "-A",
                        "INPUT",
                        "-i",
                        ifname,
                        "-p",
                        "udp",
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        f"{p:.4f}",
                        "-j",
                        "DROP",
                    )
                )

    def drops(self) -> dict[str, Any]:
        """Packets dropped by the loss rules so far: to the server, to the clients."""
        out: dict[str, Any] = {}
        for side, ns in (("to_server", self.server_ns), ("to_clients", self.client_ns)):
            r = _run(*self.ns_exec(ns, "iptables", "-L", "INPUT", "-v", "-n", "-x"), check=False)
            total = 0
            for line in r.stdout.splitlines():
                if "statistic" in line and "DROP" in line:
                    total += int(line.split()[0])
            out[side] = total
        return out

    def received(self) -> dict[str, int]:
        """UDP packets that reached each veth (before the loss rules)."""
        out: dict[str, int] = {}
        for side, ns, ifname in (
            ("server", self.server_ns, self.server_if),
            ("clients", self.client_ns, self.client_if),
        ):
            r = _run("ip", "-n", ns, "-s", "link", "show", ifname, check=False)
            lines = r.stdout.splitlines()
            for i, line in enumerate(lines):
                if line.strip().startswith("RX:") and i + 1 < len(lines):
                    out[side] = int(lines[i + 1].split()[1])
                    break
        return out

    def close(self) -> None:
        if not self._up:
            return
        self._up = False
        for ns in (self.client_ns, self.server_ns):
            with contextlib.suppress(Exception):
                _run("ip", "netns", "del", ns, check=False)
