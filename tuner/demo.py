"""`make demo`: the race on the local lab, shown and then fixed.

nginx keeps idle upstream connections for 60 s (its usual production value) in front of a
Node server with keepAliveTimeout 1000 ms. The demo measures when Node really closes an idle
connection, hunts the race with synchronized bursts of POSTs whose idle gaps straddle that
time, then reloads nginx with an idle timeout safely below it and sends the same load again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from tuner.analysis.outcomes import OutcomeCounts
from tuner.analysis.signatures import count_nginx_signatures, is_nginx_race_line, n_races
from tuner.analysis.verdict import judge, largest_safe_proxy_idle_s
from tuner.durations import format_seconds
from tuner.errors import ProbeError
from tuner.lab import Lab, get_upstream
from tuner.load.bursts import BurstPlan, run_bursts, straddling_gaps
from tuner.probe import parse_target, probe

UPSTREAM_IDLE_S = 1.0
UNSAFE_PROXY_IDLE_S = 60.0
#: The window in which a reused connection meets the upstream's close is a few ms wide on
#: loopback (measured: failures at gaps of close-6 ms .. close+6 ms), so the gaps sweep
#: +-10 ms around the measured close in 2 ms steps.
GAP_HALF_WIDTH_S = 0.010
N_GAP_STEPS = 11


@dataclass(frozen=True)
class DemoRun:
    proxy_idle_s: float
    n_requests: int
    n_502: int
    n_failed: int
    n_proxy_log_races: int
    outcomes: dict[str, int]
    log_signatures: dict[str, int]
    sample_log_line: str | None
    #: the rule's verdict on this setting ("safe" or "unsafe"), and why
    verdict: str
    verdict_message: str


@dataclass(frozen=True)
class DemoResult:
    proxy: str
    proxy_version: str
    upstream: str
    upstream_idle_s: float
    upstream_advertised_s: float | None
    upstream_close_s: float
    runs: list[DemoRun]

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def run_demo(*, n_bursts: int = 12, burst_size: int = 30,
             say: Callable[[str], None] = print) -> DemoResult:
    with Lab(proxy="nginx", upstream=get_upstream("node"), proxy_idle_s=UNSAFE_PROXY_IDLE_S,
             upstream_idle_s=UPSTREAM_IDLE_S) as lab:
        assert lab.proxy is not None and lab.upstream is not None
        info = lab.info()
        say(f"lab: nginx {info.proxy_version} on {info.proxy_url} -> Node on "
            f"{info.upstream_url} (keepAliveTimeout {int(UPSTREAM_IDLE_S * 1000)} ms)")
        say("measuring when Node really closes an idle connection ...")
        measured = probe(parse_target(f"{lab.upstream.url}/"), n_samples=3, max_idle_s=30)
        if measured.effective_close_s is None:
            raise ProbeError("Node kept idle connections open for 30 s; expected ~2 s")
        close_s = measured.effective_close_s
        advertised_s = measured.advertised_s
        said = ("nothing" if advertised_s is None
                else f"Keep-Alive: timeout={advertised_s:g}")
        say(f"  Node advertises {said} and really closes after {close_s:.3f} s")
        runs = []
        safe_s = largest_safe_proxy_idle_s(close_s)
        if safe_s is None:
            raise ProbeError(f"Node closed idle connections after {close_s:.3f} s, too soon "
                             "for any safe proxy idle timeout; expected about 2 s")
        for proxy_idle_s in (UNSAFE_PROXY_IDLE_S, safe_s):
            if proxy_idle_s != lab.proxy.proxy_idle_s:
                say(f"reloading nginx with upstream keepalive_timeout "
                    f"{format_seconds(proxy_idle_s)} ...")
                lab.set_proxy_idle(proxy_idle_s)
            verdict = judge(proxy_idle_s=proxy_idle_s, upstream_close_s=close_s,
                            max_idle_s=UNSAFE_PROXY_IDLE_S)
            say(f"nginx keepalive_timeout {format_seconds(proxy_idle_s)} ({verdict.status} "
                f"against Node's {close_s:.2f} s): {n_bursts} bursts of {burst_size} POSTs, "
                "idle gaps "
                f"{close_s - GAP_HALF_WIDTH_S:.3f}-{close_s + GAP_HALF_WIDTH_S:.3f} s")
            mark = lab.proxy.error_log.mark()
            plan = BurstPlan(url=f"{lab.proxy.url}/orders", burst_size=burst_size,
                             n_bursts=n_bursts, max_seconds=n_bursts * (close_s + 1) + 10,
                             gaps_s=straddling_gaps(close_s, below_s=GAP_HALF_WIDTH_S,
                                                    above_s=GAP_HALF_WIDTH_S,
                                                    n_steps=N_GAP_STEPS))

            def progress(i: int, counts: OutcomeCounts, n: int = n_bursts) -> None:
                say(f"  burst {i:2d}/{n}: {counts.n_requests:4d} requests, "
                    f"{counts.n_502} x 502, {counts.n_failed} failed")

            report = run_bursts(plan, on_burst=progress)
            lines = lab.proxy.error_log.lines_since(mark)
            signatures = count_nginx_signatures(lines)
            race_lines = [line for line in lines if is_nginx_race_line(line)]
            runs.append(DemoRun(
                proxy_idle_s=proxy_idle_s, n_requests=report.counts.n_requests,
                n_502=report.counts.n_502, n_failed=report.counts.n_failed,
                n_proxy_log_races=n_races(signatures),
                outcomes={k: v for k, v in report.counts.as_dict().items() if v},
                log_signatures=dict(signatures),
                sample_log_line=race_lines[0] if race_lines else None,
                verdict=verdict.status, verdict_message=verdict.message))
        return DemoResult(proxy="nginx", proxy_version=info.proxy_version, upstream="node",
                          upstream_idle_s=UPSTREAM_IDLE_S, upstream_advertised_s=advertised_s,
                          upstream_close_s=close_s, runs=runs)
