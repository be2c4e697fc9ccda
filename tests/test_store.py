from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tuner.errors import StoreError
from tuner.store import SCHEMA_VERSION, ResultsStore, StoredTrial
from tuner.trial import Trial

TRIAL = Trial(proxy="nginx", upstream="node", proxy_idle_s=60.0, upstream_idle_s=1.0,
              outcomes={"2xx": 26, "502": 4}, gaps_s=(1.99, 2.0), verdict="unsafe",
              burst_spread_ms_p95=3.5, n_in_window=12, proxy_lifetime_s=60.002)


def test_trials_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    with ResultsStore(path) as store:
        store.add_experiment(experiment_id="e1", created_at=1.0, spec={"proxy": "nginx"},
                             versions={"nginx": "1.22.1"}, host="lab")
        store.add_trial(StoredTrial("e1", "60s|1s", 0, 2.0, 3.0, TRIAL))
    with ResultsStore(path) as store:
        experiment = store.experiment()
        assert experiment is not None and experiment["spec"] == {"proxy": "nginx"}
        [trial] = store.trials("e1")
        assert trial.trial == TRIAL and trial.trial.n_502 == 4 and trial.cell == "60s|1s"
        with pytest.raises(StoreError,
                           match=r"record trial 60s\|1s repeat 0 attempt 0 .* already recorded"):
            store.add_trial(StoredTrial("e1", "60s|1s", 0, 2.0, 3.0, TRIAL))  # no duplicates


def test_a_file_that_is_not_ours(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello " * 1000)
    with pytest.raises(StoreError, match="not a tuner results store"):
        ResultsStore(text)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="SQLite file but not a tuner results store"):
        ResultsStore(other)


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    ResultsStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this tuner"):
        ResultsStore(path)


def test_a_locked_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    ResultsStore(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="another process holds it"):
            ResultsStore(path, busy_timeout_s=0.1)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_write_blocked_by_another_writer(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    store = ResultsStore(path, busy_timeout_s=0.1)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="another process holds it"):
            store.add_experiment(experiment_id="e", created_at=0, spec={}, versions={}, host="h")
        store.close()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
