"""Writes the state-machine diagrams in docs/ from the transition tables, so the two never drift.

    python docs/diagrams.py           # rewrite the generated sections
    python docs/diagrams.py --check   # exit 1 if any generated section is out of date (CI)

A page keeps its hand-written text; only what lies between `<!-- generated:start NAME -->` and
`<!-- generated:end NAME -->` is rewritten. The tables are read when the script runs (not copied
at import), so tests/test_docs.py can prove that a changed table makes the check fail.
"""

from __future__ import annotations

import argparse
import enum
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.install import machine  # noqa: E402
from controller.rollout import engine  # noqa: E402
from controller.rollout.model import GroupState, RolloutState  # noqa: E402
from edgefleet.contract import InstallStage  # noqa: E402

StateT = TypeVar("StateT", bound=enum.Enum)
CauseT = TypeVar("CauseT", bound=enum.Enum)
MARKER = re.compile(r"(<!-- generated:start (?P<name>[\w-]+) -->\n)(?P<body>.*?)"
                    r"(<!-- generated:end (?P=name) -->)", re.DOTALL)


class PageError(RuntimeError):
    """A page lacks a marker the script needs, or has one the script does not know."""


def state_diagram(table: Mapping[tuple[StateT, CauseT], StateT], *, initial: StateT | None,
                  ends: bool) -> str:
    """A Mermaid stateDiagram-v2 of `table`: one arrow per (from, to), labelled with every cause
    that takes it, in the table's order. With `ends`, a state that leads nowhere else gets an
    arrow to the end marker."""
    edges: dict[tuple[StateT, StateT], list[str]] = {}
    states: dict[StateT, None] = {} if initial is None else {initial: None}
    for (source, cause), target in table.items():
        edges.setdefault((source, target), []).append(str(cause.value))
        states.update({source: None, target: None})
    lines = ["```mermaid", "stateDiagram-v2"]
    lines += [f'    state "{state.value}" as {state.name}' for state in states]
    if initial is not None:
        lines.append(f"    [*] --> {initial.name}")
    lines += [f"    {source.name} --> {target.name}: {', '.join(causes)}"
              for (source, target), causes in edges.items()]
    if ends:
        leaving = {source for source, target in edges if source is not target}
        lines += [f"    {state.name} --> [*]" for state in states if state not in leaving]
    lines.append("```")
    return "\n".join(lines)


def transition_table(table: Mapping[tuple[StateT, CauseT], StateT], on: str) -> str:
    """The same table as Markdown, for readers whose viewer does not draw Mermaid."""
    rows = [f"| `{source.value}` | `{cause.value}` | `{target.value}` |"
            for (source, cause), target in table.items()]
    return "\n".join(["<details><summary>The table as text</summary>", "",
                      f"| from | {on} | to |", "| --- | --- | --- |", *rows, "", "</details>"])


def section(table: Mapping[tuple[StateT, CauseT], StateT], on: str, *, initial: StateT | None,
            ends: bool) -> str:
    return (state_diagram(table, initial=initial, ends=ends) + "\n\n"
            + transition_table(table, on))


def recovery_table() -> str:
    """Where each unfinished install resumes after a restart, from `machine.recover` itself (the
    RECOVERY table plus the default for states it does not list)."""
    rows = []
    for stage in InstallStage:
        if stage is InstallStage.UNKNOWN or stage in machine.FINAL:
            continue
        record = machine.InstallRecord(command_id="c", command=b"", model_name="m",
                                       model_version=1, state=stage)
        resumed = machine.recover(record).state
        why = "listed in RECOVERY" if stage in machine.RECOVERY else "not listed: rolls back"
        rows.append(f"| `{stage.value}` | `{resumed.value}` | {why} |")
    return "\n".join([
        "| persisted state | resumes in | |", "| --- | --- | --- |", *rows, "",
        f"Final states (`{'`, `'.join(s.value for s in _in_order(machine.FINAL))}`) stay as "
        f"they are. A state entered more than `MAX_ENTRIES` = {machine.MAX_ENTRIES} times "
        "ends the install instead (a crash loop): as `rolled-back` when the loop is in "
        "`rolling-back` or the new model was activated, else as `rejected`."])


def _in_order(states: Iterable[InstallStage]) -> list[InstallStage]:
    members = list(InstallStage)
    return sorted(states, key=lambda state: members.index(state))


def pages() -> dict[str, dict[str, Callable[[], str]]]:
    """Page (relative to the repository) -> generated section name -> what to write there."""
    return {
        "docs/install-state-machine.md": {
            "install": lambda: section(machine.TRANSITIONS, "event", initial=InstallStage.RECEIVED,
                                       ends=True),
            "recovery": recovery_table,
        },
        "docs/rollout-state-machine.md": {
            "rollout": lambda: section(engine.TRANSITIONS, "cause", initial=RolloutState.DRAFT,
                                       ends=True),
            "group": lambda: section(engine.GROUP_TRANSITIONS, "cause",
                                     initial=GroupState.PENDING, ends=True),
            # Not every device move is in this table (see the page), so no end markers.
            "device": lambda: section(engine.DEVICE_TRANSITIONS, "reported state",
                                      initial=None, ends=False),
        },
    }


SOURCES = {
    "install": "agent.install.machine.TRANSITIONS",
    "recovery": "agent.install.machine.recover (RECOVERY, MAX_ENTRIES)",
    "rollout": "controller.rollout.engine.TRANSITIONS",
    "group": "controller.rollout.engine.GROUP_TRANSITIONS",
    "device": "controller.rollout.engine.DEVICE_TRANSITIONS",
}


def render(text: str, sections: Mapping[str, Callable[[], str]], page: str) -> str:
    """`text` with every generated section rewritten; raises PageError on a missing marker."""
    found = [m.group("name") for m in MARKER.finditer(text)]
    missing = sorted(set(sections) - set(found))
    unknown = sorted(set(found) - set(sections))
    if missing or unknown:
        raise PageError(f"{page}: missing generated sections {missing}, unknown {unknown}")

    def fill(match: re.Match[str]) -> str:
        name = match.group("name")
        note = (f"<!-- Written by docs/diagrams.py from {SOURCES[name]}; do not edit here: "
                "change the table, then run `python docs/diagrams.py`. -->")
        return f"{match.group(1)}{note}\n{sections[name]()}\n{match.group(4)}"

    return MARKER.sub(fill, text)


def stale(root: Path = ROOT) -> list[str]:
    """The pages whose generated sections differ from what the tables give now."""
    out = []
    for page, sections in pages().items():
        text = (root / page).read_text(encoding="utf-8")
        if render(text, sections, page) != text:
            out.append(page)
    return out


def write(root: Path = ROOT) -> list[str]:
    """Rewrites the pages that are out of date; returns them."""
    written = []
    for page, sections in pages().items():
        path = root / page
        text = path.read_text(encoding="utf-8")
        new = render(text, sections, page)
        if new != text:
            path.write_text(new, encoding="utf-8")
            written.append(page)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a page is out of date")
    args = parser.parse_args(argv)
    try:
        if args.check:
            out_of_date = stale()
            for page in out_of_date:
                print(f"{page} is out of date with its transition tables: run "
                      "`python docs/diagrams.py`", file=sys.stderr)
            return 1 if out_of_date else 0
        for page in write():
            print(f"rewrote {page}")
    except PageError as exc:
        print(f"docs/diagrams.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
