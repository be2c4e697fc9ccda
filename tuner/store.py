"""The results store: one SQLite file, append-only per trial, schema versioned.

Design decision: raw results reach disk before any analysis, one transaction per finished
trial, so a `kill -9` loses at most the trial in flight and `tuner recommend` can be re-run
offline. The file says it is ours (`application_id`) and which schema it has
(`user_version`); a newer schema is refused rather than misread.

    meta         key/value: tuner version that created the file
    experiments  one row per experiment: its spec, versions of every program, host
    trials       one row per finished trial (valid or invalid, with the reason)
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner import __version__
from tuner.errors import StoreError
from tuner.trial import Trial

#: "tunr" as a 32-bit integer: marks the file as a tuner results store
APPLICATION_ID = 0x74756E72
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE experiments (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    spec_json TEXT NOT NULL,
    versions_json TEXT NOT NULL,
    host TEXT NOT NULL
);
CREATE TABLE trials (
    experiment_id TEXT NOT NULL REFERENCES experiments(id),
    cell TEXT NOT NULL,
    repeat INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL,
    record_json TEXT NOT NULL,
    PRIMARY KEY (experiment_id, cell, repeat, attempt)
);
"""


@dataclass(frozen=True)
class StoredTrial:
    """One finished trial as stored: where it sits in its experiment, and the trial."""

    experiment_id: str
    cell: str
    repeat: int
    started_at: float
    finished_at: float
    trial: Trial
    #: 0, or how many earlier attempts of this trial were invalid (re-run on --resume)
    attempt: int = 0


class ResultsStore:
    """Open (or create) a results store; use as a context manager. `create=False` (the
    commands that only read: results, recommend, report) refuses an empty file rather than
    writing the schema into it."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 5.0, create: bool = True) -> None:
        self.path = path
        self.create = create
        try:
            self._db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open results store {path}: {exc}; check that its "
                             "directory exists and is writable") from exc
        try:
            self._check_or_create()
        except BaseException:
            self._db.close()
            raise

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"could not {what} in {self.path}: it is already recorded "
                             f"({exc}); list the store with `tuner results {self.path}`"
                             ) from exc
        except sqlite3.Error as exc:
            hint = ("another process holds it; wait or use another --db" if "locked" in str(exc)
                    else "check free disk space and permissions")
            raise StoreError(f"could not {what} in {self.path}: {exc}; {hint}") from exc

    def _check_or_create(self) -> None:
        try:
            app_id = self._db.execute("PRAGMA application_id").fetchone()[0]
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            n_tables = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlite3.OperationalError as exc:
            hint = ("another process holds it; wait or use another --db"
                    if "locked" in str(exc) else "check the path and its permissions")
            raise StoreError(f"could not read {self.path}: {exc}; {hint}") from exc
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a tuner results store (not SQLite: {exc}); "
                             "choose another --db path") from exc
        if app_id == 0 and n_tables == 0:
            if not self.create:
                raise StoreError(f"{self.path} is empty, not a tuner results store; run "
                                 f"`tuner experiment --db {self.path}` to fill it")
            with self._transaction("create the results schema") as db:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT INTO meta VALUES ('created_by', ?)", (f"tuner {__version__}",))
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return
        if app_id != APPLICATION_ID:
            raise StoreError(f"{self.path} is an SQLite file but not a tuner results store; "
                             "choose another --db path")
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has results schema {version}, newer than this "
                             f"tuner {__version__} understands ({SCHEMA_VERSION}); upgrade tuner")

    def add_experiment(self, *, experiment_id: str, created_at: float, spec: Mapping[str, Any],
                       versions: Mapping[str, str], host: str) -> None:
        with self._transaction("record the experiment") as db:
            db.execute("INSERT INTO experiments VALUES (?, ?, ?, ?, ?)",
                       (experiment_id, created_at, json.dumps(spec, sort_keys=True),
                        json.dumps(versions, sort_keys=True), host))

    def experiment(self, experiment_id: str | None = None) -> dict[str, Any] | None:
        """The experiment with this id, or the newest one; None if there is none."""
        query = ("SELECT id, created_at, spec_json, versions_json, host FROM experiments "
                 + ("WHERE id = ?" if experiment_id else "ORDER BY created_at DESC LIMIT 1"))
        row = self._db.execute(query, (experiment_id,) if experiment_id else ()).fetchone()
        if row is None:
            return None
        return {"id": row[0], "created_at": row[1], "spec": json.loads(row[2]),
                "versions": json.loads(row[3]), "host": row[4]}

    def add_trial(self, stored: StoredTrial) -> None:
        """Write one finished trial in its own transaction."""
        what = f"record trial {stored.cell} repeat {stored.repeat} attempt {stored.attempt}"
        with self._transaction(what) as db:
            db.execute("INSERT INTO trials VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (stored.experiment_id, stored.cell, stored.repeat, stored.attempt,
                        stored.started_at, stored.finished_at,
                        json.dumps(stored.trial.to_json(), sort_keys=True)))

    def trials(self, experiment_id: str) -> list[StoredTrial]:
        rows = self._db.execute(
            "SELECT experiment_id, cell, repeat, started_at, finished_at, record_json, attempt "
            "FROM trials WHERE experiment_id = ? ORDER BY started_at", (experiment_id,))
        stored = []
        for r in rows:
            try:
                trial = Trial.from_json(json.loads(r[5]))
            except (ValueError, TypeError, KeyError) as exc:
                raise StoreError(f"{self.path}: trial {r[1]} repeat {r[2]} of experiment "
                                 f"{r[0]} cannot be read ({exc}); the file was changed by "
                                 "another program") from None
            stored.append(StoredTrial(r[0], r[1], r[2], r[3], r[4], trial, r[6]))
        return stored

    def experiment_ids(self) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT id FROM experiments ORDER BY created_at")]
