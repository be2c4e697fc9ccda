"""Text for people: the tables and sentences the CLI prints (pure)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tuner.durations import format_seconds

if TYPE_CHECKING:
    from tuner.analysis.verdict import Verdict
    from tuner.probe import ProbeResult


def render_probe(result: ProbeResult, verdict: Verdict | None) -> str:
    advertised = (f"Keep-Alive: timeout={result.advertised_s:g}" if result.advertised_s
                  is not None else "nothing (no Keep-Alive timeout header)")
    lines = [f"  advertised  {advertised}"]
    closes = result.closes_s
    if not result.keeps_alive:
        lines.append("  measured    no keep-alive: the server closes every connection after "
                     "its response")
    if closes:
        spread = (f"{closes[0]:.3f} s min / {statistics.median(closes):.3f} s median / "
                  f"{closes[-1]:.3f} s max")
        lines.append(f"  measured    idle close after {spread}  "
                     f"({result.close_kind.upper()}, {len(closes)} of {len(result.samples)} "
                     "connections)")
    if result.closes_on_next_request:
        lines.append(f"  measured    connections stayed open {format_seconds(result.max_idle_s)}"
                     " but a request sent on them then was DROPPED: the server closes only "
                     "when the next request arrives")
    elif not closes and result.keeps_alive:
        lines.append(f"  measured    never closed: connections stayed open and served after "
                     f"{format_seconds(result.max_idle_s)} idle (--max-idle)")
    if result.window is not None:
        lines.append(f"  window      {result.window.note}"
                     + (f" (reused after {result.window.reused_at_idle_s:.3f} s idle)"
                        if result.window.reused_at_idle_s is not None else ""))
    if result.effective_close_s is not None and result.effective_close_s != result.idle_close_s:
        lines.append(f"  plan with   {result.effective_close_s:.3f} s")
    if verdict is not None:
        lines.append(f"  verdict     {verdict.status.upper()}: {verdict.message}")
    lines.append(f"  took        {result.elapsed_s:.1f} s")
    return "\n".join(lines)


def render_trials(trials: Sequence[Mapping[str, Any]]) -> str:
    """The table of an experiment's trials, sorted by cell."""
    header = (f"{'proxy idle':>10}  {'upstream idle':>13}  {'closes at':>9}  {'requests':>8}  "
              f"{'502':>4}  {'failed':>6}  {'log races':>9}  verdict")
    rows = [header]
    for t in sorted(trials, key=lambda t: (t["proxy_idle_s"], t["upstream_idle_s"],
                                           t.get("repeat", 0))):
        close = t.get("upstream_close_s")
        verdict = t["verdict"].upper() if t["verdict"] == "unsafe" else t["verdict"]
        if t["verdict"] == "invalid":
            verdict += f" ({t.get('invalid_reason')})"
        rows.append(
            f"{format_seconds(t['proxy_idle_s']):>10}  {format_seconds(t['upstream_idle_s']):>13}"
            f"  {f'{close:.3f}s' if close is not None else '-':>9}  {t.get('n_requests', 0):>8}"
            f"  {t.get('n_502', 0):>4}  {t.get('n_failed', 0):>6}  "
            f"{t.get('n_proxy_log_races', 0):>9}  {verdict}")
    return "\n".join(rows)
