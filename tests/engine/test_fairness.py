"""Agent Fair Share: slowdown over task completions drives deadlines and protection."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler_service.domain import TenantId
from scheduler_service.fairness import (
    CORRECTION_GAIN,
    DEADLINE_QUANTUM_S,
    INITIAL_STRETCH,
    INTEGRAL_GAIN,
    INTEGRAL_LEAK,
    MAX_CORRECTION,
    MAX_PRIORITY,
    TOP_STEP_PRIORITY,
    FairShare,
)


def test_the_slower_tenant_gets_protection_and_tighter_deadlines() -> None:
    f = FairShare()
    a, b = f.slot(TenantId("a")), f.slot(TenantId("b"))
    assert f.directive_priority(a) == f.directive_priority(b) == MAX_PRIORITY // 2
    assert f.stretch(a) == f.stretch(b) == INITIAL_STRETCH
    f.record_completion(a, elapsed_s=10.0, standalone_s=10.0)  # slowdown 1
    f.record_completion(b, elapsed_s=30.0, standalone_s=10.0)  # slowdown 3
    assert (f.mean_slowdown(a), f.mean_slowdown(b)) == (1.0, 3.0)
    # relative to the mean slowdown 2: a at 0.5, b at 1.5
    assert f.protection[a] == pytest.approx(0.5) and f.protection[b] == pytest.approx(1.5)
    assert (f.directive_priority(a), f.directive_priority(b)) == (25, 75)
    # deadlines: b's are tighter, a's looser, by the proportional and integral
    # parts (the integral has moved once); a's loosening stops at the bound
    gain = CORRECTION_GAIN + INTEGRAL_GAIN
    ratio = f.stretch(a) / f.stretch(b)
    assert ratio == pytest.approx(min(MAX_CORRECTION, 0.5**-gain) / 1.5**-gain)
    # the smoothed slowdown moves a tenth of the way per completion
    f.record_completion(b, elapsed_s=10.0, standalone_s=10.0)
    assert f.mean_slowdown(b) == pytest.approx(2.8)


def test_a_lasting_gap_keeps_tightening_and_a_closed_one_is_forgotten() -> None:
    f = FairShare()
    a, b = f.slot(TenantId("a")), f.slot(TenantId("b"))
    f.record_completion(a, elapsed_s=10.0, standalone_s=10.0)
    f.record_completion(b, elapsed_s=30.0, standalone_s=10.0)
    f.observe_live([10.0, 30.0], [10.0, 10.0])  # in flight: the same gap as completed
    gaps = []
    for _ in range(10):  # (past ~15 the correction reaches its bound)
        f.record_completion(a, elapsed_s=10.0, standalone_s=10.0)
        gaps.append(f.stretch(a) / f.stretch(b))
    # the proportional part alone would hold the ratio; the integral widens it
    assert all(later > earlier for earlier, later in itertools.pairwise(gaps))
    assert gaps[-1] > gaps[0] * 1.3
    widest = max(f.integral[b], 1.0 / f.integral[b])
    # the gap closes (both at slowdown 1): the integral decays back towards 1
    f.observe_live([10.0, 10.0], [10.0, 10.0])
    f.slowdown[b] = 1.0
    for _ in range(200):
        f.record_completion(a, elapsed_s=10.0, standalone_s=10.0)
    assert max(f.integral[b], 1.0 / f.integral[b]) < 1.0 + (widest - 1.0) * 0.1
    assert f.integral[b] == pytest.approx(1.0, abs=0.1)
    assert 0.0 < INTEGRAL_LEAK < 1.0


def test_in_flight_work_counts_when_completions_look_fine() -> None:
    f = FairShare()
    a, b = f.slot(TenantId("a")), f.slot(TenantId("b"))
    f.record_completion(a, elapsed_s=10.0, standalone_s=10.0)
    f.record_completion(b, elapsed_s=10.0, standalone_s=10.0)
    assert f.stretch(a) == pytest.approx(f.stretch(b))
    # a's live sessions have waited 600 s for 100 s of standalone work
    f.observe_live([600.0, 20.0], [100.0, 20.0])
    assert (f.effective_slowdown(a), f.effective_slowdown(b)) == (6.0, 1.0)
    f.record_completion(b, elapsed_s=10.0, standalone_s=10.0)
    assert f.stretch(a) < f.stretch(b) / 4.0 and f.protection[a] > f.protection[b]
    # nothing in flight: the completed tasks' slowdown is what is left
    f.observe_live([0.0, 0.0], [0.0, 0.0])
    assert f.effective_slowdown(a) == f.mean_slowdown(a) == 1.0


def test_weights_scale_what_a_slowdown_costs() -> None:
    f = FairShare()
    a, b = f.slot(TenantId("a")), f.slot(TenantId("b"))
    f.set_weight(TenantId("a"), 3.0)
    f.record_completion(a, 20.0, 10.0)
    f.record_completion(b, 20.0, 10.0)
    # same slowdown, but a is owed three times the share
    assert f.directive_priority(a) > f.directive_priority(b)
    assert f.stretch(a) < f.stretch(b) / 3.0
    new = f.slot(TenantId("new"))
    assert f.mean_slowdown(new) == 0.0
    # no completion of its own: a newcomer is neither favoured nor penalised
    assert f.directive_priority(new) == MAX_PRIORITY // 2
    assert f.stretch(new) == pytest.approx(f.mean_stretch)


def test_step_priority_is_the_deadline_earliest_highest() -> None:
    f = FairShare()
    t = f.slot(TenantId("t"))
    f.session_started(100.0)
    f.session_started(500.0)  # the epoch is the first session's
    assert f.epoch_s == 100.0
    s = f.stretch(t)
    # a task started at the epoch with 1 s of standalone work: deadline 100 + s
    p = f.step_priority(t, 100.0, 1.0, now=120.0)
    assert p == TOP_STEP_PRIORITY - round(s / DEADLINE_QUANTUM_S)
    # a short task that started later can still be due first (its deadline is earlier)
    long_task = f.step_priority(t, 100.0, 60.0, now=130.0)
    short_task = f.step_priority(t, 110.0, 2.0, now=130.0)
    assert short_task > long_task
    # far-future deadlines saturate instead of wrapping around
    assert f.step_priority(t, 100.0, 1e12, now=130.0) == 0


@given(
    placed=st.lists(st.tuples(st.floats(0.0, 1e5), st.floats(0.0, 1e4)), min_size=1, max_size=30),
    later_s=st.floats(0.0, 1e4),
)
def test_no_step_placed_after_a_deadline_passes_overtakes_it(
    placed: list[tuple[float, float]], later_s: float
) -> None:
    # starvation freedom: once the clock is past a waiting step's deadline, any
    # step placed from then on (started no earlier than it is placed) ranks below
    f = FairShare()
    t = f.slot(TenantId("t"))
    f.session_started(0.0)
    for started, work in placed:
        waiting = f.step_priority(t, started, work, now=started)
        deadline = started + f.stretch(t) * work
        now = deadline + DEADLINE_QUANTUM_S + later_s
        newcomer = f.step_priority(t, now, 0.0, now=now)
        assert newcomer <= waiting


def test_the_engine_measures_in_flight_slowdown_at_each_completion(script: Any) -> None:
    from scheduler_service.domain import EventKind as K

    sc = script()
    sc.worker("w1")
    sc.event(0.0, "long", K.STEP_START, 20_000, tenant="slow")  # ~1 s of prefill, alone
    sc.event(99.9, "short", K.STEP_START, 1_000, tenant="fast")
    sc.event(100.0, "short", K.SESSION_FINISH, 1_000, tenant="fast")
    f = sc.engine.fair
    slow, fast = f.tenants.index[TenantId("slow")], f.tenants.index[TenantId("fast")]
    # "long" has been in flight 100 s for about a second of standalone work
    assert f.live_slowdown[slow] > 10.0 * f.live_slowdown[fast] >= 10.0
    assert f.effective_slowdown(slow) == f.live_slowdown[slow]
    # no completion of its own, yet its deadlines are the tighter
    assert f.mean_slowdown(slow) == 0.0 and f.completed[slow] == 0
    assert f.stretch(slow) < f.stretch(fast)


def _refresh_as_written(f: FairShare) -> None:
    # the refresh's arithmetic in its plainest form: FairShare._refresh must match it
    # bit for bit
    from scheduler_service.fairness import (
        MAX_PROTECTION,
        MIN_CORRECTION,
        MIN_PROTECTION,
    )

    f.effective = [f.effective_slowdown(i) for i in range(len(f.weight))]
    active = [x * w for x, w in zip(f.effective, f.weight, strict=True) if x > 0.0]
    mean = sum(active) / len(active) if active else 0.0
    if mean <= 0.0:
        return
    for i, x in enumerate(f.effective):
        if x <= 0.0:
            continue
        ratio = x * f.weight[i] / mean
        integral = f.integral[i] ** (1.0 - INTEGRAL_LEAK) * ratio**-INTEGRAL_GAIN
        f.integral[i] = min(MAX_CORRECTION, max(MIN_CORRECTION, integral))
        correction = ratio**-CORRECTION_GAIN * f.integral[i]
        f.correction[i] = min(MAX_CORRECTION, max(MIN_CORRECTION, correction))
        rel = min(MAX_PROTECTION, max(MIN_PROTECTION, ratio))
        f.protection[i] = rel
        f.priority[i] = max(0, min(MAX_PRIORITY, round(MAX_PRIORITY / 2 * rel)))


_slow = st.floats(1.0, 1e6, allow_nan=False)


@given(
    st.lists(
        st.tuples(
            st.floats(0.01, 100.0),  # weight
            _slow,  # mean slowdown of completed tasks
            st.integers(0, 3),  # completed
            st.one_of(st.just(0.0), _slow),  # live slowdown
            st.floats(0.25, 4.0),  # integral so far
        ),
        min_size=1,
        max_size=20,
    )
)
def test_a_refresh_computes_what_its_formulas_say(tenants: list[tuple[Any, ...]]) -> None:
    fast, plain = FairShare(), FairShare()
    for f in (fast, plain):
        for i, (w, slow, done, live, integral) in enumerate(tenants):
            t = f.slot(TenantId(f"t{i}"))
            f.weight[t], f.slowdown[t], f.completed[t] = w, slow, done
            f.live_slowdown[t], f.integral[t] = live, integral
    fast._refresh()
    _refresh_as_written(plain)
    for name in ("effective", "integral", "correction", "priority"):
        assert getattr(fast, name) == getattr(plain, name), name
    assert fast.protection.tolist() == plain.protection.tolist()


@pytest.mark.parametrize("live", [1e200, 1e300])
def test_a_tenant_far_above_the_rest_leaves_the_others_at_the_bounds(live: float) -> None:
    # standalone work near 0 makes a live slowdown as large as a float holds,
    # and the other tenant's ratio to the mean ~0 (its correction overflowed
    # float ** before): it gets the loosest deadlines and the least protection
    from scheduler_service.fairness import MIN_CORRECTION, MIN_PROTECTION

    f = FairShare()
    fast, slow = f.slot(TenantId("fast")), f.slot(TenantId("slow"))
    f.observe_live([0.0, 1e6], [0.0, 1e6 / live])
    f.record_completion(fast, 1.0, 1.0)
    assert f.correction[fast] == MAX_CORRECTION and f.protection[fast] == MIN_PROTECTION
    assert f.priority[fast] == round(MAX_PRIORITY / 2 * MIN_PROTECTION)
    # the slow one is twice the mean of the two
    assert f.correction[slow] == MIN_CORRECTION and f.protection[slow] == 2.0
