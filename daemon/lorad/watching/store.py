"""Watches persisted in the daemon's SQLite file, beside (not inside) the job store's schema.

The table is created here if missing, so the job store's migrations stay the job store's. Writes go
through one connection under a lock and are committed before a method returns.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from lorad.jobs.store import new_job_id
from lorad.watching.records import WatchExists, WatchNotFound, WatchPolicy, WatchRecord

_CREATE = """CREATE TABLE IF NOT EXISTS watches (
    num            INTEGER PRIMARY KEY AUTOINCREMENT,
    watch_id       TEXT NOT NULL UNIQUE,
    folder         TEXT NOT NULL UNIQUE,
    config_path    TEXT NOT NULL,
    base_dir       TEXT NOT NULL,
    policy         TEXT NOT NULL,
    created_at     REAL NOT NULL,
    updated_at     REAL NOT NULL,
    last_job_id    TEXT NOT NULL,
    version        INTEGER NOT NULL,
    queued_version INTEGER NOT NULL,
    latest_output  TEXT NOT NULL,
    published_path TEXT NOT NULL,
    known          TEXT NOT NULL
)"""
_FIELDS = tuple(f.name for f in fields(WatchRecord))
_COLUMNS = ", ".join(_FIELDS)


def _encode(name: str, value: Any) -> Any:
    if name == "policy":
        return json.dumps(value.to_dict())
    if name == "known":
        return json.dumps({rel: list(stat) for rel, stat in value.items()}, separators=(",", ":"))
    return value


def _record(row: sqlite3.Row) -> WatchRecord:
    values = dict(zip(_FIELDS, row, strict=True))
    values["policy"] = WatchPolicy(**json.loads(values["policy"]))
    values["known"] = {rel: (int(s[0]), int(s[1])) for rel, s in json.loads(values["known"]).items()}
    return WatchRecord(**values)


def _broken_record(row: sqlite3.Row) -> WatchRecord:
    """What can be kept of a row that does not decode: its id and folder (so it can be listed and
    removed), everything else default."""
    values = dict(zip(_FIELDS, row, strict=True))
    return WatchRecord(
        watch_id=str(values["watch_id"]),
        folder=str(values["folder"]),
        config_path=str(values["config_path"]),
        base_dir=str(values["base_dir"]),
        policy=WatchPolicy(),
        created_at=values["created_at"] if isinstance(values["created_at"], float) else 0.0,
        updated_at=values["updated_at"] if isinstance(values["updated_at"], float) else 0.0,
    )


class WatchStore:
    """The watches table; thread-safe."""

    def __init__(self, path: Path) -> None:
        """Open the table in the SQLite file at ``path`` (the job store's, already created and in WAL mode)."""
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute(_CREATE)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def add(
        self,
        *,
        folder: str,
        config_path: str,
        base_dir: str,
        policy: WatchPolicy,
        now: float,
        watch_id: str = "",
    ) -> WatchRecord:
        """Store a new watch (with ``watch_id``, or a fresh id); WatchExists if the folder is watched already."""
        with self._lock:
            if self._conn.execute("SELECT 1 FROM watches WHERE folder = ?", (folder,)).fetchall():
                raise WatchExists(
                    f"{folder} is watched already",
                    "`lorad watch ls` shows its watch; remove it first "
                    "with `lorad watch rm` to change its config or policy",
                )
            watch_id = watch_id or new_job_id()
            record = WatchRecord(
                watch_id=watch_id,
                folder=folder,
                config_path=config_path,
                base_dir=base_dir,
                policy=policy,
                created_at=now,
                updated_at=now,
            )
            values = [_encode(name, getattr(record, name)) for name in _FIELDS]
            self._conn.execute(f"INSERT INTO watches ({_COLUMNS}) VALUES ({', '.join('?' * len(values))})", values)
            return record

    def list(self) -> list[WatchRecord]:
        """Every watch whose row decodes, oldest first."""
        return [record for record, broken in self.load_all() if not broken]

    def load_all(self) -> list[tuple[WatchRecord, str]]:
        """Every watch, oldest first, with "" or why its row does not decode (a row written by a
        different version, or damaged): such a record holds only its id, folder and paths."""
        with self._lock:
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM watches ORDER BY num").fetchall()
        loaded = []
        for row in rows:
            try:
                loaded.append((_record(row), ""))
            except (ValueError, TypeError, KeyError, AttributeError, IndexError) as err:
                loaded.append((_broken_record(row), f"{type(err).__name__} in its stored settings"))
        return loaded

    def get(self, watch_id: str) -> WatchRecord:
        with self._lock:
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM watches WHERE watch_id = ?", (watch_id,)).fetchall()
        if not rows:
            raise WatchNotFound(f"no watch with id {watch_id!r}")
        return _record(rows[0])

    def update(self, record: WatchRecord, **changes: Any) -> WatchRecord:
        """Set ``changes`` on the watch and return the new record."""
        updated = replace(record, **changes)
        names = [name for name in changes if name != "watch_id"]
        if names:
            with self._lock:
                self._conn.execute(
                    f"UPDATE watches SET {', '.join(f'{n} = ?' for n in names)} WHERE watch_id = ?",
                    [*(_encode(n, getattr(updated, n)) for n in names), record.watch_id],
                )
        return updated

    def remove(self, watch_id: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM watches WHERE watch_id = ?", (watch_id,))
