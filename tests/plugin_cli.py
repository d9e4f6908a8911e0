"""Run the real `prebake` command line in this process with the plugin commands of this source
tree's pyproject.toml, whatever the installed metadata lists (a checkout whose editable install
predates a new entry point, or a worktree beside the installed one)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from prebake.client import cli
from prebake.core.command_plugins import ENTRY_POINT_GROUP

ROOT = Path(__file__).resolve().parent.parent


def source_entry_points() -> list[EntryPoint]:
    """The `prebake.commands` entry points as this tree's pyproject.toml declares them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared: dict[str, str] = project["entry-points"][ENTRY_POINT_GROUP]
    return [EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in declared.items()]


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str


class PrebakeCli:
    """`prebake ARGS...` in process; returns the exit code and what it printed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        points = source_entry_points()
        monkeypatch.setattr(cli, "entry_points", lambda group: [p for p in points if p.group == group])
        self._capsys = capsys

    def __call__(self, *args: str) -> Ran:
        self._capsys.readouterr()
        code = cli.main(list(args))
        captured = self._capsys.readouterr()
        return Ran(code, captured.out, captured.err)
