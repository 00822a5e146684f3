"""The outbox on real SQLite files: replay order, crash survival (SIGKILL mid-stream), bounds that
count what they drop, sequence numbers, concurrent append and ack, corrupt files, and a property
over random append/ack/reopen runs."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent.outbox import (
    SCHEMA_VERSION,
    Outbox,
    OutboxCorrupt,
    OutboxError,
    OutboxMessage,
    PayloadTooLarge,
    open_recovering,
)

REPO = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000.0


def fixed_clock() -> float:
    return T0


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.sqlite"


def open_outbox(path: Path, *, max_rows: int = 10_000, max_bytes: int = 2**20,
                max_age_s: float = 3600.0) -> Outbox:
    return Outbox(path, max_rows=max_rows, max_bytes=max_bytes, max_age_s=max_age_s,
                  clock=fixed_clock)


def topics(messages: list[OutboxMessage]) -> list[str]:
    return [m.topic for m in messages]


# --- order and persistence ---------------------------------------------------------------------

def test_pending_returns_messages_in_append_order_and_ack_removes_them(path: Path) -> None:
    with open_outbox(path) as outbox:
        ids = [outbox.append(f"t/{i}", f"p{i}".encode()) for i in range(5)]
        status_id = outbox.append("t/status", b"s", qos=1, retain=True, kind="status")

        assert ids == sorted(ids)
        assert outbox.pending(10) == [
            *(OutboxMessage(id_, f"t/{i}", f"p{i}".encode(), 1, False) for i, id_ in
              enumerate(ids)),
            OutboxMessage(status_id, "t/status", b"s", 1, True)]
        assert topics(outbox.pending(2)) == ["t/0", "t/1"]
        assert topics(outbox.pending(2, after_id=ids[1])) == ["t/2", "t/3"]

        assert outbox.ack(ids[0]) is True
        assert outbox.ack(ids[2]) is True
        assert outbox.ack(ids[2]) is False              # a duplicate PUBACK is harmless
        assert topics(outbox.pending(10)) == ["t/1", "t/3", "t/4", "t/status"]
        assert len(outbox) == 4


def test_messages_counters_and_kv_survive_close_and_reopen(path: Path) -> None:
    with open_outbox(path) as outbox:
        first = outbox.append("t/a", b"a")
        outbox.append("t/b", b"b")
        outbox.ack(first)
        outbox.set("model", b"digits@3")
        seq = outbox.next_sequence()

    with open_outbox(path) as outbox:
        assert topics(outbox.pending(10)) == ["t/b"]
        assert len(outbox) == 1
        assert outbox.get("model") == b"digits@3"
        assert outbox.get("absent") is None
        assert outbox.next_sequence() == seq + 1
        # AUTOINCREMENT: an id is never reused, even after the newest row was acked
        newest = outbox.append("t/c", b"c")
        outbox.ack(newest)
    with open_outbox(path) as outbox:
        assert outbox.append("t/d", b"d") > newest


def test_a_closed_outbox_raises_an_error_naming_the_file(path: Path) -> None:
    outbox = open_outbox(path)
    outbox.close()
    outbox.close()                                      # closing twice is fine

    with pytest.raises(OutboxError, match=str(path)):
        outbox.append("t", b"x")


_CHILD = """
import sys
from pathlib import Path
from agent.outbox import Outbox
outbox = Outbox(Path(sys.argv[1]))
while True:
    row, seq = outbox.append_with_sequence("t/telemetry", lambda n: b"seq=%d" % n)
    print(row, seq, flush=True)
"""


def test_rows_appended_before_a_sigkill_are_all_there_with_contiguous_sequence_numbers(
        path: Path) -> None:
    confirmed = []
    with subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)}) as child:
        assert child.stdout is not None
        for line in child.stdout:
            confirmed.append(tuple(int(word) for word in line.split()))
            if len(confirmed) == 300:
                child.send_signal(signal.SIGKILL)       # mid-stream: it is appending right now
                break
        child.kill()                                    # if it died early, a no-op
    assert child.returncode == -signal.SIGKILL
    assert len(confirmed) == 300

    with Outbox(path) as outbox:
        stored = outbox.pending(10_000)
        by_id = {m.id: int(m.payload.removeprefix(b"seq=")) for m in stored}
        assert all(by_id.get(row) == seq for row, seq in confirmed)
        sequence = [by_id[m.id] for m in stored]
        assert sequence == list(range(sequence[0], sequence[0] + len(sequence)))
        assert len(stored) in (len(confirmed), len(confirmed) + 1)  # one may have beaten print
        assert outbox.next_sequence() == sequence[-1] + 1


# --- sequence numbers and transactions ---------------------------------------------------------

def test_next_sequence_is_monotonic_across_reopen_and_independent_per_name(path: Path) -> None:
    with open_outbox(path) as outbox:
        first = outbox.next_sequence()
        assert first == int(T0 * 1000)                  # a new counter starts at the clock
        assert outbox.next_sequence() == first + 1
        assert outbox.next_sequence("other") == first
    with open_outbox(path) as outbox:
        assert outbox.next_sequence() == first + 2


def test_a_payload_builder_that_fails_consumes_no_sequence_number(path: Path) -> None:
    def fail(number: int) -> bytes:
        raise RuntimeError("encode failed")

    with open_outbox(path) as outbox:
        _, first = outbox.append_with_sequence("t", lambda n: b"%d" % n)
        with pytest.raises(RuntimeError):
            outbox.append_with_sequence("t", fail)
        _, second = outbox.append_with_sequence("t", lambda n: b"%d" % n)

        assert second == first + 1
        assert len(outbox) == 2


def test_transaction_commits_kv_and_append_together_or_neither(path: Path) -> None:
    with open_outbox(path) as outbox:
        with pytest.raises(RuntimeError), outbox.transaction():
            outbox.set("accepted", b"v2")
            outbox.append("t/status", b"accepted v2", kind="status")
            raise RuntimeError("crash between the two")
        assert outbox.get("accepted") is None
        assert len(outbox) == 0

        with outbox.transaction():
            outbox.set("accepted", b"v2")
            outbox.append("t/status", b"accepted v2", kind="status")
    with open_outbox(path) as outbox:
        assert outbox.get("accepted") == b"v2"
        assert topics(outbox.pending(10)) == ["t/status"]


def test_a_failed_inner_block_is_undone_while_the_outer_block_commits(path: Path) -> None:
    with open_outbox(path) as outbox:
        with outbox.transaction():
            outbox.append("t/kept", b"k")
            with pytest.raises(RuntimeError), outbox.transaction():
                outbox.append("t/undone", b"u")
                raise RuntimeError
        assert topics(outbox.pending(10)) == ["t/kept"]
        assert len(outbox) == 1


# --- bounds ------------------------------------------------------------------------------------

def test_max_rows_drops_the_oldest_telemetry_first_and_counts_it(path: Path) -> None:
    with open_outbox(path, max_rows=3) as outbox:
        outbox.append("t/status", b"s", kind="status")
        for i in range(4):
            outbox.append(f"t/{i}", b"x")

        assert topics(outbox.pending(10)) == ["t/status", "t/2", "t/3"]
        assert outbox.dropped("telemetry") == 2
        assert outbox.dropped("status") == 0


def test_status_rows_are_dropped_only_when_no_other_kind_is_left(path: Path) -> None:
    with open_outbox(path, max_rows=2) as outbox:
        for i in range(3):
            outbox.append(f"t/status{i}", b"s", kind="status")

        assert topics(outbox.pending(10)) == ["t/status1", "t/status2"]
        assert outbox.dropped("status") == 1
        outbox.append("t/telemetry", b"x")              # a status goes: nothing else is left
        assert topics(outbox.pending(10)) == ["t/status2", "t/telemetry"]
        outbox.append("t/telemetry2", b"x")             # now the telemetry row goes first
        assert topics(outbox.pending(10)) == ["t/status2", "t/telemetry2"]
        assert (outbox.dropped("status"), outbox.dropped("telemetry")) == (2, 1)


def test_max_age_drops_expired_messages_and_counts_them_per_kind(path: Path) -> None:
    with open_outbox(path, max_age_s=100) as outbox:
        outbox.append("t/old", b"x", now=T0)
        outbox.append("t/old-status", b"s", kind="status", now=T0 + 10)
        outbox.append("t/new", b"x", now=T0 + 60)

        assert outbox.drop_expired(T0 + 105) == 1
        assert topics(outbox.pending(10)) == ["t/old-status", "t/new"]
        outbox.append("t/newest", b"x", now=T0 + 150)  # an append expires what is due first
        assert topics(outbox.pending(10)) == ["t/new", "t/newest"]
        assert (outbox.dropped("telemetry"), outbox.dropped("status")) == (1, 1)


def test_max_bytes_drops_oldest_until_the_new_payload_fits(path: Path) -> None:
    with open_outbox(path, max_bytes=1000) as outbox:
        for i in range(3):
            outbox.append(f"t/{i}", bytes(300))
        assert outbox.pending_bytes == 900

        outbox.append("t/big", bytes(650))              # needs two 300-byte rows gone

        assert topics(outbox.pending(10)) == ["t/2", "t/big"]
        assert outbox.pending_bytes == 950
        assert outbox.dropped() == 2


def test_a_payload_larger_than_max_bytes_is_refused_without_dropping_anything(
        path: Path) -> None:
    with open_outbox(path, max_bytes=100) as outbox:
        outbox.append("t/small", bytes(50))

        with pytest.raises(PayloadTooLarge, match="101 bytes"):
            outbox.append("t/huge", bytes(101))

        assert topics(outbox.pending(10)) == ["t/small"]
        assert outbox.dropped() == 0


def test_dropped_counters_persist_across_reopen(path: Path) -> None:
    with open_outbox(path, max_rows=1) as outbox:
        for i in range(4):
            outbox.append(f"t/{i}", b"x")
    with open_outbox(path, max_rows=1) as outbox:
        assert outbox.dropped() == 3
        assert len(outbox) == 1
        assert outbox.dropped("never-seen") == 0


def test_a_full_disk_raises_outbox_error_and_leaves_the_outbox_usable(path: Path) -> None:
    with open_outbox(path) as outbox:
        outbox.append("t/kept", b"k")
        assert outbox._db is not None                   # a page cap stands in for a full disk
        pages = outbox._db.execute("PRAGMA page_count").fetchone()[0]
        outbox._db.execute(f"PRAGMA max_page_count = {pages}")

        with pytest.raises(OutboxError, match="full") as raised:
            outbox.append("t/big", bytes(64 * 1024))
        assert not isinstance(raised.value, OutboxCorrupt)

        assert (len(outbox), outbox.pending_bytes) == (1, 1)
        outbox._db.execute("PRAGMA max_page_count = 1000000")
        outbox.append("t/after", b"a")
        assert topics(outbox.pending(10)) == ["t/kept", "t/after"]


def test_bounds_must_be_positive(path: Path) -> None:
    with pytest.raises(ValueError):
        Outbox(path, max_rows=0)


# --- threads -----------------------------------------------------------------------------------

def test_append_on_one_thread_and_ack_on_another_leaves_a_consistent_outbox(
        path: Path) -> None:
    total = 2000
    appended: list[int] = []
    acked: list[int] = []
    outbox = open_outbox(path)

    def telemetry_thread() -> None:
        for i in range(total):
            appended.append(outbox.append("t", b"%d" % i))

    def mqtt_thread() -> None:
        last = None
        while len(acked) < total:
            for message in outbox.pending(50, after_id=last):
                assert outbox.ack(message.id)
                acked.append(message.id)
                last = message.id

    threads = [threading.Thread(target=telemetry_thread), threading.Thread(target=mqtt_thread)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)

    assert acked == appended
    assert len(outbox) == 0 and outbox.pending_bytes == 0
    outbox.close()
    with open_outbox(path) as reopened:
        assert reopened.pending(10) == [] and len(reopened) == 0


# --- schema and corruption ---------------------------------------------------------------------

def test_a_new_file_gets_the_current_schema_version(path: Path) -> None:
    open_outbox(path).close()

    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_file_from_a_newer_agent_is_refused_and_left_alone(path: Path) -> None:
    open_outbox(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")

    with pytest.raises(OutboxError, match="newer") as raised:
        open_recovering(path)
    assert not isinstance(raised.value, OutboxCorrupt)
    assert list(path.parent.glob("*.corrupt-*")) == []


def test_a_garbage_file_raises_outbox_corrupt_naming_the_file(path: Path) -> None:
    path.write_bytes(os.urandom(8192))

    with pytest.raises(OutboxCorrupt, match=str(path)):
        Outbox(path)


def test_a_damaged_page_is_found_at_open(path: Path) -> None:
    with open_outbox(path) as outbox:
        for i in range(200):
            outbox.append(f"t/{i}", bytes(200))
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    data[4096:4096 + 600] = os.urandom(600)    # garble the second page, not the file header
    path.write_bytes(bytes(data))

    with pytest.raises(OutboxCorrupt):
        Outbox(path)


def test_open_recovering_moves_a_corrupt_file_aside_and_logs_it(
        path: Path, caplog: pytest.LogCaptureFixture) -> None:
    garbage = os.urandom(8192)
    path.write_bytes(garbage)
    path.with_name(path.name + "-wal").write_bytes(b"stale wal")

    with caplog.at_level(logging.ERROR, logger="agent.outbox"):
        outbox, aside = open_recovering(path, clock=fixed_clock)

    assert aside == path.with_name(f"{path.name}.corrupt-20231114T221320Z")
    assert aside.read_bytes() == garbage
    # SQLite itself deletes a -wal it cannot use when the failed connection closes; whatever
    # sidecar survives is moved aside, so none of it reaches the fresh file.
    assert path.with_name(path.name + "-wal").read_bytes() != b"stale wal"
    assert "corrupt" in caplog.text and str(aside) in caplog.text
    with outbox:
        assert len(outbox) == 0
        outbox.append("t", b"x")                        # the fresh outbox works
        assert outbox.next_sequence() == int(T0 * 1000)

    path.write_bytes(garbage)                           # a second one in the same second
    second, second_aside = open_recovering(path, clock=fixed_clock)
    second.close()
    assert second_aside is not None and second_aside != aside and aside.exists()


def test_open_recovering_leaves_a_healthy_file_in_place(path: Path) -> None:
    with open_outbox(path) as outbox:
        outbox.append("t", b"x")

    outbox, aside = open_recovering(path, clock=fixed_clock)
    with outbox:
        assert aside is None and len(outbox) == 1


# --- property: random append / ack / reopen runs -----------------------------------------------

class OutboxRuns(RuleBasedStateMachine):
    """Whatever happens, pending is in id order, an acked id never comes back, and every message
    appended is pending, acked or counted as dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.TemporaryDirectory()
        self.path = Path(self.directory.name) / "outbox.sqlite"
        self.outbox = open_outbox(self.path, max_rows=8)
        self.appended = 0
        self.acked: set[int] = set()
        self.ids: list[int] = []

    @rule(kind=st.sampled_from(["telemetry", "status"]), size=st.integers(0, 64))
    def append(self, kind: str, size: int) -> None:
        self.ids.append(self.outbox.append("t", bytes(size), kind=kind))
        self.appended += 1

    @precondition(lambda self: self.appended > 0)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        message_id = data.draw(st.sampled_from(self.ids))
        if self.outbox.ack(message_id):
            self.acked.add(message_id)

    @rule()
    def reopen(self) -> None:
        self.outbox.close()
        self.outbox = open_outbox(self.path, max_rows=8)

    @invariant()
    def pending_is_in_id_order_and_accounts_for_every_message(self) -> None:
        pending = [m.id for m in self.outbox.pending(100)]
        assert pending == sorted(pending)
        assert not self.acked & set(pending)
        dropped = self.outbox.dropped("telemetry") + self.outbox.dropped("status")
        assert len(pending) + len(self.acked) + dropped == self.appended
        assert len(self.outbox) == len(pending) <= 8

    def teardown(self) -> None:
        self.outbox.close()
        self.directory.cleanup()


TestOutboxRuns = OutboxRuns.TestCase
TestOutboxRuns.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])


# --- forget_oldest: bounded key/value memories ---------------------------------------------------

def test_forget_oldest_keeps_the_newest_keys_of_a_prefix_and_no_other(path: Path) -> None:
    with open_outbox(path) as outbox:
        for i in range(10):
            outbox.set(f"seen:cmd-{i}", b"1")
            outbox.set(f"other:{i}", b"2")
        outbox.set("seen", b"3")                         # the prefix's neighbours, not under it
        outbox.set("seen;x", b"4")
        outbox.set("install", b"5")

        assert outbox.forget_oldest("seen:", keep=3) == 7

        assert [outbox.get(f"seen:cmd-{i}") for i in range(10)] == [None] * 7 + [b"1"] * 3
        assert all(outbox.get(f"other:{i}") == b"2" for i in range(10))
        assert (outbox.get("seen"), outbox.get("seen;x"), outbox.get("install")) == (
            b"3", b"4", b"5")


def test_forget_oldest_goes_by_write_order_not_by_key_order(path: Path) -> None:
    with open_outbox(path) as outbox:
        for name in ("zulu", "alpha", "mike", "bravo"):
            outbox.set(f"seen:{name}", b"1")

        outbox.forget_oldest("seen:", keep=2)

        assert [name for name in ("zulu", "alpha", "mike", "bravo")
                if outbox.get(f"seen:{name}") is not None] == ["mike", "bravo"]


def test_forget_oldest_with_room_to_spare_deletes_nothing_and_survives_reopen(
        path: Path) -> None:
    with open_outbox(path) as outbox:
        for i in range(4):
            outbox.set(f"seen:{i}", b"1")
        assert outbox.forget_oldest("seen:", keep=4) == 0
        assert outbox.forget_oldest("seen:", keep=100) == 0
        assert outbox.forget_oldest("nothing-here:", keep=1) == 0
        assert outbox.forget_oldest("seen:", keep=1) == 3

    with open_outbox(path) as outbox:
        assert [outbox.get(f"seen:{i}") for i in range(4)] == [None, None, None, b"1"]


def test_forget_oldest_is_undone_with_the_transaction_around_it(path: Path) -> None:
    with open_outbox(path) as outbox:
        for i in range(5):
            outbox.set(f"seen:{i}", b"1")

        with pytest.raises(RuntimeError), outbox.transaction():
            outbox.forget_oldest("seen:", keep=0)
            raise RuntimeError("crash before commit")

        assert all(outbox.get(f"seen:{i}") == b"1" for i in range(5))


def test_forget_oldest_covers_keys_with_any_character_after_the_prefix(path: Path) -> None:
    # Command ids are any string the controller chose; a key under the prefix is under it
    # whatever characters follow, those outside the Basic Multilingual Plane included.
    with open_outbox(path) as outbox:
        for name in ("cmd-\U0001f680-1", "cmd-\U0001f680-2", "cmd-3", "\U0001f680"):
            outbox.set(f"seen:{name}", b"1")

        assert outbox.forget_oldest("seen:", keep=1) == 3

        assert [outbox.get(f"seen:{n}") for n in (
            "cmd-\U0001f680-1", "cmd-\U0001f680-2", "cmd-3", "\U0001f680")] == [
            None, None, None, b"1"]
