"""`tuner report`: a self-contained HTML file that really renders (headless Chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from matplotlib import image

from .test_recommend import _store

TUNER = [sys.executable, "-m", "tuner.cli"]


def test_report_is_self_contained_and_renders(tmp_path: Path) -> None:
    db = _store(tmp_path)
    out = tmp_path / "report.html"
    result = subprocess.run([*TUNER, "report", str(db), "-o", str(out)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    for heading in ("What to set", "Trials, measured",
                    "Race failure rate by proxy idle x upstream idle",
                    "Failure rate against the margin", "Which idle gaps produced the failures",
                    "The whole recommendation"):
        assert heading in text
    # the first screen answers: what to set on each side, in its own syntax, the evidence
    # and the control, before any figure
    answer = text[text.index("What to set"):text.index("Trials, measured")]
    assert "keepalive_timeout 1000ms;" in answer and "server.keepAliveTimeout = " in answer
    assert "evidence: no race in" in answer and "control:" in answer
    assert text.count("<svg") == 3
    # nothing to fetch: every reference is internal to the file or inline data
    references = re.findall(r'(?:href|src)="([^"]*)"', text)
    assert references and all(ref.startswith(("#", "data:")) for ref in references)
    assert "proxy idle timeout at most 1s" in text

    chromium = shutil.which("chromium")
    assert chromium, "chromium is needed for this test: `scripts/setup test` installs it"
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2400",
                    f"--screenshot={shot}", out.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2400, 1200)
    not_white = (pixels < 0.95).any(axis=2).mean()
    assert not_white > 0.03, f"the page looks blank ({not_white:.1%} ink)"
    # the heatmap's and the gap chart's reds (#b00 bars, the Reds colormap) were drawn
    red = (pixels[..., 0] > 0.55) & (pixels[..., 1] < 0.2) & (pixels[..., 2] < 0.2)
    assert int(np.count_nonzero(red)) > 2000
