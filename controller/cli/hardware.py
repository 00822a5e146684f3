"""`edgefleet profiles|hardware|topics`: what the fleet's hardware is and how it is matched."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from controller.cli.output import console
from edgefleet.contract import CHANNEL_TYPES, CHANNELS, COMMAND_TYPES, Channel, TopicSchema
from edgefleet.hardware import (
    HardwareProfile,
    ProfileError,
    load_profiles,
    match_profile,
    probe_runtimes,
    read_hardware,
)


@click.group()
def profiles() -> None:
    """Hardware profiles: what each kind of device can run."""


@profiles.command("list")
@click.option("--dir", "directory", type=click.Path(path_type=Path, file_okay=False),
              help="Profile folder (default: the shipped profiles).")
def profiles_list(directory: Path | None) -> None:
    """List profiles with their accelerator, limits and preferred variants."""
    table = Table(title="Hardware profiles")
    for column in ("name", "arch", "accelerator", "memory", "max model", "prefers"):
        table.add_column(column)
    for name, profile in load_profiles_or_exit(directory).items():
        table.add_row(name, profile.arch, profile.accelerator.value, f"{profile.memory_mb} MB",
                      f"{profile.limits.max_model_bytes / 2**20:.0f} MiB",
                      ", ".join(k.value for k in profile.prefers))
    console().print(table)


def load_profiles_or_exit(directory: Path | None) -> dict[str, HardwareProfile]:
    """Profiles, or a clean CLI error naming the broken file and field."""
    try:
        return load_profiles(directory)
    except ProfileError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def hardware() -> None:
    """Detect and match hardware the way an agent does."""


@hardware.command("detect")
@click.option("--root", type=click.Path(path_type=Path, file_okay=False, exists=True),
              default=Path("/"), show_default=True,
              help="Filesystem root to read facts from (a device image or a fake root).")
@click.option("--probe/--no-probe", default=True, show_default=True,
              help="Also try the inference runtimes installed here.")
def hardware_detect(root: Path, probe: bool) -> None:
    """Show a device's facts, the profile they match and the runtimes that really load."""
    facts = read_hardware(root)
    match = match_profile(facts, load_profiles_or_exit(None))
    table = Table(title=f"Facts under {root}", show_header=False)
    for field in facts.__struct_fields__:
        value = getattr(facts, field)
        table.add_row(field, ", ".join(value) if isinstance(value, tuple) else str(value))
    table.add_row("profile", match.profile.name if match.profile else "[red]none[/red]")
    table.add_row("why", "; ".join(match.reasons))
    console().print(table)
    if probe:
        runtimes = Table(title="Runtimes on this machine", show_header=False)
        for fact in probe_runtimes():
            if not fact.available:
                runtimes.add_row(fact.name, f"[red]unavailable[/red]: {fact.detail}")
                continue
            lines = [f"{fact.version} via {fact.module}", f"loads: {', '.join(fact.targets)}",
                     *fact.missing]
            runtimes.add_row(fact.name, "\n".join(lines))
        console().print(runtimes)
    if match.profile is None:
        sys.exit(2)


@hardware.command("survey")
@click.argument("roots", nargs=-1, required=True,
                type=click.Path(path_type=Path, file_okay=False, exists=True))
def hardware_survey(roots: tuple[Path, ...]) -> None:
    """Match several filesystem roots (device images, fake roots) to profiles in one table."""
    profiles = load_profiles_or_exit(None)
    table = Table(title="Profile match per root")
    for column in ("root", "profile", "accelerator", "why"):
        table.add_column(column)
    unknown = 0
    for root in roots:
        match = match_profile(read_hardware(root), profiles)
        unknown += match.profile is None
        table.add_row(root.name, match.profile.name if match.profile else "[red]unknown[/red]",
                      match.profile.accelerator.value if match.profile else "",
                      "; ".join(match.reasons))
    console().print(table)
    if unknown:
        console().print(f"{unknown} root(s) matched no profile: flagged, not guessed.")


@click.command("topics")
@click.option("--root", default="edgefleet", show_default=True, help="Topic root.")
@click.option("--device", default="+", show_default=True, help="A device id, or + for all.")
def topics(root: str, device: str) -> None:
    """Print the MQTT topic tree with QoS, retain and payload type per channel."""
    schema = TopicSchema(root)
    table = Table(title="MQTT topic tree")
    for column in ("topic", "direction", "payload", "encoding", "qos", "retain"):
        table.add_column(column)
    for channel, spec in CHANNELS.items():
        if channel is Channel.COMMAND:
            rows = [(f"{schema.filter(channel, device)[:-1]}{kind.value}", t.__name__)
                    for kind, t in COMMAND_TYPES.items()]
        else:
            rows = [(schema.filter(channel, device), CHANNEL_TYPES[channel].__name__)]
        for topic, payload in rows:
            table.add_row(topic, spec.direction.value, payload, spec.encoding.value,
                          str(spec.qos), "yes" if spec.retain else "no")
    console().print(table)
