"""The daemon's persistent job store: jobs and their full event history in one SQLite file.

Durability: every write is committed before its method returns. The database runs in WAL mode with
``synchronous=NORMAL``, so a commit is an append to the WAL file without an fsync: it survives the
daemon being killed (SIGKILL, a crash) because the OS already holds the data, and it costs tens of
microseconds, which keeps event appends cheap on the training loop's path. Only a power loss or an
OS crash can drop the last few commits; the file itself stays consistent even then.

Concurrency: one store serves many threads. All writes go through one connection guarded by a
lock, each in a ``BEGIN IMMEDIATE`` transaction (so :meth:`JobStore.transition` is a true
compare-and-set). Reads use a small pool of separate read-only connections: in WAL mode a reader
sees the latest committed snapshot and neither waits for the writer nor holds it up, so a watcher
replaying tens of thousands of events never stalls the worker's appends.

Only :meth:`JobStore.get` resolves an id prefix; every other method takes a full job id.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from time import time as _now
from typing import Any

from lorad.errors import LoradError
from lorad.jobs.records import EventRecord, JobNotFound, JobRecord, JobState

# Bump when the schema changes, and add the statements that upgrade from the previous version.
SCHEMA_VERSION = 1

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        # `num` records insertion order (the FIFO tie-break when two jobs share a created_at);
        # AUTOINCREMENT keeps it monotonic and never reuses a value.
        """CREATE TABLE jobs (
            num                INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id             TEXT NOT NULL UNIQUE,
            name               TEXT NOT NULL,
            state              TEXT NOT NULL,
            created_at         REAL NOT NULL,
            started_at         REAL,
            finished_at        REAL,
            config_yaml        TEXT NOT NULL,
            base_dir           TEXT NOT NULL,
            source_name        TEXT NOT NULL,
            base_model         TEXT NOT NULL,
            output_dir         TEXT NOT NULL,
            outputs            TEXT NOT NULL,
            error              TEXT NOT NULL,
            hint               TEXT NOT NULL,
            progress           TEXT,
            attempt            INTEGER NOT NULL,
            checkpoint         TEXT NOT NULL,
            keep_alive_seconds REAL NOT NULL
        )""",
        "CREATE INDEX jobs_by_state ON jobs (state, created_at, num)",
        "CREATE INDEX jobs_by_age ON jobs (created_at, num)",
        # Clustered on (job_id, seq): one job's events are contiguous on disk, so replaying a long
        # history is a range scan and the next seq is one index probe.
        """CREATE TABLE events (
            job_id  TEXT NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
            seq     INTEGER NOT NULL,
            time    REAL NOT NULL,
            kind    TEXT NOT NULL,
            payload TEXT NOT NULL,
            PRIMARY KEY (job_id, seq)
        ) WITHOUT ROWID""",
    ),
}

# How long a connection waits for another process's lock (e.g. a CLI reading the file) before failing.
_BUSY_TIMEOUT_S = 10.0
# Read connections kept open for reuse; more concurrent readers get a connection of their own.
_MAX_IDLE_READERS = 8

ID_LENGTH = 10
# Shortest id prefix get() resolves: shorter ones would too often match several jobs.
MIN_PREFIX = 4
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base32, lower case: url-safe and unambiguous
_AMBIGUOUS_SHOWN = 5

_JOB_FIELDS = tuple(f.name for f in fields(JobRecord))
_JOB_COLUMNS = ", ".join(_JOB_FIELDS)
_JOB_COLUMNS_WITHOUT_CONFIG = ", ".join("'' AS config_yaml" if f == "config_yaml" else f for f in _JOB_FIELDS)
_UPDATABLE = frozenset(_JOB_FIELDS) - {"job_id", "created_at"}


def new_job_id() -> str:
    """A fresh random job id: 10 lower-case base32 characters (50 bits), url- and shell-safe."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(ID_LENGTH))


# Compact, and NaN allowed: a diverged run's last loss must not make the append itself fail.
# Built once: json.dumps with non-default arguments would build a new encoder on every event.
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _dump_json(value: Mapping[str, Any]) -> str:
    return _JSON_ENCODER.encode(value if isinstance(value, dict) else dict(value))


def _encode_optional_json(value: Mapping[str, Any] | None) -> str | None:
    return None if value is None else _dump_json(value)


def _encode_state(value: JobState | str) -> str:
    return JobState(value).value


def _identity(value: Any) -> Any:
    return value


# Fields stored in another form than the record holds; the rest are stored as given.
_ENCODERS: dict[str, Callable[[Any], Any]] = {
    "state": _encode_state,
    "outputs": _dump_json,
    "progress": _encode_optional_json,
}


def _encode_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(changes) - _UPDATABLE)
    if unknown:
        raise ValueError(f"cannot update job field(s) {', '.join(unknown)}; updatable: {', '.join(sorted(_UPDATABLE))}")
    return {name: _ENCODERS.get(name, _identity)(value) for name, value in changes.items()}


def _job_from_row(row: sqlite3.Row) -> JobRecord:
    values = dict(zip(_JOB_FIELDS, row, strict=True))
    values["state"] = JobState(values["state"])
    values["outputs"] = json.loads(values["outputs"])
    if values["progress"] is not None:
        values["progress"] = json.loads(values["progress"])
    return JobRecord(**values)


def _rows(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
    # Always fetch to the end: a half-read statement would keep its read snapshot (and, on the
    # writer, its transaction) open.
    return conn.execute(sql, params).fetchall()


def _not_found(job_id: str) -> JobNotFound:
    return JobNotFound(f"no job with id {job_id!r}")


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """Run the body in one write transaction: committed if it returns, rolled back if it raises."""
    # IMMEDIATE takes the write lock up front, so a read-then-write (compare-and-set, next seq)
    # cannot be overtaken by another process's writer and never fails half-way with SQLITE_BUSY.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


DAMAGED_STORE_HINT = (
    "Stop any other lorad daemon using it; if the file is damaged, move it aside "
    "(the daemon then starts with an empty job list)."
)


def store_failure(path: Path, err: sqlite3.Error) -> LoradError:
    """What to tell a person when SQLite refused to read or write the store at ``path``."""
    from lorad.disk_space import free_bytes, is_disk_full, mount_point

    if is_disk_full(err):
        return LoradError(
            f"the job store {path} cannot be written: the disk at {mount_point(path)} is full "
            f"({free_bytes(path)} bytes free)",
            hint=f"Free space on {mount_point(path)}, the disk holding the state directory (LORAD_HOME); "
            "the daemon records what it could not as soon as it can write again.",
        )
    if isinstance(err, sqlite3.DatabaseError) and not isinstance(err, sqlite3.OperationalError):
        return LoradError(f"{path} is not a usable job store: {err}", hint=DAMAGED_STORE_HINT)
    return LoradError(
        f"the job store {path} cannot be used: {err}",
        hint="Check that the state directory (LORAD_HOME) is writable and that no other program locks the file.",
    )


def _prepare_file(path: Path) -> None:
    """Create the database file private (0600) before SQLite opens it, and tighten an existing one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_CREAT with mode 0600 leaves no moment in which the new file is readable by others.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    # SQLite gives its -wal/-shm files the database's mode; fix any made looser by hand or by umask.
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(file, 0o600)


# JobStore has a method named `list`; its annotations say `builtins.list` so that type checkers,
# which resolve names in the class body, do not mistake the method for the type.
class JobStore:
    """Jobs and their events, persisted in one SQLite file; safe to share between threads.

    Every method that writes has committed before it returns, and every method that returns a
    record returns what is committed. Methods raise :class:`JobNotFound` for an unknown id and
    ``RuntimeError`` once the store is closed.
    """

    def __init__(self, path: Path) -> None:
        """Open (creating file, folders and schema as needed) the store at ``path``, e.g.
        :func:`lorad.paths.jobs_db_path`. Raises :class:`LoradError` if the file is not a usable
        job store or was written by a newer lorad."""
        self.path = Path(path)
        _prepare_file(self.path)
        self._write_lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._closed = False
        self._revision = 0
        writer = self._connect()
        try:
            # WAL is a property of the file; setting it once here also covers the readers.
            writer.execute("PRAGMA journal_mode = WAL").fetchall()
            writer.execute("PRAGMA synchronous = NORMAL")
            writer.execute("PRAGMA foreign_keys = ON")
            self._migrate(writer)
            # A file damaged inside (not in its header) opens fine and fails at the first read of a
            # bad page, with a raw traceback in the middle of startup: look at every page now.
            problems = [row[0] for row in writer.execute("PRAGMA quick_check(5)").fetchall()]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("damaged: " + "; ".join(problems))
        except sqlite3.DatabaseError as exc:
            writer.close()
            raise LoradError(f"{self.path} is not a usable job store: {exc}", hint=DAMAGED_STORE_HINT) from exc
        except BaseException:
            writer.close()
            raise
        self._writer = writer

    # -- connections -----------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; writes open theirs explicitly.
        # timeout= is SQLite's busy timeout (waiting on another process's lock).
        conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        with _transaction(conn):
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at REAL)")
            current = _rows(conn, "SELECT max(version) FROM schema_version")[0][0] or 0
            if current > SCHEMA_VERSION:
                raise LoradError(
                    f"{self.path} holds job store schema version {current}; this lorad knows up to {SCHEMA_VERSION}",
                    hint="Upgrade lorad, or point LORAD_HOME at another folder.",
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, _now()))

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """The writer connection inside a transaction committed on normal exit."""
        with self._write_lock:
            if self._closed:
                raise RuntimeError("the job store is closed")
            with _transaction(self._writer):
                yield self._writer

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A pooled read-only connection; each statement on it sees the latest committed data."""
        with self._pool_lock:
            if self._closed:
                raise RuntimeError("the job store is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only = ON")
        try:
            yield conn
        finally:
            with self._pool_lock:
                keep = not self._closed and len(self._idle) < _MAX_IDLE_READERS
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()

    def close(self) -> None:
        """Close all connections; idempotent. Readers still in use close when they finish."""
        with self._pool_lock:
            if self._closed:
                return
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        # Closed last: the last connection to close checkpoints the WAL into the main file.
        with self._write_lock:
            self._writer.close()

    @property
    def revision(self) -> int:
        """Goes up with every job created or moved to another state through this store object: a
        reader that saw the same number before has seen every job as it is (in this process)."""
        return self._revision

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- jobs ------------------------------------------------------------------------------------

    def create_job(
        self,
        *,
        name: str,
        config_yaml: str,
        base_dir: str,
        source_name: str,
        base_model: str,
        output_dir: str,
        keep_alive_seconds: float = 0.0,
    ) -> JobRecord:
        """Add a QUEUED job (attempt 0, created now) with a fresh unique id and return it."""
        values: dict[str, Any] = {
            "name": name,
            "state": JobState.QUEUED.value,
            "created_at": _now(),
            "started_at": None,
            "finished_at": None,
            "config_yaml": config_yaml,
            "base_dir": base_dir,
            "source_name": source_name,
            "base_model": base_model,
            "output_dir": output_dir,
            "outputs": "{}",
            "error": "",
            "hint": "",
            "progress": None,
            "attempt": 0,
            "checkpoint": "",
            "keep_alive_seconds": float(keep_alive_seconds),
        }
        with self._write() as conn:
            # Checked under the write lock, so the id stays free until the insert below.
            job_id = new_job_id()
            while _rows(conn, "SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)):
                job_id = new_job_id()
            values["job_id"] = job_id
            names = ", ".join(values)
            marks = ", ".join("?" * len(values))
            conn.execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", tuple(values.values()))
            self._revision += 1
            return self._job_in(conn, job_id)

    def get(self, job_id: str) -> JobRecord:
        """The job with this id, or with a unique id prefix of at least 4 characters (like git).

        Raises :class:`JobNotFound` if none matches, or if the prefix matches several jobs (the
        message then says it is ambiguous and names some of them).
        """
        with self._read() as conn:
            rows = _rows(conn, f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,))
            if rows:
                return _job_from_row(rows[0])
            if len(job_id) < MIN_PREFIX:
                raise JobNotFound(
                    f"no job with id {job_id!r}: an id prefix needs at least {MIN_PREFIX} characters",
                    hint=f"Give at least {MIN_PREFIX} characters of the id (ids have {ID_LENGTH}); "
                    "`lorad jobs` lists jobs and their ids.",
                )
            # A range scan on the unique index: ids sharing the prefix sort right after it.
            candidates = _rows(
                conn,
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id > ? ORDER BY job_id LIMIT ?",
                (job_id, _AMBIGUOUS_SHOWN + 1),
            )
        matches = [row for row in candidates if row["job_id"].startswith(job_id)]
        if not matches:
            raise _not_found(job_id)
        if len(matches) > 1:
            shown = ", ".join(row["job_id"] for row in matches[:_AMBIGUOUS_SHOWN])
            more = ", ..." if len(matches) > _AMBIGUOUS_SHOWN else ""
            raise JobNotFound(
                f"job id prefix {job_id!r} is ambiguous: it matches {shown}{more}",
                hint="Give more characters of the id; `lorad jobs` lists jobs and their ids.",
            )
        return _job_from_row(matches[0])

    def list(
        self, states: Sequence[JobState] = (), limit: int = 100, *, configs: bool = True
    ) -> builtins.list[JobRecord]:
        """Up to ``limit`` jobs, newest first, only those in ``states`` unless it is empty. Without
        ``configs`` each record's ``config_yaml`` is "" (not even read: lists stay small and fast)."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit}")
        wanted = list(dict.fromkeys(JobState(state).value for state in states))
        where = f"WHERE state IN ({', '.join('?' * len(wanted))})" if wanted else ""
        columns = _JOB_COLUMNS if configs else _JOB_COLUMNS_WITHOUT_CONFIG
        with self._read() as conn:
            rows = _rows(
                conn,
                f"SELECT {columns} FROM jobs {where} ORDER BY created_at DESC, num DESC LIMIT ?",
                (*wanted, limit),
            )
        return [_job_from_row(row) for row in rows]

    def next_queued(self) -> JobRecord | None:
        """The oldest QUEUED job (by created_at, then insertion order), or None if none waits."""
        with self._read() as conn:
            rows = _rows(
                conn,
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = ? ORDER BY created_at, num LIMIT 1",
                (JobState.QUEUED.value,),
            )
        return _job_from_row(rows[0]) if rows else None

    def queued(self, limit: int = 10_000) -> builtins.list[JobRecord]:
        """Every QUEUED job, oldest first (the order :meth:`next_queued` hands them out)."""
        with self._read() as conn:
            rows = _rows(
                conn,
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = ? ORDER BY created_at, num LIMIT ?",
                (JobState.QUEUED.value, limit),
            )
        return [_job_from_row(row) for row in rows]

    def queue_position(self, job_id: str) -> int:
        """1 for the job :meth:`next_queued` returns, 2 for the one after, ...; 0 if not QUEUED."""
        with self._read() as conn:
            # One statement, so the state and the count come from the same snapshot.
            rows = _rows(
                conn,
                """SELECT j.state,
                          (SELECT count(*) FROM jobs q
                           WHERE q.state = ?
                             AND (q.created_at < j.created_at OR (q.created_at = j.created_at AND q.num <= j.num)))
                   FROM jobs j WHERE j.job_id = ?""",
                (JobState.QUEUED.value, job_id),
            )
        if not rows:
            raise _not_found(job_id)
        state, position = rows[0]
        return position if state == JobState.QUEUED.value else 0

    def update(self, job_id: str, /, **changes: Any) -> JobRecord:
        """Set the given fields (any JobRecord field but job_id and created_at) and return the job.

        Raises ValueError naming any other field, before writing anything. ``job_id`` is
        positional-only, so a ``job_id=`` change is such a ValueError too.
        """
        encoded = _encode_changes(changes)
        with self._write() as conn:
            return self._apply(conn, job_id, encoded)

    def transition(
        self, job_id: str, /, *, expect: Collection[JobState], to: JobState, **changes: Any
    ) -> JobRecord | None:
        """Atomically move the job to state ``to`` (setting ``changes`` too) if its state is in ``expect``.

        Returns the new record, or None (changing nothing) if the state was something else — e.g.
        when a cancel and the worker race for the same QUEUED job, exactly one of them wins.
        Raises :class:`JobNotFound` for an unknown id and ValueError for a bad field in ``changes``.
        """
        if "state" in changes:
            raise ValueError("transition() takes the new state as `to`, not as a `state` change")
        encoded = _encode_changes({**changes, "state": to})
        allowed = {JobState(state).value for state in expect}
        with self._write() as conn:
            rows = _rows(conn, "SELECT state FROM jobs WHERE job_id = ?", (job_id,))
            if not rows:
                raise _not_found(job_id)
            if rows[0][0] not in allowed:
                return None
            return self._apply(conn, job_id, encoded)

    def _apply(self, conn: sqlite3.Connection, job_id: str, encoded: Mapping[str, Any]) -> JobRecord:
        if encoded:
            assignments = ", ".join(f"{name} = ?" for name in encoded)
            cursor = conn.execute(f"UPDATE jobs SET {assignments} WHERE job_id = ?", (*encoded.values(), job_id))
            if cursor.rowcount == 0:
                raise _not_found(job_id)
            if "state" in encoded or "outputs" in encoded:
                self._revision += 1  # under the write lock
        return self._job_in(conn, job_id)

    @staticmethod
    def _job_in(conn: sqlite3.Connection, job_id: str) -> JobRecord:
        rows = _rows(conn, f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,))
        if not rows:
            raise _not_found(job_id)
        return _job_from_row(rows[0])

    # -- events ----------------------------------------------------------------------------------

    def append_event(
        self, job_id: str, kind: str, payload: Mapping[str, Any], *, time: float | None = None
    ) -> EventRecord:
        """Append an event (seq = the job's last seq + 1, from 1; ``time`` defaults to now).

        ``payload`` must be JSON-serialisable (TypeError otherwise, nothing written); the returned
        record holds the payload as stored, i.e. as JSON decodes it.
        """
        text = _dump_json(payload)  # encoded before taking the lock, which the worker shares
        when = _now() if time is None else float(time)
        with self._write() as conn:
            exists, last = _rows(
                conn,
                "SELECT (SELECT 1 FROM jobs WHERE job_id = ?), (SELECT max(seq) FROM events WHERE job_id = ?)",
                (job_id, job_id),
            )[0]
            if not exists:
                raise _not_found(job_id)
            seq = (last or 0) + 1
            conn.execute(
                "INSERT INTO events (job_id, seq, time, kind, payload) VALUES (?, ?, ?, ?, ?)",
                (job_id, seq, when, kind, text),
            )
        return EventRecord(job_id=job_id, seq=seq, time=when, kind=kind, payload=json.loads(text))

    def events(self, job_id: str, after_seq: int = 0, limit: int | None = None) -> builtins.list[EventRecord]:
        """The job's events with seq > ``after_seq``, in ascending seq, at most ``limit`` of them."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, not {limit}")
        with self._read() as conn:
            rows = _rows(
                conn,
                "SELECT seq, time, kind, payload FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (job_id, after_seq, -1 if limit is None else limit),
            )
            # Only an empty answer needs the extra look-up that tells "no events yet" from "no job".
            if not rows and not _rows(conn, "SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)):
                raise _not_found(job_id)
        return [
            EventRecord(job_id=job_id, seq=seq, time=when, kind=kind, payload=json.loads(payload))
            for seq, when, kind, payload in rows
        ]

    def last_seq(self, job_id: str) -> int:
        """The seq of the job's latest event, 0 if it has none yet."""
        with self._read() as conn:
            exists, last = _rows(
                conn,
                "SELECT (SELECT 1 FROM jobs WHERE job_id = ?), (SELECT max(seq) FROM events WHERE job_id = ?)",
                (job_id, job_id),
            )[0]
        if not exists:
            raise _not_found(job_id)
        return last or 0
