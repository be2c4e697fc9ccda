"""The burst bookkeeping (pure): every answer counted once, whatever the order, lateness or
duplication of reports; the next burst only once every expected process has reported."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tuner.analysis.stopping import StopRule
from tuner.load.conduct import (
    FIRST,
    SWEEP_GROUPS,
    BurstTally,
    Hub,
    NextBurst,
    Stop,
    fire_delay_s,
    gap_key,
    group_offset_s,
)

GAPS = [1.99, 2.0, 2.01]


@given(st.lists(st.tuples(st.integers(0, 4), st.sampled_from(["2xx", "502", "reset"])),
                max_size=60), st.data())
def test_every_answer_is_reported_exactly_once(answers: list[tuple[int, str]],
                                               data: st.DataObject) -> None:
    tally = BurstTally(GAPS)
    sent: list[dict[str, dict[str, int]]] = []
    index = 0
    tally.start(0, n_users=3)
    for burst, outcome in sorted(answers, key=lambda a: a[0]):
        while burst > index:  # the burst's deadline passes; the next one starts
            report = tally.report()
            if report:
                sent.append(report["counts"])
            index += 1
            tally.start(index, n_users=3)
        # some answers arrive late, for an earlier burst
        late = data.draw(st.booleans()) and index > 0
        report = tally.answered(index - 1 if late else index, 1.0, outcome)
        if report:
            sent.append(report["counts"])
            assert tally.report() is None  # once only
    sent.append(tally.flush()["counts"])
    total = sum(sum(counts.values()) for report in sent for counts in report.values())
    assert total == len(answers)


def test_gap_keys() -> None:
    assert gap_key(GAPS, 0) == FIRST
    assert [gap_key(GAPS, i) for i in (1, 2, 3, 4)] == ["1.990", "2.000", "2.010", "1.990"]


def test_hub_waits_for_every_expected_worker_and_ignores_duplicates() -> None:
    hub = Hub(GAPS, StopRule(unsafe_after_failures=3, safe_after_requests=0))
    hub.expect(0, frozenset({"w1", "w2"}))
    report = {"index": 0, "first_answer": 100.0, "counts": {FIRST: {"2xx": 15}}}
    assert hub.report("w1", report) is None
    assert hub.report("w1", {**report, "counts": {}}) is None  # a duplicate: no decision
    decision = hub.report("w2", {**report, "first_answer": 99.5})
    assert decision == NextBurst(1, 99.5 + GAPS[0])  # from the earliest first answer
    assert hub.total == {"2xx": 30}
    hub.expect(1, frozenset({"w1", "w2"}))
    hub.report("w1", {"index": 1, "first_answer": 102.0, "counts": {"1.990": {"502": 2}}})
    decision = hub.report("w2", {"index": 1, "first_answer": 102.0,
                                 "counts": {"1.990": {"502": 1, "2xx": 14}}})
    assert decision == Stop("unsafe") and hub.stop_reason == "unsafe"
    assert hub.results(mode="bursts", elapsed_s=3.0)["n_reused"] == 17


def test_hub_declares_safe_only_after_a_full_cycle() -> None:
    hub = Hub(GAPS, StopRule(unsafe_after_failures=3, safe_after_requests=30))
    decisions = []
    for index in range(5):
        key = gap_key(GAPS, index)
        decisions.append(hub.report("local", {"index": index, "first_answer": float(index),
                                              "counts": {key: {"2xx": 30}}}))
    # 30 reused requests after burst 1, but only after burst 3 has every gap been tried
    assert [isinstance(d, Stop) for d in decisions[:3]] == [False, False, False]
    assert decisions[3] == Stop("safe")


def test_hub_measures_the_spread_and_the_gap_error_over_every_process() -> None:
    hub = Hub(GAPS, StopRule(unsafe_after_failures=0, safe_after_requests=0))
    hub.expect(0, frozenset({"w1", "w2"}))
    hub.expect(1, frozenset({"w1", "w2"}))
    for sender, first, last in (("w1", 100.000, 100.002), ("w2", 100.001, 100.005)):
        hub.report(sender, {"index": 0, "first_answer": 100.010, "counts": {FIRST: {"2xx": 2}},
                            "groups": {"0": [first, last]}})
    planned = 100.010 + GAPS[0]
    for sender, first, last in (("w1", planned + 0.003, planned + 0.004),
                                ("w2", planned + 0.0015, planned + 0.009)):
        hub.report(sender, {"index": 1, "first_answer": planned + 0.02,
                            "counts": {"1.990": {"2xx": 2}}, "idle_ms": {"1990": 1, "1991": 1},
                            "groups": {"0": [first, last]}})
    results = hub.results(mode="bursts", elapsed_s=1.0)
    assert results["burst_spread_ms"] == [5.0, 7.5]  # across both workers, not per worker
    assert results["gap_error_ms"] == [1.5]
    assert results["idle_ms"] == {"1990": 2, "1991": 2}


def test_tally_reports_sent_times_and_idle_ages() -> None:
    tally = BurstTally(GAPS)
    tally.start(1, n_users=2)
    assert tally.answered(1, 5.0, "2xx", sent_at=3.001, idle_s=1.9904) is None
    report = tally.answered(1, 5.1, "502", sent_at=3.004, idle_s=1.9911)
    assert report is not None
    assert report["groups"] == {"0": [3.001, 3.004]}
    assert report["idle_ms"] == {"1990": 1, "1991": 1}


def test_groups_sweep_every_gap_in_every_burst() -> None:
    """Staggered bursts: group g waits gap g after the previous (tight) burst; tight bursts
    wait the largest gap after a staggered one, so the connections they reuse sat idle
    gap 0 .. gap max; each answer is keyed by the idle time of its own connection."""
    sweep = SWEEP_GROUPS
    assert [fire_delay_s(GAPS, 1, g, sweep=sweep) for g in range(3)] == GAPS
    assert [fire_delay_s(GAPS, 2, g, sweep=sweep) for g in range(3)] == [2.01] * 3
    assert [round(group_offset_s(GAPS, 3, g, sweep=sweep), 6) for g in range(3)] == [
        0.0, 0.01, 0.02]
    assert [gap_key(GAPS, 1, g, sweep=sweep) for g in range(3)] == ["1.990", "2.000", "2.010"]
    # group 0 answered first, so in the tight burst its connection sat the longest
    assert [gap_key(GAPS, 2, g, sweep=sweep) for g in range(3)] == ["2.010", "2.000", "1.990"]


def test_groups_hub_counts_a_cycle_per_burst_and_spread_within_a_group() -> None:
    hub = Hub(GAPS, StopRule(unsafe_after_failures=3, safe_after_requests=60),
              sweep=SWEEP_GROUPS)
    decision = hub.report("local", {"index": 0, "first_answer": 100.0,
                                    "counts": {FIRST: {"2xx": 30}},
                                    "groups": {str(g): [99.99, 99.991] for g in range(3)}})
    assert decision == NextBurst(1, 100.0 + GAPS[0])
    # the groups fire 10 ms apart as planned; each group is written within 1 ms
    groups = {str(g): [101.99 + 0.01 * g + 0.0005, 101.99 + 0.01 * g + 0.0015]
              for g in range(3)}
    decision = hub.report("local", {"index": 1, "first_answer": 102.0,
                                    "counts": {k: {"2xx": 10} for k in ("1.990", "2.000",
                                                                       "2.010")},
                                    "groups": groups})
    assert decision == NextBurst(2, 102.0 + GAPS[-1])
    assert hub.n_cycles == 1
    results = hub.results(mode="bursts", elapsed_s=3.0)
    assert max(results["burst_spread_ms"]) <= 1.0  # the 20 ms stagger is no spread
    assert results["gap_error_ms"] == [0.5, 0.5, 0.5]
    decision = hub.report("local", {"index": 2, "first_answer": 104.02,
                                    "counts": {k: {"2xx": 10} for k in ("1.990", "2.000",
                                                                       "2.010")},
                                    "groups": {str(g): [104.01, 104.011] for g in range(3)}})
    assert decision == Stop("safe") and hub.n_cycles == 2
