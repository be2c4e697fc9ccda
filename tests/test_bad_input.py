"""Bad input to every command, as a user gives it: one table, each row a real `tuner`
process given one bad value. Each must end with the exit code tuner/errors.py gives its
kind (2 bad input, 5 unreachable to probe, 7 a store that is not ours, 9 the Kubernetes
API), print `error: ...` and never a traceback, and name the value it refused.

`{d}` in a row is a directory of bad files the fixture makes (a text file named .db, an
SQLite file of another program, a store of a newer schema, broken specs and kubeconfigs);
`{port}` is a port on 127.0.0.1 that nobody listens on.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tuner.store import APPLICATION_ID, ResultsStore, StoredTrial
from tuner.trial import Trial

TUNER = [sys.executable, "-m", "tuner.cli"]
RECORDED = Path(__file__).parent / "data" / "nginx_node_grid.json"
SIDECAR = "sidecar --render-dir {d}/render --nginx-pid {d}/nginx.pid --error-log {d}/error.log"
KUBE_SPEC = "experiment {d}/kube.yaml --target kubernetes --db {d}/kube.db"

#: (id, command line, exit code, what the message must name)
CASES: list[tuple[str, str, int, str]] = [
    # durations, names and commands of the lab
    ("lab-proxy", "lab up --proxy traefik", 2, "'traefik'"),
    ("lab-upstream", "lab up --upstream tomcat", 2, "'tomcat'"),
    ("duration-zero", "lab up --proxy-idle 0s", 2, "'0s'"),
    ("duration-negative", "lab up --proxy-idle=-1s", 2, "'-1s'"),
    ("duration-unit", "lab up --upstream-idle 5parsecs", 2, "'5parsecs'"),
    ("duration-exponent", "lab up --upstream-idle 1e3", 2, "'1e3'"),
    ("duration-whole-seconds", "lab up --upstream uvicorn --upstream-idle 1500ms", 2, "1.5s"),
    ("duration-whole-ms", "lab up --upstream-idle 1.5ms", 2, "1.5ms"),
    ("cmd-no-port", "lab up --upstream-cmd 'srv {idle_s}'", 2, "'srv {idle_s}'"),
    ("cmd-empty", "lab up --upstream-cmd ''", 2, "--upstream-cmd ''"),
    ("cmd-placeholder", "lab up --upstream-cmd 'srv {port} {idle}'", 2, "{idle}"),
    ("demo-db-not-ours", "demo --db {d}/notes.db", 2, "{d}/notes.db"),
    ("demo-db-no-dir", "demo --db {d}/missing/demo.db", 7, "{d}/missing/demo.db"),
    # URLs and headers of the probe
    ("url-scheme", "probe ftp://127.0.0.1/", 2, "'ftp://127.0.0.1/'"),
    ("url-not-a-url", "probe not-a-url", 2, "'not-a-url'"),
    ("url-no-host", "probe http://", 2, "'http://'"),
    ("url-port", "probe http://127.0.0.1:99999/", 2, "'http://127.0.0.1:99999/'"),
    ("url-space", "probe 'http://127.0.0.1:{port}/ x'", 2, "/ x'"),
    ("url-refused", "probe http://127.0.0.1:{port}/", 5, "127.0.0.1:{port}"),
    ("probe-samples", "probe http://127.0.0.1:{port}/ --samples 0", 2, "got 0"),
    ("probe-samples-int", "probe http://127.0.0.1:{port}/ --samples x", 2, "'x'"),
    ("probe-max-idle", "probe http://127.0.0.1:{port}/ --max-idle 0", 2, "'0'"),
    ("probe-margin", "probe http://127.0.0.1:{port}/ --margin abc", 2, "'abc'"),
    ("header-form", "probe http://127.0.0.1:{port}/ -H nocolon", 2, "'nocolon'"),
    ("header-newline", "probe http://127.0.0.1:{port}/ -H 'X: a\nb'", 2, "'X: a\\nb'"),
    ("probe-method", "probe http://127.0.0.1:{port}/ --method 'G ET'", 2, "'G ET'"),
    ("probe-host", "probe http://127.0.0.1:{port}/ --host 'a b'", 2, "'a b'"),
    # specs
    ("spec-missing", "experiment {d}/missing.yaml", 2, "{d}/missing.yaml"),
    ("spec-yaml", "experiment {d}/broken.yaml", 2, "{d}/broken.yaml"),
    ("spec-binary", "experiment {d}/binary.yaml", 2, "{d}/binary.yaml"),
    ("spec-directory", "experiment {d}/dir.db", 2, "{d}/dir.db"),
    ("spec-list", "experiment {d}/list.yaml", 2, "got list"),
    ("spec-unknown-field", "experiment {d}/unknown.yaml", 2, "timeout"),
    ("spec-duration", "experiment {d}/duration.yaml", 2, "'10 parsecs'"),
    ("spec-nan", "experiment {d}/nan.yaml", 2, "max_seconds: nan"),
    ("spec-cmd-type", "experiment {d}/cmd.yaml", 2, "upstream_cmd: 5"),
    ("spec-write-back-unit", "experiment {d}/unit.yaml", 2, "'h'"),
    # grids and load options
    ("grid-repeat", "experiment --proxy-idle 1s,1s", 2, "proxy_idle[1]: '1s'"),
    ("grid-empty", "experiment --proxy-idle=", 2, "proxy_idle[0]: ''"),
    ("grid-gaps", "experiment --gaps 2s,x", 2, "gaps[1]: 'x'"),
    ("grid-upstream", "experiment --upstream tomcat", 2, "'tomcat'"),
    ("methods-typo", "experiment --methods PSOT", 2, "'PSOT'"),
    ("methods-weight", "experiment --methods POST:0", 2, "'POST:0'"),
    ("repeats", "experiment --repeats 0", 2, "repeats: 0"),
    ("burst-size", "experiment --burst-size=-1", 2, "burst_size: -1"),
    ("max-seconds", "experiment --max-seconds 0", 2, "'0'"),
    ("resume-and-grid", "experiment --db {d}/good.db --resume --proxy-idle 1s", 2,
     "--proxy-idle"),
    ("resume-nothing", "experiment --db {d}/empty.db --resume", 2, "{d}/empty.db"),
    # stores of another program, or none
    ("store-text", "experiment --db {d}/notes.db", 7, "{d}/notes.db"),
    ("store-other-sqlite", "experiment --db {d}/other.db", 7, "{d}/other.db"),
    ("store-newer", "experiment --db {d}/newer.db", 7, "{d}/newer.db"),
    ("store-no-dir", "experiment --db {d}/missing/r.db", 7, "{d}/missing/r.db"),
    ("store-directory", "experiment --db {d}/dir.db", 7, "{d}/dir.db"),
    ("results-missing", "results {d}/missing.db", 2, "{d}/missing.db"),
    ("results-text", "results {d}/notes.db", 7, "{d}/notes.db"),
    ("results-other-sqlite", "results {d}/other.db", 7, "{d}/other.db"),
    ("results-newer", "results {d}/newer.db", 7, "schema 99"),
    ("results-empty", "results {d}/empty.db", 2, "{d}/empty.db"),
    ("results-id", "results {d}/good.db --id nope", 2, "'nope'"),
    ("results-zero-bytes", "results {d}/zero.db", 7, "{d}/zero.db"),
    ("recommend-zero-bytes", "recommend {d}/zero.db", 7, "{d}/zero.db"),
    ("report-zero-bytes", "report {d}/zero.db -o {d}/r.html", 7, "{d}/zero.db"),
    ("recommend-missing", "recommend {d}/missing.db", 2, "{d}/missing.db"),
    ("recommend-other-sqlite", "recommend {d}/other.db", 7, "{d}/other.db"),
    ("recommend-text", "recommend {d}/notes.db", 7, "{d}/notes.db"),
    ("recommend-rate", "recommend {d}/good.db --target-rate 2", 2, "--target-rate 2"),
    ("recommend-rate-float", "recommend {d}/good.db --target-rate abc", 2, "'abc'"),
    ("recommend-upstream", "recommend {d}/good.db --upstream-idle 7s", 2, "7s"),
    ("recommend-output", "recommend {d}/good.db -o yaml", 2, "'yaml'"),
    # output paths
    ("report-no-dir", "report {d}/good.db -o {d}/missing/r.html", 2, "{d}/missing/r.html"),
    ("report-directory", "report {d}/good.db -o {d}/dir.db", 2, "{d}/dir.db"),
    ("report-unwritable", "report {d}/good.db -o /proc/r.html", 2, "/proc/r.html"),
    ("report-store-text", "report {d}/notes.db -o {d}/r.html", 7, "{d}/notes.db"),
    # Kubernetes names, specs and kubeconfigs
    ("kube-namespace", "recommend {d}/good.db -o configmap --namespace Bad_NS", 2, "'Bad_NS'"),
    ("kube-name", "recommend {d}/good.db -o configmap --name UPPER", 2, "'UPPER'"),
    ("kube-spec-name", "experiment {d}/kube-name.yaml", 2, "'Shop_NS'"),
    ("kube-spec-url", "experiment {d}/kube-url.yaml", 2, "'ftp://a.b/'"),
    ("kube-spec-port", "experiment {d}/kube-port.yaml", 2, "70000"),
    ("kube-spec-duration", "experiment {d}/kube-duration.yaml", 2, "'soon'"),
    ("kube-spec-write-back", "experiment {d}/write-back-ns.yaml", 2, "'Bad_NS'"),
    ("kube-no-section", "experiment --target kubernetes", 2, "kubernetes:"),
    ("kube-local-kubeconfig", "experiment --kubeconfig {d}/kubeconfig", 2, "--kubeconfig"),
    ("kube-unit", "experiment {d}/kube-seconds.yaml --target kubernetes --db {d}/k.db", 2,
     "1.5s"),
    ("kubeconfig-missing", KUBE_SPEC + " --kubeconfig {d}/nothing", 2, "{d}/nothing"),
    ("kubeconfig-string", KUBE_SPEC + " --kubeconfig {d}/notes.db", 2, "{d}/notes.db"),
    ("apply-kubeconfig-yaml", "apply {d}/good.db --kubeconfig {d}/broken.yaml", 2,
     "{d}/broken.yaml"),
    ("apply-kubeconfig-list", "apply {d}/good.db --kubeconfig {d}/list.yaml", 2,
     "{d}/list.yaml"),
    ("apply-context", "apply {d}/good.db --kubeconfig {d}/kubeconfig --context nope", 9,
     "nope"),
    ("apply-unreachable", "apply {d}/good.db --kubeconfig {d}/kubeconfig", 9,
     "127.0.0.1:{port}"),
    ("apply-namespace", "apply {d}/good.db --kubeconfig {d}/kubeconfig --namespace Bad_NS", 2,
     "'Bad_NS'"),
    # the sidecar
    ("sidecar-listen", SIDECAR + " --tuning-dir {d}/tuning --listen nohost", 2, "'nohost'"),
    ("sidecar-listen-port", SIDECAR + " --tuning-dir {d}/tuning --listen 127.0.0.1:99999", 2,
     "'127.0.0.1:99999'"),
    ("sidecar-two-sources", SIDECAR + " --tuning-dir {d}/tuning --configmap a/b", 2,
     "--tuning-dir"),
    ("sidecar-tuning-dir", SIDECAR + " --tuning-dir {d}/missing", 2, "{d}/missing"),
    ("sidecar-configmap", SIDECAR + " --configmap noslash", 2, "'noslash'"),
    ("sidecar-configmap-ns", SIDECAR + " --configmap Bad_NS/x", 2, "'Bad_NS'"),
    ("sidecar-watch-timeout", SIDECAR + " --configmap a/b --watch-timeout 500ms", 2, "0.5s"),
    ("sidecar-poll", SIDECAR + " --tuning-dir {d}/tuning --poll 0", 2, "'0'"),
    ("sidecar-app-url", SIDECAR + " --tuning-dir {d}/tuning --app-url ftp://x/", 2,
     "'ftp://x/'"),
    ("sidecar-render-dir", "sidecar --tuning-dir {d}/tuning --nginx-pid x --error-log y", 2,
     "--render-dir"),
    # the scan
    ("scan-namespace", "scan --kubeconfig {d}/kubeconfig -n Bad_NS", 2, "'Bad_NS'"),
    ("scan-kubeconfig-yaml", "scan --kubeconfig {d}/broken.yaml", 2, "{d}/broken.yaml"),
    ("scan-unreachable", "scan --kubeconfig {d}/kubeconfig -n shop", 9, "127.0.0.1:{port}"),
    ("scan-proxy-idle", "scan --kubeconfig {d}/kubeconfig --proxy-idle traefik=soon", 2,
     "'soon'"),
    ("scan-max-idle", "scan --kubeconfig {d}/kubeconfig --max-idle 0", 2, "'0'"),
    ("scan-configmap", "scan --kubeconfig {d}/kubeconfig --ingress-nginx-configmap x", 2,
     "'x'"),
    ("scan-configmap-ns", "scan --kubeconfig {d}/kubeconfig --ingress-nginx-configmap A/b", 2,
     "'A'"),
    ("scan-push", "scan --kubeconfig {d}/kubeconfig --push gateway:9091", 2,
     "'gateway:9091'"),
]

KUBE = "kubernetes: {namespace: shop, service_url: 'http://a.b/', deployment: app"
FILES = {
    "notes.db": "shopping list\n",
    "broken.yaml": "proxy: [nginx\n",
    "list.yaml": "- nginx\n",
    "unknown.yaml": "proxy: nginx\ntimeout: 5s\n",
    "duration.yaml": "proxy_idle: [1s, 10 parsecs]\n",
    "nan.yaml": "max_seconds: .nan\n",
    "cmd.yaml": "upstream_cmd: 5\n",
    "unit.yaml": "write_back: {app: {namespace: shop, name: cfg, key: K, unit: h}}\n",
    "write-back-ns.yaml": "write_back: {ingress_nginx: {namespace: Bad_NS, name: x}}\n",
    "kube.yaml": KUBE + "}\n",
    "kube-name.yaml": KUBE.replace("shop", "Shop_NS") + "}\n",
    "kube-url.yaml": KUBE.replace("http:", "ftp:") + "}\n",
    "kube-port.yaml": KUBE + ", sidecar_port: 70000}\n",
    "kube-duration.yaml": KUBE + ", rollout_timeout: soon}\n",
    "kube-seconds.yaml": KUBE + ", upstream_idle_unit: s}\nupstream_idle: [1500ms]\n",
    "kubeconfig": "apiVersion: v1\nkind: Config\n"
                  "clusters: [{name: c, cluster: {server: 'http://127.0.0.1:{port}'}}]\n"
                  "users: [{name: u, user: {token: x}}]\n"
                  "contexts: [{name: ctx, context: {cluster: c, user: u}}]\n"
                  "current-context: ctx\n",
}


def _closed_port() -> int:
    """A port on 127.0.0.1 that the OS just handed out and nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    d = tmp_path_factory.mktemp("bad")
    port = _closed_port()
    for name, text in FILES.items():
        (d / name).write_text(text.replace("{port}", str(port)))
    (d / "binary.yaml").write_bytes(b"\xff\xfeproxy: nginx\n")
    for name in ("dir.db", "tuning", "render"):
        (d / name).mkdir()
    other = sqlite3.connect(d / "other.db")
    other.execute("CREATE TABLE users (id INTEGER)")
    other.commit()
    other.close()
    newer = sqlite3.connect(d / "newer.db")
    newer.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    newer.execute("PRAGMA user_version = 99")
    newer.execute("CREATE TABLE t (x)")
    newer.commit()
    newer.close()
    ResultsStore(d / "empty.db").close()
    (d / "zero.db").write_bytes(b"")  # an empty file: read-only commands must not fill it
    recorded = json.loads(RECORDED.read_text())
    with ResultsStore(d / "good.db") as store:
        store.add_experiment(experiment_id=recorded["experiment_id"], created_at=0.0,
                             spec=recorded["spec"], versions=recorded["versions"],
                             host=recorded["host"])
        for i, trial in enumerate(recorded["trials"]):
            store.add_trial(StoredTrial(recorded["experiment_id"], trial["cell"],
                                        trial["repeat"], float(i), float(i) + 1,
                                        Trial.from_json(trial)))
    return d, port


def test_the_table_covers_every_command_with_40_bad_inputs() -> None:
    commands = {line.split()[0] for _, line, _, _ in CASES}
    assert commands == {"lab", "demo", "probe", "experiment", "results", "recommend", "apply",
                        "report", "sidecar", "scan"}
    assert len(CASES) >= 40 and len({case_id for case_id, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize(("line", "exit_code", "named"),
                         [pytest.param(*case, id=case_id) for case_id, *case in CASES])
def test_bad_input(bad_files: tuple[Path, int], line: str, exit_code: int, named: str) -> None:
    d, port = bad_files

    def fill(text: str) -> str:
        return text.replace("{d}", str(d)).replace("{port}", str(port))

    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    result = subprocess.run([*TUNER, *(fill(arg) for arg in shlex.split(line))], cwd=d, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == exit_code, result.stderr
    assert "error: " in result.stderr
    assert fill(named) in result.stderr, result.stderr


@pytest.mark.parametrize("command", ["lab up", "demo", "probe", "experiment", "results",
                                     "recommend", "apply", "report", "sidecar", "scan"])
def test_help_prints_each_percent_sign_once(command: str) -> None:
    result = subprocess.run([*TUNER, *command.split(), "--help"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0 and "%%" not in result.stdout, result.stdout


def test_a_binary_key_in_the_tuning_dir_does_not_stop_the_sidecar(tmp_path: Path) -> None:
    """A mounted ConfigMap's binaryData key need not be UTF-8; the sidecar reads it as text
    with U+FFFD in place of the bad bytes, and validation refuses it if it is a tuning key."""
    from tuner.sidecar import read_configmap_dir

    (tmp_path / "upstream-keepalive-timeout").write_bytes(b"\xff60s")
    (tmp_path / "generation").write_text("7")
    assert read_configmap_dir(tmp_path) == {"generation": "7",
                                            "upstream-keepalive-timeout": "\ufffd60s"}
