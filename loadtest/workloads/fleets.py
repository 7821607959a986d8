"""Synthetic agent sessions: coding, browsing, RAG/chat, multi-agent, single-shot.

Each generator draws one session's whole structure up front (prompt tokens
appended before every step, output tokens, the tool called after it and how
long the tool runs) from a seeded ``numpy.random.Generator``, so a seed fixes
the trace. Parameter sources are named next to each default; where a paper
gives a range we draw uniformly or log-normally inside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class AgentSession:
    """One agent task: ``len(prompt_tokens)`` LLM steps separated by tool waits.

    Step ``i`` appends ``prompt_tokens[i]`` to the context (step 0 carries the
    system prompt and the task), generates ``output_tokens[i]`` and then waits
    ``tool_latency_s[i]`` on ``tool_names[i]`` (empty after the last step).
    """

    session_id: str
    tenant_id: str
    agent_type: str
    arrival_s: float
    prompt_tokens: list[int]
    output_tokens: list[int]
    tool_names: list[str]
    tool_latency_s: list[float]
    # multi-agent: a worker spawned by ``parent`` (an index into the session list)
    # after the parent's step ``spawn_after_step``; its first prompt starts with
    # ``shared_prefix_tokens`` of the parent's context.
    parent: int = -1
    spawn_after_step: int = -1
    shared_prefix_tokens: int = 0
    # planner side: indices of workers it waits for after ``join_after_step``
    children: list[int] = field(default_factory=list)
    join_after_step: int = -1

    @property
    def steps(self) -> int:
        """Number of LLM steps."""
        return len(self.prompt_tokens)

    def context_before_step(self, i: int) -> int:
        """Context tokens the prompt of step ``i`` holds (prefix + new input)."""
        return sum(self.prompt_tokens[: i + 1]) + sum(self.output_tokens[:i])


def _lognormal(rng: np.random.Generator, median: float, sigma: float) -> float:
    return float(median * np.exp(sigma * rng.standard_normal()))


def _steps(rng: np.random.Generator, median: float, lo: int, hi: int, sigma: float = 0.5) -> int:
    return int(min(hi, max(lo, round(_lognormal(rng, median, sigma)))))


@dataclass(frozen=True, slots=True)
class CodingParams:
    """SWE-bench-like coding agent (SWE-agent / OpenHands trajectories)."""

    # 20-40 steps typical, long tail to 150 (SWE-agent/OpenHands on SWE-bench)
    steps_median: float = 28.0
    steps_sigma: float = 0.45
    steps_max: int = 150
    # system prompt + repository context: tens of k tokens (issue 5; SyFI atlas)
    first_prompt_tokens: tuple[int, int] = (8_000, 30_000)
    # ~6.6k appended per step on Claude Code traces, 3-7k on SWE-agent (SyFI atlas)
    appended_tokens: tuple[int, int] = (3_000, 7_000)
    # ~520 output tokens per step, "hundreds" (SyFI atlas: input:output ~294:1)
    output_median_tokens: float = 350.0
    # tools (Continuum, arXiv 2511.02230): read/grep 10-200 ms, edit ms, tests 2-60 s
    p_read: float = 0.5
    p_edit: float = 0.3
    test_median_s: float = 8.0


@dataclass(frozen=True, slots=True)
class BrowsingParams:
    """Browsing / research agent (BFCL-style web tools)."""

    steps_median: float = 12.0
    steps_max: int = 40
    first_prompt_tokens: tuple[int, int] = (3_000, 6_000)
    # a fetched page appended as an observation: large (2-10k tokens)
    appended_tokens: tuple[int, int] = (2_000, 10_000)
    output_median_tokens: float = 200.0
    # page fetches 0.5-5 s (Continuum, web tools)
    fetch_s: tuple[float, float] = (0.5, 5.0)


@dataclass(frozen=True, slots=True)
class RagParams:
    """RAG / chat assistant: few turns, fast retrieval, long human think time."""

    turns_median: float = 3.0
    turns_max: int = 8
    first_prompt_tokens: tuple[int, int] = (2_000, 4_000)
    retrieved_tokens: tuple[int, int] = (1_000, 3_000)
    question_tokens: tuple[int, int] = (30, 200)
    output_median_tokens: float = 250.0
    retrieval_s: tuple[float, float] = (0.05, 0.3)
    # human think time between turns: seconds to minutes
    think_median_s: float = 25.0


@dataclass(frozen=True, slots=True)
class MultiAgentParams:
    """A planner fanning out to parallel workers that share its prefix, then a join."""

    planner_steps: tuple[int, int] = (3, 6)
    workers: tuple[int, int] = (3, 8)
    worker_steps: tuple[int, int] = (3, 10)
    first_prompt_tokens: tuple[int, int] = (6_000, 16_000)
    worker_task_tokens: tuple[int, int] = (300, 1_500)
    appended_tokens: tuple[int, int] = (1_000, 4_000)
    output_median_tokens: float = 300.0
    tool_s: tuple[float, float] = (0.05, 3.0)


def _out(rng: np.random.Generator, median: float) -> int:
    return int(min(4_000, max(20, round(_lognormal(rng, median, 0.6)))))


def coding_session(rng: np.random.Generator, p: CodingParams, scale: float = 1.0) -> dict[str, Any]:
    """Fields of one coding session (``scale`` stretches steps and context)."""
    n = _steps(rng, p.steps_median * scale, 8, p.steps_max, p.steps_sigma)
    prompts = [int(rng.integers(*p.first_prompt_tokens) * scale)]
    prompts += [int(rng.integers(*p.appended_tokens)) for _ in range(n - 1)]
    outs = [_out(rng, p.output_median_tokens) for _ in range(n)]
    names: list[str] = []
    lat: list[float] = []
    for _ in range(n - 1):
        u = rng.random()
        if u < p.p_read:
            names.append("read")
            lat.append(float(rng.uniform(0.01, 0.2)))
        elif u < p.p_read + p.p_edit:
            names.append("edit")
            lat.append(float(rng.uniform(0.001, 0.02)))
        else:
            names.append("test")
            lat.append(float(min(60.0, max(2.0, _lognormal(rng, p.test_median_s, 0.8)))))
    return {
        "prompt_tokens": prompts,
        "output_tokens": outs,
        "tool_names": [*names, ""],
        "tool_latency_s": [*lat, 0.0],
    }


def browsing_session(
    rng: np.random.Generator, p: BrowsingParams, scale: float = 1.0
) -> dict[str, Any]:
    """Fields of one browsing/research session."""
    n = _steps(rng, p.steps_median * scale, 2, p.steps_max, 0.5)
    prompts = [int(rng.integers(*p.first_prompt_tokens))]
    prompts += [int(rng.integers(*p.appended_tokens)) for _ in range(n - 1)]
    outs = [_out(rng, p.output_median_tokens) for _ in range(n)]
    lat = [float(rng.uniform(*p.fetch_s)) for _ in range(n - 1)]
    return {
        "prompt_tokens": prompts,
        "output_tokens": outs,
        "tool_names": ["fetch"] * (n - 1) + [""],
        "tool_latency_s": [*lat, 0.0],
    }


def rag_session(rng: np.random.Generator, p: RagParams, scale: float = 1.0) -> dict[str, Any]:
    """Fields of one RAG/chat session: per turn a query step, retrieval, an answer step."""
    turns = _steps(rng, p.turns_median * scale, 1, p.turns_max, 0.6)
    prompts: list[int] = []
    names: list[str] = []
    lat: list[float] = []
    for t in range(turns):
        first = int(rng.integers(*p.first_prompt_tokens)) if t == 0 else 0
        prompts.append(first + int(rng.integers(*p.question_tokens)))
        names.append("retrieve")
        lat.append(float(rng.uniform(*p.retrieval_s)))
        prompts.append(int(rng.integers(*p.retrieved_tokens)))
        names.append("human")
        lat.append(float(min(600.0, _lognormal(rng, p.think_median_s, 0.9))))
    names[-1], lat[-1] = "", 0.0
    outs = [
        _out(rng, 60.0) if i % 2 == 0 else _out(rng, p.output_median_tokens)
        for i in range(len(prompts))
    ]
    return {
        "prompt_tokens": prompts,
        "output_tokens": outs,
        "tool_names": names,
        "tool_latency_s": lat,
    }


def single_shot_session(rng: np.random.Generator, scale: float = 1.0) -> dict[str, Any]:
    """One request with no tools (the non-agent load peak throughput is measured on)."""
    return {
        "prompt_tokens": [int(rng.integers(500, 4_000) * scale)],
        "output_tokens": [_out(rng, 250.0)],
        "tool_names": [""],
        "tool_latency_s": [0.0],
    }


def multi_agent_sessions(
    rng: np.random.Generator, p: MultiAgentParams, scale: float = 1.0
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A planner's fields and its workers' fields (linked later by index)."""
    n = int(rng.integers(p.planner_steps[0], p.planner_steps[1] + 1))
    join = int(rng.integers(0, max(1, n - 1)))
    prompts = [int(rng.integers(*p.first_prompt_tokens) * scale)]
    prompts += [int(rng.integers(*p.appended_tokens)) for _ in range(n - 1)]
    outs = [_out(rng, p.output_median_tokens) for _ in range(n)]
    names = ["tool"] * (n - 1) + [""]
    lat = [float(rng.uniform(*p.tool_s)) for _ in range(n - 1)] + [0.0]
    names[join], lat[join] = "join", 0.0
    planner = {
        "prompt_tokens": prompts,
        "output_tokens": outs,
        "tool_names": names,
        "tool_latency_s": lat,
        "join_after_step": join,
    }
    shared = sum(prompts[: join + 1]) + sum(outs[: join + 1])
    workers = []
    for _ in range(int(rng.integers(p.workers[0], p.workers[1] + 1))):
        m = int(rng.integers(p.worker_steps[0], p.worker_steps[1] + 1))
        wp = [shared + int(rng.integers(*p.worker_task_tokens))]
        wp += [int(rng.integers(*p.appended_tokens)) for _ in range(m - 1)]
        workers.append(
            {
                "prompt_tokens": wp,
                "output_tokens": [_out(rng, p.output_median_tokens) for _ in wp],
                "tool_names": ["tool"] * (m - 1) + [""],
                "tool_latency_s": [float(rng.uniform(*p.tool_s)) for _ in range(m - 1)] + [0.0],
                "shared_prefix_tokens": shared,
                "spawn_after_step": join,
            }
        )
    return planner, workers
