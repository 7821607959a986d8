"""The cluster model: replica sizing from a GPU profile and a model, and the KV pool.

Sizes and prefill speed come from ``scheduler_service.costs`` (the engine
prices with the same formulas). The pool is session-granular: a session's KV
on a replica is a prefix of its context, so "how many of its blocks are here"
is the whole state. Eviction takes blocks from the tail of the least recently
freed session first, which is what vLLM's free queue does (a request's blocks
are freed tail-first onto the end of the queue); a partly evicted session keeps
its prefix and its place at the front of the queue.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from scheduler_service import costs

#: HBM bandwidth by GPU profile; decode is memory bound (weights + KV read per token).
HBM_BYTES_PER_S = {"A100-80G": 2.0e12, "H100-80G": 3.35e12, "H200-141G": 4.8e12}


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """What a simulated fleet is made of."""

    gpus: int = 64
    gpu: str = "H100-80G"
    model: str = "Llama-3.1-8B"
    tensor_parallel: int = 1
    block_size_tokens: int = 16  # vLLM's default block size
    host_bytes_per_gpu: float = 200e9  # a share of a node's DRAM for the KV host tier
    max_running_steps: int = 256  # vLLM max_num_seqs
    # vLLM max_num_batched_tokens: the prefill chunk one iteration carries
    token_budget_tokens: int = 8192
    # GPUs per KV-transfer domain: replicas within one (e.g. 8, a node sharing its
    # host memory as an LMCache tier) can load each other's KV over their host
    # links (GPU -> host -> GPU); 0: none can. Only the kvsched policy uses it.
    kv_transfer_gpus: int = 0

    def __post_init__(self) -> None:
        tp = self.tensor_parallel
        if self.kv_transfer_gpus < 0 or self.kv_transfer_gpus % max(1, tp):
            raise ValueError(
                f"kv_transfer_gpus must be 0 or a multiple of tensor_parallel ({tp}),"
                f" got {self.kv_transfer_gpus}"
            )

    @property
    def replicas(self) -> int:
        """Model replicas (GPUs / tensor parallel)."""
        return max(1, self.gpus // self.tensor_parallel)


@dataclass(frozen=True, slots=True)
class ReplicaModel:
    """Derived per-replica figures (all from the cost model)."""

    capacity_blocks: int
    host_capacity_blocks: int
    block_size_tokens: int
    bytes_per_token: int
    prefill_tokens_per_s: float
    knee_tokens: float
    host_link_bytes_per_s: float
    weight_bytes: int
    hbm_bytes_per_s: float
    max_running_steps: int
    token_budget_tokens: int

    @classmethod
    def of(cls, c: ClusterConfig) -> ReplicaModel:
        """Size one replica of ``c``."""
        gpu = costs.GPU_PROFILES[c.gpu]
        m = costs.model(c.model)
        tp = c.tensor_parallel
        return cls(
            capacity_blocks=gpu.kv_capacity_tokens(m, tp) // c.block_size_tokens,
            host_capacity_blocks=int(c.host_bytes_per_gpu * tp)
            // (costs.bytes_per_token(m) * c.block_size_tokens),
            block_size_tokens=c.block_size_tokens,
            bytes_per_token=costs.bytes_per_token(m),
            prefill_tokens_per_s=gpu.prefill_tokens_per_s(m, tp),
            knee_tokens=costs.DEFAULT_ATTENTION_KNEE_TOKENS,
            host_link_bytes_per_s=gpu.host_link_bytes_per_s * tp,
            weight_bytes=m.weight_bytes,
            hbm_bytes_per_s=HBM_BYTES_PER_S.get(c.gpu, 3.35e12) * tp,
            max_running_steps=c.max_running_steps,
            token_budget_tokens=c.token_budget_tokens,
        )

    def prefill_s(self, tokens: float) -> float:
        """Seconds to prefill ``tokens`` from nothing."""
        return costs.prefill_time_s(tokens, self.prefill_tokens_per_s, self.knee_tokens)

    def extend_s(self, cached_tokens: float, total_tokens: float) -> float:
        """Seconds to prefill tokens ``cached..total`` attending over the cached prefix."""
        return self.prefill_s(total_tokens) - self.prefill_s(cached_tokens)

    def reload_s(self, tokens: float) -> float:
        """Seconds to copy ``tokens`` of KV across the host link."""
        return tokens * self.bytes_per_token / self.host_link_bytes_per_s

    def token_time_s(self, batch_kv_tokens: float) -> float:
        """One decode iteration: weights plus every running sequence's KV read from HBM."""
        return (self.weight_bytes + batch_kv_tokens * self.bytes_per_token) / self.hbm_bytes_per_s

    def decode_s(self, output_tokens: int, batch_kv_tokens: float, prefill_busy_s: float) -> float:
        """Seconds to decode ``output_tokens`` in a batch reading ``batch_kv_tokens`` of KV.

        # NOTE: chunked prefill: while the replica has prefill work, every
        # iteration also carries a chunk of ``token_budget_tokens`` prefill
        # tokens, so a decode iteration takes at least the chunk's compute time.
        """
        token_s = self.token_time_s(batch_kv_tokens)
        chunk_s = max(token_s, self.token_budget_tokens / self.prefill_tokens_per_s)
        shared = min(output_tokens, int(prefill_busy_s / chunk_s))
        return shared * chunk_s + (output_tokens - shared) * token_s

    def blocks(self, tokens: int) -> int:
        """Blocks ``tokens`` take."""
        return -(-tokens // self.block_size_tokens) if tokens > 0 else 0


class Pool:
    """One replica's GPU KV pool plus its host tier, per session.

    ``lru`` holds the sessions whose blocks are cached but free to evict
    (oldest first); running and leased sessions are not in it.
    """

    __slots__ = (
        "cap",
        "dead",
        "dead_blocks",
        "evicted_blocks",
        "gpu",
        "host",
        "host_cap",
        "host_lru",
        "host_used",
        "lease_until",
        "lru",
        "own",
        "ready_at",
        "used",
    )

    def __init__(self, capacity_blocks: int, host_capacity_blocks: int = 0) -> None:
        self.cap = capacity_blocks
        self.host_cap = host_capacity_blocks
        self.gpu: dict[int, int] = {}
        self.host: dict[int, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.host_lru: OrderedDict[int, None] = OrderedDict()
        self.lease_until: dict[int, float] = {}
        self.ready_at: dict[int, float] = {}  # a prefetch lands at this time
        # NOTE: blocks a session kept on the GPU before a reload added its host
        # copy at the tail: what an oracle without a host tier compares with
        self.own: dict[int, int] = {}
        self.dead: set[int] = set()  # finished sessions still cached
        self.used = 0
        self.host_used = 0
        self.dead_blocks = 0
        self.evicted_blocks = 0

    @property
    def free(self) -> int:
        """Blocks holding nothing."""
        return self.cap - self.used

    def evictable(self) -> int:
        """Blocks that could be freed now (unleased idle sessions)."""
        gpu = self.gpu
        return sum(gpu[s] for s in self.lru)

    def take(self, s: int, n: int) -> None:
        """Drop the last ``n`` of session ``s``'s GPU blocks (its prefix stays)."""
        left = self.gpu[s] - n
        self.used -= n
        self.evicted_blocks += n
        if s in self.dead:
            self.dead_blocks -= n
        if left > 0:
            self.gpu[s] = left
        else:
            del self.gpu[s]
            self.lru.pop(s, None)
            self.lease_until.pop(s, None)
            self.ready_at.pop(s, None)
            self.own.pop(s, None)
            if s in self.dead and s not in self.host:
                self.dead.discard(s)

    def evict_lru(self, need: int, exclude: int = -1) -> None:
        """Free blocks until ``need`` are free: LRU session first, its tail first.

        ``exclude`` (the session being admitted) is skipped: its cached blocks are
        the prefix its step is about to reuse.
        """
        lru = self.lru
        while self.cap - self.used < need and lru:
            it = iter(lru)
            s = next(it)
            if s == exclude:
                s = next(it, -1)
                if s < 0:
                    return
            self.take(s, min(self.gpu[s], need - (self.cap - self.used)))

    def own_blocks(self, s: int) -> int:
        """``s``'s GPU blocks that were never reloaded from the host tier."""
        n = self.gpu.get(s, 0)
        return min(n, self.own[s]) if s in self.own else n

    def hold(self, s: int, blocks: int) -> None:
        """Session ``s`` now holds ``blocks`` on the GPU and is running (not evictable)."""
        self.own.pop(s, None)
        old = self.gpu.get(s, 0)
        self.used += blocks - old
        self.gpu[s] = blocks
        self.lru.pop(s, None)
        self.lease_until.pop(s, None)

    def idle(self, s: int, first: bool = False) -> None:
        """Session ``s``'s blocks become evictable (at the back, or the front when ``first``)."""
        if s not in self.gpu:
            return
        self.lease_until.pop(s, None)
        self.lru[s] = None
        self.lru.move_to_end(s, last=not first)

    def lease(self, s: int, until_s: float) -> bool:
        """Hold ``s``'s blocks until ``until_s``; False when it has none here."""
        if s not in self.gpu:
            return False
        self.lru.pop(s, None)
        self.lease_until[s] = until_s
        return True

    def finish(self, s: int) -> None:
        """``s`` ended: its cached blocks are dead weight (kept until evicted, as APC does)."""
        if s in self.gpu:
            self.dead.add(s)
            self.dead_blocks += self.gpu[s]
        self.drop_host(s)

    def drop(self, s: int) -> None:
        """Free every GPU block of ``s`` now."""
        if s in self.gpu:
            n = self.gpu[s]
            self.take(s, n)
            self.evicted_blocks -= n  # ordered, not forced by pressure

    def drop_host(self, s: int) -> None:
        """Forget ``s``'s host copy."""
        n = self.host.pop(s, 0)
        self.host_used -= n
        self.host_lru.pop(s, None)

    def offload(self, s: int) -> bool:
        """Copy ``s``'s GPU blocks to the host tier and free them on the GPU."""
        n = self.gpu.get(s, 0)
        if n <= 0 or n > self.host_cap:
            return False
        self.drop_host(s)
        while self.host_cap - self.host_used < n and self.host_lru:
            self.drop_host(next(iter(self.host_lru)))
        self.host[s] = n
        self.host_used += n
        self.host_lru[s] = None
        self.drop(s)
        return True

    def reload(self, s: int, now: float, reload_s: float) -> int:
        """Bring ``s``'s host blocks back (evicting LRU for room); blocks reloaded."""
        n = self.host.get(s, 0)
        have = self.gpu.get(s, 0)
        if n <= have:
            return 0
        self.evict_lru(n - have, exclude=s)
        if self.cap - self.used < n - have:
            return 0
        self.used += n - have
        self.gpu[s] = n
        self.own[s] = min(self.own.get(s, have), have)
        self.ready_at[s] = now + reload_s
        self.lru[s] = None
        self.lru.move_to_end(s)
        return n - have
