"""`tuner experiment` on the real lab: spec validation, a 2x2 grid, HAProxy, faults, resume."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tuner.errors import Cancelled, ConfigError, LoadError
from tuner.experiment.runner import TrialKey, run_trial, trial_order
from tuner.experiment.spec import ExperimentSpec, load_spec, parse_spec
from tuner.lab import Lab, get_upstream
from tuner.load.locust_runner import LocustPlan, run_locust

from .conftest import alive, descendants, signal_and_wait, wait_for

TUNER = [sys.executable, "-m", "tuner.cli"]


def _rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as connection:
        return connection.execute(sql).fetchall()


@pytest.mark.parametrize(("data", "message"), [
    ({"proxy_idle": ["1s", "10 parsecs"]}, "proxy_idle[1]: '10 parsecs' is not a duration"),
    ({"proxy_idle": "1s,1000ms"}, "proxy_idle[1]: '1000ms' repeats an earlier value"),
    ({"methods": "POST:0"}, "methods: 'POST:0' is not a method mix"),
    ({"proxy": "traefik"}, "proxy: 'traefik' is not one of nginx, haproxy, envoy"),
    ({"repeats": 0}, "repeats: 0 must be at least 1"),
    ({"burst_size": "many"}, "burst_size: 'many' must be a whole number"),
    ({"methods": "POST:x"}, "methods: 'POST:x' is not a method mix"),
    ({"upstream_idel": "1s"}, "upstream_idel: unknown field"),
    ({"max_seconds": -5}, "max_seconds: -5 must be greater than zero"),
    ({"max_seconds": "0s"}, "max_seconds: '0s' must be greater than zero"),
])
def test_spec_errors_name_the_key_and_value(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_spec(data)
    assert message in str(info.value)


def test_spec_file_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("proxy: haproxy\nproxy_idle: [500ms, 10s]\nupstream_idle: 2s\n"
                    "gaps: [1.99s, 2s]\nstop_after: 3\n")
    with pytest.raises(ConfigError, match=f"{path}: stop_after: unknown field"):
        load_spec(path)
    path.write_text("proxy: haproxy\nproxy_idle: [500ms, 10s]\nupstream_idle: 2s\n"
                    "gaps: [1.99s, 2s]\n")
    spec = load_spec(path)
    assert spec.proxy == "haproxy" and spec.proxy_idle_s == (0.5, 10.0)
    assert spec.upstream_idle_s == (2.0,) and spec.gaps_s == (1.99, 2.0)
    overridden = parse_spec({"proxy_idle": "1s,2s", "db": "x.db"}, base=spec)
    assert overridden.proxy_idle_s == (1.0, 2.0) and overridden.proxy == "haproxy"
    assert ExperimentSpec.from_stored(overridden.as_dict()) == overridden
    (tmp_path / "bad.yaml").write_text("proxy: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_spec(tmp_path / "bad.yaml")


def test_trial_order_is_shuffled_by_the_seed_and_complete() -> None:
    spec = parse_spec({"proxy_idle": "1s,2s,3s", "upstream_idle": "1s,2s", "repeats": 2})
    order = trial_order(spec)
    assert len(order) == len(set(order)) == 1 + 12
    assert order[0].control and not any(key.control for key in order[1:])  # control first
    assert order == trial_order(spec)
    assert len(trial_order(parse_spec({"control": False}, base=spec))) == 12
    assert order != trial_order(parse_spec({"seed": 99}, base=spec))


def test_upstream_that_cannot_take_a_grid_value_fails_before_starting(tmp_path: Path) -> None:
    result = subprocess.run([*TUNER, "experiment", "--upstream", "uvicorn", "--upstream-idle",
                             "1s,1500ms", "--db", str(tmp_path / "r.db")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "upstream_idle 1.5s: uvicorn --timeout-keep-alive takes whole seconds" \
        in result.stderr
    assert not (tmp_path / "r.db").exists()


@pytest.mark.race
@pytest.mark.slow
def test_grid_is_unsafe_exactly_where_the_proxy_outlives_the_upstream(tmp_path: Path) -> None:
    db = tmp_path / "grid.db"
    result = subprocess.run([*TUNER, "experiment", "--proxy", "nginx", "--upstream", "node",
                             "--proxy-idle", "1s,3s", "--upstream-idle", "1s,2500ms",
                             "--max-seconds", "40", "--db", str(db), "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["db"] == str(db) and len(document["trials"]) == 1 + 4
    [control] = [t for t in document["trials"] if t["control"]]
    assert control["proxy_idle_s"] > control["upstream_close_s"] + 1 - 1e-9
    for trial in document["trials"]:
        for key in ("proxy", "upstream", "proxy_idle_s", "upstream_idle_s", "upstream_close_s",
                    "n_requests", "n_502", "n_failed", "failure_rate", "n_proxy_log_races",
                    "verdict", "verdict_text", "proxy_lifetime_s", "burst_spread_ms_p95",
                    "gap_error_ms_p95", "n_in_window"):
            assert key in trial, key
        expected = "unsafe" if trial["proxy_idle_s"] >= trial["upstream_close_s"] else "safe"
        if expected == "unsafe":
            assert trial["verdict"] == "unsafe", trial
            assert trial["n_502"] >= 1 and trial["n_proxy_log_races"] >= 1
        else:
            assert trial["n_failed"] == 0 and trial["n_requests"] >= 200
            # safe, or honestly inconclusive: a busy machine can loosen the bursts
            assert trial["verdict"] in ("safe", "inconclusive"), trial
            if trial["verdict"] == "inconclusive":
                assert "burst spread" in trial["verdict_text"] or "control" in \
                    trial["verdict_text"], trial
    listed = subprocess.run([*TUNER, "results", str(db), "--json"], capture_output=True,
                            text=True, timeout=60)
    assert json.loads(listed.stdout)["trials"] == document["trials"]


@pytest.mark.race
@pytest.mark.slow
def test_haproxy_records_its_failure_kind(tmp_path: Path) -> None:
    result = subprocess.run([*TUNER, "experiment", "--proxy", "haproxy", "--upstream", "node",
                             "--proxy-idle", "10s", "--upstream-idle", "1s", "--max-seconds",
                             "40", "--db", str(tmp_path / "h.db"), "--json"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    [trial] = [t for t in json.loads(result.stdout)["trials"] if not t["control"]]
    assert trial["verdict"] == "unsafe", trial
    assert trial["outcomes"].get("reset", 0) >= 1  # the silent close, not a 502
    assert trial["n_502"] == 0


def test_an_upstream_dying_mid_trial_makes_the_trial_invalid() -> None:
    spec = parse_spec({"max_seconds": 8, "gaps": "1s", "unsafe_after": 0, "safe_after": 0})
    with Lab(proxy="nginx", upstream=get_upstream("node"), proxy_idle_s=0.5,
             upstream_idle_s=1) as lab:
        assert lab.upstream is not None and lab.upstream.process is not None
        pgid = lab.upstream.process.pid
        # the probe takes ~2 s (Node closes after 2.0 s), Locust starts in ~1 s: at 5 s the
        # load is running
        killer = threading.Timer(5.0, os.killpg, args=(pgid, signal.SIGKILL))
        killer.start()
        try:
            trial = run_trial(lab, spec, TrialKey(0.5, 1.0, 0))
        finally:
            killer.cancel()
    assert trial.verdict == "invalid" and trial.invalid_reason is not None
    assert trial.n_requests > 0  # the load ran: the trial did not fail in the probe
    assert trial.invalid_reason.startswith(("a lab process died during the trial",
                                            "the proxy could not connect to the upstream"))


def test_a_probe_under_way_stops_when_the_run_is_interrupted() -> None:
    """A --parallel cell probes an upstream idle value not probed yet in its own thread;
    Ctrl-C sets the cancel event, and the probe ends within about a second instead of
    waiting out the close (Node at 20 s: 21 s and more)."""
    spec = parse_spec({"max_seconds": 60})
    with Lab(proxy="nginx", upstream=get_upstream("node"), proxy_idle_s=1,
             upstream_idle_s=20) as lab:
        cancel = threading.Event()
        interrupt = threading.Timer(2.0, cancel.set)
        interrupt.start()
        started = time.monotonic()
        try:
            with pytest.raises(Cancelled, match="probe"):
                run_trial(lab, spec, TrialKey(1.0, 20.0, 0), cancel=cancel)
        finally:
            interrupt.cancel()
        assert time.monotonic() - started < 6


def test_locust_failing_shows_why(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match=r"Locust exited \(status 2\) without usable results: "
                                        r".*unrecognized arguments: --no-such-option"):
        run_locust(LocustPlan(host_url="http://127.0.0.1:9", gaps_s=[1.0], max_seconds=5,
                              locust_args=("--no-such-option",)), workdir=tmp_path)
    with pytest.raises(ConfigError, match="gaps"):
        LocustPlan(host_url="http://127.0.0.1:9", gaps_s=[])


def test_steady_mode_sends_the_same_mean_rate_without_gaps(tmp_path: Path) -> None:
    with Lab(proxy="nginx", upstream=get_upstream("node"), proxy_idle_s=60,
             upstream_idle_s=5) as lab:
        assert lab.proxy is not None
        results = run_locust(LocustPlan(host_url=lab.proxy.url, gaps_s=[1.0], mode="steady",
                                        burst_size=10, max_seconds=5), workdir=tmp_path)
    assert results["mode"] == "steady" and set(results["by_gap"]) == {"steady"}
    # 10 users, one request per user per second, for about 5 s (minus start-up)
    assert 20 <= results["n_requests"] <= 60, results
    assert results["counts"] == {"2xx": results["n_requests"]}


@pytest.mark.race
@pytest.mark.slow
def test_kill_9_then_resume_repeats_no_trial(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    db = tmp_path / "resume.db"
    spec.write_text(f"proxy_idle: [1s, 3s]\nupstream_idle: [1s]\nrepeats: 2\ngap_steps: 3\n"
                    f"gap_half_width: 6ms\nsafe_after: 60\nmax_seconds: 30\ndb: {db}\n")
    runner = subprocess.Popen([*TUNER, "experiment", str(spec)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    n_before = 0
    started = set()
    while time.monotonic() < deadline and n_before == 0:
        time.sleep(0.1)
        started |= descendants(runner.pid)
        if db.exists():
            with contextlib.suppress(sqlite3.OperationalError):  # not created yet
                n_before = int(str(_rows(db, "SELECT count(*) FROM trials")[0][0]))
    assert n_before >= 1, "no trial was recorded within 2 minutes"
    started |= descendants(runner.pid)
    runner.kill()  # kill -9: no cleanup code runs in the runner
    runner.wait(timeout=10)
    # the parent-death signal asks for a graceful stop
    wait_for(lambda: not alive(started), timeout_s=10,
             what="exit of the lab and Locust processes after the runner's kill -9")
    first = _rows(db, "SELECT cell, repeat, started_at FROM trials ORDER BY started_at")

    result = subprocess.run([*TUNER, "experiment", "--db", str(db), "--resume", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = _rows(db, "SELECT cell, repeat, started_at FROM trials ORDER BY started_at")
    assert len(rows) == 1 + 4 and len({(c, r) for c, r, _ in rows}) == 1 + 4
    assert rows[0][0] == "control|1"
    assert rows[:len(first)] == first  # the trials recorded before the kill are untouched
    assert len(json.loads(result.stdout)["trials"]) == 1 + 4


def test_resume_refuses_a_changed_spec(tmp_path: Path) -> None:
    result = subprocess.run([*TUNER, "experiment", "--db", str(tmp_path / "x.db"), "--resume",
                             "--proxy-idle", "5s"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "drop --proxy-idle" in result.stderr
    empty = subprocess.run([*TUNER, "experiment", "--db", str(tmp_path / "y.db"), "--resume"],
                           capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "holds no experiment to resume" in empty.stderr


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    runner = subprocess.Popen([*TUNER, "experiment", "--proxy-idle", "3s", "--upstream-idle",
                               "1s", "--db", str(db)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert runner.stdout is not None
    # the preflight's lines, then "experiment <id>: 1 trials, ..." once the store is made
    lines = [runner.stdout.readline()]
    while lines[-1] and not lines[-1].startswith("experiment ") and len(lines) < 10:
        lines.append(runner.stdout.readline())
    assert lines[0].startswith("preflight: POST / with Host: 127.0.0.1:"), lines
    assert lines[-1].startswith("experiment "), lines
    # into a trial: the load runs (Locust is among the runner's processes)
    wait_for(lambda: any("locust" in _cmdline(pid) for pid in descendants(runner.pid)),
             timeout_s=60, what="Locust process under the runner")
    started = descendants(runner.pid)
    stderr = signal_and_wait(runner, signal.SIGINT, timeout_s=30)
    assert runner.returncode == 130
    assert f"tuner experiment --db {db} --resume" in stderr
    wait_for(lambda: not alive(started), timeout_s=5, what="exit of every process it started")


@pytest.mark.parametrize(("proxy_idle", "n_loads"), [
    # the lifetime at 60 s is still being measured beside the control's load (ignoring
    # the cancel would keep the run 45 s or more past the signal)
    ("1s,60s", 1),
    # the two cells run side by side after the control, each in a thread of its own
    ("1s,3s", 2)])
def test_ctrl_c_stops_work_in_other_threads_at_once(tmp_path: Path, proxy_idle: str,
                                                    n_loads: int) -> None:
    db = tmp_path / "p.db"
    runner = subprocess.Popen([*TUNER, "experiment", "--proxy-idle", proxy_idle,
                               "--upstream-idle", "1s", "--parallel", "2", "--max-seconds", "90",
                               "--db", str(db)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)

    def loads() -> int:
        return sum(1 for pid in descendants(runner.pid)
                   if _cmdline(pid).split()[1:3] == ["-m", "locust"])

    wait_for(lambda: loads() >= n_loads, timeout_s=90, what=f"{n_loads} Locust load(s)")
    started = descendants(runner.pid)
    interrupted = time.monotonic()
    stderr = signal_and_wait(runner, signal.SIGINT, timeout_s=60)
    # not the 90 s budgets nor the 60 s lifetime: the threads saw the cancel
    assert time.monotonic() - interrupted < 15, stderr
    assert runner.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    wait_for(lambda: not alive(started), timeout_s=5, what="exit of every process it started")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_service_url_with_a_path_keeps_it_out_of_locusts_host() -> None:
    # Locust sends no request at all to a --host with a path, even "/" (found with
    # service_url: http://demo-app.tuner-demo.svc/)
    from tuner.load.locust_runner import locust_argv

    for url, host, path in [("http://demo-app.tuner-demo.svc/", "http://demo-app.tuner-demo.svc",
                             "/"),
                            ("https://shop.example:8443/api/", "https://shop.example:8443",
                             "/api/"),
                            ("http://127.0.0.1:8080", "http://127.0.0.1:8080", "/"),
                            ("http://svc/api?tenant=a", "http://svc", "/api/?tenant=a")]:
        argv = locust_argv(LocustPlan(host_url=url, gaps_s=[1.0]), results_path=Path("r"))
        assert argv[argv.index("--host") + 1] == host
        assert argv[argv.index("--tuner-path") + 1] == path
