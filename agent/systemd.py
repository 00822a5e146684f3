"""The agent under systemd: the sd_notify protocol, and installing the service unit.

`SystemdNotifier` speaks sd_notify(3) itself (one datagram per message on $NOTIFY_SOCKET), so the
agent needs no libsystemd. `install_service` writes the unit from systemd/ (shipped in the wheel
as edgefleet.systemd) and a starting config into a filesystem root.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TextIO

from agent.durable import write_atomically
from edgefleet import __version__

log = logging.getLogger(__name__)

UNIT_NAME = "edgefleet-agent.service"
CONFIG_EXAMPLE = "agent.toml.example"
SERVICE_USER = "edgefleet"
# The groups that own accelerator device nodes: plugdev (Coral USB), apex (Coral PCIe),
# video and render (Jetson GPU, cameras). Only those present on the target go into the unit.
DEVICE_GROUPS = ("plugdev", "apex", "video", "render")

RESOURCE_PACKAGE = "edgefleet.systemd"
CHECKOUT_DIR = Path(__file__).resolve().parents[1] / "systemd"

# ProtectHome= and PrivateTmp= hide these from the service, so an executable there cannot start.
HIDDEN_FROM_SERVICE = ("/home/", "/root/", "/run/user/", "/tmp/", "/var/tmp/")
# What ExecStart= takes unquoted and unescaped (no spaces, '%' specifiers or '$' variables).
PLAIN_PATH = re.compile(r"/[A-Za-z0-9._+/-]+")

SYSUSERS = (
    f"# The edgefleet agent's service user (written by edgefleet-agent install-service).\n"
    f'u {SERVICE_USER} - "edgefleet device agent" /var/lib/edgefleet\n'
)

SEND_TIMEOUT_S = 1.0


class ServiceInstallError(Exception):
    """install_service cannot do what was asked; the message says what to change."""


class SystemdNotifier:
    """Sends READY, WATCHDOG, STATUS and STOPPING to systemd, or nothing outside systemd.

    Every method returns whether the message went out and never raises: the agent's work must
    not stop because systemd went away. The first failure is logged as a warning, later ones
    at debug level.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = notify_address(env.get("NOTIFY_SOCKET", ""))
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", f"STATUS={_one_line(status)}" if status else "")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_one_line(text)}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def send(self, *assignments: str) -> bool:
        """Sends VAR=value lines as one datagram."""
        if self._address is None:
            return False
        message = "\n".join(a for a in assignments if a).encode("utf-8")
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX,
                                                 socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    # systemd reads at once; a full queue must not stall the watchdog thread.
                    self._socket.settimeout(SEND_TIMEOUT_S)
                self._socket.sendto(message, self._address)
            except OSError as exc:
                level = logging.DEBUG if self._warned else logging.WARNING
                self._warned = True
                log.log(level, "cannot notify systemd at %r: %s", self._address, exc)
                return False
        return True

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None


def notify_address(value: str) -> str | None:
    """$NOTIFY_SOCKET as a socket address: a path, or '@name' for an abstract socket."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value:
        log.warning("NOTIFY_SOCKET=%r is not a unix socket address; not notifying systemd",
                    value)
    return None


def watchdog_interval(environ: Mapping[str, str] | None = None,
                      pid: int | None = None) -> float | None:
    """Seconds between watchdog pings: half of WatchdogSec=, as sd_watchdog_enabled(3) advises.

    None when systemd expects no pings from this process: $WATCHDOG_USEC unset or not a positive
    integer, or $WATCHDOG_PID naming another process.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    watchdog_pid = env.get("WATCHDOG_PID", "")
    if watchdog_pid and watchdog_pid != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 2 / 1_000_000


def _one_line(text: str) -> str:
    # A newline would start a new assignment: STATUS="x\nREADY=1" must not declare readiness.
    return " ".join(text.splitlines())


def packaged_text(name: str) -> str:
    """A file from systemd/: from the installed package, else from the repository checkout."""
    try:
        return importlib.resources.files(RESOURCE_PACKAGE).joinpath(name).read_text("utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        return (CHECKOUT_DIR / name).read_text("utf-8")


def default_executable(python: str | None = None) -> str:
    """The edgefleet-agent script beside this interpreter, as pip puts it in a venv.

    Not resolved: a venv's python is a symlink to the system one, the script is not.
    """
    return str(Path(python or sys.executable).parent / "edgefleet-agent")


def check_executable(path: str) -> str:
    if not PLAIN_PATH.fullmatch(path):
        raise ServiceInstallError(
            f"executable {path!r}: need an absolute path of letters, digits and ._+-/ only")
    if path.startswith(HIDDEN_FROM_SERVICE):
        raise ServiceInstallError(
            f"executable {path}: the unit hides /home, /root, /run/user and /tmp from the "
            f"service (ProtectHome=, PrivateTmp=); install into a venv such as "
            f"/opt/edgefleet/venv")
    return path


def existing_groups(group_file: str, wanted: Iterable[str] = DEVICE_GROUPS) -> tuple[str, ...]:
    """Those of `wanted` that an /etc/group file's text defines, in `wanted`'s order."""
    defined = {line.split(":", 1)[0] for line in group_file.splitlines()
               if line.strip() and not line.startswith("#")}
    return tuple(g for g in wanted if g in defined)


def render_unit(template: str, *, executable: str, groups: Iterable[str]) -> str:
    """The unit with ExecStart='s program and SupplementaryGroups= filled in."""
    text, execs = re.subn(r"(?m)^ExecStart=\S+", lambda _: f"ExecStart={executable}", template)
    text, supplementary = re.subn(r"(?m)^SupplementaryGroups=.*$",
                                  lambda _: "SupplementaryGroups=" + " ".join(groups), text)
    if (execs, supplementary) != (1, 1):
        raise ValueError(f"{UNIT_NAME} template needs one ExecStart= and one "
                         f"SupplementaryGroups= line, has {execs} and {supplementary}")
    return f"# Installed by edgefleet-agent install-service (edgefleet {__version__}).\n{text}"


def install_service(root: Path = Path("/"), *, executable: str | None = None,
                    force: bool = False, out: TextIO | None = None) -> list[Path]:
    """Installs the unit, its service user's sysusers.d entry, a config and the trusted-key dir.

    The unit and the sysusers.d file are always rewritten: they belong to edgefleet. The config
    is written only where none exists, unless `force`. Returns the paths written (the key dir
    when created) and prints what to run next to `out` (default stdout).
    """
    if executable is None:
        executable = default_executable()
        if not Path(executable).is_file():
            raise ServiceInstallError(
                f"no edgefleet-agent beside {sys.executable}; pass the installed script's path")
    check_executable(executable)
    group_file = root / "etc/group"
    groups = existing_groups(group_file.read_text("utf-8")) if group_file.is_file() else ()

    unit = root / "etc/systemd/system" / UNIT_NAME
    sysusers = root / "etc/sysusers.d/edgefleet-agent.conf"
    config = root / "etc/edgefleet/agent.toml"
    keys = root / "etc/edgefleet/keys"
    written: list[Path] = []
    for path, text, mode in (
            (unit, render_unit(packaged_text(UNIT_NAME), executable=executable, groups=groups),
             0o644),
            (sysusers, SYSUSERS, 0o644),
            # No secrets in it yet; a password or key path added later is the operator's to guard.
            (config, packaged_text(CONFIG_EXAMPLE), 0o644)):
        if path == config and config.exists() and not force:
            continue
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_atomically(path, text.encode("utf-8"), mode=mode)
        written.append(path)
    if not keys.is_dir():
        # Public keys, read by the unprivileged agent: world-readable, writable by root only
        # (as /etc/apt/trusted.gpg.d).
        keys.mkdir(mode=0o755)
        keys.chmod(0o755)
        written.append(keys)

    print(next_steps(executable, groups, config_written=config in written), file=out)
    return written


def next_steps(executable: str, groups: Iterable[str], *, config_written: bool) -> str:
    config_note = ("set device_id and [broker]" if config_written
                   else "kept as it was (force replaces it)")
    return "\n".join((
        f"Installed {UNIT_NAME}: ExecStart={executable}, "
        f"SupplementaryGroups={' '.join(groups) or '(none)'}.",
        "Next, on the device:",
        "  systemd-sysusers /etc/sysusers.d/edgefleet-agent.conf   # creates the edgefleet user",
        f"  edit /etc/edgefleet/agent.toml                          # {config_note}",
        "  systemctl daemon-reload",
        "  systemctl enable --now edgefleet-agent",
        "  journalctl -u edgefleet-agent -f",
    ))
