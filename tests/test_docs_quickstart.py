"""docs/quickstart.md runs as written: every command of every snippet, in order, in a
fresh directory, its output compared with the page.

How the page is read:

* a ```console block holds ``$ command`` lines, each followed by the output it shows;
* a ```bash block holds commands whose output is not shown;
* a ```toml block whose first line is ``# NAME`` is written to the file NAME.

``backbone serve`` and ``backbone client`` keep running, so they start as subprocesses and
their shown lines must appear in their logs, in order; the other ``backbone`` commands run
in-process (click's runner) and ``curl`` as itself, and their whole output must match.  In
the comparison, runs of spaces count as one, numbers match numbers (ports, times, ids
differ from run to run; so do values with a unit, ``4.2s``, ``0.4 ms``, ``0 B``, and a
``-``, the value not known yet), and ``...`` matches anything (a whole ``...`` line: any lines).
Ports are free ones (through the BACKBONE_* environment, which flags override, so the
commands stay as printed); ``pip install`` is not run, the package is already installed.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from backbone.__main__ import main

from .test_cli import Proc, subprocess_env

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "docs" / "quickstart.md"
DEFAULT_ADMIN = "http://127.0.0.1:8080"


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)
    shows_output: bool = True


@dataclass
class Snippet:
    lang: str
    steps: list[Step] = field(default_factory=list)
    text: str = ""


def snippets(text: str) -> list[Snippet]:
    out: list[Snippet] = []
    for lang, body in re.findall(r"^```(\w+)\n(.*?)^```", text, re.S | re.M):
        snippet = Snippet(lang, text=body)
        if lang == "console":
            for line in body.splitlines():
                if line.startswith("$ "):
                    snippet.steps.append(Step(line[2:]))
                else:
                    assert snippet.steps, f"output before a command in:\n{body}"
                    snippet.steps[-1].expected.append(line)
        elif lang == "bash":
            snippet.steps = [
                Step(line, shows_output=False) for line in body.splitlines() if line.strip()
            ]
        out.append(snippet)
    return out


# --- comparing output ------------------------------------------------------------------------

# a number, with its unit if it has one (12.3 ms, 4.2s, 0 B); a lone "-" (no value yet)
# (digits inside a word, dev-1, stay as they are)
_VALUE = re.compile(r"(?<![\w-])\d+(?:[.,]\d+)*(?: ?(?:ms|s|B|KiB|MiB)\b)?|(?<!\S)-(?!\S)")


def normal(line: str) -> str:
    return _VALUE.sub("N", " ".join(line.split()))


def line_pattern(expected: str) -> re.Pattern[str]:
    parts = [re.escape(p) for p in normal(expected).split("...")]
    return re.compile(".*".join(parts))


def line_matches(expected: str, actual: str) -> bool:
    return line_pattern(expected).fullmatch(normal(actual)) is not None


def lines_match(expected: list[str], actual: list[str]) -> bool:
    """Whole output: ``...`` alone on a line stands for any number of lines."""
    if not expected:
        return not actual
    head, rest = expected[0], expected[1:]
    if head.strip() == "...":
        return any(lines_match(rest, actual[i:]) for i in range(len(actual) + 1))
    return bool(actual) and line_matches(head, actual[0]) and lines_match(rest, actual[1:])


def test_the_matcher_itself() -> None:
    assert line_matches("dev-1   127.0.0.1:4433  0.4 ms", "dev-1 127.0.0.1:50123     12.5 ms")
    assert line_matches("dev-1  4.2s  0.4 ms  0 B", "dev-1  0.0s     -  1.5 KiB")
    assert not line_matches("dev-1  4.2s", "dev-2  4.2s")
    assert line_matches(
        "... INFO    backbone.cli: ready", "2026-01-01 10:00:00,123 INFO backbone.cli: ready"
    )
    assert not line_matches("ok", "error")
    assert lines_match(["a", "...", "z"], ["a", "b", "c", "z"])
    assert not lines_match(["a", "z"], ["a", "b", "z"])


# --- running the page ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("BACKBONE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NO_COLOR", "1")


class Session:
    """The three terminals of the page."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.background: list[Proc] = []
        self.quic_port: str | None = None
        self.admin_url: str | None = None

    def run(self, step: Step) -> None:
        argv = shlex.split(step.command, comments=True)
        if argv[:4] == ["python3", "-m", "pip", "install"]:
            self.check_install(argv)
        elif (
            argv[0] == "backbone"
            and argv[1] in ("serve", "client")
            and ("--print-config" not in argv)
        ):
            self.start(argv, step)
        elif argv[0] == "backbone":
            self.invoke(argv, step)
        elif argv[0] == "curl":
            self.curl(argv, step)
        else:
            raise AssertionError(f"the test does not know how to run {step.command!r}")

    @staticmethod
    def check_install(argv: list[str]) -> None:
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        assert argv[4] == project["name"]
        assert "backbone" in project["scripts"]

    def start(self, argv: list[str], step: Step) -> None:
        env = subprocess_env()
        if argv[1] == "serve":
            env.update(BACKBONE_PORT="0", BACKBONE_ADMIN_PORT="0")
        else:
            assert self.quic_port is not None, "the client needs the server first"
            env["BACKBONE_CLIENT_PORT"] = self.quic_port
        proc = Proc(*argv[1:], env=env, cwd=self.cwd)
        self.background.append(proc)
        for line in step.expected:
            proc.wait_for_line(lambda actual, line=line: line_matches(line, actual))
        if argv[1] == "serve":
            ready = proc.wait_for(r"ready: QUIC on 127\.0\.0\.1:(\d+), admin API (http://[\d.:]+)")
            self.quic_port, self.admin_url = ready.group(1), ready.group(2)

    def invoke(self, argv: list[str], step: Step) -> None:
        env = {"BACKBONE_ADMIN_URL": self.admin_url} if self.admin_url else {}
        result = CliRunner().invoke(main, argv[1:], env=env, catch_exceptions=False)
        if step.expected and step.expected[0].startswith("Error:"):
            assert result.exit_code != 0, result.output
        else:
            assert result.exit_code == 0, f"{step.command}:\n{result.output}"
        self.compare(step, result.output.splitlines())

    def curl(self, argv: list[str], step: Step) -> None:
        assert self.admin_url is not None
        argv = [a.replace(DEFAULT_ADMIN, self.admin_url) for a in argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
        self.compare(step, done.stdout.splitlines())

    @staticmethod
    def compare(step: Step, actual: list[str]) -> None:
        if step.shows_output:
            assert lines_match(step.expected, actual), (
                f"$ {step.command}\n--- the page shows:\n"
                + "\n".join(step.expected)
                + "\n--- it printed:\n"
                + "\n".join(actual)
            )

    def stop(self) -> None:
        """Ctrl-C in terminal 1 (the server drains), then in terminal 2."""
        for proc in self.background:
            assert proc.stop(signal.SIGINT) == 0, proc.output
            assert "Traceback" not in proc.output, proc.output

    def kill(self) -> None:
        for proc in self.background:
            proc.kill()


def test_quickstart_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    session = Session(tmp_path)
    ran = 0
    try:
        for snippet in snippets(QUICKSTART.read_text()):
            if snippet.lang == "toml":
                first, _, _rest = snippet.text.partition("\n")
                assert first.startswith("# "), "a toml snippet starts with # FILENAME"
                tomllib.loads(snippet.text)
                (tmp_path / first[2:].strip()).write_text(snippet.text)
                continue
            assert snippet.lang in ("console", "bash"), snippet.lang
            for step in snippet.steps:
                session.run(step)
                ran += 1
        session.stop()
    finally:
        session.kill()
    assert ran >= 9
