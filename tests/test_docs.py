"""The docs stay true to the code: the state diagrams are generated from the current transition
tables, the README's CLI tour names every command, and every relative link leads somewhere."""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import pytest

from agent.cli import build_parser
from agent.install import machine
from controller.cli import main
from controller.rollout import engine
from controller.rollout.model import DeploymentState, GroupState, RolloutState
from edgefleet.contract import CommandState, InstallStage

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted([README, *(ROOT / "docs").rglob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def _diagrams() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_diagrams", ROOT / "docs" / "diagrams.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_state_diagrams_in_docs_match_the_transition_tables() -> None:
    done = subprocess.run([sys.executable, "docs/diagrams.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr + "\nrun `python docs/diagrams.py` and commit"


S, E = InstallStage, machine.Event
R, G, D = RolloutState, GroupState, DeploymentState


@pytest.mark.parametrize(("module", "table", "edge", "page"), [
    (machine, "TRANSITIONS", ((S.COMMITTED, E.FAILED), S.ROLLING_BACK),
     "docs/install-state-machine.md"),
    (machine, "RECOVERY", (S.WATCHING, S.WATCHING), "docs/install-state-machine.md"),
    (engine, "TRANSITIONS", ((R.SUCCEEDED, engine.Cause.ABORT), R.ABORTED),
     "docs/rollout-state-machine.md"),
    (engine, "GROUP_TRANSITIONS", ((G.CANCELLED, engine.GroupCause.RESOAK), G.SOAKING),
     "docs/rollout-state-machine.md"),
    (engine, "DEVICE_TRANSITIONS", ((D.SUCCEEDED, CommandState.FAILED), D.FAILED),
     "docs/rollout-state-machine.md"),
])
def test_a_table_changed_without_regenerating_makes_the_check_fail(
        monkeypatch: pytest.MonkeyPatch, module: ModuleType, table: str, edge: tuple[Any, Any],
        page: str) -> None:
    diagrams = _diagrams()
    assert diagrams.stale() == []
    key, target = edge
    monkeypatch.setattr(module, table, {**getattr(module, table), key: target})

    assert diagrams.stale() == [page]


def test_a_page_without_its_markers_is_refused(tmp_path: Path) -> None:
    diagrams = _diagrams()
    sections = diagrams.pages()["docs/install-state-machine.md"]

    with pytest.raises(diagrams.PageError, match="missing generated sections"):
        diagrams.render("# no markers here\n", sections, "page.md")


def _commands(group: click.Group, path: str) -> Iterator[str]:
    for name, command in group.commands.items():
        yield f"{path} {name}"
        if isinstance(command, click.Group):
            yield from _commands(command, f"{path} {name}")


def _agent_commands() -> Iterator[str]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from (f"edgefleet-agent {name}" for name in action.choices)


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end == -1 else text[start:end]


def test_the_readme_cli_tour_names_every_command() -> None:
    tour = _section(README.read_text(encoding="utf-8"), "A tour of the CLI")
    commands = [*_commands(main, "edgefleet"), *_agent_commands()]
    assert len(commands) > 20

    missing = [c for c in commands if not re.search(rf"{re.escape(c)}(?![\w-])", tour)]

    assert missing == [], f"not in the README's CLI tour: {missing}"


def _links(page: Path) -> Iterator[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)
    yield from LINK.findall(text)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.MULTILINE)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page: Path) -> None:
    broken = []
    for link in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):   # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link}: no heading #{anchor}")

    assert broken == []


def test_every_benchmark_script_is_in_the_readme() -> None:
    readme = README.read_text(encoding="utf-8")
    # Scripts, not the helper modules they import (those have no __main__ block).
    scripts = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "benchmarks").glob("*.py")
                     if 'if __name__ == "__main__":' in p.read_text(encoding="utf-8"))
    assert scripts

    assert [s for s in scripts if f"python {s}" not in readme] == []
