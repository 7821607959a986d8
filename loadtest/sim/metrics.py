"""What a run measured, and the summary every report prints.

Definitions (docs/simulator.md repeats them):

* task: a root session (multi-agent workers are parts of their planner's task);
* step TTFT: from the step being ready (arrival or tool return) to its first
  token; the step SLO holds when TTFT <= ``slo_ttft_s``;
* recompute share: prefill seconds spent rebuilding context this session had
  already computed, over all GPU seconds (prefill + each step's share of its
  decode batch);
* KV utilisation: time-weighted share of GPU KV blocks holding live sessions'
  KV on the replica of their latest step (cached blocks of finished sessions,
  and copies left on other replicas, count as empty);
* token hit ratio: prompt tokens served from cache (GPU or host tier) over all
  prompt tokens;
* slowdown: a task's completion time over its standalone time (perfect cache,
  batch of one, no queueing), over the tasks that started in the first half of
  the run; one still running at the end counts at its time so far over its
  standalone time (a lower bound: censored). Counting completed tasks only
  would keep the fast few of a tenant with long tasks and drop the rest. The
  tenant ratio is max/min of tenant means.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loadtest.sim.cluster import ReplicaModel
from loadtest.workloads import AgentSession


class Recorder:
    """Collects per-step and per-task figures during a run."""

    def __init__(
        self,
        sessions: list[AgentSession],
        model: ReplicaModel,
        replicas: int,
        slo_ttft_s: float,
        record_trace: bool,
    ) -> None:
        self.sessions = sessions
        self.model = model
        self.slo_ttft_s = slo_ttft_s
        n = len(sessions)
        self.start_s = [-1.0] * n
        self.end_s = [-1.0] * n
        self.ttft_s: list[float] = []
        self.prompt_tokens = 0
        self.hit_tokens = 0
        self.prompt_blocks = 0
        self.miss_blocks = 0
        self.prefill_s = 0.0
        self.recompute_s = 0.0
        self.moved_tokens = 0  # prompt tokens loaded from another replica's KV
        self.decode_gpu_s = 0.0
        self.tokens_done = 0
        self.samples_t: list[float] = []
        self.samples_util: list[float] = []
        self.samples_used: list[float] = []
        self.record_trace = record_trace
        # per replica: (session, prompt blocks, blocks after the step) in admission order
        self.trace: list[list[tuple[int, int, int]]] = [[] for _ in range(replicas)]

    def started(self, sid: int, now: float) -> None:
        """A session arrived."""
        self.start_s[sid] = now

    def admitted(
        self,
        sid: int,
        r: int,
        now: float,
        prompt: int,
        hit: int,
        recompute: int,
        prefill_s: float,
        recompute_s: float,
        prompt_blocks: int,
        after_blocks: int,
        own_hit: int,
    ) -> None:
        """A step was admitted on replica ``r``.

        ``hit`` counts every prompt token not prefilled (GPU, host reload, a
        planner's shared prefix); ``own_hit`` only the session's own blocks that
        stayed on the GPU since it last ran (a prefetch from the host tier is a
        fetch, so a miss), the one thing the oracle's GPU-tier replay compares with.
        """
        self.prompt_tokens += prompt
        self.hit_tokens += hit
        self.prompt_blocks += prompt_blocks
        self.miss_blocks += prompt_blocks - own_hit // self.model.block_size_tokens
        self.prefill_s += prefill_s
        self.recompute_s += recompute_s
        if self.record_trace:
            self.trace[r].append((sid, prompt_blocks, after_blocks))

    def first_token(self, sid: int, ttft_s: float, decode_gpu_s: float) -> None:
        """A step's prefill finished; ``decode_gpu_s`` is its share of the batch's decode."""
        self.ttft_s.append(ttft_s)
        self.decode_gpu_s += decode_gpu_s

    def finished(self, sid: int, now: float) -> None:
        """A session's last step ended."""
        self.end_s[sid] = now
        s = self.sessions[sid]
        self.tokens_done += s.context_before_step(s.steps - 1) + s.output_tokens[-1]

    def sample(self, now: float, replicas: list[Any], where: list[int]) -> None:
        """Record KV utilisation (live KV) and occupancy (anything cached).

        # NOTE: live KV is a live session's blocks on the replica of its latest
        # step; copies left behind on other replicas (round robin, moves) will
        # not be reused by the next step there, so they count as empty.
        """
        cap = used = live = 0
        for r, rep in enumerate(replicas):
            pool = rep.pool
            cap += pool.cap
            used += pool.used
            dead = pool.dead
            live += sum(n for s, n in pool.gpu.items() if where[s] == r and s not in dead)
        self.samples_t.append(now)
        self.samples_util.append(live / cap)
        self.samples_used.append(used / cap)

    def standalone_s(self, sid: int) -> float:
        """A session's time alone on an idle replica with a perfect cache.

        A planner's join waits for its slowest worker, so that worker's standalone
        time stands in for the join's tool time.
        """
        s, m = self.sessions[sid], self.model
        t, prev = 0.0, 0
        for i in range(s.steps):
            ctx = s.context_before_step(i)
            t += m.extend_s(prev, ctx) + s.output_tokens[i] * m.token_time_s(ctx)
            t += s.tool_latency_s[i]
            if i == s.join_after_step and s.children:
                t += max(self.standalone_s(c) for c in s.children)
            prev = ctx + s.output_tokens[i]
        return t

    def summary(self, duration_s: float, oracle_miss_blocks: int | None) -> dict[str, Any]:
        """The report's figures for this run."""
        tasks = [
            i
            for i, s in enumerate(self.sessions)
            if s.parent < 0 and 0.0 <= self.end_s[i] <= duration_s
        ]
        jct = np.array([self.end_s[i] - self.start_s[i] for i in tasks], dtype=np.float64)
        ttft = np.array(self.ttft_s, dtype=np.float64)
        gpu_s = self.prefill_s + self.decode_gpu_s
        by_tenant: dict[str, list[float]] = {}
        censored: dict[str, int] = {}
        for i, s in enumerate(self.sessions):
            start = self.start_s[i]
            if s.parent >= 0 or not 0.0 <= start <= duration_s / 2:
                continue
            end = self.end_s[i]
            if not 0.0 <= end <= duration_s:
                end = duration_s
                censored[s.tenant_id] = censored.get(s.tenant_id, 0) + 1
            sd = (end - start) / max(1e-9, self.standalone_s(i))
            by_tenant.setdefault(s.tenant_id, []).append(sd)
        means = {t: float(np.mean(v)) for t, v in sorted(by_tenant.items())}
        censored_share = {t: censored.get(t, 0) / len(v) for t, v in sorted(by_tenant.items())}
        ratio = max(means.values()) / min(means.values()) if means else float("nan")
        return {
            "task_completions_per_hour": len(tasks) * 3600.0 / duration_s,
            "tasks_completed": len(tasks),
            "jct_p50_s": float(np.percentile(jct, 50)) if jct.size else float("nan"),
            "jct_p99_s": float(np.percentile(jct, 99)) if jct.size else float("nan"),
            "steps_started": int(ttft.size),
            "ttft_p50_s": float(np.percentile(ttft, 50)) if ttft.size else float("nan"),
            "ttft_p99_s": float(np.percentile(ttft, 99)) if ttft.size else float("nan"),
            "slo_attainment": float(np.mean(ttft <= self.slo_ttft_s)) if ttft.size else 1.0,
            "recompute_share": self.recompute_s / gpu_s if gpu_s else 0.0,
            "kv_util": float(np.mean(self.samples_util)) if self.samples_util else 0.0,
            "kv_occupancy": float(np.mean(self.samples_used)) if self.samples_used else 0.0,
            "token_hit_ratio": self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            "moved_token_share": (
                self.moved_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
            ),
            "miss_blocks": self.miss_blocks,
            "oracle_miss_blocks": oracle_miss_blocks,
            "misses_vs_oracle": (
                self.miss_blocks / oracle_miss_blocks if oracle_miss_blocks else float("nan")
            ),
            "tenant_slowdown": means,
            "tenant_slowdown_ratio": ratio,
            "tenant_slowdown_censored_share": censored_share,
        }

    def series(self, duration_s: float) -> dict[str, Any]:
        """Time series and distributions for the plots."""
        tasks = [
            i
            for i, s in enumerate(self.sessions)
            if s.parent < 0 and 0.0 <= self.end_s[i] <= duration_s
        ]
        return {
            "completion_times_s": sorted(self.end_s[i] for i in tasks),
            "jct_s": sorted(self.end_s[i] - self.start_s[i] for i in tasks),
            "util_t_s": self.samples_t,
            "util": self.samples_util,
        }
