"""The agent's durable outbox: every message that must reach the controller is written here
before it is published and deleted only when the broker acknowledges it.

Mosquitto loses queued QoS 1 messages on kill -9 and paho keeps nothing on disk, so this SQLite
file (WAL, synchronous=FULL) is the only thing between a crash and lost telemetry. It is bounded
by rows, bytes and age; what a bound drops is counted per kind in the same file, never silent.
The same file holds the per-device sequence counters and a small key/value store, so a caller
can change agent state and queue the message that reports it in one transaction.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from agent.durable import move_atomically

log = logging.getLogger(__name__)

# Kinds that a bound drops only when nothing else is left: a command status drives a rollout and
# is small, a telemetry window is one of many.
PRECIOUS_KINDS = frozenset({"status"})

# SCHEMA[i] takes a file from user_version i to i + 1. Append, never edit: a device may open a
# file written by any earlier agent.
SCHEMA: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE messages (
               id INTEGER PRIMARY KEY AUTOINCREMENT,
               topic TEXT NOT NULL,
               payload BLOB NOT NULL,
               qos INTEGER NOT NULL,
               retain INTEGER NOT NULL,
               created REAL NOT NULL,
               kind TEXT NOT NULL)""",
        "CREATE INDEX messages_by_created ON messages (created)",
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
    ),
)
SCHEMA_VERSION = len(SCHEMA)

DEFAULT_MAX_ROWS = 10_000
DEFAULT_MAX_BYTES = 16 * 2**20
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0

# SQLite's primary result codes for a damaged file (extended codes keep them in the low byte).
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26


class OutboxError(Exception):
    """The outbox file cannot be used; the message names the file."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"outbox {path}: {reason}")
        self.path = path
        self.reason = reason


class OutboxCorrupt(OutboxError):
    """The file is not a SQLite database or is damaged; `open_recovering` moves it aside."""


class PayloadTooLarge(OutboxError):
    """One payload larger than max_bytes: no amount of dropping would make room for it."""


@dataclass(frozen=True)
class OutboxMessage:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


def _is_corruption(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", None)         # Python >= 3.11
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(error)
    return "file is not a database" in text or "malformed" in text


def _dropped_counter(kind: str) -> str:
    return f"dropped:{kind}"


def _sequence_counter(name: str) -> str:
    return f"sequence:{name}"


class Outbox:
    """One SQLite file shared by the telemetry thread (append) and the MQTT thread (ack).

    One connection behind a re-entrant lock: `transaction()` holds it across the caller's block,
    and the methods called inside take it again. Row and byte totals are kept in memory (read
    once at open) so that enforcing the bounds costs no table scan per append.
    """

    def __init__(self, path: Path, *, max_rows: int = DEFAULT_MAX_ROWS,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_age_s: float = DEFAULT_MAX_AGE_S,
                 clock: Callable[[], float] = time.time) -> None:
        if max_rows < 1 or max_bytes < 1 or max_age_s <= 0:
            raise ValueError(f"outbox bounds must be positive: max_rows={max_rows}, "
                             f"max_bytes={max_bytes}, max_age_s={max_age_s}")
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.RLock()
        self._depth = 0                              # nesting of transaction blocks
        self._rows = 0
        self._bytes = 0
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, the module never does.
            self._db: sqlite3.Connection | None = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        except sqlite3.Error as error:
            raise OutboxError(self.path, f"cannot open: {error}") from error
        try:
            with self._errors_named():
                self._prepare()
        except BaseException:
            self._db.close()
            self._db = None
            raise

    # --- opening ---------------------------------------------------------------------------

    def _prepare(self) -> None:
        db = self._connection()
        check = db.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            raise OutboxCorrupt(self.path, f"integrity check failed: {check}")
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: in WAL mode NORMAL may lose the last commits on power loss; an append must be
        # on disk when it returns.
        db.execute("PRAGMA synchronous=FULL")
        with self.transaction():
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise OutboxError(self.path, f"schema version {version} is newer than this "
                                             f"agent's {SCHEMA_VERSION}")
            for statements in SCHEMA[version:]:
                for statement in statements:
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._load_totals()

    def _load_totals(self) -> None:
        rows, size = self._connection().execute(
            "SELECT COUNT(*), COALESCE(SUM(length(payload)), 0) FROM messages").fetchone()
        self._rows, self._bytes = int(rows), int(size)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise OutboxError(self.path, "closed")
        return self._db

    @contextmanager
    def _errors_named(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as error:
            kind = OutboxCorrupt if _is_corruption(error) else OutboxError
            raise kind(self.path, str(error)) from error

    # --- transactions ----------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Groups kv writes, sequence numbers and appends: all of them commit, or none.

        A block inside another one is a savepoint: if it fails and the caller carries on, what
        it wrote is undone and the rest of the outer block still commits.
        """
        with self._lock, self._errors_named():
            db = self._connection()
            savepoint = f"nested{self._depth}"
            # IMMEDIATE takes the write lock now, so a commit never fails on a lock upgrade.
            db.execute(f"SAVEPOINT {savepoint}" if self._depth else "BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if self._depth:
                    db.execute(f"ROLLBACK TO {savepoint}")
                    db.execute(f"RELEASE {savepoint}")
                else:
                    db.execute("ROLLBACK")
                self._load_totals()              # the in-memory totals saw the undone writes
                raise
            self._depth -= 1
            if self._depth:
                db.execute(f"RELEASE {savepoint}")
                return
            try:
                db.execute("COMMIT")
            except sqlite3.Error:
                # A failed COMMIT (a full disk) leaves the transaction open; end it, or every
                # later BEGIN would fail too.
                if db.in_transaction:
                    db.execute("ROLLBACK")
                self._load_totals()
                raise

    # --- messages --------------------------------------------------------------------------

    def append(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
               kind: str = "telemetry", now: float | None = None) -> int:
        """Stores one message after making room for it; returns its id (the replay order)."""
        with self.transaction():
            return self._insert(topic, payload, qos, retain, kind, now)

    def append_with_sequence(self, topic: str, build_payload: Callable[[int], bytes], *,
                             qos: int = 1, retain: bool = False, kind: str = "telemetry",
                             sequence: str | None = None,
                             now: float | None = None) -> tuple[int, int]:
        """Takes the next number of `sequence` (default: `kind`), builds the payload with it and
        stores it, all in one transaction: a crash can neither reuse nor skip a number that
        reached the outbox. Returns (message id, sequence number)."""
        with self.transaction():
            number = self.next_sequence(sequence or kind)
            payload = build_payload(number)
            return self._insert(topic, payload, qos, retain, kind, now), number

    def _insert(self, topic: str, payload: bytes, qos: int, retain: bool, kind: str,
                now: float | None) -> int:
        created = self._clock() if now is None else now
        size = len(payload)
        if size > self.max_bytes:
            raise PayloadTooLarge(self.path, f"a {kind} payload of {size} bytes exceeds "
                                             f"max_bytes={self.max_bytes}")
        self._drop_expired(created)
        self._make_room(size)
        cursor = self._connection().execute(
            "INSERT INTO messages (topic, payload, qos, retain, created, kind) "
            "VALUES (?, ?, ?, ?, ?, ?)", (topic, payload, qos, int(retain), created, kind))
        self._rows += 1
        self._bytes += size
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def _fits(self, size: int) -> bool:
        return (self._rows + 1 <= self.max_rows
                and self._bytes + size <= self.max_bytes)

    def _make_room(self, size: int) -> None:
        """Drops the oldest rows, precious kinds last, until one more of `size` bytes fits."""
        db = self._connection()
        precious = tuple(PRECIOUS_KINDS)
        spare_precious = f"kind NOT IN ({','.join('?' * len(precious))})"
        for where, params in ((spare_precious, precious), ("1", ())):
            while not self._fits(size):
                victims = db.execute(
                    f"SELECT id, kind, length(payload) FROM messages WHERE {where} "
                    "ORDER BY id LIMIT 64", params).fetchall()
                if not victims:
                    break
                for row_id, kind, length in victims:
                    if self._fits(size):
                        break
                    db.execute("DELETE FROM messages WHERE id = ?", (row_id,))
                    self._count_drops(kind, 1, int(length))

    def _count_drops(self, kind: str, rows: int, size: int) -> None:
        self._rows -= rows
        self._bytes -= size
        self._add_to_counter(_dropped_counter(kind), rows)

    def pending(self, limit: int, after_id: int | None = None) -> list[OutboxMessage]:
        """Up to `limit` unacknowledged messages in id order, after `after_id` if given."""
        with self._lock, self._errors_named():
            rows = self._connection().execute(
                "SELECT id, topic, payload, qos, retain FROM messages WHERE id > ? "
                "ORDER BY id LIMIT ?", (after_id if after_id is not None else 0, limit))
            return [OutboxMessage(row_id, topic, bytes(payload), qos, bool(retain))
                    for row_id, topic, payload, qos, retain in rows]

    def ack(self, message_id: int) -> bool:
        """Deletes an acknowledged message; False when it was already gone (acked or dropped)."""
        with self.transaction():
            db = self._connection()
            found = db.execute("SELECT length(payload) FROM messages WHERE id = ?",
                               (message_id,)).fetchone()
            if found is None:
                return False
            db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            self._rows -= 1
            self._bytes -= int(found[0])
            return True

    def drop_expired(self, now: float | None = None) -> int:
        """Drops messages older than max_age_s, counting them; returns how many."""
        with self.transaction():
            return self._drop_expired(self._clock() if now is None else now)

    def _drop_expired(self, now: float) -> int:
        # A device without a real-time clock that boots at an old time and then syncs would see
        # its early rows as very old; they are dropped and counted, as any expiry is.
        db = self._connection()
        cutoff = now - self.max_age_s
        expired = db.execute(
            "SELECT kind, COUNT(*), SUM(length(payload)) FROM messages WHERE created < ? "
            "GROUP BY kind", (cutoff,)).fetchall()
        if not expired:
            return 0
        db.execute("DELETE FROM messages WHERE created < ?", (cutoff,))
        for kind, rows, size in expired:
            self._count_drops(kind, int(rows), int(size))
        return sum(int(rows) for _, rows, _ in expired)

    def dropped(self, kind: str = "telemetry") -> int:
        """How many messages of `kind` the bounds have dropped over the file's whole life."""
        return self._counter(_dropped_counter(kind)) or 0

    def __len__(self) -> int:
        with self._lock:
            return self._rows

    @property
    def pending_bytes(self) -> int:
        with self._lock:
            return self._bytes

    # --- counters and key/value ------------------------------------------------------------

    def next_sequence(self, name: str = "telemetry") -> int:
        """The next number of a per-device counter that never repeats, across crashes too.

        A new counter starts at the wall clock in milliseconds, not at 1: when a counter has to
        start over (a corrupt outbox moved aside, a wiped state directory) it still continues
        above every number the old one issued, as long as fewer than 1000 numbers a second were
        taken and the clock did not go back. The controller deduplicates on (device, seq) and
        would otherwise discard the new batches as replays.
        """
        with self.transaction():
            counter = _sequence_counter(name)
            current = self._counter(counter)
            number = int(self._clock() * 1000) if current is None else current + 1
            self._connection().execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (counter, number))
            return number

    def _counter(self, name: str) -> int | None:
        with self._lock, self._errors_named():
            row = self._connection().execute(
                "SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
            return None if row is None else int(row[0])

    def _add_to_counter(self, name: str, amount: int) -> None:
        self._connection().execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value", (name, amount))

    def get(self, key: str) -> bytes | None:
        with self._lock, self._errors_named():
            row = self._connection().execute(
                "SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
            return None if row is None else bytes(row[0])

    def set(self, key: str, value: bytes) -> None:
        with self.transaction():
            self._connection().execute(
                "INSERT INTO kv (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))

    def delete(self, key: str) -> None:
        with self.transaction():
            self._connection().execute("DELETE FROM kv WHERE key = ?", (key,))

    def forget_oldest(self, prefix: str, keep: int) -> int:
        """Deletes all but the `keep` most recently added keys starting with `prefix` (an
        update keeps a key's place)."""
        with self.transaction():
            n = len(prefix)
            cursor = self._connection().execute(
                "DELETE FROM kv WHERE substr(key, 1, ?) = ? AND rowid NOT IN (SELECT rowid "
                "FROM kv WHERE substr(key, 1, ?) = ? ORDER BY rowid DESC LIMIT ?)",
                (n, prefix, n, prefix, keep))
            return cursor.rowcount

    # --- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_recovering(path: Path, *, max_rows: int = DEFAULT_MAX_ROWS,
                    max_bytes: int = DEFAULT_MAX_BYTES, max_age_s: float = DEFAULT_MAX_AGE_S,
                    clock: Callable[[], float] = time.time) -> tuple[Outbox, Path | None]:
    """Opens the outbox; a corrupt file is moved aside to ``<name>.corrupt-<timestamp>`` (with
    its -wal and -shm files) and a fresh outbox started in its place.

    What the old file held cannot be read, so nothing is claimed about it: the move is logged at
    ERROR and its new path returned for the agent to report. The fresh file's sequence counters
    start at the clock (see `Outbox.next_sequence`), so the controller keeps accepting batches.
    Errors other than corruption (a full disk, no permission, a newer schema) are raised: moving
    the file aside would not cure them and would throw away a good file.
    """
    path = Path(path)

    def open_outbox() -> Outbox:
        return Outbox(path, max_rows=max_rows, max_bytes=max_bytes, max_age_s=max_age_s,
                      clock=clock)

    try:
        return open_outbox(), None
    except OutboxCorrupt as error:
        aside = _corrupt_name(path, clock())
        for suffix in ("-wal", "-shm"):
            sidecar = path.with_name(path.name + suffix)
            if sidecar.exists():
                move_atomically(sidecar, aside.with_name(aside.name + suffix))
        move_atomically(path, aside)
        log.error("outbox %s is corrupt (%s); moved it to %s and started a fresh outbox: "
                  "the messages it held are lost", path, error.reason, aside)
        return open_outbox(), aside


def _corrupt_name(path: Path, now: float) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    number = 1
    while aside.exists():                   # a second corruption within the same second
        number += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{number}")
    return aside
