"""The agent's state as the agent itself reads it at start-up (its SQLite file and A/B slots),
for crash tests that check what survived a SIGKILL; and `poll` for conditions no message
announces."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec

from agent.install.machine import InstallRecord
from agent.install.runner import QUEUE_KEY, RECORD_KEY
from edgefleet.contract import (
    TelemetryBatch,
    decode,
)


def poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Waits for a condition that no message announces (FleetPeer.wait wakes on messages)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# --- the agent's state, read from its files as the agent would at start-up ----------------------

@contextlib.contextmanager
def agent_db(state: Path) -> Iterator[sqlite3.Connection]:
    # A second connection to the agent's WAL database; fine while it runs, and after a SIGKILL
    # it sees exactly what was committed.
    db = sqlite3.connect(state / "agent.db", timeout=10.0)
    try:
        yield db
    finally:
        db.close()


def stored(state: Path, key: str) -> bytes | None:
    with agent_db(state) as db:
        row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    return None if row is None else bytes(row[0])


def saved_install(state: Path) -> InstallRecord | None:
    raw = stored(state, RECORD_KEY)
    return None if raw is None else msgspec.msgpack.decode(raw, type=InstallRecord)


def queued_commands(state: Path) -> list[str]:
    raw = stored(state, QUEUE_KEY)
    queued = [] if raw is None else msgspec.msgpack.decode(raw, type=list[bytes])
    return [msgspec.json.decode(command)["command_id"] for command in queued]


def counter(state: Path, name: str) -> int | None:
    with agent_db(state) as db:
        row = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
    return None if row is None else int(row[0])


def pending_telemetry(state: Path) -> list[int]:
    with agent_db(state) as db:
        rows = db.execute("SELECT payload FROM messages WHERE kind = 'telemetry'").fetchall()
    return [decode(TelemetryBatch, bytes(payload)).seq for (payload,) in rows]
