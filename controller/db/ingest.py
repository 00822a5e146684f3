"""Stores what devices send: telemetry windows, command statuses, presence, facts, heartbeats.

Each writer takes a batch of (device id from the topic, payload) and stores it in one
transaction. Telemetry is idempotent on (device, seq), so an at-least-once redelivery is stored
once. A malformed message (undecodable, another device's id, a value no column can hold) is
counted, logged with its device and reason, and left out; it never raises and never holds the
good messages back. A device heard from for the first time is registered as unknown hardware.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import msgspec
from sqlalchemy import (
    Connection,
    Dialect,
    Engine,
    Table,
    bindparam,
    case,
    exc,
    false,
    func,
    literal_column,
    null,
    or_,
    true,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import ClauseElement, ColumnElement
from sqlalchemy.sql.compiler import SQLCompiler

from controller.db.engine import DatabaseUnavailable, safe_url
from controller.db.schema import CommandStatusRow, Device, Telemetry
from edgefleet.contract import (
    CommandStatus,
    DecodeError,
    DeviceFacts,
    Heartbeat,
    Presence,
    PresenceState,
    TelemetryBatch,
    WireMessage,
    decode,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=WireMessage)
R = TypeVar("R")
Incoming = tuple[str, bytes]  # (device id parsed from the topic, payload)

DEVICES: Table = Device.__table__  # type: ignore[assignment]
TELEMETRY: Table = Telemetry.__table__  # type: ignore[assignment]
STATUSES: Table = CommandStatusRow.__table__  # type: ignore[assignment]

ACTIVE_COLUMNS = ("active_model_name", "active_model_version", "active_variant_kind",
                  "active_artifact_id", "active_execution", "active_reported_at")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class Rejected(NamedTuple):
    device_id: str
    reason: str


@dataclass(frozen=True)
class WriteResult:
    stored: int = 0          # telemetry: new windows; the other channels: messages applied
    duplicates: int = 0      # telemetry windows already stored, by (device, seq)
    malformed: list[Rejected] = field(default_factory=list)


@dataclass
class Totals:
    """What a writer has done since it was made, for the service's status line."""

    stored: int = 0
    duplicates: int = 0
    malformed: int = 0


class Unstorable(ValueError):
    """A message decoded but holds a value no column can take (a NUL, a 65-bit int, NaN)."""


class _Writer(Generic[M, R]):
    """Decodes, checks and stores one channel's batches. A subclass turns a message into the
    row it stores (`_prepare`) and stores a transaction's worth of rows (`_store`)."""

    message_type: ClassVar[type[WireMessage]]
    deduplicates: ClassVar[bool] = False  # whether `duplicates` means something here

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.clock = clock
        self.totals = Totals()

    def write(self, batch: Sequence[Incoming]) -> WriteResult:
        """Stores the good messages of `batch` in one transaction and reports the others.

        Raises `DatabaseUnavailable` only when the database cannot be reached, or stays locked
        past its timeout, so that the caller can leave the batch unacknowledged and retry.
        """
        now = self.clock()
        rows: list[tuple[str, R]] = []
        rejected: list[Rejected] = []
        for device_id, payload in batch:
            try:
                message: M = decode(self.message_type, payload)  # type: ignore[assignment]
                claimed = getattr(message, "device_id", None)
                if claimed != device_id:
                    raise Unstorable(f"payload says device_id {claimed!r}, the topic says "
                                     f"{device_id!r}")
                rows.append((device_id, self._prepare(message, now)))
            except (DecodeError, Unstorable) as error:
                rejected.append(self._reject(device_id, str(error)))
        stored = 0
        if rows:
            try:
                stored = self._in_transaction([row for _, row in rows], now)
            except _Refused:
                # Something the checks missed: find it one message at a time.
                self._forget()
                for device_id, row in rows:
                    try:
                        stored += self._in_transaction([row], now)
                    except _Refused as refused:
                        rejected.append(self._reject(device_id,
                                                     f"the database refused it: {refused}"))
        duplicates = len(rows) - stored if self.deduplicates else 0
        self.totals.stored += stored
        self.totals.duplicates += duplicates
        self.totals.malformed += len(rejected)
        return WriteResult(stored, duplicates, rejected)

    def _reject(self, device_id: str, reason: str) -> Rejected:
        log.warning("rejected %s from %s: %s", self.message_type.__name__, device_id, reason)
        return Rejected(device_id, reason)

    def _in_transaction(self, rows: list[R], now: float) -> int:
        try:
            with self.engine.begin() as connection:
                stored = self._store(connection, rows, now)
            self._committed()
            return stored
        except (exc.OperationalError, exc.InterfaceError) as error:
            unavailable = DatabaseUnavailable(safe_url(self.engine.url), _first_line(error.orig))
            raise unavailable from error
        except (exc.DataError, exc.IntegrityError) as error:
            raise _Refused(_first_line(error.orig)) from error
        except exc.StatementError as error:
            if isinstance(error, exc.DBAPIError):
                raise  # e.g. ProgrammingError: our bug, not the message's
            raise _Refused(_first_line(error.orig)) from error  # a value the driver cannot bind
        except OverflowError as error:  # the same, raised by the driver itself
            raise _Refused(str(error)) from error

    def _prepare(self, message: M, now: float) -> R:
        """The row to store for `message`; raises `Unstorable` if no column can hold it."""
        problem = _unstorable_value("$", msgspec.to_builtins(message))
        if problem is not None:
            raise Unstorable(problem)
        return message  # type: ignore[return-value]

    def _store(self, connection: Connection, rows: list[R], now: float) -> int:
        raise NotImplementedError

    def _committed(self) -> None:
        """Called after `_store`'s transaction committed."""

    def _forget(self) -> None:
        """Drops anything remembered about the database: a batch was refused."""

    # --- devices -------------------------------------------------------------------------------

    def _upsert_devices(self, connection: Connection, rows: list[dict[str, Any]],
                        update: Callable[[Any], dict[str, Any]]) -> None:
        """Inserts the devices not seen before; sets what `update` returns on the others."""
        statement = _insert(self.dialect, DEVICES)
        connection.execute(statement.on_conflict_do_update(
            index_elements=[DEVICES.c.id], set_=update(statement.excluded)), rows)

    def _touch(self, connection: Connection, device_ids: Iterable[str], now: float) -> None:
        """Registers unknown devices and records that these were just heard from."""
        rows = [_new_device(device_id, now, online=True) for device_id in dict.fromkeys(device_ids)]
        self._upsert_devices(connection, rows, lambda new: {"last_seen": new.last_seen})


class _Refused(Exception):
    """The database refused a row for its content."""


# --- telemetry ----------------------------------------------------------------------------------

TELEMETRY_COLUMNS = (
    "device_id", "seq", "window_start", "window_end", "model_name", "model_version",
    "variant_kind", "artifact_id", "execution", "inferences", "errors", "throughput_ips",
    "p50_ms", "p95_ms", "p99_ms", "max_ms", "labelled", "accuracy", "agreement", "cpu_percent",
    "rss_mb", "temperature_c", "dropped_windows", "received_at")
_AT = {name: i for i, name in enumerate(TELEMETRY_COLUMNS)}
_INTS = itemgetter(*(_AT[n] for n in ("seq", "inferences", "errors", "labelled",
                                      "dropped_windows")))
_FLOATS = itemgetter(*(i for n, i in _AT.items() if TELEMETRY.c[n].type.python_type is float))
_STRS = itemgetter(*(_AT[n] for n in ("device_id", "model_name", "variant_kind", "artifact_id",
                                      "execution")))
_DEVICE, _WINDOW_END, _MODEL_VERSION = _AT["device_id"], _AT["window_end"], _AT["model_version"]
_TOUCH_COLUMNS = ("id", "now", *ACTIVE_COLUMNS)
_ACTIVE_FROM_ROW = itemgetter(*(_AT[n] for n in ("model_name", "model_version", "variant_kind",
                                                 "artifact_id", "execution", "window_end")))

TelemetryRow = tuple[Any, ...]  # values in TELEMETRY_COLUMNS order


class TelemetryWriter(_Writer[TelemetryBatch, TelemetryRow]):
    """Telemetry windows, stored once per (device, seq) however often they are delivered.

    The hot path: each row is built once, as a tuple in column order, and goes to the driver
    as it is (SQLite: one executemany; PostgreSQL: COPY), with no per-row SQLAlchemy work.
    The writer remembers what it last wrote to each device's row, and updates the row only
    for a new device, a new active model, or a `last_seen` older than `touch_interval_s`
    (heartbeats keep `last_seen` closer; they are few).
    """

    message_type = TelemetryBatch
    deduplicates = True

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time,
                 touch_interval_s: float = 30.0) -> None:
        super().__init__(engine, clock=clock)
        self.touch_interval_s = touch_interval_s
        # device -> (last_seen written, active model written): what its row already says.
        self._written: dict[str, tuple[float, tuple[Any, ...]]] = {}
        self._writing: dict[str, tuple[float, tuple[Any, ...]]] = {}
        devices = _insert(self.dialect, DEVICES).values(
            id=bindparam("id"), labels=literal_column("'{}'"), profile=null(),
            hardware_known=false(), facts=literal_column("'{}'"), online=true(),
            first_seen=bindparam("now"), last_seen=bindparam("now"),
            agent_version=literal_column("''"),
            **{column: bindparam(column) for column in ACTIVE_COLUMNS})
        self._devices = _Prepared(devices.on_conflict_do_update(
            index_elements=[DEVICES.c.id],
            set_={"last_seen": devices.excluded.last_seen, **_newer_active(devices.excluded)}),
            _TOUCH_COLUMNS, engine.dialect)
        self._insert = _Prepared(
            _insert(self.dialect, TELEMETRY)
            .values({column: bindparam(column) for column in TELEMETRY_COLUMNS})
            .on_conflict_do_nothing(index_elements=["device_id", "seq"]),
            TELEMETRY_COLUMNS, engine.dialect)

    def _prepare(self, message: TelemetryBatch, now: float) -> TelemetryRow:
        m, model, latency = message, message.model, message.latency
        row = (m.device_id, m.seq, m.window_start, m.window_end,
               model.model_name if model else None, model.model_version if model else None,
               model.variant_kind.value if model else None, model.artifact_id if model else None,
               m.execution, m.inferences, m.errors, m.throughput_ips,
               latency.p50_ms if latency else None, latency.p95_ms if latency else None,
               latency.p99_ms if latency else None, latency.max_ms if latency else None,
               m.labelled, m.accuracy, m.agreement, m.cpu_percent, m.rss_mb, m.temperature_c,
               m.dropped_windows, now)
        if _suspicious(row):
            for name, value in zip(TELEMETRY_COLUMNS, row, strict=True):
                problem = _unstorable_scalar(name, value)
                if problem is not None:
                    raise Unstorable(problem)
        return row

    def _store(self, connection: Connection, rows: list[TelemetryRow], now: float) -> int:
        latest: dict[str, TelemetryRow] = {}
        for row in rows:
            seen = latest.get(row[_DEVICE])
            if seen is None or row[_WINDOW_END] >= seen[_WINDOW_END]:
                latest[row[_DEVICE]] = row
        due: list[tuple[Any, ...]] = []
        self._writing = {}
        for device, row in latest.items():
            active = _ACTIVE_FROM_ROW(row)  # ends with window_end, the report's time
            written = self._written.get(device)
            if (written is None or written[1] != active[:-1]
                    or now - written[0] >= self.touch_interval_s):
                due.append((device, now, *active))
                self._writing[device] = (now, active[:-1])
        self._devices.run(connection, due)
        if self.dialect == "postgresql":
            return _copy_telemetry(connection, rows)
        return self._insert.run(connection, rows)

    def _committed(self) -> None:
        self._written.update(self._writing)

    def _forget(self) -> None:
        self._written.clear()  # a device deleted meanwhile fails its rows' foreign key


def _suspicious(row: TelemetryRow) -> bool:
    """A quick look; only a suspicious row is checked field by field for the reason."""
    ints = _INTS(row)
    version = row[_MODEL_VERSION]
    return (min(ints) < INT64_MIN or max(ints) > INT64_MAX
            or (version is not None and not INT64_MIN <= version <= INT64_MAX)
            # A sum of finite floats can overflow: that only costs the slow check.
            or not math.isfinite(sum(filter(None, _FLOATS(row))))
            or "\x00" in "".join(filter(None, _STRS(row))))


_PG_STAGE = "telemetry_incoming"
_PG_COLUMNS = ", ".join(TELEMETRY_COLUMNS)
_PG_TYPES = [{int: "int8", float: "float8", str: "text"}[TELEMETRY.c[n].type.python_type]
             for n in TELEMETRY_COLUMNS]


def _copy_telemetry(connection: Connection, rows: list[TelemetryRow]) -> int:
    """PostgreSQL: binary COPY into a session temp table, then one INSERT ... SELECT that
    skips the (device, seq) pairs already stored. The temp table empties itself at each commit.
    (SQLAlchemy's executemany of INSERT ... ON CONFLICT was 3x slower and gave no rowcount.)"""
    connection.exec_driver_sql(
        f"CREATE TEMP TABLE IF NOT EXISTS {_PG_STAGE} ON COMMIT DELETE ROWS AS "
        f"SELECT {_PG_COLUMNS} FROM telemetry WITH NO DATA")
    copy_sql = f"COPY {_PG_STAGE} ({_PG_COLUMNS}) FROM STDIN (FORMAT BINARY)"
    dbapi = connection.dialect.loaded_dbapi
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        with cursor.copy(copy_sql) as copy:
            copy.set_types(_PG_TYPES)
            for row in rows:
                copy.write_row(row)
    except dbapi.Error as error:  # COPY bypasses SQLAlchemy: wrap as it would have
        raise exc.DBAPIError.instance(copy_sql, None, error, dbapi.Error) from error
    return connection.exec_driver_sql(
        f"INSERT INTO telemetry ({_PG_COLUMNS}) SELECT {_PG_COLUMNS} FROM {_PG_STAGE} "
        f"ON CONFLICT (device_id, seq) DO NOTHING").rowcount


class _Prepared:
    """A Core statement compiled once for the engine's dialect, run through the driver.

    SQLAlchemy's own executemany processes each row's parameters in Python, which costs more
    than SQLite's insert itself. Rows are tuples in `columns` order and go to the driver as
    they are, so no parameter may need a bind processor (JSON, for one).
    """

    def __init__(self, statement: ClauseElement, columns: Sequence[str],
                 dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        self.sql = str(compiled)
        self.columns = tuple(columns)
        self.positional = compiled.positional
        order = tuple(self.columns.index(name) for name in compiled.positiontup or ())
        self.reorder = (itemgetter(*order) if self.positional
                        and order != tuple(range(len(self.columns))) else None)

    def run(self, connection: Connection, rows: Sequence[tuple[Any, ...]]) -> int:
        """Executes the statement for every row in one executemany; returns rows changed."""
        if not rows:
            return 0
        params: Sequence[Any]
        if not self.positional:
            params = [dict(zip(self.columns, row, strict=True)) for row in rows]
        elif self.reorder is not None:
            params = [self.reorder(row) for row in rows]
        else:
            params = rows
        return connection.exec_driver_sql(self.sql, params).rowcount  # type: ignore[arg-type]


# --- the other channels -------------------------------------------------------------------------

class StatusWriter(_Writer[CommandStatus, CommandStatus]):
    """Command statuses, appended in arrival order; the rollout engine reads them by command."""

    message_type = CommandStatus

    def _store(self, connection: Connection, rows: list[CommandStatus], now: float) -> int:
        self._touch(connection, (m.device_id for m in rows), now)
        connection.execute(STATUSES.insert(), [{
            "device_id": m.device_id, "command_id": m.command_id, "kind": m.kind,
            "state": m.state.value, "stage": m.stage.value if m.stage else None,
            "model_name": m.model_name, "model_version": m.model_version, "reason": m.reason,
            "ts": m.ts, "received_at": now} for m in rows])
        return len(rows)


class PresenceWriter(_Writer[Presence, Presence]):
    """Online or offline (offline is usually the broker publishing the device's last will)."""

    message_type = Presence

    def _store(self, connection: Connection, rows: list[Presence], now: float) -> int:
        unknown = [m.device_id for m in rows if m.state is PresenceState.UNKNOWN]
        if unknown:  # a state newer than this controller: the device spoke, nothing more
            self._touch(connection, unknown, now)
        known = [m for m in rows if m.state is not PresenceState.UNKNOWN]
        if known:
            self._upsert_devices(connection, [
                {**_new_device(m.device_id, now, online=m.state is PresenceState.ONLINE),
                 "agent_version": m.agent_version} for m in known],
                lambda new: {
                    "online": new.online,
                    "last_seen": func.coalesce(new.last_seen, DEVICES.c.last_seen),
                    "agent_version": _unless_empty(new.agent_version, DEVICES.c.agent_version)})
        return len(rows)


class FactsWriter(_Writer[DeviceFacts, DeviceFacts]):
    """Hardware, runtimes, matched profile and active model, as the agent found them."""

    message_type = DeviceFacts

    def _store(self, connection: Connection, rows: list[DeviceFacts], now: float) -> int:
        self._upsert_devices(connection, [
            {**_new_device(m.device_id, now, online=False), **_facts_columns(m)} for m in rows],
            lambda new: {
                "profile": new.profile, "hardware_known": new.hardware_known,
                "facts": new.facts,
                "agent_version": _unless_empty(new.agent_version, DEVICES.c.agent_version),
                **_newer_active(new, keep_execution_unless_changed=True)})
        return len(rows)


class HeartbeatWriter(_Writer[Heartbeat, Heartbeat]):
    """Heartbeats only say the device is alive: they move `last_seen`."""

    message_type = Heartbeat

    def _store(self, connection: Connection, rows: list[Heartbeat], now: float) -> int:
        self._touch(connection, (m.device_id for m in rows), now)
        return len(rows)


# --- rows ---------------------------------------------------------------------------------------

def _insert(dialect: str, table: Table) -> sqlite.Insert | postgresql.Insert:
    return sqlite.insert(table) if dialect == "sqlite" else postgresql.insert(table)


def _new_device(device_id: str, now: float, *, online: bool) -> dict[str, Any]:
    """A devices row for a device never seen: unknown hardware until its facts say otherwise."""
    return {"id": device_id, "labels": {}, "profile": None, "hardware_known": False,
            "facts": {}, "online": online, "first_seen": now,
            "last_seen": now if online else None, "agent_version": "",
            **dict.fromkeys(ACTIVE_COLUMNS)}


def _facts_columns(m: DeviceFacts) -> dict[str, Any]:
    active = m.active_model
    return {
        "profile": m.profile, "hardware_known": m.profile is not None,
        "facts": {"hardware": msgspec.to_builtins(m.hardware),
                  "runtimes": msgspec.to_builtins(m.runtimes)},
        "agent_version": m.agent_version,
        "active_model_name": active.model_name if active else None,
        "active_model_version": active.model_version if active else None,
        "active_variant_kind": active.variant_kind.value if active else None,
        "active_artifact_id": active.artifact_id if active else None,
        "active_execution": None,  # facts do not say how it runs; telemetry does
        "active_reported_at": m.ts}


def _newer_active(new: Any, *,
                  keep_execution_unless_changed: bool = False) -> dict[str, ColumnElement[Any]]:
    """Takes the report's active model only if it is newer (device clock) than the stored one,
    so a replayed old window or a stale retained facts message never moves it back."""
    newer = or_(DEVICES.c.active_reported_at.is_(None),
                new.active_reported_at >= DEVICES.c.active_reported_at)
    update: dict[str, ColumnElement[Any]] = {
        column: case((newer, new[column]), else_=DEVICES.c[column])
              for column in ACTIVE_COLUMNS}
    if keep_execution_unless_changed:
        changed = DEVICES.c.active_artifact_id.is_distinct_from(new.active_artifact_id)
        update["active_execution"] = case((newer & changed, null()),
                                          else_=DEVICES.c.active_execution)
    return update


def _unless_empty(new: Any, old: Any) -> ColumnElement[Any]:
    return func.coalesce(func.nullif(new, ""), old)


def _first_line(error: BaseException | None) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --- what no column can hold --------------------------------------------------------------------

def _unstorable_scalar(name: str, value: Any) -> str | None:
    if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
        return f"{name}: {value} does not fit in a 64-bit integer"
    if type(value) is float and not math.isfinite(value):
        return f"{name}: {value} is not a finite number"
    if type(value) is str and "\x00" in value:
        return f"{name}: contains a NUL character"
    return None


def _unstorable_value(path: str, value: Any) -> str | None:
    if isinstance(value, dict):
        for key, item in value.items():
            problem = _unstorable_scalar(path, key) or _unstorable_value(f"{path}.{key}", item)
            if problem:
                return problem
        return None
    if isinstance(value, list):
        for i, item in enumerate(value):
            problem = _unstorable_value(f"{path}[{i}]", item)
            if problem:
                return problem
        return None
    return _unstorable_scalar(path, value)
