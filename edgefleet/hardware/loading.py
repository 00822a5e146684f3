"""Reading hardware profiles from TOML files, with errors an operator can act on.

A broken profile is reported by file and field ("profiles/rpi4.toml: field 'limits.
max_model_bytes': expected int, got str"), never as a bare traceback from the decoder.
"""

from __future__ import annotations

import enum
import importlib.resources
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from edgefleet.contract.manifest import Runtime
from edgefleet.contract.messages import VariantKind
from edgefleet.hardware.profile import Accelerator, HardwareProfile

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the 3.10 fallback the core dependencies declare
    import tomli as tomllib

PROFILES_ENV = "EDGEFLEET_PROFILES"
PROFILES_PACKAGE = "edgefleet.profiles"

# msgspec reports "<what> - at `$.a.b[0].c`"; the location is optional at the top level.
_VALIDATION_ERROR = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<at>[^`]*)`)?$", re.DOTALL)
_NAMED_FIELD = re.compile(
    r"^Object (?P<problem>missing required|contains unknown) field `(?P<name>[^`]+)`$")
_WRONG_TYPE = re.compile(r"^Expected `(?P<expected>[^`]+)`, got `(?P<got>[^`]+)`$")
_TOML_POSITION = re.compile(r" \(at line (?P<line>\d+), column (?P<column>\d+)\)$")

# Which enum a field's value must come from, so an invalid value can list the valid ones.
_ENUM_FIELDS: Mapping[str, type[enum.Enum]] = {"accelerator": Accelerator, "runtime": Runtime}


class ProfileError(ValueError):
    """A profile file that cannot be used, with the file and (where known) the field or line."""

    def __init__(self, path: Path, field: str | None, message: str, *,
                 line: int | None = None) -> None:
        self.path = path
        self.field = field
        self.message = message
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.field is not None:
            return f"{self.path}: field '{self.field}': {self.message}"
        if self.line is not None:
            return f"{self.path}: line {self.line}: {self.message}"
        return f"{self.path}: {self.message}"


def load_profile(path: Path) -> HardwareProfile:
    """Read and check one profile file; its ``name`` must be the file's stem."""
    try:
        with path.open("rb") as file:
            raw = tomllib.load(file)
    except OSError as error:
        raise ProfileError(path, None, f"cannot read: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise ProfileError(path, None, f"not UTF-8 text: {error.reason}") from error
    except tomllib.TOMLDecodeError as error:
        raise _toml_error(path, error) from error

    try:
        profile = msgspec.convert(raw, HardwareProfile)
    except msgspec.ValidationError as error:
        field, message = _explain_validation_error(str(error))
        raise ProfileError(path, field, message) from error

    # VariantKind decodes what it does not know as UNKNOWN so the wire stays lenient; a profile
    # is written by us, so a kind it names that we do not know is a typo to report, not to skip.
    for index, kind in enumerate(profile.prefers):
        if kind is VariantKind.UNKNOWN:
            given = _raw_item(raw, "prefers", index)
            known = ", ".join(k.value for k in VariantKind if k is not VariantKind.UNKNOWN)
            raise ProfileError(path, f"prefers[{index}]",
                               f"unknown variant kind {given!r} (known: {known})")
    if profile.name != path.stem:
        raise ProfileError(path, "name",
                           f"{profile.name!r} does not match the file name {path.stem!r}")
    return profile


def load_profiles(directory: Path | None = None) -> dict[str, HardwareProfile]:
    """Every ``*.toml`` profile in ``directory`` (default: ``default_profile_dir()``), by name.

    Names that differ only in case are duplicates: they would collide on a case-insensitive
    filesystem and name the same kind of device to an operator.
    """
    directory = default_profile_dir() if directory is None else directory
    paths = sorted(directory.glob("*.toml"))
    if not paths:
        raise ProfileError(directory, None, "no profile files (*.toml) found")
    by_name: dict[str, HardwareProfile] = {}
    first_path: dict[str, Path] = {}
    for path in paths:
        profile = load_profile(path)
        key = profile.name.casefold()
        if key in first_path:
            raise ProfileError(path, "name", f"duplicate profile name {profile.name!r} "
                                             f"(also in {first_path[key]})")
        first_path[key] = path
        by_name[profile.name] = profile
    return dict(sorted(by_name.items()))


def default_profile_dir() -> Path:
    """Where profiles live: $EDGEFLEET_PROFILES, else the installed package, else the checkout."""
    configured = os.environ.get(PROFILES_ENV)
    if configured:
        return Path(configured)
    packaged = packaged_profile_dir(PROFILES_PACKAGE)
    if packaged is not None:
        return packaged
    return Path(__file__).resolve().parents[2] / "profiles"


def packaged_profile_dir(package: str) -> Path | None:
    """The folder of an importable package that holds ``*.toml`` files, or None.

    Only a package on a real filesystem counts; a zipped install gives no folder to glob.
    """
    try:
        folder = importlib.resources.files(package)
    except ModuleNotFoundError:
        return None
    if not isinstance(folder, Path) or not any(folder.glob("*.toml")):
        return None
    return folder


def _toml_error(path: Path, error: tomllib.TOMLDecodeError) -> ProfileError:
    """Move tomllib's "(at line L, column C)" out of the text into the error's line."""
    text = str(error)
    position = _TOML_POSITION.search(text)
    if position is None:
        return ProfileError(path, None, f"invalid TOML: {text}")
    described = text[:position.start()]
    return ProfileError(path, None, f"invalid TOML: {described} (column {position['column']})",
                        line=int(position["line"]))


def _explain_validation_error(text: str) -> tuple[str | None, str]:
    """Turn msgspec's "<what> - at `$.x.y`" into a dotted field path and a plain message."""
    parsed = _VALIDATION_ERROR.match(text)
    what = parsed["what"] if parsed else text
    at = (parsed["at"] or "") if parsed else ""
    location = at.lstrip(".")
    named = _NAMED_FIELD.match(what)
    if named:
        field = f"{location}.{named['name']}" if location else named["name"]
        problem = ("missing required field" if named["problem"] == "missing required"
                   else "unknown field")
        return field, problem
    wrong_type = _WRONG_TYPE.match(what)
    if wrong_type:
        return location or None, f"expected {wrong_type['expected']}, got {wrong_type['got']}"
    if what.startswith("Invalid enum value"):
        allowed = _ENUM_FIELDS.get(re.sub(r"\[\d+\]$", "", location.rsplit(".", 1)[-1]))
        suffix = f" (expected one of: {', '.join(m.value for m in allowed)})" if allowed else ""
        return location or None, f"invalid value{what.removeprefix('Invalid enum value')}{suffix}"
    return location or None, what[:1].lower() + what[1:]


def _raw_item(raw: Mapping[str, Any], key: str, index: int) -> object:
    values = raw.get(key)
    if isinstance(values, list) and index < len(values):
        return values[index]
    return None
