"""The import boundaries hold: the agent and the controller never import each other, and the
shared core imports neither of them nor any I/O library. import-linter checks the contracts in
pyproject.toml; the tests also prove it can fail, and a plain AST walk backs it up."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IO_LIBRARIES = frozenset({"paho", "sqlalchemy", "click", "alembic", "psycopg", "rich"})


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """Runs import-linter from this interpreter's environment on the project at `root`."""
    script = Path(sys.executable).parent / "lint-imports"
    command = [str(script)] if script.exists() else [
        sys.executable, "-c",
        "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())"]
    # import-linter puts its working directory first on sys.path, so `root` shadows any
    # installed (editable) copy of the packages.
    return subprocess.run([*command, "--no-cache", "--no-logo"], cwd=root, capture_output=True,
                          text=True, timeout=120)


def test_import_linter_contracts_are_kept_in_the_repository() -> None:
    result = _lint_imports(REPO)

    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 broken" in result.stdout


@pytest.mark.parametrize(("module", "planted", "contract", "violation"), [
    ("agent/__init__.py", "import controller",
     "The agent never imports the controller", "agent -> controller"),
    ("controller/__init__.py", "from agent import cli",
     "The controller never imports the agent's runtime code", "controller -> agent"),
    ("edgefleet/contract/topics.py", "import paho.mqtt.client",
     "The shared core imports neither side and no I/O library",
     "edgefleet.contract.topics -> paho"),
], ids=["agent-imports-controller", "controller-imports-agent", "contract-imports-paho"])
def test_import_linter_reports_a_planted_forbidden_import(
        tmp_path: Path, module: str, planted: str, contract: str, violation: str) -> None:
    for package in ("agent", "controller", "edgefleet"):
        shutil.copytree(REPO / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    (tmp_path / "agent" / "cli.py").touch()          # what the planted controller import names
    with (tmp_path / module).open("a") as source:
        source.write(f"\n{planted}\n")

    result = _lint_imports(tmp_path)

    assert result.returncode != 0, result.stdout
    assert f"{contract} BROKEN" in result.stdout
    assert violation in result.stdout


# --- the same rules, checked without import-linter ---------------------------------------------

def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in a file, relative ones resolved, and
    ``from x import y`` also giving ``x.y`` (y may be a module)."""
    module = _module_name(path, root)
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".")
                keep = len(package) - node.level + (1 if is_package else 0)
                base = ".".join(package[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def forbidden_imports(package: str, forbidden: frozenset[str], root: Path = REPO) -> list[str]:
    """Every import under `package` whose top-level name is in `forbidden`, as path:line."""
    found = []
    files = sorted((root / package).rglob("*.py"))
    assert files, f"no modules under {root / package}"
    for path in files:
        for line, name in imported_modules(path, root):
            if name.split(".")[0] in forbidden:
                found.append(f"{path.relative_to(root)}:{line}: {name}")
    return found


@pytest.mark.parametrize(("package", "forbidden"), [
    ("edgefleet/contract", IO_LIBRARIES | {"agent", "controller"}),
    ("edgefleet", IO_LIBRARIES | {"agent", "controller"}),
    ("agent", frozenset({"controller"})),
    ("controller", frozenset({"agent"})),
], ids=["contract", "core", "agent", "controller"])
def test_no_module_imports_across_a_boundary(package: str, forbidden: frozenset[str]) -> None:
    assert forbidden_imports(package, forbidden) == []


def test_ast_check_finds_absolute_relative_and_function_level_imports(tmp_path: Path) -> None:
    contract = tmp_path / "edgefleet" / "contract"
    contract.mkdir(parents=True)
    (tmp_path / "edgefleet" / "__init__.py").touch()
    (contract / "__init__.py").write_text("from . import wire\nfrom .. import __version__\n")
    (contract / "wire.py").write_text(
        "import msgspec\n"
        "from paho.mqtt import client\n"
        "def later() -> None:\n"
        "    import sqlalchemy.orm\n"
        "from ..contract import topics\n")

    found = forbidden_imports("edgefleet", IO_LIBRARIES, root=tmp_path)

    assert found == ["edgefleet/contract/wire.py:2: paho.mqtt",
                     "edgefleet/contract/wire.py:2: paho.mqtt.client",
                     "edgefleet/contract/wire.py:4: sqlalchemy.orm"]
    assert {name for _, name in imported_modules(contract / "__init__.py", tmp_path)} == {
        "edgefleet.contract", "edgefleet.contract.wire", "edgefleet", "edgefleet.__version__"}
    assert (5, "edgefleet.contract.topics") in set(imported_modules(contract / "wire.py", tmp_path))
