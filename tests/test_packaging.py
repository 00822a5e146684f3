"""The wheel carries every package and the hardware profiles, so a device installed from it
works without the repository."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_in_the_tree_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for top in ("agent", "controller", "edgefleet")
             for p in (ROOT / top).rglob("__init__.py")}
    assert found | {"edgefleet.profiles", "edgefleet.systemd"} == listed


def test_the_wheel_ships_the_profiles_and_they_load_from_it(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True)
    wheel = next(tmp_path.glob("edgefleet-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    profiles = [n for n in names if n.startswith("edgefleet/profiles/") and n.endswith(".toml")]
    assert len(profiles) == len(list((ROOT / "profiles").glob("*.toml")))
    code = ("from edgefleet.hardware import load_profiles, default_profile_dir;"
            "print(len(load_profiles()), default_profile_dir())")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, text=True,
                         capture_output=True, env={"PYTHONPATH": str(tmp_path / "site")}).stdout
    count, where = out.split()
    assert int(count) == len(profiles)
    assert where.startswith(str(tmp_path / "site"))
