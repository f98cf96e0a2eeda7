"""Every option of every command (emo-subset, emo-serve, emo-client) has a help text that says its default,
and every positional argument says what it is (issue 12, item 13)."""

from __future__ import annotations

import argparse

import pytest


def _serve_parser(monkeypatch) -> argparse.ArgumentParser:
    """emo-serve builds its parser inside `parse_args`: take it from there."""
    import server.cli

    seen = {}

    def grab(self, *args, **kwargs):
        seen["parser"] = self
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(SystemExit):
        server.cli.parse_args([])
    return seen["parser"]


def _parsers(monkeypatch) -> dict[str, argparse.ArgumentParser]:
    from clients.cli import build_parser as client_parser
    from subsetting.cli import build_parser as subset_parser

    return {"emo-subset": subset_parser(), "emo-client": client_parser(), "emo-serve": _serve_parser(monkeypatch)}


def _undocumented(name: str, parser: argparse.ArgumentParser) -> list[str]:
    bad = []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub, p in a.choices.items():
                bad += _undocumented(f"{name} {sub}", p)
            continue
        if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
            continue
        label = f"{name} {'/'.join(a.option_strings) or a.dest}"
        if not a.help or not a.help.strip():
            bad.append(f"{label}: no help text")
        elif a.option_strings and not a.required and "default" not in a.help.lower():
            bad.append(f"{label}: the help does not say the default")
    return bad


@pytest.mark.parametrize("command", ["emo-subset", "emo-client", "emo-serve"])
def test_every_option_has_help_with_its_default(command, monkeypatch):
    parser = _parsers(monkeypatch)[command]
    assert _undocumented(command, parser) == []


def test_emo_serve_defaults_are_the_server_configs():
    """deploy/memory_request.py sizes containers from ServerConfig's defaults: the command's must be the same."""
    import dataclasses

    import server.cli
    from server.config import ServerConfig

    args = vars(server.cli.parse_args([]))
    base = ServerConfig()
    differ = {f.name: (args[f.name], getattr(base, f.name)) for f in dataclasses.fields(ServerConfig)
              if f.name in args and args[f.name] != getattr(base, f.name)}
    assert differ == {}
