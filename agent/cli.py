"""`edgefleet-agent`: the device daemon's command line.

argparse rather than click: the agent's install stays small (see the `agent` extra).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
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


def run_command(args: argparse.Namespace) -> int:
    """Run the agent until SIGTERM or SIGINT."""
    from agent.config import ConfigError, load_config

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"edgefleet-agent: {exc}", file=sys.stderr)
        return 2
    from agent.service import Agent

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        agent = Agent(config)
    except Exception as exc:  # e.g. an unreadable replay file or state directory
        print(f"edgefleet-agent: cannot start: {exc}", file=sys.stderr)
        return 1
    return agent.run(stop)


def install_service_command(args: argparse.Namespace) -> int:
    """Install the systemd unit and a default config under --root."""
    from agent.systemd import ServiceInstallError, install_service

    try:
        install_service(args.root, executable=args.executable, force=args.force)
    except ServiceInstallError as exc:
        print(f"edgefleet-agent: {exc}", file=sys.stderr)
        return 1
    return 0


def keygen_command(args: argparse.Namespace) -> int:
    """Make this device's TLS key and a certificate request for `edgefleet devices enroll
    --csr`; the key stays here."""
    from agent.identity import make_key_and_request

    try:
        key, request = make_key_and_request(args.device_id, args.out)
    except EncodeError as exc:
        print(f"edgefleet-agent: {exc}", file=sys.stderr)
        return 2
    except FileExistsError:
        print(f"edgefleet-agent: {args.out / 'device.key'} exists: refusing to replace this "
              "device's key", file=sys.stderr)
        return 1
    print(f"key {key} (stays on this device)\nrequest {request}: on the controller, run "
          f"`edgefleet devices enroll {args.device_id} --csr device.csr`")
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
    run = commands.add_parser("run", help=run_command.__doc__)
    run.add_argument("--config", type=Path, required=True, help="the agent's TOML config")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(handler=run_command)
    keygen = commands.add_parser("keygen", help=keygen_command.__doc__)
    keygen.add_argument("--device-id", required=True)
    keygen.add_argument("--out", type=Path, default=Path("/etc/edgefleet"),
                        help="folder for device.key and device.csr")
    keygen.set_defaults(handler=keygen_command)
    service = commands.add_parser("install-service", help=install_service_command.__doc__)
    service.add_argument("--root", type=Path, default=Path("/"),
                         help="install under this root (an image being prepared)")
    service.add_argument("--executable", help="path of edgefleet-agent in the unit's ExecStart")
    service.add_argument("--force", action="store_true", help="replace an existing config")
    service.set_defaults(handler=install_service_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
