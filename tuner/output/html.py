"""`tuner report`: one self-contained HTML file from an experiment's findings.

Design decision: figures are drawn with matplotlib (Agg, no display) and embedded as inline
SVG, so the file has no external reference at all: it can be attached to a ticket or
opened offline. Everything shown comes from the store and the pure analysis; nothing is
measured here.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tuner.analysis.recommend import Recommendation
from tuner.durations import format_seconds
from tuner.findings import Findings
from tuner.output.text import render_answer, render_findings
from tuner.trial import Trial

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
table { border-collapse: collapse; font-size: 0.85em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #eee; } .unsafe { color: #b00; font-weight: bold; } .safe { color: #070; }
.figure svg { max-width: 100%; height: auto; }
"""


def _svg(figure: Any) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog: inline in HTML


def _pooled_rates(trials: Sequence[Trial]) -> dict[tuple[float, float], tuple[int, int]]:
    cells: dict[tuple[float, float], tuple[int, int]] = {}
    for t in trials:
        if t.verdict == "invalid" or t.control:
            continue
        k, n = cells.get((t.proxy_idle_s, t.upstream_idle_s), (0, 0))
        cells[(t.proxy_idle_s, t.upstream_idle_s)] = (k + t.n_race, n + t.n_reused)
    return cells


def heatmap_svg(trials: Sequence[Trial]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = _pooled_rates(trials)
    proxies = sorted({p for p, _ in cells})
    upstreams = sorted({u for _, u in cells})
    grid = np.full((len(upstreams), len(proxies)), np.nan)
    figure, axes = plt.subplots(figsize=(1.6 + 1.3 * len(proxies), 1.2 + 0.9 * len(upstreams)))
    for (p, u), (k, n) in cells.items():
        grid[upstreams.index(u), proxies.index(p)] = k / n if n else np.nan
    top = max(0.05, float(np.nanmax(grid)) if np.isfinite(grid).any() else 0.0)
    for (p, u), (k, n) in cells.items():
        dark = n > 0 and k / n > top / 2  # white text on the dark cells
        axes.text(proxies.index(p), upstreams.index(u), f"{k}/{n}", ha="center", va="center",
                  fontsize=9, color="white" if dark else "black")
    image = axes.imshow(grid, cmap="Reds", vmin=0, vmax=top, origin="lower", aspect="auto")
    axes.set_xticks(range(len(proxies)), [format_seconds(p) for p in proxies])
    axes.set_yticks(range(len(upstreams)), [format_seconds(u) for u in upstreams])
    axes.set_xlabel("proxy idle timeout")
    axes.set_ylabel("upstream idle setting")
    figure.colorbar(image, ax=axes, label="race failures / reused requests")
    svg = _svg(figure)
    plt.close(figure)
    return svg


def margin_svg(trials: Sequence[Trial], rec: Recommendation) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tuner.analysis.intervals import clopper_pearson

    figure, axes = plt.subplots(figsize=(7, 3.6))
    points = [t for t in trials if t.margin_s is not None and t.n_reused and t.verdict != "invalid"]
    for t in points:
        assert t.margin_s is not None
        rate = t.n_race / t.n_reused
        low, high = clopper_pearson(t.n_race, t.n_reused)
        axes.errorbar(t.margin_s, rate, yerr=[[rate - low], [high - rate]], fmt="o",
                      color="#b00" if t.n_race else "#070", capsize=3)
    for block in rec.model:
        axes.hlines(block.rate, block.margin_low_s - 0.1, block.margin_high_s + 0.1,
                    color="#333", linewidth=2)
    axes.axvline(rec.margin_s, color="#888", linestyle="--", label="required margin")
    axes.axvline(0, color="#bbb", linestyle=":")
    axes.set_xlabel("margin: upstream's real close - proxy idle timeout (s)")
    axes.set_ylabel("race failure rate")
    axes.legend(loc="upper right")
    svg = _svg(figure)
    plt.close(figure)
    return svg


def gaps_svg(rec: Recommendation) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3))
    offsets = [g.offset_ms for g in rec.gaps]
    rates = [g.n_race / g.n_requests if g.n_requests else 0.0 for g in rec.gaps]
    axes.bar(offsets, rates, width=2.0, color="#b00")
    axes.set_xlabel("idle gap before the burst, relative to the measured close (ms)")
    axes.set_ylabel("race failure rate")
    svg = _svg(figure)
    plt.close(figure)
    return svg


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _trial_table(trials: Sequence[Trial]) -> str:
    head = ("<tr><th>proxy idle</th><th>proxy keeps</th><th>upstream idle</th>"
            "<th>advertised</th><th>measured close</th><th>close</th><th>margin</th>"
            "<th>requests</th><th>race failures (client)</th><th>failed</th>"
            "<th>races the proxy saw</th>"
            "<th>burst spread median / p95</th><th>gap error p95</th><th>in window</th>"
            "<th>verdict</th></tr>")
    rows = []
    for t in sorted(trials, key=lambda t: (not t.control, t.proxy_idle_s, t.upstream_idle_s,
                                           t.repeat)):
        why = t.invalid_reason if t.verdict == "invalid" else t.verdict_text
        verdict = html.escape(t.verdict + (" (control)" if t.control else "")
                              + (f": {why}" if why else ""))
        rows.append(
            f"<tr><td>{format_seconds(t.proxy_idle_s)}</td>"
            f"<td>{_cell(t.proxy_lifetime_s, '.3f')} s</td>"
            f"<td>{format_seconds(t.upstream_idle_s)}</td>"
            f"<td>{_cell(t.upstream_advertised_s, 'g')} s</td>"
            f"<td>{_cell(t.upstream_close_s, '.3f')} s</td>"
            f"<td>{html.escape(str(t.close_kind or '-'))}</td>"
            f"<td>{_cell(t.margin_s, '+.2f')} s</td>"
            f"<td>{t.n_requests}</td><td>{t.n_race_failures}</td>"
            f"<td>{t.n_failed}</td><td>{t.n_proxy_log_races}</td>"
            f"<td>{_cell(t.burst_spread_ms_median, '.1f')} / "
            f"{_cell(t.burst_spread_ms_p95, '.1f')} ms</td>"
            f"<td>{_cell(t.gap_error_ms_p95, '.1f')} ms</td>"
            f"<td>{_cell(t.n_in_window, 'd')}</td>"
            f"<td class=\"{html.escape(t.verdict)}\" style=\"text-align:left\">{verdict}</td>"
            "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def render_html(findings: Findings) -> str:
    trials, versions, host = findings.trials, findings.versions, findings.host
    primary = findings.primary
    here = [t for t in trials if abs(t.upstream_idle_s - primary.upstream_idle_setting_s) < 1e-9
            and not t.control]
    spec = findings.spec
    title = f"Keep-alive experiment {findings.experiment_id}: {spec.proxy} -> {findings.upstream}"
    versions_text = ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
    gaps = (f"<div class=\"figure\">{gaps_svg(primary)}</div>" if primary.gaps
            else "<p>No trial failed: no gap to show.</p>")
    answer = "\n".join(render_answer(findings))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<h2 id="answer">What to set</h2>
<pre class="answer">{html.escape(answer)}</pre>
<h2>Trials, measured</h2>
{_trial_table(trials)}
<h2>Race failure rate by proxy idle x upstream idle</h2>
<div class="figure">{heatmap_svg(trials)}</div>
<h2>Failure rate against the margin (upstream idle setting
{html.escape(format_seconds(primary.upstream_idle_setting_s))})</h2>
<p>Dots: trials with exact 95 % intervals; bars: the monotone fit. The margin is the
upstream's measured close minus what the proxy really keeps (its measured idle lifetime).</p>
<div class="figure">{margin_svg(here, primary)}</div>
<h2>Which idle gaps produced the failures</h2>
{gaps}
<h2>The whole recommendation</h2>
<pre>{html.escape(render_findings(findings))}</pre>
<p>Host {html.escape(host)}; {html.escape(versions_text)}.</p>
</body></html>
"""


def write_report(findings: Findings, path: Path) -> None:
    text = render_html(findings)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)
