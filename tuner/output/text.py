"""Text for people: the tables and sentences the CLI prints (pure)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tuner.durations import format_seconds

if TYPE_CHECKING:
    from tuner.analysis.verdict import Verdict
    from tuner.findings import Findings
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
    rule = result.rule
    if rule is not None and rule.closes_by_sweep:
        every = (f"every {rule.sweep_period_s:.2f} s" if rule.sweep_period_s is not None
                 else "its period not seen (one sweep within --max-idle)")
        survivor = (f"a sweep left one idle {rule.oldest_survivor_s:.3f} s open"
                    if rule.oldest_survivor_s is not None else "no sweep left one open")
        lines.append(f"  sweep       the server closes idle connections by a SWEEP, {every}: "
                     f"connections answered at {result.n_staggered} staggered instants closed "
                     f"together; the youngest closed after {rule.youngest_close_s or 0:.3f} s "
                     f"idle, {survivor}. Any connection idle past that may go at the next "
                     "sweep, whatever the samples' own close")
    elif rule is not None and result.n_staggered:
        lines.append(f"  timer       {result.n_staggered} connections answered at staggered "
                     "instants each closed at its own idle age: a timer per connection, no "
                     "sweep")
    if result.earliest_close_s is not None and result.earliest_close_s != result.idle_close_s:
        lines.append(f"  plan with   {result.earliest_close_s:.3f} s (the earliest idle age at "
                     "which it may close a connection)")
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
    sent within 2 ms of the measured close; "race fail": the client's race failures (502
    behind nginx and HAProxy, 503 "UC" behind Envoy); "proxy saw": the races the proxy
    counted (its error log, or Envoy's admin stats), hidden retries included."""
    header = (f"{'proxy idle':>10}  {'keeps':>7}  {'upstream idle':>13}  {'closes at':>9}  "
              f"{'margin':>7}  {'requests':>8}  {'race fail':>9}  {'failed':>6}  {'proxy saw':>9}  "
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
            f"  {t.n_race_failures:>9}  {t.n_failed:>6}  {t.n_proxy_log_races:>9}  {spread:>8}"
            f"  {in_window:>9}  {verdict}")
        reason = t.invalid_reason if t.verdict == "invalid" else t.verdict_text
        if reason:
            why.append(f"  {'control' if t.control else format_seconds(t.proxy_idle_s)} / "
                       f"{format_seconds(t.upstream_idle_s)}: {reason}")
    return "\n".join(rows + (["", *why] if why else []))


def render_answer(findings: Findings) -> list[str]:
    """The first screen: what to set on each side, in its own syntax, and why to trust it."""
    rec = findings.primary
    lines = []
    settings = findings.settings()
    if settings:
        lines.append("set (either side is enough; both gives the margin twice):")
        lines += [f"  {key.removesuffix('-snippet'):<10} {value}"
                  for key, value in settings.items()]
    else:
        lines.append(f"NO RECOMMENDATION ({rec.status}): {rec.more_load}")
    if rec.evidence is not None:
        lines.append(f"evidence: {rec.evidence.text}")
    if rec.bound_note:
        lines.append(f"note: {rec.bound_note}")
    lines.append(f"control: {findings.control.text}")
    n_left_out = sum(len(r.left_out) for r in findings.recommendations)
    if n_left_out:
        lines.append(f"left out: {n_left_out} of {len(findings.trials)} trials, which no "
                     "recommendation rests on (each with its reason below)")
    return lines


def render_findings(findings: Findings) -> str:
    spec = findings.spec
    lines = [f"experiment {findings.experiment_id}: {spec.proxy} -> {findings.upstream}", "",
             *render_answer(findings)]
    for rec in findings.recommendations:
        lines.append(f"\nupstream idle setting {format_seconds(rec.upstream_idle_setting_s)}")
        if rec.upstream_close_s is not None:
            lines.append(f"  measured close    {rec.upstream_close_s:.3f} s (setting "
                         f"{'+' if (rec.upstream_close_offset_s or 0) >= 0 else ''}"
                         f"{rec.upstream_close_offset_s or 0:.2f} s)")
        if rec.proxy_lifetime_ratio > 1.01:
            lines.append(f"  proxy keeps       idle connections up to "
                         f"{rec.proxy_lifetime_ratio:.2f}x its setting (measured)")
        if rec.status == "ok" and rec.proxy_idle_s is not None:
            lines.append(f"  recommend         proxy idle timeout at most "
                         f"{format_seconds(rec.proxy_idle_s)} (margin "
                         f"{format_seconds(rec.margin_s)})")
        if rec.upstream_idle_s is not None:
            lines.append(f"  or, for the proxy's {format_seconds(rec.configured_proxy_idle_s)}: "
                         f"upstream idle setting at least {format_seconds(rec.upstream_idle_s)}")
        if rec.evidence is not None:
            lines.append(f"  evidence          {rec.evidence.text}")
        for bad in rec.unsafe:
            if "by_margin" in bad:
                lines.append(f"  unsafe            proxy idle "
                             f"{format_seconds(bad['proxy_idle_s'])}: {bad['by_margin']}")
                continue
            hidden = (f", {bad['n_hidden']} of them hidden from the client by the proxy's "
                      "retries" if bad["n_hidden"] else "")
            lines.append(f"  unsafe            proxy idle {format_seconds(bad['proxy_idle_s'])}: "
                         f"{bad['n_race']} races in {bad['n_reused']} reused requests "
                         f"({bad['rate']:.1%}, 95 % CI {bad['rate_low']:.1%}-"
                         f"{bad['rate_high']:.1%}){hidden}")
        if rec.n_hidden_races:
            lines.append(f"  hidden races      {rec.n_hidden_races} races the proxy retried on a "
                         "fresh connection: the client saw a success, at the cost of a second "
                         "round trip and a replayed request; a POST or PATCH there fails")
        for block in rec.model:
            lines.append(f"  model             margin {block.margin_low_s:+.2f}.."
                         f"{block.margin_high_s:+.2f} s: {block.rate:.1%} "
                         f"[{block.rate_low:.1%}-{block.rate_high:.1%}] in {block.n_reused}")
        if rec.gaps:
            hits = [g for g in rec.gaps if g.n_race]
            lines.append("  failing gaps      " + (", ".join(
                f"close{g.offset_ms:+d} ms: {g.n_race}/{g.n_requests}" for g in hits)
                if hits else "none"))
        for cause in rec.other_causes:
            lines.append(f"  other cause       {cause}")
        for trial in rec.left_out:
            lines.append(f"  left out          proxy idle {format_seconds(trial['proxy_idle_s'])}"
                         f" (repeat {trial['repeat'] + 1}): {trial['reason']}")
        if rec.status != "ok":
            lines.append(f"  {rec.status.upper():<17} {rec.more_load}")
    lines.append("\nmasks, not fixes:")
    for alt in findings.primary.alternatives:
        lines.append(f"  {alt['proxy']}: {alt['setting']}  ({alt['effect']})")
    return "\n".join(lines)
