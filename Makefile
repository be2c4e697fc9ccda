# The two commands of the README. Each installs what is missing first (scripts/setup).
.PHONY: demo test lint setup setup-test k8s-binaries foreign-servers cluster cluster-down image e2e

setup:
	@./scripts/setup

setup-test:
	@./scripts/setup test

demo: setup
	.venv/bin/tuner demo

# The kube tests run against a real control plane: its binaries are built (once per machine,
# tens of minutes cold) before pytest, whose per-test timeout a build would not fit.
test: setup-test lint k8s-binaries foreign-servers
	.venv/bin/pytest -m "not slow"

lint: setup
	.venv/bin/ruff check tuner tests bench locustfiles
	.venv/bin/mypy

# A real Kubernetes v1.34.4 control plane on 127.0.0.1 (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler), built once per machine from the official Go
# modules into ~/.cache/tuner (or taken from $KUBEBUILDER_ASSETS). Prints the kubeconfig.
k8s-binaries:
	@ONLY=control-plane ./scripts/k8s-build/build >/dev/null

# Real foreign upstreams for tests/test_foreign_servers.py: embedded Tomcat 11 (Maven, ~/.m2)
# and Go net/http, built once per version of scripts/foreign into ~/.cache/tuner/foreign.
foreign-servers:
	@./scripts/foreign/build >/dev/null

cluster:
	@python3 scripts/cluster.py up

cluster-down:
	@python3 scripts/cluster.py down

# Tier 3: the tuner image, built with podman from a local Debian base (no registry); then
# the end-to-end tests (e2e/): the demo pod from those images (root needed). First the
# tests marked slow (tests/, 40 s or more each: whole grids, kill -9 and resume, the cluster
# loops), which `make test` leaves out.
image:
	@./scripts/image/build

# Tier 4 (e2e/test_node.py) also needs the node's binaries: kubelet and kube-proxy.
e2e: setup-test image
	@./scripts/k8s-build/build >/dev/null
	.venv/bin/pytest -m slow
	.venv/bin/pytest e2e
