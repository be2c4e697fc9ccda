#!/usr/bin/env python3
"""Tier 4: a real Kubernetes node on this machine, inside a network namespace of its own:
containerd (Debian's 1.6), the kubelet and kube-proxy (v1.34.4, scripts/k8s-build), the CNI
bridge plugin, beside a control plane started in the same namespace.

    ip netns add tuner-node
    nsenter --net=/run/netns/tuner-node python3 scripts/cluster.py up --dir D \\
        --advertise-address 10.245.0.1
    nsenter --net=/run/netns/tuner-node python3 scripts/node.py up --cluster-dir D --dir N
    ...
    nsenter --net=/run/netns/tuner-node python3 scripts/node.py down --cluster-dir D --dir N

Design decision: everything with an address (the apiserver's advertised 10.245.0.1, the pod
range 10.244.0.0/24 on bridge cni0, the Service range 10.96.0.0/24 in kube-proxy's iptables
rules) lives in that namespace and in the pods' own namespaces that containerd makes;
`ip netns del` removes it. Nothing is routed off the machine: no default route, no NAT out.
Only `nsenter --net` is used (not `ip netns exec`, which remounts /sys and so hides the
cgroup mounts the kubelet needs). The images are podman's (scripts/image/build), imported
into containerd's k8s.io namespace under the names the manifests use; the sandbox ("pause")
image is catatonit in pause mode, made here.

Measured necessary here (Debian 12 kernel, cgroup v1, a sandbox without CAP_SYS_RESOURCE):
- containerd `restrict_oom_score_adj = true`: the kubelet asks -998 for sandboxes, the
  kernel refuses a negative oom_score_adj, runc fails "can't get final child's PID from pipe";
- kubelet `cgroupDriver: cgroupfs`, `cgroupsPerQOS: false`, `failSwapOn: false`; 1.34 still
  runs on cgroup v1 without `failCgroupV1: false`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cluster  # noqa: E402

NODE_IP = "10.245.0.1"
POD_CIDR = "10.244.0.0/24"
PAUSE_IMAGE = "localhost/tuner-pause:1"
#: local image -> the names manifests/ use (no registry: nothing is pulled)
IMAGES = {"localhost/tuner-base:bookworm": ["docker.io/library/node:20-slim",
                                           "docker.io/nginxinc/nginx-unprivileged:1.27"],
          "localhost/tuner:0.1.0": ["docker.io/library/tuner:0.1.0"],
          PAUSE_IMAGE: []}
CONTAINERS_CONF = Path(__file__).resolve().parent / "image" / "containers.conf"


def _run(*argv: str, stdin: bytes | None = None, check: bool = True) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, check=False, timeout=600,
                          env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)})
    if check and done.returncode != 0:
        raise cluster.ClusterError(f"{' '.join(argv[:3])} failed ({done.returncode}): "
                                   f"{done.stderr.decode(errors='replace').strip()[-1500:]}")
    return done.stdout.decode(errors="replace")


def _ctr(state: Path, *args: str, stdin: bytes | None = None, check: bool = True) -> str:
    return _run("ctr", "--address", str(state / "containerd.sock"), "-n", "k8s.io", *args,
                stdin=stdin, check=check)


def _write_configs(state: Path, info: cluster.Cluster) -> None:
    pki = info.dir / "pki"
    (state / "cni").mkdir(parents=True, exist_ok=True)
    (state / "results").mkdir(exist_ok=True)
    (state / "containerd.toml").write_text(f"""version = 2
root = "{state / 'containerd-root'}"
state = "{state / 'containerd-state'}"
[grpc]
  address = "{state / 'containerd.sock'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{state / 'cni'}"
""")
    (state / "cni" / "10-tuner.conflist").write_text(json.dumps({
        "cniVersion": "0.4.0", "name": "tuner", "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
             "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}}]}))
    (state / "kubelet.json").write_text(json.dumps({
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "cgroupDriver": "cgroupfs", "cgroupsPerQOS": False, "enforceNodeAllocatable": [],
        "failSwapOn": False, "address": NODE_IP, "port": 10250, "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
        "containerRuntimeEndpoint": f"unix://{state / 'containerd.sock'}",
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(pki / "ca.crt")}},
        "authorization": {"mode": "Webhook"},
        # a shared test machine's disk is not this node's to manage: no eviction, no GC
        "evictionHard": {"memory.available": "0%", "nodefs.available": "0%",
                         "imagefs.available": "0%"},
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "resolvConf": "/etc/resolv.conf", "localStorageCapacityIsolation": False}))
    for name, user in (("kubelet", f"system:node:{cluster.NODE_NAME}"),
                       ("kube-proxy", "system:kube-proxy")):
        cluster.write_kubeconfig(state / f"{name}.kubeconfig", server=info.server,
                                 ca_file=pki / "ca.crt", user=user,
                                 cert=pki / f"{name}.crt", key=pki / f"{name}.key")
    (state / "kube-proxy.json").write_text(json.dumps({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(state / "kube-proxy.kubeconfig")},
        "mode": "iptables", "clusterCIDR": POD_CIDR, "hostnameOverride": cluster.NODE_NAME,
        "bindAddress": NODE_IP, "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249", "nodePortAddresses": ["primary"],
        # conntrack's limits are the machine's, not this namespace's: leave them alone
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                      "tcpCloseWaitTimeout": "0s"}}))


def _pause_image(state: Path) -> None:
    """A sandbox image made here: catatonit (Debian's, static) in pause mode."""
    if subprocess.run(["podman", "image", "exists", PAUSE_IMAGE], check=False,
                      env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
                      ).returncode == 0:
        return
    context = state / "pause"
    context.mkdir(exist_ok=True)
    (context / "catatonit").write_bytes(Path("/usr/bin/catatonit").read_bytes())
    (context / "catatonit").chmod(0o755)
    (context / "Containerfile").write_text(
        'FROM scratch\nCOPY catatonit /pause\nENTRYPOINT ["/pause", "-P"]\n')
    _run("podman", "build", "--pull=never", "--network=none", "-t", PAUSE_IMAGE, str(context))


def _import_images(state: Path) -> None:
    present = set(_ctr(state, "images", "ls", "-q").split())
    for image, names in IMAGES.items():
        if image not in present:
            archive = subprocess.run(
                ["podman", "save", "--format", "docker-archive", image], capture_output=True,
                check=True, timeout=600,
                env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}).stdout
            _ctr(state, "images", "import", "-", stdin=archive)
        for name in names:
            if name not in present:
                _ctr(state, "images", "tag", image, name)


def up(state: Path, cluster_dir: Path) -> None:
    state = state.resolve()
    state.mkdir(parents=True, exist_ok=True)
    info = cluster.read(cluster_dir)
    _run("ip", "addr", "replace", f"{NODE_IP}/32", "dev", "lo")
    _run("ip", "link", "set", "lo", "up")
    for key in ("net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables"):
        _run("sysctl", "-q", "-w", f"{key}=1")
    _write_configs(state, info)
    _pause_image(state)
    bins = info.bin_dir
    containerd = cluster._start(state, "containerd",
                                ["containerd", "--config", str(state / "containerd.toml")],
                                die_with_parent=False)
    cluster._wait(state, "containerd", containerd,
                  lambda: (state / "containerd.sock").exists() and not
                  subprocess.run(["ctr", "--address", str(state / "containerd.sock"),
                                  "version"], capture_output=True, check=False).returncode)
    started = time.monotonic()
    _import_images(state)
    print(f"node: images imported into containerd in {time.monotonic() - started:.1f} s",
          file=sys.stderr)
    kubelet = cluster._start(state, "kubelet", [
        str(bins / "kubelet"), "--config", str(state / "kubelet.json"),
        "--kubeconfig", str(state / "kubelet.kubeconfig"),
        "--hostname-override", cluster.NODE_NAME, "--node-ip", NODE_IP,
        "--root-dir", str(state / "kubelet-root")], die_with_parent=False)
    proxy = cluster._start(state, "kube-proxy", [
        str(bins / "kube-proxy"), "--config", str(state / "kube-proxy.json")],
        die_with_parent=False)
    kubectl = [str(bins / "kubectl"), "--kubeconfig", str(info.kubeconfig)]

    def node_ready() -> bool:
        done = subprocess.run([*kubectl, "get", "node", cluster.NODE_NAME, "-o",
                               "jsonpath={.status.conditions[?(@.type=='Ready')].status}"],
                              capture_output=True, text=True, check=False)
        return done.stdout.strip() == "True"
    cluster._wait(state, "kubelet", kubelet, node_ready)
    cluster._wait(state, "kube-proxy", proxy, lambda: cluster._http_ok(
        "http://127.0.0.1:10256/healthz"))


def down(state: Path) -> list[str]:
    """Stop every pod's containers (the kubelet would leave them running), then the node's
    processes."""
    state = state.resolve()
    own_netns: set[str] = set()  # the pods' network namespaces, made by containerd's CNI
    if (state / "containerd.sock").exists():
        for container in _ctr(state, "containers", "ls", "-q", check=False).split():
            try:
                info = json.loads(_ctr(state, "containers", "info", container, check=False))
            except ValueError:
                continue
            for namespace in (info.get("Spec") or {}).get("linux", {}).get("namespaces", []):
                if namespace.get("type") == "network" and namespace.get("path"):
                    own_netns.add(Path(namespace["path"]).name)
        for task in _ctr(state, "tasks", "ls", "-q", check=False).split():
            _ctr(state, "tasks", "kill", "-s", "SIGKILL", task, check=False)
        deadline = time.monotonic() + 10
        while _ctr(state, "tasks", "ls", "-q", check=False).split() and \
                time.monotonic() < deadline:
            for task in _ctr(state, "tasks", "ls", "-q", check=False).split():
                _ctr(state, "tasks", "delete", task, check=False)
            time.sleep(0.2)
        for container in _ctr(state, "containers", "ls", "-q", check=False).split():
            _ctr(state, "containers", "rm", container, check=False)
    stopped = cluster.down(state)
    # the kubelet bind-mounts its root directory (and the pods' volumes) under the state
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if line.split()[4].startswith(f"{state}/")]
    for mountpoint in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mountpoint], check=False)
    # this node's pods' network namespaces only: other nodes may run beside it
    for netns in sorted(own_netns):
        if netns.startswith("cni-") and (Path("/run/netns") / netns).exists():
            subprocess.run(["ip", "netns", "del", netns], check=False)
    return stopped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, required=True, help="the node's state")
    parser.add_argument("--cluster-dir", type=Path, required=True,
                        help="the control plane's state (scripts/cluster.py --dir)")
    args = parser.parse_args()
    try:
        if args.action == "up":
            started = time.monotonic()
            up(args.dir, args.cluster_dir)
            print(f"node {cluster.NODE_NAME} Ready in {time.monotonic() - started:.1f} s",
                  file=sys.stderr)
        else:
            print(f"stopped: {', '.join(down(args.dir)) or 'nothing'}", file=sys.stderr)
    except cluster.ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.action == "up":
            down(args.dir)
        return 1
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
