#!/usr/bin/env python3
"""A real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver, kube-controller-manager
and kube-scheduler (v1.34.4, built by scripts/k8s-build/build), for `make cluster` and the
tests' session fixture.

    scripts/cluster.py up   [--dir .cluster]   # prints the admin kubeconfig's path
    scripts/cluster.py down [--dir .cluster]   # stops every process `up` started

Design decision: the processes this starts are named by pid in DIR/pids (with their command
line, so `down` never signals a pid the OS has since given to another program), and all
state (etcd's data, certificates, logs, kubeconfigs) lives in DIR: `down` plus `rm -rf DIR`
leaves nothing behind. Everything listens on 127.0.0.1 only, on ports the OS picks.
RBAC is enforced (--authorization-mode=Node,RBAC): the admin kubeconfig is system:masters,
every other identity gets only what Roles grant it. Standard library only (and the openssl
command), so `make cluster` needs no virtual environment.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "scripts" / "k8s-build" / "build"
#: the Service range only names ClusterIPs inside the API; nothing routes it on this machine
SERVICE_CIDR = "10.96.0.0/24"
#: what the apiserver's serving certificate is valid for (in-cluster names included, so
#: that pods of tier 4 can reach it as kubernetes.default)
SERVING_NAMES = ["DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default",
                 "DNS:kubernetes.default.svc", "DNS:kubernetes.default.svc.cluster.local",
                 "IP:127.0.0.1", "IP:10.96.0.1"]
#: cold start here: etcd in under a second, the apiserver 5-15 s (its post-start hooks
#: create the bootstrap RBAC roles), more while other tests load both cores
READY_TIMEOUT_S = 120.0
#: what the apiserver's audit log (DIR/logs/audit.log) records: every request of a
#: ServiceAccount outside kube-system (the tuner's and the sidecar's), verb and object only.
#: The tests read it to find verbs a Role grants that nothing used.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
    "rules": [{"level": "None", "userGroups": ["system:serviceaccounts:kube-system"]},
              {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
              {"level": "None"}]}


class ClusterError(Exception):
    """The control plane could not start or stop; the message names the log to read."""


@dataclass(frozen=True)
class Cluster:
    dir: Path
    server: str  # https://127.0.0.1:PORT
    kubeconfig: Path  # admin (system:masters)
    ca_file: Path
    etcd_url: str
    bin_dir: Path


# -- binaries and certificates ----------------------------------------------------------------

def binaries(*, control_plane_only: bool = True) -> Path:
    """The directory with the binaries: KUBEBUILDER_ASSETS if it holds them, else the cache
    (built there once per machine; a cold build takes tens of minutes on 2 cores)."""
    env = dict(os.environ)
    if control_plane_only:
        env["ONLY"] = "control-plane"
    done = subprocess.run([str(BUILD)], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise ClusterError(f"building the Kubernetes binaries failed (exit {done.returncode})"
                           f": {done.stderr.strip()[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args[:2])} failed: {done.stderr.strip()}")


def _signed(pki: Path, name: str, subject: str, extensions: str) -> None:
    """A key and a certificate for `subject` signed by pki/ca, with `extensions`."""
    (pki / f"{name}.ext").write_text(extensions)
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-subj", subject, "-out", f"{name}.csr", cwd=pki)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "365", "-extfile", f"{name}.ext", "-out",
             f"{name}.crt", cwd=pki)


CLIENT = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n" \
         "extendedKeyUsage=clientAuth\n"


NODE_NAME = "tuner-node"


def make_pki(pki: Path, *, extra_ips: tuple[str, ...] = ()) -> None:
    """The cluster CA, the apiserver's serving certificate, client certificates for the admin
    (system:masters), the controller-manager and the scheduler (the users the bootstrap
    RBAC policy binds), and the service-account signing key pair."""
    if (pki / "sa.pub").exists():
        return
    pki.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.crt", "-days", "3650", "-subj", "/CN=tuner-test-ca", cwd=pki)
    _signed(pki, "apiserver", "/CN=kube-apiserver",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\nsubjectAltName="
            f"{','.join([*SERVING_NAMES, *(f'IP:{ip}' for ip in extra_ips)])}\n")
    _signed(pki, "admin", "/O=system:masters/CN=tuner-admin", CLIENT)
    _signed(pki, "controller-manager", "/CN=system:kube-controller-manager", CLIENT)
    _signed(pki, "scheduler", "/CN=system:kube-scheduler", CLIENT)
    # tier 4's node: the kubelet (the Node authorizer's identity) and kube-proxy
    _signed(pki, "kubelet", f"/O=system:nodes/CN=system:node:{NODE_NAME}", CLIENT)
    _signed(pki, "kube-proxy", "/CN=system:kube-proxy", CLIENT)
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out",
             "sa.key", cwd=pki)
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def write_kubeconfig(path: Path, *, server: str, ca_file: Path, user: str,
                     cert: Path | None = None, key: Path | None = None,
                     token: str | None = None) -> Path:
    """A kubeconfig (JSON is YAML) for one user: a client certificate or a bearer token."""
    credentials: dict[str, str] = (
        {"token": token} if token is not None else
        {"client-certificate": str(cert), "client-key": str(key)})
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": user,
        "clusters": [{"name": "tuner-test", "cluster": {
            "server": server, "certificate-authority": str(ca_file)}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": user, "context": {"cluster": "tuner-test", "user": user}}],
    }, indent=1))
    path.chmod(0o600)
    return path


# -- processes --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _set_pdeathsig() -> None:
    """In the child: die with the parent (the test run), even on its kill -9."""
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


#: the processes this interpreter started: kept referenced (a Popen collected while its
#: process runs warns), and reaped by `down`
_STARTED: list[subprocess.Popen[bytes]] = []


def _start(state: Path, name: str, argv: list[str], *,
           die_with_parent: bool) -> subprocess.Popen[bytes]:
    logs = state / "logs"
    logs.mkdir(exist_ok=True)
    with open(logs / f"{name}.log", "ab") as log:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_set_pdeathsig if die_with_parent else None)
    with open(state / "pids", "a") as pids:
        pids.write(json.dumps({"name": name, "pid": process.pid, "argv0": argv[0]}) + "\n")
    _STARTED.append(process)
    return process


def _last_lines(path: Path, n: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return "(no log)"


def _is_running(pid: int, argv0: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
    except OSError:
        return False
    return cmdline == argv0 and state != "Z"


def _wait(state: Path, name: str, process: subprocess.Popen[bytes], is_ready: object, *,
          timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ClusterError(f"{name} exited before it was ready; "
                               f"{state / 'logs' / (name + '.log')}: "
                               f"{_last_lines(state / 'logs' / (name + '.log'))}")
        if is_ready():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise ClusterError(f"{name} was not ready within {timeout_s:g}s; "
                       f"{state / 'logs' / (name + '.log')}: "
                       f"{_last_lines(state / 'logs' / (name + '.log'))}")


def _https_ok(url: str, pki: Path) -> bool:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    try:
        with urllib.request.urlopen(url, context=context, timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def up(state: Path, *, bin_dir: Path | None = None, die_with_parent: bool = False,
       advertise_address: str | None = None) -> Cluster:
    """Start etcd, kube-apiserver, kube-controller-manager and kube-scheduler with state in
    `state`; return once the apiserver is ready and the controller-manager has made the
    default ServiceAccount (so both are working, not just listening).

    `advertise_address`: for a node (tier 4), run inside a network namespace of its own,
    the apiserver listens on every address of that namespace and advertises this one as the
    `kubernetes` Service's endpoint, so pods reach it through kube-proxy."""
    state = state.resolve()
    if (state / "pids").exists() and any(
            _is_running(p["pid"], p["argv0"]) for p in _pids(state)):
        raise ClusterError(f"a cluster already runs from {state} (see {state / 'pids'}); "
                           "stop it first: make cluster-down")
    (state / "pids").unlink(missing_ok=True)
    bin_dir = bin_dir or binaries()
    pki = state / "pki"
    make_pki(pki, extra_ips=(advertise_address,) if advertise_address else ())
    etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
    cm_port, sched_port = free_port(), free_port()
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    server = f"https://127.0.0.1:{api_port}"

    etcd = [str(bin_dir / "etcd"), "--name", "tuner", "--data-dir", str(state / "etcd"),
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"tuner={peer_url}", "--log-level", "warn",
            # a test cluster on a shared disk: losing it on a power cut costs nothing
            "--unsafe-no-fsync"]
    process = _start(state, "etcd", etcd, die_with_parent=die_with_parent)
    _wait(state, "etcd", process, lambda: _http_ok(f"{etcd_url}/health"))

    apiserver = [
        str(bin_dir / "kube-apiserver"), "--etcd-servers", etcd_url,
        "--bind-address", "0.0.0.0" if advertise_address else "127.0.0.1",
        "--advertise-address", advertise_address or "127.0.0.1",
        "--secure-port", str(api_port),
        "--tls-cert-file", str(pki / "apiserver.crt"),
        "--tls-private-key-file", str(pki / "apiserver.key"),
        "--client-ca-file", str(pki / "ca.crt"),
        "--kubelet-client-certificate", str(pki / "admin.crt"),
        "--kubelet-client-key", str(pki / "admin.key"),
        "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
        "--service-account-key-file", str(pki / "sa.pub"),
        "--service-account-signing-key-file", str(pki / "sa.key"),
        "--service-cluster-ip-range", SERVICE_CIDR,
        "--authorization-mode", "Node,RBAC",
        "--allow-privileged=true",
        # 127.0.0.1 may not be an Endpoints address: keep the `kubernetes` Service's
        # endpoints out of it rather than log an error every 10 s
        "--endpoint-reconciler-type", "lease" if advertise_address else "none",
        "--profiling=false"]
    if advertise_address:  # `kubectl logs` reaches the node's kubelet by its IP: no DNS
        apiserver += ["--kubelet-preferred-address-types", "InternalIP"]
    (state / "audit-policy.json").write_text(json.dumps(AUDIT_POLICY))
    apiserver += ["--audit-policy-file", str(state / "audit-policy.json"),
                  "--audit-log-path", str(state / "logs" / "audit.log"),
                  "--audit-log-mode", "blocking"]
    process = _start(state, "kube-apiserver", apiserver, die_with_parent=die_with_parent)
    _wait(state, "kube-apiserver", process,
          lambda: _https_ok(f"{server}/readyz", pki))

    kubeconfig = write_kubeconfig(state / "kubeconfig", server=server,
                                  ca_file=pki / "ca.crt", user="tuner-admin",
                                  cert=pki / "admin.crt", key=pki / "admin.key")
    started: dict[str, subprocess.Popen[bytes]] = {}
    for component, port, extra in (
            ("kube-controller-manager", cm_port, [
                "--service-account-private-key-file", str(pki / "sa.key"),
                "--root-ca-file", str(pki / "ca.crt"),
                "--use-service-account-credentials=true",
                "--cluster-signing-cert-file", str(pki / "ca.crt"),
                "--cluster-signing-key-file", str(pki / "ca.key")]),
            ("kube-scheduler", sched_port, [])):
        short = component.removeprefix("kube-")
        own = write_kubeconfig(state / f"{short}.kubeconfig", server=server,
                               ca_file=pki / "ca.crt", user=f"system:{component}",
                               cert=pki / f"{short}.crt", key=pki / f"{short}.key")
        argv = [str(bin_dir / component), "--kubeconfig", str(own),
                "--authentication-kubeconfig", str(own), "--authorization-kubeconfig",
                str(own), "--bind-address", "127.0.0.1", "--secure-port", str(port),
                "--leader-elect=false", *extra]
        process = _start(state, component, argv, die_with_parent=die_with_parent)
        _wait(state, component, process, lambda port=port: _healthz(port))
        started[component] = process

    cluster = Cluster(state, server, kubeconfig, pki / "ca.crt", etcd_url, bin_dir)
    (state / "cluster.json").write_text(json.dumps(
        {"server": server, "etcd_url": etcd_url, "bin_dir": str(bin_dir)}))
    _wait(state, "kube-controller-manager", started["kube-controller-manager"],
          lambda: _https_ok(f"{server}/api/v1/namespaces/default/serviceaccounts/default",
                            pki))
    return cluster


def read(state: Path) -> Cluster:
    """The cluster `up` started with state in `state`."""
    state = state.resolve()
    try:
        found = json.loads((state / "cluster.json").read_text())
    except OSError as exc:
        raise ClusterError(f"no cluster was started in {state}: {exc}") from exc
    return Cluster(state, found["server"], state / "kubeconfig", state / "pki" / "ca.crt",
                   found["etcd_url"], Path(found["bin_dir"]))


def _healthz(port: int) -> bool:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # its self-signed serving cert; /healthz is public
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=context,
                                    timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _pids(state: Path) -> list[dict[str, object]]:
    try:
        lines = (state / "pids").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def down(state: Path, *, timeout_s: float = 20.0) -> list[str]:
    """SIGTERM every process `up` started (newest first), SIGKILL what is left after
    `timeout_s`; return the names stopped."""
    state = state.resolve()
    entries = [e for e in reversed(_pids(state))
               if _is_running(int(e["pid"]), str(e["argv0"]))]  # type: ignore[call-overload]
    for entry in entries:
        os.kill(int(entry["pid"]), signal.SIGTERM)  # type: ignore[call-overload]
    deadline = time.monotonic() + timeout_s
    for entry in entries:
        pid, argv0 = int(entry["pid"]), str(entry["argv0"])  # type: ignore[call-overload]
        while _is_running(pid, argv0) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _is_running(pid, argv0):
            os.kill(pid, signal.SIGKILL)
    (state / "pids").unlink(missing_ok=True)
    for process in [p for p in _STARTED if p.pid in {int(e["pid"]) for e in entries}]:
        process.wait(timeout=5)
        _STARTED.remove(process)
    return [str(e["name"]) for e in entries]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, default=ROOT / ".cluster",
                        help="state directory (default: .cluster in the checkout)")
    parser.add_argument("--advertise-address", help="(tier 4, inside a network namespace) "
                        "the address pods reach the apiserver at")
    args = parser.parse_args()
    try:
        if args.action == "up":
            started = time.monotonic()
            cluster = up(args.dir, advertise_address=args.advertise_address)
            print(f"control plane up in {time.monotonic() - started:.1f} s: {cluster.server}"
                  f" (etcd {cluster.etcd_url}); logs in {cluster.dir / 'logs'}",
                  file=sys.stderr)
            print(f"  export KUBECONFIG={cluster.kubeconfig}", file=sys.stderr)
            print(cluster.kubeconfig)
        else:
            stopped = down(args.dir)
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}", file=sys.stderr)
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.action == "up":
            down(args.dir)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
