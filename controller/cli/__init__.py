"""The `edgefleet` operator CLI.

Commands read and print; every decision they show comes from the pure core (profile matching,
variant selection) or the pipeline, so what an operator sees is what the controller will do.
"""

from __future__ import annotations

import click

from controller.cli.fleet import (
    devices,
    fleet_group,
    init,
    models,
    serve,
    telemetry,
    variants_db,
)
from controller.cli.hardware import hardware, profiles, topics
from controller.cli.rollouts import rollouts
from controller.cli.security import broker_config, devices_enroll, devices_revoke, keys
from controller.cli.variants import variants
from controller.demo import demo


@click.group()
@click.version_option(package_name="edgefleet")
def main() -> None:
    """edgefleet: ship optimized ML model variants to fleets of edge devices."""


for command in (init, serve, devices, models, rollouts, profiles, hardware, topics, telemetry,
                broker_config, keys):
    main.add_command(command)
devices.add_command(devices_enroll)
devices.add_command(devices_revoke)
main.add_command(fleet_group, "fleet")
# `variants build|show` work on folders (no database); `variants list` reads the registry.
variants.add_command(variants_db.commands["list"])
main.add_command(variants)
main.add_command(demo)
