"""Placement: rank workers for a session's next step.

The placement kernel scores every allowed worker (cached prefix reused, queue
wait, evictions forced, best fit) and keeps the top k; this module turns the
slots into ``Candidate`` records and names the reason.

Place is not journaled, so it never writes the cluster state: replaying the
journal must give the same event decisions whether or not Place was called.
It keeps one tally of its own, outside the state: the prefill tokens it has
sent to each worker since that worker's last heartbeat. The reported queue is
a heartbeat old; without the tally every Place between two heartbeats sees the
same least-loaded worker and sends it all the work (a herd).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from scheduler_service.costs import prefill_time_s
from scheduler_service.domain import Candidate, Placement, PlaceRequest, Tier
from scheduler_service.engine_config import EngineConfig
from scheduler_service.fairness import FairShare
from scheduler_service.kernels import KernelSet
from scheduler_service.kernels.placement import TIER_PEER_GPU
from scheduler_service.prefix_index import PrefixIndex
from scheduler_service.state import NO_SLOT, TIER_NONE, ClusterState

_NO_LIVE = Placement(candidates=(), reason="no_live_worker")
#: Tier by its integer value (the kernel's cached tier of a candidate)
_TIERS = {int(t): t for t in Tier}


class Placer:
    """Scores workers with the placement kernel and builds a ``Placement``."""

    def __init__(
        self,
        config: EngineConfig,
        state: ClusterState,
        kernels: KernelSet,
        fair: FairShare,
        prefix: PrefixIndex,
    ) -> None:
        self.config = config
        self.prefix = prefix
        self.state = state
        self.kernels = kernels
        self.fair = fair
        k = max(1, config.max_candidates)
        # NOTE: preallocated outputs: a Place call allocates nothing per worker.
        # They make a Placer single-threaded, like the engine it belongs to
        # (the service drives one engine from one event loop).
        self._out_slots = np.zeros(k, dtype=np.int32)
        self._out_scores = np.zeros(k, dtype=np.float64)
        self._out_cached = np.zeros(k, dtype=np.int64)
        self._out_tier = np.zeros(k, dtype=np.int64)
        self._placed = np.zeros(64, dtype=np.int64)
        self._no_domain = np.full(64, -1, dtype=np.int64)  # no worker shares KV
        # blocks of the request's prefix each worker holds; zero between calls
        self._prefix = np.zeros(64, dtype=np.int64)

    def reported(self, slot: int) -> None:
        """A worker reported its queue: what Place sent it before is in it now."""
        if slot < len(self._placed):
            self._placed[slot] = 0

    def _grow_to(self, n: int) -> None:
        if len(self._placed) < n:
            self._placed = _grown(self._placed, n)
            self._prefix = _grown(self._prefix, n)
            self._no_domain = np.full(len(self._placed), -1, dtype=np.int64)

    def place(self, req: PlaceRequest, now: float) -> Placement:
        """Candidates for ``req`` best first; empty when no allowed worker is live."""
        ws = self.state.workers
        n = ws.high_water
        if n == 0:
            return _NO_LIVE
        if req.candidate_worker_ids:
            allowed = np.zeros(n, dtype=np.bool_)
            for wid in req.candidate_worker_ids:
                w = ws.slot_of.get(wid)
                if w is not None:
                    allowed[w] = ws.live_v[w]
        else:
            allowed = ws.live
        ss = self.state.sessions
        s = ss.slot_of.get(req.session_id)
        home, tier, cached, t = NO_SLOT, TIER_NONE, 0, NO_SLOT
        if s is not None:
            t = int(ss.tenant_v[s])
            tier = int(ss.tier_v[s])
            if tier != TIER_NONE:
                home = int(ss.home_v[s])
                cached = int(ss.context_tokens_v[s])
        else:
            t = self.fair.tenants.index.get(req.tenant_id, NO_SLOT)
        k = max(1, min(req.max_candidates or 3, self.config.max_candidates))
        self._grow_to(n)
        step_tokens = int(req.context_tokens + req.new_tokens)
        pre = self._prefix
        touched: list[int] = (
            self.prefix.prefix_blocks(req.prefix_block_hashes, pre)
            if req.prefix_block_hashes
            else []
        )
        try:
            return self._ranked(req, now, allowed, n, home, tier, cached, step_tokens, k, t, s)
        finally:
            pre[touched] = 0

    def _ranked(
        self,
        req: PlaceRequest,
        now: float,
        allowed: npt.NDArray[np.bool_],
        n: int,
        home: int,
        tier: int,
        cached: int,
        step_tokens: int,
        k: int,
        t: int,
        s: int | None,
    ) -> Placement:
        ws, ss, c = self.state.workers, self.state.sessions, self.config
        placed, pre = self._placed, self._prefix
        started_s, done_s, known_tokens = now, 0.0, 0
        if s is not None:
            started_s, done_s = float(ss.started_s_v[s]), float(ss.ideal_s_v[s])
            known_tokens = int(ss.context_tokens_v[s])

        def rank(mask: npt.NDArray[np.bool_], kv_domain: npt.NDArray[np.int64], top: int) -> int:
            return self.kernels.place_topk(  # type: ignore[no-any-return]
                mask,
                ws.gpu_cap_blocks,
                ws.gpu_used_blocks,
                ws.queued_prefill_tokens,
                placed,
                pre,
                ws.prefill_tokens_per_s,
                ws.block_size_tokens,
                ws.bytes_per_token,
                ws.host_link_bytes_per_s,
                kv_domain,
                n,
                home,
                tier,
                cached,
                step_tokens,
                float(c.knee_tokens),
                float(c.evict_cost_factor),
                float(c.bestfit_weight_s),
                float(c.affinity_bonus_s),
                float(c.rebuild_weight),
                top,
                self._out_slots,
                self._out_scores,
                self._out_cached,
                self._out_tier,
            )

        count = rank(allowed, self._no_domain, k)
        if count == 0:
            return _NO_LIVE
        if (
            tier != TIER_NONE
            and home != NO_SLOT
            and int(self._out_slots[0]) != home
            and int(ws.kv_domain_v[home]) >= 0
            and ws.connected_v[home]  # a gone worker's KV is nowhere to load from
        ):
            self._loads_from_home(rank, count)
        cands = []
        specs = ws.specs
        ctx = int(req.context_tokens)
        # NOTE: plain lists and a tier table: numpy scalars and Enum() calls cost
        # more than the rest of this loop (Place is timed call by call)
        for slot, tier_i, got, score in zip(
            self._out_slots[:count].tolist(),
            self._out_tier[:count].tolist(),
            self._out_cached[:count].tolist(),
            self._out_scores[:count].tolist(),
            strict=True,
        ):
            spec = specs[slot]
            assert spec is not None
            loads = tier_i >= TIER_PEER_GPU  # from the home, in its KV-transfer domain
            cands.append(
                Candidate(
                    spec.worker_id,
                    spec.endpoint,
                    got if got < ctx else ctx,
                    score,
                    Tier.NONE if loads else _TIERS[tier_i],
                    ws.spec(home).worker_id if loads else None,
                )
            )
        w0 = int(self._out_slots[0])
        if cands[0].kv_source_worker_id is not None:
            reason = "move"  # the home is loaded or draining: the step leaves with its KV
        elif home == NO_SLOT or not allowed[home]:
            reason = "prefix" if pre[w0] > 0 else "bin_pack"
        elif w0 == home:
            reason = "affinity"
        else:
            reason = "steal"  # the home is loaded enough that rebuilding elsewhere wins
        # the first candidate is where the step will most likely queue
        placed[w0] += max(0, int(req.context_tokens) - cands[0].expected_cached_tokens)
        # the step's standalone time: the prefill of the tokens it adds, its decode
        step_s = prefill_time_s(
            float(max(0, req.context_tokens - known_tokens)),
            float(ws.prefill_tokens_per_s_v[w0]),
            c.knee_tokens,
        ) + req.new_tokens * (
            float(ws.decode_s_per_token_v[w0])
            + (req.context_tokens + req.new_tokens / 2) * float(ws.decode_s_per_context_token_v[w0])
        )
        return Placement(
            candidates=tuple(cands),
            step_priority=self.fair.step_priority(t, started_s, done_s + step_s, now),
            affinity_ttl_s=c.affinity_ttl_s,
            reason=reason,
        )

    def _loads_from_home(
        self,
        rank: Callable[[npt.NDArray[np.bool_], npt.NDArray[np.int64], int], int],
        count: int,
    ) -> None:
        """Mark which of the ranked candidates would load the session's KV from its home.

        # NOTE: the ranking stays as scored with a rebuild wherever the step goes:
        # whether to leave the home, and for where, is decided as before. Scoring
        # the candidates at the price of loading the KV instead drew moved steps
        # to busier workers of the home's domain over idle ones elsewhere, and
        # cost completions in the simulator (docs/simulator.md). The same kernel,
        # run over just these candidates with the domains, says which can load.
        """
        order = self._out_slots[:count].copy()
        scores = self._out_scores[:count].copy()
        mask = np.zeros(len(self._placed), dtype=np.bool_)
        mask[order] = True
        got = rank(mask, self.state.workers.kv_domain, count)
        loaded = {
            int(self._out_slots[i]): (int(self._out_cached[i]), int(self._out_tier[i]))
            for i in range(got)
        }
        for i, slot in enumerate(order.tolist()):
            self._out_slots[i] = slot
            self._out_scores[i] = scores[i]
            self._out_cached[i], self._out_tier[i] = loaded[slot]


def _grown(a: npt.NDArray[np.int64], n: int) -> npt.NDArray[np.int64]:
    grown = np.zeros(max(n, 2 * len(a)), dtype=np.int64)
    grown[: len(a)] = a
    return grown
