"""Matching facts to a profile: every fake root to its profile, ties and strangers to none."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from msgspec.structs import replace

from edgefleet.contract.messages import HardwareFacts
from edgefleet.hardware import (
    HardwareProfile,
    Identity,
    load_profiles,
    match_profile,
    read_hardware,
)

FAKEROOTS = Path(__file__).parent / "fakeroots"
PROFILES = load_profiles(Path(__file__).resolve().parents[1] / "profiles")

# fake root -> the profile it must match (None: flagged as unknown)
ROOT_TO_PROFILE = {
    "coral-devboard": "coral-devboard",
    "coral-pcie": "coral-pcie",
    "coral-usb-rpi4": "coral-usb-rpi4",
    "coral-usb-rpi4-unflashed": "coral-usb-rpi4",
    "jetson-nano": "jetson-nano",
    "jetson-orin-nano": "jetson-orin-nano",
    "rpi4": "rpi4",
    "rpi5": "rpi5",
    "x86-64": "x86-64",
    "unknown-riscv": None,
}

# fake root -> the less specific profiles that also match and lose
ALSO_MATCHED = {
    "coral-devboard": "coral-pcie",
    "coral-pcie": "x86-64",
    "coral-usb-rpi4": "rpi4",
    "coral-usb-rpi4-unflashed": "rpi4",
}


def test_every_fake_root_and_every_profile_is_in_the_table() -> None:
    assert {root.name for root in FAKEROOTS.iterdir() if root.is_dir()} == set(ROOT_TO_PROFILE)
    assert set(PROFILES) <= set(ROOT_TO_PROFILE.values())


@pytest.mark.parametrize(("root", "expected"), ROOT_TO_PROFILE.items(),
                         ids=ROOT_TO_PROFILE.keys())
def test_a_fake_root_matches_its_profile(root: str, expected: str | None) -> None:
    match = match_profile(read_hardware(FAKEROOTS / root), PROFILES)
    assert match.name == expected
    assert match.profile is (PROFILES[expected] if expected else None)
    assert [c.name for c in match.candidates] == sorted(PROFILES)
    matched = {c.name for c in match.candidates if c.matched}
    assert matched == {name for name in (expected, ALSO_MATCHED.get(root)) if name}


@pytest.mark.parametrize("root", sorted(ALSO_MATCHED))
def test_the_more_specific_profile_wins_and_says_what_it_beat(root: str) -> None:
    match = match_profile(read_hardware(FAKEROOTS / root), PROFILES)
    assert match.reasons[-1] == f"also matched, less specific: {ALSO_MATCHED[root]}"


def test_the_reasons_name_each_condition_that_held() -> None:
    match = match_profile(read_hardware(FAKEROOTS / "coral-usb-rpi4-unflashed"), PROFILES)
    assert match.reasons == (
        "arch aarch64 is aarch64",
        "device-tree model 'Raspberry Pi 4 Model B Rev 1.4' contains 'Raspberry Pi 4'",
        "USB device 1a6e:089a present",
        "also matched, less specific: rpi4",
    )


def test_each_candidate_says_why_it_did_not_match() -> None:
    match = match_profile(read_hardware(FAKEROOTS / "rpi4"), PROFILES)
    checks = {c.name: c for c in match.candidates}
    assert checks["coral-usb-rpi4"].why_not == ("no USB device 1a6e:089a or 18d1:9302",)
    assert checks["x86-64"].why_not == ("arch aarch64 is not x86_64",)
    assert checks["jetson-nano"].why_not == (
        "device-tree model 'Raspberry Pi 4 Model B Rev 1.4' does not contain 'Jetson Nano'",
        "no tegra release (wanted one containing 'R32')",
    )
    assert checks["rpi4"].matched and checks["rpi4"].why_not == ()
    assert checks["coral-usb-rpi4"].specificity == 3


def test_unknown_hardware_is_flagged_with_its_facts() -> None:
    match = match_profile(read_hardware(FAKEROOTS / "unknown-riscv"), PROFILES)
    assert match.profile is None
    (reason,) = match.reasons
    assert reason.startswith("unknown hardware: arch riscv64, "
                             "device-tree model 'StarFive VisionFive 2 v1.3B', ")
    assert not any(c.matched for c in match.candidates)


def test_no_profiles_at_all_is_unknown_hardware() -> None:
    match = match_profile(read_hardware(FAKEROOTS / "rpi4"), [])
    assert match.profile is None
    assert match.reasons[0].startswith("unknown hardware: ")


def test_a_tie_between_equally_specific_profiles_is_ambiguous_not_guessed() -> None:
    twins = [replace(PROFILES["rpi4"], name="rpi4-b"), replace(PROFILES["rpi4"], name="rpi4-a")]
    match = match_profile(read_hardware(FAKEROOTS / "rpi4"), [*PROFILES.values(), *twins])
    assert match.profile is None
    assert match.reasons[0] == "ambiguous: rpi4, rpi4-a, rpi4-b"
    assert match.reasons[1].startswith("rpi4: arch aarch64 is aarch64; ")


def test_a_tie_below_the_winner_does_not_matter() -> None:
    twin = replace(PROFILES["rpi4"], name="rpi4-twin")
    match = match_profile(read_hardware(FAKEROOTS / "coral-usb-rpi4"), [*PROFILES.values(), twin])
    assert match.name == "coral-usb-rpi4"


def test_a_profile_that_states_no_conditions_never_matches() -> None:
    anything = replace(PROFILES["x86-64"], name="anything", identify=Identity())
    match = match_profile(read_hardware(FAKEROOTS / "unknown-riscv"), [anything])
    assert match.profile is None
    assert match.candidates[0].why_not == ("states no identifying conditions",)


def test_duplicate_profile_names_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate profile name 'rpi4'"):
        match_profile(read_hardware(FAKEROOTS / "rpi4"), [PROFILES["rpi4"], PROFILES["rpi4"]])


# --- properties ----------------------------------------------------------------------------------

FACTS = st.builds(
    HardwareFacts,
    arch=st.sampled_from(["aarch64", "x86_64", "armv7l", "riscv64"]),
    machine_model=st.sampled_from([None, "Raspberry Pi 4 Model B Rev 1.5",
                                   "Raspberry Pi 5 Model B Rev 1.0", "Freescale i.MX8MQ Phanbell",
                                   "NVIDIA Jetson Nano Developer Kit",
                                   "NVIDIA Jetson Orin Nano Developer Kit"]),
    usb_ids=st.lists(st.sampled_from(["1a6e:089a", "18d1:9302", "1d6b:0002"]), unique=True)
    .map(lambda ids: tuple(sorted(ids))),
    apex_devices=st.sampled_from([(), ("/dev/apex_0",)]),
    tegra_release=st.sampled_from([None, "# R32 (release), REVISION: 7.1",
                                   "# R35 (release), REVISION: 4.1"]),
)
# Twins make ties reachable, so the property also covers the ambiguous answer.
POOL = [*PROFILES.values(), replace(PROFILES["rpi5"], name="rpi5-twin")]


@given(hardware=FACTS, order=st.permutations(POOL), subset=st.sets(st.sampled_from(
    [p.name for p in POOL])))
def test_matching_is_deterministic_and_independent_of_profile_order(
        hardware: HardwareFacts, order: list[HardwareProfile], subset: set[str]) -> None:
    given_profiles = [p for p in order if p.name in subset]
    match = match_profile(hardware, given_profiles)
    assert match == match_profile(hardware, sorted(given_profiles, key=lambda p: p.name))
    assert match == match_profile(hardware, {p.name: p for p in reversed(given_profiles)})
    assert match == match_profile(hardware, given_profiles)

    matched = [c for c in match.candidates if c.matched]
    if match.profile is not None:
        (winner,) = [c for c in matched if c.name == match.profile.name]
        assert all(c.specificity < winner.specificity for c in matched if c is not winner)
    elif matched:
        top = max(c.specificity for c in matched)
        assert sum(c.specificity == top for c in matched) > 1
        assert match.reasons[0].startswith("ambiguous: ")
    else:
        assert match.reasons[0].startswith("unknown hardware: ")
