"""Text for people: the tables and sentences the CLI prints (pure)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tuner.durations import format_seconds

if TYPE_CHECKING:
    from tuner.analysis.verdict import Verdict
    from tuner.probe import ProbeResult
    from tuner.trial import Trial


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


def _seconds_or_dash(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else f"{value:{fmt}}s"


def render_trials(trials: Sequence[Trial]) -> str:
    """The table of an experiment's trials (the control first, then by cell), and under it
    each verdict in words. "keeps": the proxy's measured idle lifetime; "spread": how long
    the load took to write a burst, median/p95 over bursts; "in window": reused requests
    sent within 2 ms of the measured close."""
    header = (f"{'proxy idle':>10}  {'keeps':>7}  {'upstream idle':>13}  {'closes at':>9}  "
              f"{'margin':>7}  {'requests':>8}  {'502':>4}  {'failed':>6}  {'log races':>9}  "
              f"{'spread':>8}  {'in window':>9}  verdict")
    rows = [header]
    why = []
    ordered = sorted(trials, key=lambda t: (not t.control, t.proxy_idle_s, t.upstream_idle_s,
                                            t.repeat))
    for t in ordered:
        verdict = t.verdict.upper() if t.verdict == "unsafe" else t.verdict
        if t.control:
            verdict += " (control)"
        spread = ("-" if t.burst_spread_ms_median is None or t.burst_spread_ms_p95 is None
                  else f"{t.burst_spread_ms_median:.0f}/{t.burst_spread_ms_p95:.0f}ms")
        margin = "-" if t.margin_s is None else f"{t.margin_s:+.2f}s"
        in_window = "-" if t.n_in_window is None else str(t.n_in_window)
        rows.append(
            f"{format_seconds(t.proxy_idle_s):>10}  {_seconds_or_dash(t.proxy_lifetime_s):>7}"
            f"  {format_seconds(t.upstream_idle_s):>13}"
            f"  {_seconds_or_dash(t.upstream_close_s):>9}  {margin:>7}  {t.n_requests:>8}"
            f"  {t.n_502:>4}  {t.n_failed:>6}  {t.n_proxy_log_races:>9}  {spread:>8}"
            f"  {in_window:>9}  {verdict}")
        reason = t.invalid_reason if t.verdict == "invalid" else t.verdict_text
        if reason:
            why.append(f"  {'control' if t.control else format_seconds(t.proxy_idle_s)} / "
                       f"{format_seconds(t.upstream_idle_s)}: {reason}")
    return "\n".join(rows + (["", *why] if why else []))
