"""Hardware profiles: what a kind of device is, what it can run, and how to recognise it.

Profiles are TOML files in profiles/ (shipped inside the wheel as ``edgefleet.profiles``). The
types here are the one definition both the controller (selection) and the agent (self-match)
use.
"""

from __future__ import annotations

import enum

import msgspec

from edgefleet.contract.manifest import Runtime
from edgefleet.contract.messages import VariantKind


class Accelerator(enum.Enum):
    NONE = "none"
    EDGETPU_USB = "edgetpu-usb"
    EDGETPU_PCIE = "edgetpu-pcie"        # M.2 / mini-PCIe cards and the Dev Board's SoM
    NVIDIA_GPU = "nvidia-gpu"


class RuntimeSupport(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A runtime this hardware can use, with its targets (providers or delegates) best first."""

    runtime: Runtime
    targets: tuple[str, ...] = ()


class ProfileLimits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    max_model_bytes: int                 # largest artifact this device should download and load
    memory_budget_mb: int                # what the model may take in RAM beside the OS and agent


class Identity(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Facts that identify the hardware. Every condition given must hold; "any of" inside one.

    A profile that states more conditions is more specific and wins over one that states fewer
    (a Raspberry Pi 4 with a Coral USB stick is the Coral profile, not the plain Pi 4).
    """

    arch: tuple[str, ...] = ()               # any of these uname machine values
    device_tree_model: tuple[str, ...] = ()  # any of these substrings of the device-tree model
    usb_ids: tuple[str, ...] = ()            # any of these USB ids present
    apex_device: bool = False                # a /dev/apex_* node present
    tegra_release: tuple[str, ...] = ()      # any of these substrings of /etc/nv_tegra_release

    @property
    def condition_count(self) -> int:
        return sum(bool(c) for c in (self.arch, self.device_tree_model, self.usb_ids,
                                     self.apex_device, self.tegra_release))


class HardwareProfile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    description: str
    arch: str
    memory_mb: int
    accelerator: Accelerator
    runtimes: tuple[RuntimeSupport, ...]
    prefers: tuple[VariantKind, ...]     # variant kinds in order of preference
    limits: ProfileLimits
    identify: Identity

    def runtime_targets(self, runtime: Runtime) -> tuple[str, ...] | None:
        """The targets this profile lists for a runtime, or None if it cannot use it."""
        for support in self.runtimes:
            if support.runtime is runtime:
                return support.targets
        return None
