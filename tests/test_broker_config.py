"""`edgefleet broker-config`'s output (controller.broker_config): the ACL built from the topic
schema, the Mosquitto settings that make a certificate the only way in, the files it writes and
their modes, and Mosquitto really starting on the generated config and letting an enrolled
device in over TLS."""

from __future__ import annotations

import os
import ssl
import time
from collections import defaultdict
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.broker_config import (
    ACL,
    CONF,
    BrokerLimits,
    render_acl,
    render_conf,
    write_broker_config,
)
from controller.pki import CertificateKind, FleetCA
from edgefleet.contract import CHANNELS, Channel, CommandKind, TopicSchema
from edgefleet.contract.topics import Direction
from tests.broker import (
    LoopbackClient,
    MessageCollector,
    connect_client,
    free_ports,
)
from tests.secure_fleet import GeneratedBroker

SCHEMA = TopicSchema("acme/edgefleet")
RUN_AS = "root" if os.geteuid() == 0 else None


def acl_blocks(text: str) -> tuple[dict[str, list[tuple[str, str]]], list[tuple[str, str]]]:
    """The ACL as Mosquitto reads it: `topic` rules per `user` block, and the `pattern` rules."""
    users: dict[str, list[tuple[str, str]]] = defaultdict(list)
    patterns: list[tuple[str, str]] = []
    user: str | None = None
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        word, *rest = line.split()
        if word == "user":
            user = rest[0]
            users[user]
        elif word == "topic":
            assert user is not None, f"a topic rule outside any user block: {line!r}"
            users[user].append((rest[0], rest[1]))
        elif word == "pattern":
            patterns.append((rest[0], rest[1]))
        else:
            raise AssertionError(f"unexpected ACL line {line!r}")
    return dict(users), patterns


def directives(conf: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = defaultdict(list)
    for line in conf.splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            found[key].append(value)
    return dict(found)


# --- the ACL ---------------------------------------------------------------------------------

def test_every_device_gets_its_own_subtree_by_its_certificate_name() -> None:
    _, patterns = acl_blocks(render_acl(SCHEMA, ["edgefleet-controller"]))

    for channel, spec in CHANNELS.items():
        topic = f"acme/edgefleet/dev/%u/{channel.value}" + (
            "/+" if channel is Channel.COMMAND else "")
        access = "write" if spec.direction is Direction.FROM_DEVICE else "read"
        assert (access, topic) in patterns, (access, topic)
    assert ("read", SCHEMA.key_chain) in patterns
    assert len(patterns) == len(CHANNELS) + 1
    for access, topic in patterns:
        assert access in ("read", "write"), "no device may both read and write a topic"
        assert "#" not in topic
        assert topic == SCHEMA.key_chain or topic.startswith("acme/edgefleet/dev/%u/")


def test_controllers_read_what_devices_send_and_write_what_devices_read() -> None:
    users, _ = acl_blocks(render_acl(SCHEMA, ["ctl-a", "ctl-b"]))

    assert set(users) == {"ctl-a", "ctl-b"}
    expected = {(("read" if spec.direction is Direction.FROM_DEVICE else "write"),
                 SCHEMA.filter(channel)) for channel, spec in CHANNELS.items()}
    expected.add(("readwrite", SCHEMA.key_chain))
    for rules in users.values():
        assert set(rules) == expected
        assert all(topic.startswith("acme/edgefleet/") for _, topic in rules)


def test_observers_read_everything_under_the_root_and_write_nothing() -> None:
    users, _ = acl_blocks(render_acl(SCHEMA, ["edgefleet-controller"], ["probe", "audit"]))

    assert users["probe"] == users["audit"] == [("read", "acme/edgefleet/#")]


def test_without_observers_nobody_reads_the_whole_tree() -> None:
    text = render_acl(SCHEMA, ["edgefleet-controller"])

    assert "#" not in "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert text.endswith("\n")


# --- the Mosquitto configuration ---------------------------------------------------------------

def _conf(tmp_path: Path, **overrides: object) -> str:
    arguments: dict[str, object] = dict(
        port=8883, bind="0.0.0.0", ca_file=tmp_path / "ca.crt", crl_file=tmp_path / "crl.pem",
        cert_file=tmp_path / "server.crt", key_file=tmp_path / "server.key",
        acl_file=tmp_path / "acl", data_dir=tmp_path / "data", limits=BrokerLimits())
    arguments.update(overrides)
    return render_conf(**arguments)  # type: ignore[arg-type]


def test_the_conf_lets_in_only_clients_with_a_fleet_certificate(tmp_path: Path) -> None:
    found = directives(_conf(tmp_path))

    assert found["allow_anonymous"] == ["false"]
    assert found["require_certificate"] == ["true"]
    assert found["use_identity_as_username"] == ["true"]
    assert found["use_username_as_clientid"] == ["true"]
    assert found["listener"] == ["8883 0.0.0.0"]
    assert found["cafile"] == [str(tmp_path / "ca.crt")]
    assert found["crlfile"] == [str(tmp_path / "crl.pem")]
    assert found["certfile"] == [str(tmp_path / "server.crt")]
    assert found["keyfile"] == [str(tmp_path / "server.key")]
    assert found["acl_file"] == [str(tmp_path / "acl")]
    assert "password_file" not in found
    assert "user" not in found


def test_the_conf_persists_often_and_bounds_messages_and_queues(tmp_path: Path) -> None:
    limits = BrokerLimits(message_size_limit=1234, max_queued_messages=56,
                          autosave_interval_s=3)
    found = directives(_conf(tmp_path, limits=limits))

    assert found["persistence"] == ["true"]
    assert found["persistence_location"] == [f"{tmp_path / 'data'}/"]
    assert found["autosave_interval"] == ["3"]
    assert found["message_size_limit"] == ["1234"]
    assert found["max_queued_messages"] == ["56"]
    defaults = directives(_conf(tmp_path))
    assert 0 < int(defaults["autosave_interval"][0]) <= 30
    assert int(defaults["message_size_limit"][0]) > 32 * 1024       # a chunk and its envelope


def test_the_conf_names_the_account_mosquitto_runs_as_when_asked(tmp_path: Path) -> None:
    assert directives(_conf(tmp_path, run_as="mqtt"))["user"] == ["mqtt"]


# --- writing it all --------------------------------------------------------------------------

@pytest.fixture
def ca(tmp_path: Path) -> FleetCA:
    ca = FleetCA.create(tmp_path / "pki")
    ca.issue("edgefleet-controller", CertificateKind.CONTROLLER)
    return ca


def test_write_broker_config_writes_the_conf_the_acl_and_a_broker_identity(
        ca: FleetCA, tmp_path: Path) -> None:
    files = write_broker_config(ca, SCHEMA, tmp_path / "broker", port=18883,
                                hostnames=["mqtt.example.internal"], observers=["probe"])

    assert files.controllers == ("edgefleet-controller",)
    assert files.observers == ("probe",)
    assert files.conf == tmp_path / "broker" / CONF and files.acl == tmp_path / "broker" / ACL
    found = directives(files.conf.read_text())
    assert found["listener"] == ["18883 127.0.0.1"]
    for name in ("cafile", "crlfile", "certfile", "keyfile", "acl_file"):
        path = Path(found[name][0])
        assert path.is_absolute() and path.is_file(), (name, path)
    assert Path(found["cafile"][0]) == ca.cert_path.resolve()
    assert Path(found["crlfile"][0]) == ca.crl_path.resolve()
    assert (files.server_key.stat().st_mode & 0o777) == 0o600
    assert (files.conf.stat().st_mode & 0o777) == 0o644
    assert (tmp_path / "broker" / "probe.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "broker" / "data").is_dir()
    users, _ = acl_blocks(files.acl.read_text())
    assert set(users) == {"edgefleet-controller", "probe"}

    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
        "mqtt.example.internal"
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.example.internal", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_a_revoked_controller_gets_no_rights(ca: FleetCA, tmp_path: Path) -> None:
    ca.issue("old-controller", CertificateKind.CONTROLLER)
    ca.revoke("old-controller", CertificateKind.CONTROLLER, time.time())

    files = write_broker_config(ca, SCHEMA, tmp_path / "broker", port=18883)

    assert files.controllers == ("edgefleet-controller",)
    assert "old-controller" not in files.acl.read_text()


def test_writing_it_again_replaces_the_broker_identity(ca: FleetCA, tmp_path: Path) -> None:
    first = write_broker_config(ca, SCHEMA, tmp_path / "broker", port=18883)
    key = first.server_key.read_bytes()

    again = write_broker_config(ca, SCHEMA, tmp_path / "broker", port=18884)

    assert again.server_key.read_bytes() != key
    assert directives(again.conf.read_text())["listener"] == ["18884 127.0.0.1"]


def _identity(ca: FleetCA, folder: Path, name: str, kind: CertificateKind) -> tuple[Path, Path]:
    issued = ca.issue(name, kind)
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    return cert, key


@pytest.mark.broker
@pytest.mark.timeout(60)
def test_mosquitto_starts_on_the_generated_config_and_carries_a_command_to_a_device(
        ca: FleetCA, tmp_path: Path) -> None:
    port = free_ports(1)[0]
    files = write_broker_config(ca, SCHEMA, tmp_path / "broker", port=port, run_as=RUN_AS)
    device = _identity(ca, tmp_path, "pi-0001", CertificateKind.DEVICE)
    controller = _identity(ca, tmp_path, "edgefleet-controller", CertificateKind.CONTROLLER)
    broker = GeneratedBroker(files.conf, port)

    def connect(name: str, identity: tuple[Path, Path], **kwargs: object) -> LoopbackClient:
        return connect_client(port, client_id=name, before_connect=lambda c: c.tls_set(
            ca_certs=str(ca.cert_path), certfile=str(identity[0]), keyfile=str(identity[1]),
            tls_version=ssl.PROTOCOL_TLS_CLIENT), **kwargs)  # type: ignore[arg-type]

    broker.start()
    try:
        received = MessageCollector()
        pi = connect("pi-0001", device, on_message=received)
        ctl = connect("edgefleet-controller", controller)
        try:
            # Wider than its own subtree: the broker may grant it but delivers only its own.
            pi.subscribe_and_wait(f"{SCHEMA.root}/dev/+/cmd/+")
            other = SCHEMA.command("pi-0002", CommandKind.DEPLOY)
            mine = SCHEMA.command("pi-0001", CommandKind.DEPLOY)
            ctl.publish_and_wait(other, b"{}")
            ctl.publish_and_wait(mine, b"{}")
            assert [m.topic for m in received.wait_for(1)] == [mine]
            received.expect_none(within=0.3)
        finally:
            pi.close()
            ctl.close()
    finally:
        broker.stop()
