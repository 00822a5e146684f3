"""The ACL matrix on Mosquitto running the configuration `edgefleet broker-config` wrote.

A compromised device ("mallory", holding its own valid certificate) tries to speak for, listen
to, or take the place of a real agent ("victim"); clients without a good certificate try to get
in at all. Every attempt must be refused, as seen by a privileged probe that reads everything.
"""

from __future__ import annotations

import datetime as dt
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgefleet.contract import CHANNELS, Channel, CommandKind, TopicSchema
from tests.broker import BrokerError, MessageCollector, connect_client
from tests.secure_fleet import SecureFleet

REFUSED = (BrokerError, ssl.SSLError, OSError)


def _refused(connect: object) -> bool:
    try:
        client = connect() if callable(connect) else None
    except REFUSED:
        return True
    assert client is not None
    client.close()
    return False


def _foreign_topics(schema: TopicSchema, victim: str) -> list[str]:
    topics = [schema.build(c, victim) for c in CHANNELS if c is not Channel.COMMAND]
    topics += [schema.command(victim, k) for k in CommandKind]
    return topics


def test_a_device_cannot_publish_subscribe_or_connect_as_another(
        secure_broker: SecureFleet) -> None:
    fleet = secure_broker
    schema = TopicSchema(fleet.root)
    victim = fleet.start_agent("victim")
    seen = MessageCollector()
    probe = fleet.probe(on_message=seen)
    probe.subscribe_and_wait(f"{schema.root}/#")
    fleet.wait(lambda: any(m.topic == schema.build(Channel.PRESENCE, "victim")
                           for m in seen.so_far()), 30, "the victim agent online")

    mallory_got = MessageCollector()
    mallory = fleet.as_device("mallory", on_message=mallory_got)
    attempts: dict[str, int] = {}

    # 1. Publishing on the victim's topics, both directions, and on the key chain.
    forged = [*_foreign_topics(schema, "victim"), schema.key_chain]
    # 2. Publishing what only a controller may send to mallory itself.
    forged += [schema.command("mallory", k) for k in CommandKind]
    forged += [schema.build(Channel.CHUNK, "mallory")]
    for topic in forged:
        mallory.publish(topic, b'{"forged":true}', qos=1, retain=topic == schema.key_chain)
    attempts["publish on another's or a controller's topic"] = len(forged)

    # 3. Subscribing wider than its own subtree: the broker may grant the filter, but must
    #    deliver nothing outside the device's own topics.
    wide = ["#", f"{schema.root}/#", f"{schema.root}/dev/+/telemetry",
            f"{schema.root}/dev/victim/cmd/+", "$SYS/#"]
    for topic_filter in wide:
        mallory.subscribe_and_wait(topic_filter)
    attempts["subscribe beyond its subtree"] = len(wide)

    # 4. A username claim does not change who it is: the certificate's name wins.
    impostor = fleet.as_device("mallory", client_id="mallory-2", username="victim")
    impostor.publish(schema.build(Channel.TELEMETRY, "victim"), b'{"forged":true}', qos=1)
    attempts["username claiming another device"] = 1

    # 5. Connecting with the victim's client id must not take over its session.
    takeover = fleet.as_device("mallory", client_id="victim")
    attempts["client id of another device"] = 1

    # Control: what mallory may do still gets through, so silence above means refusal.
    mallory.publish(schema.build(Channel.TELEMETRY, "mallory"), b'{"control":true}', qos=1)

    # The victim keeps publishing; a controller sends it a command mallory must not see.
    controller = fleet.as_controller()
    controller.publish_and_wait(schema.command("victim", CommandKind.CONFIG),
                                b'{"type":"config","v":1,"command_id":"c-1","device_id":'
                                b'"victim","telemetry_interval_s":0.5}')
    time.sleep(3.0)
    received = seen.so_far()
    forged_seen = [m for m in received if b"forged" in m.payload]
    assert forged_seen == [], f"the probe saw forged messages: {forged_seen}"
    assert any(m.payload == b'{"control":true}' for m in received), "the probe saw nothing"
    foreign = [m.topic for m in mallory_got.so_far()
               if not m.topic.startswith(f"{schema.root}/dev/mallory/")
               and m.topic != schema.key_chain]
    assert foreign == [], f"mallory received others' messages: {foreign[:5]}"
    # The takeover attempt was renamed to mallory: the victim never went offline.
    presence = [m.payload for m in received
                if m.topic == schema.build(Channel.PRESENCE, "victim")]
    assert not any(b"offline" in p for p in presence), presence
    assert victim.alive and "disconnected from the broker" not in victim.log_text()
    assert "as mallory" in fleet.broker.log_text()
    for client in (mallory, impostor, takeover, controller, probe):
        client.close()
    print("\nACL matrix, refused / attempted:",
          {what: f"{n}/{n}" for what, n in attempts.items()})


def test_clients_without_a_good_certificate_or_without_tls_cannot_connect(
        secure_broker: SecureFleet, tmp_path: Path) -> None:
    fleet = secure_broker
    ca = str(fleet.home / "pki" / "ca.crt")
    port = fleet.broker.port
    counts: dict[str, bool] = {}

    counts["plaintext MQTT on the TLS port"] = _refused(lambda: connect_client(port, timeout=3))
    counts["TLS without a client certificate"] = _refused(lambda: connect_client(
        port, timeout=3, before_connect=lambda c: c.tls_set(
            ca_certs=ca, tls_version=ssl.PROTOCOL_TLS_CLIENT)))

    fleet.enroll("expired", valid_from=time.time() - 10 * 86_400, days=1)
    counts["an expired certificate"] = _refused(lambda: fleet.as_device("expired", timeout=3))

    stranger_cert, stranger_key = _foreign_ca_identity(tmp_path, "victim")
    counts["a certificate from another CA"] = _refused(lambda: fleet.tls_client(
        stranger_cert, stranger_key, client_id="victim", timeout=3))

    fleet.enroll("stolen")
    fleet.as_device("stolen").close()                # works until it is revoked
    fleet.cli("devices", "revoke", "stolen")
    fleet.broker.restart()
    counts["a revoked certificate (after a broker restart)"] = _refused(
        lambda: fleet.as_device("stolen", timeout=3))
    # The revocation hit only that device.
    fleet.enroll("honest")
    counts["(control) an enrolled device still connects"] = not _refused(
        lambda: fleet.as_device("honest", timeout=5))

    listeners = [line for line in fleet.broker.config_text.splitlines()
                 if line.startswith("listener ")]
    assert listeners == [f"listener {port} 127.0.0.1"], "one listener, TLS only"
    assert all(counts.values()), counts
    print("\nconnections refused:", counts)


def test_a_sighup_makes_the_broker_read_a_new_revocation_list(
        secure_broker: SecureFleet) -> None:
    fleet = secure_broker
    fleet.enroll("lost")
    fleet.as_device("lost").close()
    fleet.cli("devices", "revoke", "lost")
    fleet.broker.reload()
    time.sleep(1.0)
    assert fleet.broker.running
    assert _refused(lambda: fleet.as_device("lost", timeout=3))


def _foreign_ca_identity(directory: Path, common_name: str) -> tuple[Path, Path]:
    """A certificate for `common_name` signed by a CA the fleet never heard of."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the fleet CA")])
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1)).sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / "stranger.crt", directory / "stranger.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


pytestmark = pytest.mark.timeout(180)


def test_a_device_with_its_own_key_joins_over_tls_and_speaks_only_for_itself(
        secure_broker: SecureFleet) -> None:
    from agent.identity import make_key_and_request

    fleet = secure_broker
    schema = TopicSchema(fleet.root)
    bundle = fleet.tmp / "bundles" / "own-key"
    _, request = make_key_and_request("own-key", bundle)       # as on the device
    fleet.enroll("own-key", request=request.read_bytes())
    seen = MessageCollector()
    probe = fleet.probe(on_message=seen)
    probe.subscribe_and_wait(f"{schema.root}/#")
    agent = fleet.start_agent("own-key")
    fleet.wait(lambda: any(m.topic == schema.build(Channel.TELEMETRY, "own-key")
                           for m in seen.so_far()), 30, "telemetry from the agent's own key")
    assert agent.alive
    probe.close()
