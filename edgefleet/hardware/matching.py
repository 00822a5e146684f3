"""Which hardware profile a device's facts describe: a pure function with its reasons.

Every condition a profile's ``identify`` states must hold. Of the profiles that match, the one
stating the most conditions wins; a tie, or no match, gives no profile. Unknown hardware is
flagged for an operator, never guessed, since a wrong profile means the wrong variant.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

import msgspec

from edgefleet.contract.messages import HardwareFacts
from edgefleet.hardware.profile import HardwareProfile, Identity


class CandidateCheck(msgspec.Struct, frozen=True, kw_only=True):
    """How one profile fared against the facts."""

    name: str
    matched: bool
    specificity: int                 # conditions the profile states; more wins
    met: tuple[str, ...] = ()        # conditions that held
    why_not: tuple[str, ...] = ()    # conditions that did not hold


class ProfileMatch(msgspec.Struct, frozen=True, kw_only=True):
    profile: HardwareProfile | None  # None: unknown or ambiguous hardware
    reasons: tuple[str, ...]         # for a person: why this profile, or why none
    candidates: tuple[CandidateCheck, ...]  # every profile, by name

    @property
    def name(self) -> str | None:
        return self.profile.name if self.profile is not None else None


def match_profile(hardware: HardwareFacts,
                  profiles: Mapping[str, HardwareProfile] | Iterable[HardwareProfile],
                  ) -> ProfileMatch:
    """The most specific profile whose every identifying condition holds for ``hardware``."""
    checked = [(profile, _check(profile, hardware))
               for profile in _by_name(profiles.values() if isinstance(profiles, Mapping)
                                       else profiles)]
    candidates = tuple(check for _, check in checked)
    matched = [(profile, check) for profile, check in checked if check.matched]
    if not matched:
        return ProfileMatch(profile=None, candidates=candidates,
                            reasons=(f"unknown hardware: {summarize(hardware)}",))
    best = max(check.specificity for _, check in matched)
    winners = [(profile, check) for profile, check in matched if check.specificity == best]
    if len(winners) > 1:
        names = ", ".join(check.name for _, check in winners)
        details = tuple(f"{check.name}: {'; '.join(check.met)}" for _, check in winners)
        return ProfileMatch(profile=None, candidates=candidates,
                            reasons=(f"ambiguous: {names}", *details))
    (winner, winner_check), = winners
    less_specific = [check.name for _, check in matched if check is not winner_check]
    also = (f"also matched, less specific: {', '.join(less_specific)}",) if less_specific else ()
    return ProfileMatch(profile=winner, candidates=candidates,
                        reasons=(*winner_check.met, *also))


def summarize(hardware: HardwareFacts) -> str:
    """The identifying facts on one line, for logs and the "unknown hardware" reason."""
    return ", ".join((
        f"arch {hardware.arch}",
        f"device-tree model {_quoted(hardware.machine_model)}",
        f"cpu {_quoted(hardware.cpu_model)} x{hardware.cpu_cores}",
        f"{hardware.memory_mb} MB",
        f"USB ids [{' '.join(hardware.usb_ids)}]",
        f"apex devices [{' '.join(hardware.apex_devices)}]",
        f"tegra release {_quoted(hardware.tegra_release)}",
    ))


def _by_name(profiles: Iterable[HardwareProfile]) -> list[HardwareProfile]:
    # Sorting makes the answer independent of the order profiles arrive in; a duplicate name
    # would make it depend on that order again.
    ordered = sorted(profiles, key=lambda p: p.name)
    for first, second in itertools.pairwise(ordered):
        if first.name == second.name:
            raise ValueError(f"duplicate profile name {first.name!r}")
    return ordered


def _check(profile: HardwareProfile, hardware: HardwareFacts) -> CandidateCheck:
    identity = profile.identify
    if identity.condition_count == 0:
        # A profile that states nothing would match every device: it can only be chosen by hand.
        return CandidateCheck(name=profile.name, matched=False, specificity=0,
                              why_not=("states no identifying conditions",))
    met: list[str] = []
    unmet: list[str] = []
    for holds, description in _conditions(identity, hardware):
        (met if holds else unmet).append(description)
    return CandidateCheck(name=profile.name, matched=not unmet,
                          specificity=identity.condition_count, met=tuple(met),
                          why_not=tuple(unmet))


def _conditions(identity: Identity, hardware: HardwareFacts) -> list[tuple[bool, str]]:
    """(holds, description) for each condition the identity states."""
    conditions = []
    if identity.arch:
        wanted = " or ".join(identity.arch)
        holds = hardware.arch in identity.arch
        conditions.append((holds, f"arch {hardware.arch} {'is' if holds else 'is not'} {wanted}"))
    if identity.device_tree_model:
        conditions.append(_contains("device-tree model", hardware.machine_model,
                                    identity.device_tree_model))
    if identity.usb_ids:
        present = sorted(set(identity.usb_ids) & {i.lower() for i in hardware.usb_ids})
        conditions.append(
            (True, f"USB device {' '.join(present)} present") if present
            else (False, f"no USB device {' or '.join(identity.usb_ids)}"))
    if identity.apex_device:
        conditions.append(
            (True, f"apex device {' '.join(hardware.apex_devices)} present")
            if hardware.apex_devices else (False, "no /dev/apex_* device"))
    if identity.tegra_release:
        conditions.append(_contains("tegra release", hardware.tegra_release,
                                    identity.tegra_release))
    return conditions


def _contains(what: str, value: str | None, substrings: tuple[str, ...]) -> tuple[bool, str]:
    wanted = " or ".join(repr(s) for s in substrings)
    if value is None:
        return False, f"no {what} (wanted one containing {wanted})"
    found = next((s for s in substrings if s in value), None)
    if found is None:
        return False, f"{what} {value!r} does not contain {wanted}"
    return True, f"{what} {value!r} contains {found!r}"


def _quoted(value: str | None) -> str:
    return repr(value) if value is not None else "none"
