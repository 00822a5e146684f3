"""The `edgefleet` operator CLI.

Commands read and print; every decision they show comes from the pure core (profile matching,
variant selection) or the pipeline, so what an operator sees is what the controller will do.
"""

from __future__ import annotations

import click

from controller.cli.hardware import hardware, profiles, topics
from controller.cli.variants import variants


@click.group()
@click.version_option(package_name="edgefleet")
def main() -> None:
    """edgefleet: ship optimized ML model variants to fleets of edge devices."""


for command in (profiles, hardware, topics, variants):
    main.add_command(command)
