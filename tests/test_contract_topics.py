"""The topic schema builds and parses every topic, and rejects what a broker ACL could not fence."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from edgefleet.contract import (
    CHANNELS,
    Channel,
    CommandKind,
    DecodeError,
    Direction,
    EncodeError,
    Topic,
    TopicSchema,
    validate_device_id,
)
from edgefleet.contract import topics as topics_module

device_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
roots = st.lists(st.from_regex(r"\A[A-Za-z0-9._-]{1,12}\Z"), min_size=1, max_size=3).map(
    "/".join)
topics = st.one_of(
    st.builds(Topic, st.sampled_from([c for c in Channel if c is not Channel.COMMAND]),
              device_ids),
    st.builds(Topic, st.just(Channel.COMMAND), device_ids, st.sampled_from(list(CommandKind))),
)


def test_module_examples_run() -> None:
    result = doctest.testmod(topics_module)
    assert result.attempted > 0 and result.failed == 0


@given(root=roots, topic=topics)
def test_parse_inverts_build(root: str, topic: Topic) -> None:
    schema = TopicSchema(root)
    built = schema.build(topic.channel, topic.device_id, topic.command)
    assert schema.parse(built) == topic
    assert topic_matches_sub(schema.filter(topic.channel), built)
    assert topic_matches_sub(schema.filter(topic.channel, topic.device_id), built)


@given(topic=topics)
def test_a_device_filter_never_matches_another_devices_topic(topic: Topic) -> None:
    schema = TopicSchema()
    other = "z" + topic.device_id[:63] if topic.device_id != "z" else "y"
    built = schema.build(topic.channel, topic.device_id, topic.command)
    assert not topic_matches_sub(schema.filter(topic.channel, other), built)


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "dev+1", "$SYS", "-lead", "x" * 65,
                                 "caf\u00e9", "sp ace"])
def test_build_rejects_device_ids_that_break_the_tree(bad: str) -> None:
    with pytest.raises(EncodeError) as err:
        TopicSchema().build(Channel.TELEMETRY, bad)
    assert err.value.what == "device id"


@pytest.mark.parametrize("root", ["", "a//b", "$SYS", "a/+", "a/#", "/lead"])
def test_schema_rejects_roots_with_wildcards_or_empty_levels(root: str) -> None:
    with pytest.raises(EncodeError):
        TopicSchema(root)


@pytest.mark.parametrize(("topic", "field"), [
    ("other/dev/pi-1/telemetry", "$"),
    ("edgefleet/dev/pi+1/telemetry", "device_id"),
    ("edgefleet/dev/pi-1/metrics", "channel"),
    ("edgefleet/dev/pi-1/cmd/reboot", "command"),
    ("edgefleet/dev/pi-1/cmd", "command"),
    ("edgefleet/dev/pi-1/telemetry/extra", "channel"),
    ("edgefleet/dev/pi-1", "channel"),
])
def test_parse_names_what_is_wrong(topic: str, field: str) -> None:
    with pytest.raises(DecodeError) as err:
        TopicSchema().parse(topic)
    assert err.value.field == field


def test_commands_need_a_kind_and_other_channels_refuse_one() -> None:
    schema = TopicSchema()
    with pytest.raises(EncodeError):
        schema.build(Channel.COMMAND, "pi-1")
    with pytest.raises(EncodeError):
        schema.build(Channel.TELEMETRY, "pi-1", CommandKind.DEPLOY)


def test_every_channel_has_a_spec_and_commands_are_never_retained() -> None:
    assert set(CHANNELS) == set(Channel)
    assert not CHANNELS[Channel.COMMAND].retain
    assert CHANNELS[Channel.PRESENCE].retain and CHANNELS[Channel.FACTS].retain
    assert all(spec.qos == 1 for c, spec in CHANNELS.items() if c is not Channel.HEARTBEAT)


def test_agent_subscribes_to_its_own_commands_and_chunks_and_the_fleet_key_chain_only() -> None:
    schema = TopicSchema("f")
    subs = dict(schema.agent_subscriptions("pi-1"))
    assert subs == {"f/dev/pi-1/cmd/+": 1, "f/dev/pi-1/artifact/chunk": 1, "f/fleet/keys": 1}


def test_controller_subscribes_to_every_device_channel_and_shares_only_streams() -> None:
    schema = TopicSchema("f")
    plain = dict(schema.controller_subscriptions())
    up = [c for c, s in CHANNELS.items() if s.direction is Direction.FROM_DEVICE]
    assert set(plain) == {schema.filter(c) for c in up}
    shared = dict(schema.controller_subscriptions(share_group="ingest"))
    assert set(shared) == {
        schema.filter(c) if CHANNELS[c].retain else f"$share/ingest/{schema.filter(c)}"
        for c in up}
    assert "f/dev/+/presence" in shared and "$share/ingest/f/dev/+/telemetry" in shared


def test_the_decision_record_lists_every_channel_and_command_as_the_code_does() -> None:
    record = (Path(__file__).parents[1] / "docs/decisions/0001-mqtt-topic-tree.md").read_text()
    for channel, spec in CHANNELS.items():
        suffix = "/{kind}" if channel is Channel.COMMAND else ""
        row = next(line for line in record.splitlines()
                   if line.startswith(f"| `{{root}}/dev/{{id}}/{channel.value}{suffix}` |"))
        cells = [c.strip() for c in row.split("|")]
        assert cells[5:7] == [str(spec.qos), "yes" if spec.retain else "no"], row
    for kind in CommandKind:
        assert f"| `{kind.value}` |" in record


def test_device_acl_lets_a_device_write_up_and_read_down_in_its_own_subtree() -> None:
    acl = TopicSchema("f").device_acl()
    assert ("write", "f/dev/%u/telemetry") in acl
    assert ("read", "f/dev/%u/cmd/+") in acl
    assert ("read", "f/dev/%u/artifact/chunk") in acl
    device_rules = [(access, p) for access, p in acl if p != "f/fleet/keys"]
    assert all("%u" in pattern for _, pattern in device_rules)
    assert len(device_rules) == len(Channel)
    # The one fleet-wide topic a device may touch: it reads the key chain, never writes it.
    assert ("read", "f/fleet/keys") in acl and ("write", "f/fleet/keys") not in acl


def test_controller_acl_reads_every_device_outbound_channel_and_writes_the_inbound_ones() -> None:
    schema = TopicSchema("f")
    acl = dict((topic, access) for access, topic in schema.controller_acl())
    for channel, spec in CHANNELS.items():
        expected = "read" if spec.direction is Direction.FROM_DEVICE else "write"
        assert acl[schema.filter(channel)] == expected, channel
    assert acl["f/fleet/keys"] == "readwrite"
    assert not any("%u" in topic for topic in acl)


def test_a_trailing_newline_is_no_device_id() -> None:
    schema = TopicSchema("e")
    with pytest.raises(DecodeError):
        schema.parse("e/dev/pi-1\n/telemetry")
    with pytest.raises(EncodeError):
        validate_device_id("pi-1\n")
