"""The end-to-end tiers (`make e2e`): the image built with podman from a local Debian base,
and the demo pod run from it. Slower than `make test`, and they need root."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import kube  # noqa: F401  (the real control plane, session-scoped)

ROOT = Path(__file__).resolve().parent.parent
CONTAINERS_CONF = ROOT / "scripts" / "image" / "containers.conf"


def podman(*args: str, check: bool = True, timeout_s: float = 300
           ) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, check=False,
                          timeout=timeout_s,
                          env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)})
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({done.returncode}): "
                             f"{done.stderr.strip()[-3000:]}")
    return done


@pytest.fixture(scope="session")
def tuner_image() -> str:
    """scripts/image/build: the tuner image (and the Debian base the demo's app and nginx
    run), built once per machine; later runs reuse podman's layers."""
    done = subprocess.run([str(ROOT / "scripts" / "image" / "build")], capture_output=True,
                          text=True, timeout=1800, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    print("\n" + done.stderr.strip().splitlines()[-1])  # the image's size and build time
    return done.stdout.strip().splitlines()[-1]
