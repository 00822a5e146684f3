"""Hardware: the profiles a device can be, the facts it reports, and matching one to the other.

Shared by the controller (variant selection) and the agent (self-identification).
"""

from edgefleet.hardware.facts import probe_runtimes, read_hardware
from edgefleet.hardware.loading import (
    ProfileError,
    default_profile_dir,
    load_profile,
    load_profiles,
)
from edgefleet.hardware.matching import CandidateCheck, ProfileMatch, match_profile
from edgefleet.hardware.profile import (
    Accelerator,
    HardwareProfile,
    Identity,
    ProfileLimits,
    RuntimeSupport,
)

__all__ = [
    "Accelerator", "CandidateCheck", "HardwareProfile", "Identity", "ProfileError",
    "ProfileLimits", "ProfileMatch", "RuntimeSupport", "default_profile_dir", "load_profile",
    "load_profiles", "match_profile", "probe_runtimes", "read_hardware",
]
