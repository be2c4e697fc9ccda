"""Foreign apps in the lab: the Host every proxy sends, --host and --path, the preflight's
decision (pure) and its requests (real servers: tests/strict_server.py, and embedded
Tomcat 11 from tests/foreign.py), what counts as served, and trials the upstream did not
serve (invalid, left out by `recommend`)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tuner.analysis.outcomes import Outcome, is_served_status, outcome_of_status
from tuner.analysis.preflight import Answer, MethodCheck, judge_preflight
from tuner.errors import ConfigError
from tuner.experiment.runner import TrialKey, run_trial
from tuner.experiment.spec import ExperimentSpec, load_spec, parse_spec
from tuner.experiment.trials import measured_trial, new_trial
from tuner.findings import load_findings
from tuner.lab import PROXIES, Lab, command_upstream
from tuner.lab.preflight import ask, preflight
from tuner.lab.process import ManagedProcess, http_get, pick_free_port
from tuner.load.request import parse_host, parse_path
from tuner.store import ResultsStore, StoredTrial

from .conftest import lab_up_text, signal_and_wait
from .foreign import tomcat_cmd

TUNER = [sys.executable, "-m", "tuner.cli"]
SERVER = Path(__file__).with_name("strict_server.py")


def strict_cmd(mode: str) -> str:
    """`--upstream-cmd` for tests/strict_server.py in `mode` (see its docstring)."""
    return f"{sys.executable} {SERVER} --port {{port}} --idle-ms {{idle_ms}} --mode {mode}"


# -- what counts as served (pure) -----------------------------------------------------------
@pytest.mark.parametrize(("status", "served"), [
    (200, True), (204, True), (301, True), (404, True), (405, True), (401, True),
    (400, False), (421, False), (431, False), (500, False), (502, False), (503, False)])
def test_served_statuses(status: int, served: bool) -> None:
    assert is_served_status(status) is served


def test_a_404_is_served_and_no_failure() -> None:
    assert outcome_of_status(404) is Outcome.SERVED
    assert outcome_of_status(400) is Outcome.OTHER_STATUS
    assert outcome_of_status(502) is Outcome.BAD_GATEWAY


# -- the preflight's decision (pure) --------------------------------------------------------
UPSTREAM, PROXY_URL = "http://127.0.0.1:8080", "http://127.0.0.1:9090"
KEPT_200 = Answer(200, "OK", {"Keep-Alive": "timeout=2"})


def _judge(direct: Answer, proxied: Answer | None = None, *, host: str = "127.0.0.1:8080",
           method: str = "POST") -> tuple[bool, str]:
    result = judge_preflight([MethodCheck(method, direct, proxied or direct)], path="/",
                             host=host, upstream_url=UPSTREAM, proxy="nginx",
                             proxy_url=PROXY_URL)
    return result.is_ok, result.problem or result.text


def test_a_200_on_a_kept_connection_passes() -> None:
    ok, text = _judge(KEPT_200)
    assert ok and "200 OK, kept the connection [Keep-Alive: timeout=2]" in text


def test_a_404_on_a_kept_connection_passes_and_shows_the_status() -> None:
    ok, text = _judge(Answer(404, "Not Found"))
    assert ok, text
    assert "served: 404 on kept connections" in text


def test_tomcats_answer_to_an_underscore_host_is_refused_with_what_to_do() -> None:
    refused = Answer(400, "", {"Connection": "close"}, closed_by="Connection: close")
    ok, problem = _judge(refused, Answer(400, "", {"Server": "nginx/1.22.1"}),
                         host="tuner_upstream")
    assert not ok
    assert "POST / with Host: tuner_upstream" in problem
    assert "400, then CLOSED the connection (Connection: close) [Connection: close]" in problem
    assert "through nginx http://127.0.0.1:9090: 400 [Server: nginx/1.22.1]" in problem
    assert "`_` is not valid in a host name" in problem and "give --host" in problem


def test_a_server_that_closes_after_answering_is_refused() -> None:
    ok, problem = _judge(Answer(200, "OK", {"Connection": "close"}, "Connection: close"))
    assert not ok and "no idle connection is left for the proxy to reuse" in problem
    assert "keep-alive is off" in problem
    ok, problem = _judge(Answer(404, "Not Found", {}, "closed it 1 ms after answering"))
    assert not ok and "some servers close after an error status" in problem
    assert "--path" in problem


def test_no_answer_a_5xx_and_a_proxy_that_differs_are_refused() -> None:
    ok, problem = _judge(Answer(None, error="ConnectionResetError"))
    assert not ok and "no HTTP answer (ConnectionResetError)" in problem
    ok, problem = _judge(Answer(500, "Internal Server Error"))
    assert not ok and "the upstream failed on POST / (500)" in problem
    ok, problem = _judge(KEPT_200, Answer(502, "Bad Gateway"))
    assert not ok and "through nginx the answer was 502" in problem


def test_methods_that_fail_alike_share_one_line() -> None:
    refused = Answer(400, "", {}, "Connection: close")
    result = judge_preflight([MethodCheck("POST", refused, refused),
                              MethodCheck("GET", refused, refused)], path="/x",
                             host="a_b", upstream_url=UPSTREAM, proxy="nginx",
                             proxy_url=PROXY_URL)
    assert len(result.advice) == 1 and result.advice[0].startswith("POST, GET: ")


# -- host, path, spec -----------------------------------------------------------------------
@pytest.mark.parametrize("value", ["127.0.0.1:8080", "shop.example", "[::1]:80", "tuner_upstream",
                                   "localhost"])
def test_host_values(value: str) -> None:
    assert parse_host(value) == value


@pytest.mark.parametrize(("data", "message"), [
    ({"host": "shop example"}, "host: 'shop example' is not a Host header value"),
    ({"host": "a;b"}, "host: 'a;b' is not a Host header value"),
    ({"host": "shop:99999"}, "host: 'shop:99999' has port 99999; a port is 1-65535"),
    ({"host": 7}, "host: 7 is not a Host header value"),
    ({"path": "healthz"}, "path: 'healthz' is not a request path: it must start with /"),
    ({"path": "/a b"}, "path: '/a b' is not a request path"),
    ({"path": "/__tuner/generation"}, "path: '/__tuner/generation' is the lab's own"),
])
def test_spec_errors_name_the_key_and_value(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_spec(data)
    assert message in str(info.value)


def test_spec_host_and_path_round_trip_and_older_specs_load(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("host: shop.example:8080\npath: /healthz?probe=1\nmethods: post:3,get\n")
    spec = load_spec(path)
    assert (spec.host, spec.path, spec.methods) == ("shop.example:8080", "/healthz?probe=1",
                                                    "POST:3,GET")
    assert ExperimentSpec.from_stored(json.loads(json.dumps(spec.as_dict()))) == spec
    older = {k: v for k, v in spec.as_dict().items() if k not in ("host", "path")}
    assert ExperimentSpec.from_stored(older).host is None
    assert ExperimentSpec.from_stored(older).path == "/"
    assert parse_spec({"path": "/x"}, base=spec).host == "shop.example:8080"


# -- the preflight's requests, on real servers ---------------------------------------------
@pytest.fixture
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[int]:
    """tests/strict_server.py in the mode the test parametrizes, idle timeout 2 s."""
    port = pick_free_port()
    process = ManagedProcess(command_upstream(strict_cmd(request.param)).argv(
        port=port, idle_s=2.0), name="strict", log_dir=tmp_path)
    process.start()
    try:
        process.wait_ready(lambda: http_get(port, "/") is not None, timeout_s=10,
                           what="answer HTTP")
        yield port
    finally:
        process.stop()


@pytest.mark.parametrize(("server", "status", "closed_by"), [
    ("not-found", 404, None),
    ("refuse", 400, "Connection: close"),
    ("close", 200, "Connection: close"),
    ("silent-close", 200, "without Connection: close"),
], indirect=["server"])
def test_ask_sees_the_status_and_whether_the_server_closed(server: int, status: int,
                                                           closed_by: str | None) -> None:
    answer = ask(server, method="POST", path="/", host="127.0.0.1")
    assert answer.status == status and answer.headers["Server"] == "StrictTest/1.0"
    if closed_by is None:
        assert answer.closed_by is None, answer
    else:
        assert answer.closed_by is not None and closed_by in answer.closed_by, answer


@pytest.mark.parametrize("proxy", sorted(PROXIES))
def test_every_proxy_sends_a_valid_host_by_default_and_the_given_one(
        proxy: str, no_leftover_children: None) -> None:
    """A strict server (400 and close to a Host with `_`, as Tomcat): served through every
    proxy by default; refused, with its headers, when --host gives such a name."""
    upstream = command_upstream(strict_cmd("strict-host"))
    with Lab(proxy=proxy, upstream=upstream, proxy_idle_s=60, upstream_idle_s=2) as lab:
        assert lab.upstream is not None
        checked = preflight(lab, methods="POST:3,GET", path="/healthz")
        assert checked.is_ok, checked.text
        assert f"POST, GET /healthz with Host: 127.0.0.1:{lab.upstream.port}" in checked.text
        body = httpx.post(f"{lab.info().proxy_url}/x", content=b"{}").json()
        assert body["host"] == f"127.0.0.1:{lab.upstream.port}"
    with Lab(proxy=proxy, upstream=upstream, proxy_idle_s=60, upstream_idle_s=2,
             upstream_host="tuner_upstream") as lab:
        checked = preflight(lab, methods="POST", path="/")
        assert not checked.is_ok and checked.problem is not None
        assert "400 Bad Request, then CLOSED the connection (Connection: close)" \
            in checked.problem
        assert f"through {proxy}" in checked.problem and "`_` is not valid" in checked.problem


@pytest.mark.parametrize("proxy", sorted(PROXIES))
def test_lab_up_host_and_path(proxy: str, no_leftover_children: None) -> None:
    up = subprocess.Popen([*TUNER, "lab", "up", "--proxy", proxy, "--upstream-cmd",
                           strict_cmd("strict-host"), "--upstream-idle", "2s", "--host",
                           "shop.example:8443", "--path", "/healthz", "--methods", "GET",
                           "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    try:
        assert up.stdout is not None
        info = json.loads(up.stdout.readline())
        assert info["upstream_host"] == "shop.example:8443" and info["path"] == "/healthz"
        assert info["preflight"]["ok"], info["preflight"]
        assert info["preflight"]["lines"][0] == \
            "preflight: GET /healthz with Host: shop.example:8443"
        body = httpx.get(f"{info['proxy_url']}/healthz").json()
        assert body == {"status": 200, "host": "shop.example:8443"}
    finally:
        signal_and_wait(up, signal.SIGINT)
    assert up.returncode == 130


def test_lab_up_warns_about_a_request_the_upstream_refuses(no_leftover_children: None) -> None:
    text = lab_up_text(["--upstream-cmd", strict_cmd("strict-host"), "--upstream-idle", "2s",
                        "--host", "tuner_upstream"])
    assert "host      the proxy sends the upstream Host: tuner_upstream" in text
    assert "warning   POST: the upstream refused the request itself (400)" in text
    assert "`tuner experiment` refuses to run with this request" in text


# -- the experiment: refused up front, or run on served 404s --------------------------------
@pytest.mark.parametrize(("mode", "host", "message"), [
    ("refuse", None, "POST: the upstream refused the request itself (400)"),
    ("strict-host", "tuner_upstream", "`_` is not valid in a host name"),
    ("close", None, "answered 200 and closed the connection (Connection: close)"),
    ("silent-close", None, "closed it"),
])
def test_an_experiment_the_upstream_does_not_serve_is_refused_before_any_trial(
        tmp_path: Path, mode: str, host: str | None, message: str) -> None:
    db = tmp_path / "r.db"
    result = subprocess.run([*TUNER, "experiment", "--upstream-cmd", strict_cmd(mode),
                             "--proxy-idle", "3s", "--upstream-idle", "1s", "--db", str(db),
                             *(["--host", host] if host else [])],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: the upstream does not serve the experiment's "
                                    "request"), result.stderr
    assert message in result.stderr and "nothing was run" in result.stderr
    assert "--resume" not in result.stderr  # nothing to resume: the input must change
    assert not db.exists()  # refused before the store was created: nothing left behind


@pytest.mark.race
@pytest.mark.parametrize("proxy", sorted(PROXIES))
def test_404s_on_kept_connections_are_served_and_show_the_race(
        proxy: str, tmp_path: Path) -> None:
    """An app that answers POST / with 404 and keeps its connections races like one that
    answers 200: the 404s count as served, the verdict is the race's."""
    result = subprocess.run([*TUNER, "experiment", "--proxy", proxy, "--upstream-cmd",
                             strict_cmd("not-found"), "--proxy-idle", "3s", "--upstream-idle",
                             "1s", "--max-seconds", "30", "--no-control",
                             "--db", str(tmp_path / "n.db"), "--json"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "served: 404 on kept connections" in result.stderr
    [trial] = json.loads(result.stdout)["trials"]
    assert trial["verdict"] == "unsafe" and trial["n_race"] >= 1, trial
    # every answer a served 404 or the race (Envoy's race rate here is 10-20 %, nginx's ~5 %)
    assert trial["outcomes"]["served"] + trial["n_race_failures"] == trial["n_requests"], trial
    assert trial["outcomes"]["served"] >= 0.6 * trial["n_requests"], trial
    assert trial["statuses"]["404"] == trial["outcomes"]["served"], trial
    assert trial["n_failed"] == trial["n_race_failures"], trial  # the 404s are no failures


def test_a_trial_mostly_refused_is_invalid_and_left_out_of_the_recommendation(
        tmp_path: Path, no_leftover_children: None) -> None:
    """Past the preflight (run_trial alone), an upstream that answers 400 on kept
    connections: the trial is invalid with its statuses, never a verdict, and `tuner
    recommend` says it left it out and why."""
    spec = parse_spec({"max_seconds": 8, "gaps": "1s", "unsafe_after": 0, "safe_after": 0,
                       "control": False, "proxy_idle": "500ms", "upstream_idle": "1s",
                       "upstream_cmd": strict_cmd("bad-request")})
    with Lab(proxy="nginx", upstream=command_upstream(strict_cmd("bad-request")),
             proxy_idle_s=0.5, upstream_idle_s=1) as lab:
        trial = run_trial(lab, spec, TrialKey(0.5, 1.0, 0))
    assert trial.invalid_reason is not None and trial.n_requests > 0
    assert trial.invalid_reason.startswith(
        f"the upstream did not serve the load: {trial.n_requests} of {trial.n_requests} "
        f"answers were neither served nor the race (statuses {trial.n_requests} x 400)")
    db = tmp_path / "r.db"
    with ResultsStore(db) as store:
        store.add_experiment(experiment_id="e1", created_at=0.0, spec=spec.as_dict(),
                             versions={}, host="test")
        store.add_trial(StoredTrial("e1", trial.cell, 0, 0.0, 1.0, trial))
    findings = load_findings(db, margin_s=None, proxy_idle_s=None, upstream_idle_s=None,
                             target_rate=0.02)
    assert findings.primary.status == "insufficient"
    [left] = findings.primary.left_out
    assert left["reason"] == f"invalid: {trial.invalid_reason}"
    text = subprocess.run([*TUNER, "recommend", str(db)], capture_output=True, text=True,
                          timeout=60)
    assert text.returncode == 8
    assert "left out: 1 of 1 trials" in text.stdout
    assert "left out          proxy idle 500ms (repeat 1): invalid: the upstream did not " \
           "serve the load" in text.stdout
    as_json = json.loads(subprocess.run([*TUNER, "recommend", str(db), "--json"],
                                        capture_output=True, text=True, timeout=60).stdout)
    assert as_json["left_out"] == [left]


def test_the_unserved_rule_on_a_load_of_results() -> None:
    """measured_trial (pure) on a load's results: mostly 400s is invalid; mostly 404s and a
    few races is a result; older results without statuses still read."""
    spec = parse_spec({})
    base = new_trial(spec, TrialKey(1.0, 1.0, 0), upstream="command")
    refused = measured_trial(base, gaps_s=[1.0], signatures={}, problem=None, results={
        "counts": {"other_status": 300, "502": 30}, "statuses": {"400": 300, "502": 30},
        "n_reused": 300, "n_bursts": 11})
    assert refused.invalid_reason is not None
    assert "300 of 330 answers" in refused.invalid_reason
    assert "statuses 300 x 400, 30 x 502" in refused.invalid_reason
    served = measured_trial(base, gaps_s=[1.0], signatures={}, problem=None, results={
        "counts": {"served": 300, "502": 30}, "statuses": {"404": 300, "502": 30}})
    assert served.invalid_reason is None and served.n_failed == 30 and served.n_served == 300
    older = measured_trial(base, gaps_s=[1.0], signatures={}, problem=None,
                           results={"counts": {"2xx": 10, "504": 20}})
    assert older.invalid_reason is not None
    assert "neither served nor the race (no status recorded)" in older.invalid_reason


def test_paths_reach_the_load() -> None:
    from tuner.experiment.trials import load_plan
    from tuner.load.locust_runner import locust_argv

    spec = parse_spec({"path": "/healthz?x=1", "max_seconds": 30})
    plan = load_plan(spec, "http://127.0.0.1:9", [1.0], close_s=1.0)
    argv = locust_argv(plan, results_path=Path("r"))
    assert argv[argv.index("--tuner-path") + 1] == "/healthz?x=1"


def test_parse_path_examples() -> None:
    assert parse_path("/") == "/" and parse_path("/api/orders?dry=1") == "/api/orders?dry=1"


# -- embedded Tomcat 11 (tests/foreign.py), the server the issue met ----------------------
@pytest.mark.parametrize("proxy", ["nginx", "haproxy"])
def test_tomcat_behind_an_underscore_host_is_refused_up_front(tmp_path: Path,
                                                              proxy: str) -> None:
    """What nginx sent before (`Host: tuner_upstream`): Tomcat answers 400 and closes; the
    experiment now stops before its first trial and says so, with Tomcat's headers."""
    result = subprocess.run([*TUNER, "experiment", "--proxy", proxy, "--upstream-cmd",
                             tomcat_cmd(), "--proxy-idle", "1s,4s", "--upstream-idle", "2s",
                             "--host", "tuner_upstream", "--db", str(tmp_path / "t.db")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "POST straight to the upstream http://127.0.0.1:" in result.stderr
    assert ": 400, then CLOSED the connection (Connection: close) [Connection: close]" \
        in result.stderr
    assert f"POST through {proxy} http://127.0.0.1:" in result.stderr
    assert "strict servers such as Tomcat refuse Host: tuner_upstream" in result.stderr


@pytest.mark.race
@pytest.mark.parametrize("proxy", [
    "nginx",
    # HAProxy's 4s keeps connections 11-23 s (pool-purge-delay): its lifetime takes as long
    pytest.param("haproxy", marks=pytest.mark.slow)])
def test_tomcat_with_the_default_host_is_served_and_judged(tmp_path: Path, proxy: str) -> None:
    """The default Host (Tomcat's own 127.0.0.1:PORT) passes the preflight, and a proxy that
    keeps idle connections past Tomcat's 2 s is unsafe."""
    result = subprocess.run([*TUNER, "experiment", "--proxy", proxy, "--upstream-cmd",
                             tomcat_cmd(), "--proxy-idle", "4s", "--upstream-idle", "2s",
                             "--no-control", "--db", str(tmp_path / "t.db"), "--json"],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert f"POST through {proxy} http://127.0.0.1:" in result.stderr
    [trial] = json.loads(result.stdout)["trials"]
    assert trial["verdict"] == "unsafe", trial
    assert trial["statuses"].get("200", 0) >= 0.8 * trial["n_requests"], trial
    assert "400" not in trial["statuses"], trial


def test_host_is_refused_for_a_cluster_target(tmp_path: Path) -> None:
    """`host` reaches only the lab's proxies: a cluster run that names one says so, before
    the cluster is touched (the kubeconfig is never read)."""
    from tuner.experiment.cluster_runner import run_cluster_experiment

    section = {"namespace": "n", "service_url": "http://x/", "deployment": "d"}
    with pytest.raises(ConfigError, match=r"host: 'shop.example' .* drop host for --target "
                                          "kubernetes"):
        run_cluster_experiment(parse_spec({"host": "shop.example", "kubernetes": section}),
                               kubeconfig=str(tmp_path / "none"), context=None,
                               say=lambda _line: None)
