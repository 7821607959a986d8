"""Agent Fair Share: tenants share task completions, not GPU time.

A task's slowdown is its wall time over its standalone time (what it would
take alone with a perfect cache: the prefill of the tokens it actually added,
its tools' waits). Fair share keeps the backlogged tenants' slowdowns, scaled
by weight, within a bounded factor of each other with two levers:

* **Step priority** (Place). Each step gets a deadline: the task's start plus
  its tenant's *stretch* times the standalone time of the work done so far
  and of this step. The engine's queue runs the earliest deadline first
  (``step_priority`` is the deadline, encoded so that higher runs sooner).
  Earliest-deadline-first over deadlines proportional to standalone time
  equalises slowdowns: a short chat task that waited one second is as late
  as a long coding task that waited a minute. A tenant's stretch is the
  cluster's mean slowdown over its weight, corrected by feedback: a tenant
  whose weighted slowdown stays above the mean gets tighter deadlines. The
  correction has a proportional part (how far off the mean the tenant is now)
  and a leaky integral part (how long it has been off, with a memory of about
  1 / ``INTEGRAL_LEAK`` completions): a tenant whose arrivals come in bursts
  needs a lasting correction, which a proportional term alone only holds by
  staying off the mean.
* **What is equalised.** A tenant's slowdown is the worse of its completed
  tasks' (smoothed) and its in-flight work's: summed time in flight over
  summed standalone work done, across its live sessions, taken at each
  completion. Completed tasks alone are a biased sample under backlog: a
  tenant with long tasks finishes only its lucky fast ones and would look
  well served while the rest wait.
* **Eviction protection**. A tenant whose weighted slowdown is above the mean
  has its idle sessions' eviction keys divided by more (they stay cached).

# NOTE: starvation-free by construction. A queued step's deadline is fixed
# when it is placed and finite; every step placed later gets a deadline no
# earlier than its own placement time, so once the clock passes a waiting
# step's deadline nothing placed afterwards can overtake it.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from scheduler_service.domain import TenantId
from scheduler_service.state import Interned

#: Weight of the newest completion in a tenant's mean slowdown.
SLOWDOWN_SMOOTHING = 0.1
#: Directive priorities run 0..MAX_PRIORITY; a tenant at the mean gets the middle.
MAX_PRIORITY = 100
#: Protection (the divisor of a session's eviction key) stays within these bounds.
MIN_PROTECTION, MAX_PROTECTION = 0.5, 4.0
#: Step priorities encode deadlines in steps of this many seconds.
DEADLINE_QUANTUM_S = 0.01
#: The largest step priority (int32): a deadline at the engine's epoch.
TOP_STEP_PRIORITY = (1 << 31) - 1
#: How strongly a tenant's slowdown off the mean moves its deadlines (an exponent).
CORRECTION_GAIN = 2.0
#: Integral part: each refresh multiplies it by (slowdown / mean) ** -INTEGRAL_GAIN ...
INTEGRAL_GAIN = 0.1
#: ... after decaying it towards 1 by this share (in log terms), so it forgets.
INTEGRAL_LEAK = 0.02
#: The correction stays within these bounds (deadlines at most 4x tighter or looser).
MIN_CORRECTION, MAX_CORRECTION = 0.25, 4.0
#: Stretch before anything has completed.
INITIAL_STRETCH = 2.0
_INTEGRAL_KEEP = 1.0 - INTEGRAL_LEAK
_HALF_PRIORITY = MAX_PRIORITY / 2


class FairShare:
    """Per-tenant slowdown, weight, stretch, step deadlines and eviction protection."""

    def __init__(self) -> None:
        self.tenants: Interned[TenantId] = Interned()
        self.weight: list[float] = []
        self.slowdown: list[float] = []
        self.completed: list[int] = []
        self.events: list[int] = []
        self.correction: list[float] = []
        self.integral: list[float] = []  # the correction's leaky integral part
        # time in flight / standalone work done, over the tenant's live sessions
        self.live_slowdown: list[float] = []
        self.effective: list[float] = []  # effective_slowdown per slot, as of the last refresh
        self.protection: npt.NDArray[np.float64] = np.ones(16, dtype=np.float64)
        self.priority: list[int] = []  # directive priority per tenant slot, kept current
        self.mean_stretch = INITIAL_STRETCH  # the cluster's smoothed slowdown
        # NOTE: deadlines are encoded relative to the first session the engine
        # saw, so a step priority fits int32 for years at 10 ms resolution. It
        # is engine state (journaled input sets it), so a replay encodes alike.
        self.epoch_s: float | None = None

    def slot(self, tenant_id: TenantId) -> int:
        """The tenant's dense slot (tenants are interned on first sight)."""
        t = self.tenants.get(tenant_id)
        if t == len(self.weight):
            self.weight.append(1.0)
            self.slowdown.append(1.0)
            self.completed.append(0)
            self.events.append(0)
            self.correction.append(1.0)
            self.integral.append(1.0)
            self.live_slowdown.append(0.0)
            self.priority.append(MAX_PRIORITY // 2)
            if t >= self.protection.shape[0]:
                grown = np.ones(self.protection.shape[0] * 2, dtype=np.float64)
                grown[:t] = self.protection[:t]
                self.protection = grown
        return t

    def set_weight(self, tenant_id: TenantId, weight: float) -> None:
        """Apply a tenant's configured weight (non-positive means 1)."""
        t = self.slot(tenant_id)
        self.weight[t] = weight if weight > 0 else 1.0
        self._refresh()

    def session_started(self, now: float) -> None:
        """Fix the deadline epoch at the first session."""
        if self.epoch_s is None:
            self.epoch_s = now

    def record_completion(self, t: int, elapsed_s: float, standalone_s: float) -> None:
        """A session of tenant slot ``t`` finished after ``elapsed_s``."""
        slowdown = max(1.0, elapsed_s / max(standalone_s, 1e-3))
        self.completed[t] += 1
        if self.completed[t] == 1:
            self.slowdown[t] = slowdown
        else:
            self.slowdown[t] += SLOWDOWN_SMOOTHING * (slowdown - self.slowdown[t])
        self.mean_stretch += SLOWDOWN_SMOOTHING * (slowdown - self.mean_stretch)
        self._refresh()

    def observe_live(self, elapsed_s: list[float], standalone_s: list[float]) -> None:
        """Per tenant slot: summed time in flight and standalone work of its live sessions."""
        for i, (e, w) in enumerate(zip(elapsed_s, standalone_s, strict=False)):
            if i < len(self.live_slowdown):
                self.live_slowdown[i] = max(1.0, e / w) if w > 0.0 else 0.0

    def effective_slowdown(self, t: int) -> float:
        """What fair share equalises: the worse of completed and in-flight work.

        Completed tasks alone would hide a tenant whose long tasks are still
        running (only its lucky fast ones finish); in-flight work alone would
        forget the slowdown of tasks that just ended.
        """
        done = self.slowdown[t] if self.completed[t] else 0.0
        return max(done, self.live_slowdown[t])

    def stretch(self, t: int) -> float:
        """Deadline stretch of tenant slot ``t``: allowed slowdown for its steps."""
        if t < 0 or t >= len(self.weight):
            return self.mean_stretch
        return self.mean_stretch * self.correction[t] / self.weight[t]

    def step_priority(self, t: int, started_s: float, standalone_s: float, now: float) -> int:
        """Priority of a step (higher runs sooner): its deadline, earliest highest.

        ``started_s`` is when the task started and ``standalone_s`` its
        standalone time including this step.
        """
        deadline = started_s + self.stretch(t) * standalone_s
        epoch = self.epoch_s if self.epoch_s is not None else now
        ticks = round((deadline - epoch) / DEADLINE_QUANTUM_S)
        return max(0, min(TOP_STEP_PRIORITY, TOP_STEP_PRIORITY - ticks))

    def directive_priority(self, t: int) -> int:
        """Priority carried by a tenant's directives (0..MAX_PRIORITY, higher keeps longer)."""
        if t < 0 or t >= len(self.priority):
            return MAX_PRIORITY // 2
        return self.priority[t]

    def mean_slowdown(self, t: int) -> float:
        """The tenant's smoothed slowdown (0 before any completion)."""
        return self.slowdown[t] if self.completed[t] else 0.0

    def _refresh(self) -> None:
        # Weighted slowdown relative to the mean over tenants with work done or in flight.
        # NOTE: runs at every completion; lists bound to locals, and
        # effective_slowdown and the weighted mean written out (same arithmetic)
        weight = self.weight
        slowdown, completed, live = self.slowdown, self.completed, self.live_slowdown
        self.effective = effective = [
            max(slowdown[t] if completed[t] else 0.0, live[t]) for t in range(len(weight))
        ]
        active = [x * w for x, w in zip(effective, weight, strict=True) if x > 0.0]
        if not active:
            return
        mean = sum(active) / len(active)
        if mean <= 0.0:
            return
        integrals, corrections = self.integral, self.correction
        protection, priority = self.protection, self.priority
        for i, x in enumerate(effective):
            if x <= 0.0:
                continue  # nothing done or in flight yet
            # a heavier tenant is owed more: the same slowdown hurts it more
            ratio = x * weight[i] / mean
            # above the mean: tighter deadlines; below: looser ones. NOTE: the
            # integral moves once per refresh (per completion), so a replay of
            # the same completions computes the same corrections.
            # NOTE: each clamp is min(hi, max(lo, v)) as the builtins evaluate it
            # (NaN included), without their calls
            try:
                v = integrals[i] ** _INTEGRAL_KEEP * ratio**-INTEGRAL_GAIN
            except ZeroDivisionError:  # a ratio of 0: far below the mean
                v = math.inf
            v = v if v > MIN_CORRECTION else MIN_CORRECTION
            integrals[i] = integral = v if v < MAX_CORRECTION else MAX_CORRECTION
            try:
                v = ratio**-CORRECTION_GAIN * integral
            except (OverflowError, ZeroDivisionError):  # float ** raises, * and / do not
                v = math.inf
            v = v if v > MIN_CORRECTION else MIN_CORRECTION
            corrections[i] = v if v < MAX_CORRECTION else MAX_CORRECTION
            v = ratio if ratio > MIN_PROTECTION else MIN_PROTECTION
            rel = v if v < MAX_PROTECTION else MAX_PROTECTION
            protection[i] = rel
            p = round(_HALF_PRIORITY * rel)
            p = p if p < MAX_PRIORITY else MAX_PRIORITY
            priority[i] = p if p > 0 else 0
