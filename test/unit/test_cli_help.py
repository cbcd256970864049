"""Every subcommand's ``--help`` states each option's default once."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from async_component import cli


def help_text(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        cli.main([*argv, "--help"])
    assert done.value.code == 0
    return out.getvalue()


def options(text: str) -> dict[str, str]:
    """Each option of a help text -> its invocation and help on one line."""
    blocks: dict[str, str] = {}
    name = None
    for line in text.split("\noptions:\n", 1)[1].splitlines():
        if re.match(r"  -", line):
            name = line.split()[0].rstrip(",")
            blocks[name] = line.strip()
        elif name and line.strip():
            blocks[name] += " " + line.strip()
    return blocks


REQUIRED = {("gateway", "--routes")}
"""Options without a default: the user must give them."""


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_option_states_its_default_once(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    found = options(help_text(command))
    assert "--log-level" in found
    for name, block in found.items():
        if name == "-h":
            continue
        count = len(re.findall(r"\bdefault\b", block))
        assert count == (0 if (command, name) in REQUIRED else 1), f"{command} {name}: {block}"


@pytest.mark.parametrize("command, option, default", [
    ("producer", "--port", "(env PORT; default: 8080)"),
    ("producer", "--request-size-limit", "(env REQUEST_SIZE_LIMIT; default: 6000000)"),
    ("source", "--sink-url", "(env SINK_URL or K_SINK; default: unset)"),
    ("source", "--consumer-name", "(env CONSUMER_NAME; default: unset)"),
    ("controller", "--health-port", "(env HEALTH_PORT; default: 8081)"),
    ("local", "--port", "(default: 8080)"),
    ("local", "--retry-base-delay", "(default: 1.0)"),
    ("local", "--app-dir", "(default: test/app)"),
    ("gateway", "--host", "(default: 127.0.0.1)"),
])
def test_the_default_shown_is_the_one_used(command, option, default, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    assert options(help_text(command))[option].endswith(default)
