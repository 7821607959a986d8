"""Agent Fair Share, first version: slowdown over task completions drives priority."""

from __future__ import annotations

import pytest

from scheduler_service.domain import TenantId
from scheduler_service.fairness import MAX_PRIORITY, FairShare


def test_the_slower_tenant_gets_priority_and_protection() -> None:
    f = FairShare()
    a, b = f.slot(TenantId("a")), f.slot(TenantId("b"))
    assert f.step_priority(a) == f.step_priority(b) == MAX_PRIORITY // 2
    f.record_completion(a, elapsed_s=10.0, standalone_s=10.0)  # slowdown 1
    f.record_completion(b, elapsed_s=30.0, standalone_s=10.0)  # slowdown 3
    assert (f.mean_slowdown(a), f.mean_slowdown(b)) == (1.0, 3.0)
    # relative to the mean slowdown 2: a at 0.5, b at 1.5
    assert f.protection[a] == pytest.approx(0.5) and f.protection[b] == pytest.approx(1.5)
    assert (f.step_priority(a), f.step_priority(b)) == (25, 75)
    # the smoothed slowdown moves a tenth of the way per completion
    f.record_completion(b, elapsed_s=10.0, standalone_s=10.0)
    assert f.mean_slowdown(b) == pytest.approx(2.8)


def test_weights_scale_what_a_slowdown_costs() -> None:
    f = FairShare()
    a, b = f.slot(TenantId("a")), f.slot(TenantId("b"))
    f.set_weight(TenantId("a"), 3.0)
    f.record_completion(a, 20.0, 10.0)
    f.record_completion(b, 20.0, 10.0)
    # same slowdown, but a is owed three times the share
    assert f.step_priority(a) > f.step_priority(b)
    assert f.mean_slowdown(f.slot(TenantId("new"))) == 0.0
    # no completion of its own: a newcomer is neither favoured nor penalised
    assert f.step_priority(f.slot(TenantId("new"))) == MAX_PRIORITY // 2
