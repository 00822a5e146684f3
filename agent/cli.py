"""`edgefleet-agent`: the device daemon's command line.

argparse rather than click: the agent's install stays small (see the `agent` extra).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from edgefleet import __version__
from edgefleet.contract import DeviceFacts, encode, validate_device_id
from edgefleet.contract.errors import EncodeError
from edgefleet.hardware import load_profiles, match_profile, probe_runtimes, read_hardware


def facts_command(args: argparse.Namespace) -> int:
    """Print the facts message this device would publish, as JSON."""
    try:
        device_id = validate_device_id(args.device_id)
    except EncodeError as exc:
        print(f"edgefleet-agent: {exc}", file=sys.stderr)
        return 2
    hardware = read_hardware(args.root)
    match = match_profile(hardware, load_profiles())
    facts = DeviceFacts(device_id=device_id, ts=time.time(), hardware=hardware,
                        runtimes=probe_runtimes() if args.probe else (),
                        profile=match.profile.name if match.profile else None,
                        agent_version=__version__)
    sys.stdout.buffer.write(encode(facts) + b"\n")
    if match.profile is None:
        print(f"edgefleet-agent: {'; '.join(match.reasons)}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefleet-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    facts = commands.add_parser("facts", help=facts_command.__doc__)
    facts.add_argument("--root", type=Path, default=Path("/"),
                       help="filesystem root to read hardware facts from")
    facts.add_argument("--device-id", default="unenrolled")
    facts.add_argument("--no-probe", dest="probe", action="store_false",
                       help="skip trying the inference runtimes")
    facts.set_defaults(handler=facts_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
