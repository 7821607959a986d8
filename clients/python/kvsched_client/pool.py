"""`BlockPool`: the reference KV block pool (the `KVPool` protocol is in pool_api).

It is the reference paged KV cache: fixed-size GPU blocks, block hashes
chained over the parent hash, ref counts, a free queue that evicts LRU and
tail-first (as vLLM's `FreeKVCacheBlockQueue`), and a host tier with a capacity
and a link bandwidth. It enforces retention directives (lease, offload,
prefetch, release, evict-now) and emits KV events in the wire shape.

Time is an argument: every call that can change state takes `now` (seconds),
and the pool never reads a clock, so a simulator can drive it in virtual time.
Model simplifications: prefill is instantaneous (blocks are cached as soon as a
step starts); transfers change state at once and report when they finish
(`ready_s`), serialised per direction on the host link.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvsched_client._proto.kvsched.v1 import types_pb2, worker_pb2
from kvsched_client.host_tier import HostLink, HostTier
from kvsched_client.kv_blocks import KvEventLog, extend_chain
from kvsched_client.pool_api import (
    BlockPoolStats,
    DirectiveResult,
    KVPool,
    PoolExhaustedError,
    StepAllocation,
)

# fmt: off
__all__ = ["BlockPool", "BlockPoolStats", "DirectiveResult", "KVPool", "PoolExhaustedError",
           "StepAllocation"]
# fmt: on

GPU = types_pb2.TIER_GPU


@dataclass(slots=True)
class _Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


@dataclass(slots=True)
class _Session:
    session_id: str
    tenant_id: str
    token_ids: list[int] = field(default_factory=list)
    # Hashes of the session's full blocks, in prefix order.
    chain: list[bytes] = field(default_factory=list)
    # GPU blocks this session holds a ref on (running step or lease), prefix order.
    held: list[int] = field(default_factory=list)
    running: bool = False
    lease_expiry_s: float | None = None
    lease_priority: int = 0


class BlockPool:
    """The reference KV block pool (see module doc)."""

    def __init__(
        self,
        *,
        gpu_capacity_blocks: int,
        block_size_tokens: int = 16,
        host_capacity_blocks: int = 0,
        bytes_per_token: int = 131_072,
        host_link_bytes_per_s: float = 25e9,
        prefill_tokens_per_s: float = 20_000.0,
        kv_events: bool = True,
    ) -> None:
        if gpu_capacity_blocks <= 0 or block_size_tokens <= 0:
            raise ValueError("gpu_capacity_blocks and block_size_tokens must be > 0")
        self.block_size_tokens = block_size_tokens
        self.gpu_capacity_blocks = gpu_capacity_blocks
        self.host_capacity_blocks = host_capacity_blocks
        self.bytes_per_token = bytes_per_token
        self.host_link_bytes_per_s = host_link_bytes_per_s
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self._blocks = [_Block(i) for i in range(gpu_capacity_blocks)]
        # NOTE: the head of the free queue is evicted first. Freed blocks are
        # appended in reverse prefix order, so the tail of a prefix goes before
        # its root (the root is the part most likely shared).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(gpu_capacity_blocks))
        self._cached: dict[bytes, int] = {}  # hash -> GPU block id
        self._sessions: dict[str, _Session] = {}
        # (expiry, session) of every lease granted, soonest first; stale entries stay.
        self._lease_heap: list[tuple[float, str]] = []
        self._log = KvEventLog(block_size_tokens, enabled=kv_events)
        self._host = HostTier(host_capacity_blocks, self._log)
        self._link = HostLink(host_link_bytes_per_s)
        self.stats = BlockPoolStats()

    # ---------------------------------------------------------------- engine side

    def start_step(
        self, session_id: str, tenant_id: str, prompt_token_ids: Sequence[int], now: float
    ) -> StepAllocation:
        """Allocates a step's prompt (prefix hits first); returns what was reused."""
        self.expire_leases(now)
        s = self._sessions.get(session_id)
        if s is None:
            s = _Session(session_id, tenant_id)  # registered once its blocks are found
        if s.running:
            raise ValueError(f"session {session_id!r} already has a running step")
        self._set_tokens(s, list(prompt_token_ids))
        n_total = -(-len(s.token_ids) // self.block_size_tokens)
        gpu_hits = self._gpu_prefix(s.chain)
        reuse = set(gpu_hits)
        own_free = [b for b in s.held if b not in reuse and self._blocks[b].ref_cnt == 1]

        def available() -> int:
            in_free = sum(1 for b in gpu_hits if self._blocks[b].ref_cnt == 0)
            return len(self._free) - in_free + len(own_free)

        need = n_total - len(gpu_hits)
        while available() < need and self._break_one_lease(exclude=session_id):
            pass
        if available() < need:
            raise PoolExhaustedError(f"need {need} GPU blocks, {available()} can be freed")
        self._sessions[session_id] = s
        for b in gpu_hits:
            self._touch(b)
        self._free_blocks(s.held)
        s.lease_expiry_s = None  # NOTE: a lease covers one tool wait; the step now holds.
        held = list(gpu_hits)
        i = len(gpu_hits)
        while i < len(s.chain) and s.chain[i] in self._host:
            i += 1
        host_moved = i - len(gpu_hits)
        held.extend(self._load_run(s.chain[len(gpu_hits) : i], s.session_id))
        computed_from = i
        held.extend(self._allocate_chain(s, i, n_total))
        s.held = held
        s.running = True
        ready_s = self._transfer(host_moved, now, to_gpu=True)
        bs = self.block_size_tokens
        gpu_tokens = min(len(gpu_hits) * bs, len(s.token_ids))
        host_tokens = min(host_moved * bs, len(s.token_ids) - gpu_tokens)
        computed = len(s.token_ids) - gpu_tokens - host_tokens
        self.stats.gpu_hit_blocks += len(gpu_hits)
        self.stats.host_hit_blocks += host_moved
        self.stats.computed_blocks += n_total - computed_from
        return StepAllocation(gpu_tokens, host_tokens, computed, ready_s)

    def end_step(
        self, session_id: str, now: float, generated_token_ids: Sequence[int] = ()
    ) -> None:
        """Appends generated tokens, then frees the step's blocks unless leased."""
        self.expire_leases(now)
        s = self._sessions[session_id]
        if not s.running:
            raise ValueError(f"session {session_id!r} has no running step")
        if generated_token_ids:
            self._set_tokens(s, s.token_ids + list(generated_token_ids))
            n_total = -(-len(s.token_ids) // self.block_size_tokens)
            first_new = len(s.held)
            need = n_total - first_new
            while len(self._free) < need and self._break_one_lease(exclude=session_id):
                pass
            if len(self._free) < need:
                raise PoolExhaustedError("no GPU block left for generated tokens")
            # The old partial tail block filled up during decode: cache it now.
            for i in range(min(first_new, len(s.chain))):
                blk = self._blocks[s.held[i]]
                if blk.block_hash is None and s.chain[i] not in self._cached:
                    self._cache_block(blk.block_id, s.chain[i], s, i)
            s.held.extend(self._allocate_chain(s, first_new, n_total))
        s.running = False
        if s.lease_expiry_s is None:
            self._free_blocks(s.held)
            s.held = []

    def finish_session(self, session_id: str, now: float) -> None:
        """Forgets a finished session; its blocks stay in the prefix cache as LRU."""
        self.expire_leases(now)
        s = self._sessions.pop(session_id, None)
        if s is not None:
            self._free_blocks(s.held)

    # ------------------------------------------------------------- enforcement

    def apply_directive(
        self, directive: worker_pb2.RetentionDirective, now: float
    ) -> DirectiveResult:
        """Enforces one RetentionDirective (see `KVPool`)."""
        self.expire_leases(now)
        a = directive.action
        sid = directive.session_id
        if a == worker_pb2.RETAIN_GPU:
            return self.retain(sid, directive.lease_ttl_s, directive.priority, now)
        if a == worker_pb2.OFFLOAD_HOST:
            return self.offload(sid, now)
        if a == worker_pb2.PREFETCH_GPU:
            return self.prefetch(sid, now, directive.lease_ttl_s, directive.priority)
        if a == worker_pb2.RELEASE:
            return self.release(sid, now)
        if a == worker_pb2.EVICT_NOW:
            return self.evict_now(sid, now)
        return DirectiveResult.rejected(f"unknown action {a}")

    def retain(self, session_id: str, ttl_s: float, priority: int, now: float) -> DirectiveResult:
        """Holds the session's GPU blocks past step end until `now + ttl_s`."""
        self.expire_leases(now)
        if not ttl_s > 0:
            return DirectiveResult.rejected("RETAIN_GPU needs lease_ttl_s > 0")
        s = self._sessions.get(session_id)
        if s is None:
            return DirectiveResult.rejected("unknown session")
        if not s.running and not s.held:
            # The step already ended: take back whatever of its prefix is still cached.
            blocks = self._gpu_prefix(s.chain)
            if not blocks:
                return DirectiveResult.rejected("no blocks of the session on the GPU")
            for b in blocks:
                self._touch(b)
            s.held = blocks
        self._set_lease(s, now + ttl_s, priority)
        return DirectiveResult.applied()

    def release(self, session_id: str, now: float) -> DirectiveResult:
        """Drops the lease; the blocks return to the LRU free queue."""
        self.expire_leases(now)
        s = self._sessions.get(session_id)
        if s is not None:
            self._end_lease(s)
        return DirectiveResult.applied()

    def offload(self, session_id: str, now: float) -> DirectiveResult:
        """Moves the session's GPU prefix blocks to the host tier and frees them."""
        self.expire_leases(now)
        s = self._sessions.get(session_id)
        if s is None:
            return DirectiveResult.rejected("unknown session")
        if self.host_capacity_blocks == 0:
            return DirectiveResult.rejected("no host tier")
        if s.running:
            return DirectiveResult.rejected("a step is running")
        on_gpu = [h for h in s.chain if h in self._cached]
        if len(on_gpu) > self.host_capacity_blocks:
            return DirectiveResult.rejected(
                f"needs {len(on_gpu)} host blocks, capacity {self.host_capacity_blocks}"
            )
        self._end_lease(s)
        # Blocks shared with a running or leased session stay on the GPU.
        movable = [
            i for i, h in enumerate(s.chain)
            if (b := self._cached.get(h)) is not None and self._blocks[b].ref_cnt == 0
        ]  # fmt: skip
        self._host.make_room(len(movable), set(s.chain))
        for i in movable:
            self._uncache(self._blocks[self._cached[s.chain[i]]])
        run: list[int] = []
        for i in [*movable, -2]:  # -2 ends the last run
            if run and i != run[-1] + 1:
                parent = s.chain[run[0] - 1] if run[0] else None
                self._host.put_run([s.chain[j] for j in run], parent, s.session_id)
                run = []
            run.append(i)
        for h in s.chain:
            if h in self._host:
                self._host.touch(h)
        self.stats.offloaded_blocks += len(movable)
        return DirectiveResult.applied(self._transfer(len(movable), now, to_gpu=False))

    def prefetch(
        self, session_id: str, now: float, lease_ttl_s: float = 0.0, priority: int = 0
    ) -> DirectiveResult:
        """Reloads the session's host prefix to the GPU; leases it when ttl > 0."""
        self.expire_leases(now)
        s = self._sessions.get(session_id)
        if s is None:
            return DirectiveResult.rejected("unknown session")
        if s.running:
            return DirectiveResult.applied()  # the step already has its blocks
        gpu = self._gpu_prefix(s.chain)
        to_load = []
        for h in s.chain[len(gpu) :]:
            if h not in self._host:
                break
            to_load.append(h)
        if not gpu and not to_load:
            return DirectiveResult.rejected("nothing of the session is cached")
        held = set(s.held)
        in_free = sum(1 for b in gpu if self._blocks[b].ref_cnt == 0 and b not in held)
        if len(self._free) - in_free < len(to_load):
            return DirectiveResult.rejected("not enough free GPU blocks")
        for b in gpu:
            if b not in held:
                self._touch(b)
        blocks = gpu + self._load_run(to_load, s.session_id)
        keep = set(blocks)
        self._free_blocks([b for b in s.held if b not in keep])
        s.held = blocks
        self.stats.prefetched_blocks += len(to_load)
        ready_s = self._transfer(len(to_load), now, to_gpu=True)
        if lease_ttl_s > 0:
            self._set_lease(s, now + lease_ttl_s, priority)
        else:
            # NOTE: no lease: the blocks go to the MRU end of the free queue, the
            # last place the LRU looks.
            self._end_lease(s)
        return DirectiveResult.applied(ready_s)

    def evict_now(self, session_id: str, now: float) -> DirectiveResult:
        """Frees the session's blocks on every tier now (shared GPU blocks stay)."""
        self.expire_leases(now)
        s = self._sessions.get(session_id)
        if s is None:
            return DirectiveResult.applied()
        if s.running:
            return DirectiveResult.rejected("a step is running")
        self._end_lease(s)
        for h in s.chain:
            b = self._cached.get(h)
            if b is not None and self._blocks[b].ref_cnt == 0:
                self._uncache(self._blocks[b])
            elif h in self._host:
                self._host.pop(h)
        return DirectiveResult.applied()

    def expire_leases(self, now: float) -> int:
        """Ends every lease whose TTL has passed (even with no scheduler alive)."""
        ended = 0
        heap = self._lease_heap
        while heap and heap[0][0] <= now:
            _, sid = heapq.heappop(heap)
            s = self._sessions.get(sid)
            # Entries are never removed when a lease changes: check it is still due.
            if s is not None and s.lease_expiry_s is not None and s.lease_expiry_s <= now:
                self._end_lease(s)
                ended += 1
        self.stats.leases_expired += ended
        return ended

    # ------------------------------------------------------------ reporting

    def cache_spec(self) -> types_pb2.CacheSpec:
        """Returns the cache declared in Hello."""
        return types_pb2.CacheSpec(
            block_size_tokens=self.block_size_tokens,
            bytes_per_token=self.bytes_per_token,
            gpu_capacity_blocks=self.gpu_capacity_blocks,
            host_capacity_blocks=self.host_capacity_blocks,
            hash_algo="sha256",
            prefill_tokens_per_s=self.prefill_tokens_per_s,
            host_link_bytes_per_s=self.host_link_bytes_per_s,
        )

    def take_kv_events(self) -> list[types_pb2.KvEvent]:
        """Returns and forgets the KV events emitted since the last call."""
        return self._log.take()

    def heartbeat(self, now: float) -> worker_pb2.Heartbeat:
        """Returns free blocks (evictable ones count as free, as in vLLM) and load."""
        self.expire_leases(now)
        return worker_pb2.Heartbeat(
            gpu_free_blocks=len(self._free),
            host_free_blocks=self.host_capacity_blocks - len(self._host),
            running_steps=sum(1 for s in self._sessions.values() if s.running),
        )

    def residency(self, session_id: str, now: float) -> worker_pb2.SessionResidency:
        """Returns where one session's KV is."""
        s = self._sessions[session_id]
        bs = self.block_size_tokens
        held_gpu = len(s.held) if s.held else sum(1 for h in s.chain if h in self._cached)
        prefix = 0
        for h in s.chain:
            if h not in self._cached and h not in self._host:
                break
            prefix += 1
        cached_tokens = prefix * bs
        if s.held and len(s.held) > len(s.chain):
            cached_tokens = len(s.token_ids)  # the partial tail block is held too
        lease_s = 0.0 if s.lease_expiry_s is None else max(0.0, s.lease_expiry_s - now)
        return worker_pb2.SessionResidency(
            session_id=s.session_id,
            tenant_id=s.tenant_id,
            gpu_blocks=held_gpu,
            host_blocks=sum(1 for h in s.chain if h in self._host),
            lease_remaining_s=lease_s,
            cached_tokens=cached_tokens,
        )

    def snapshot(self, now: float) -> worker_pb2.PoolSnapshot:
        """Returns the full inventory (the worker is the truth about residency)."""
        self.expire_leases(now)
        return worker_pb2.PoolSnapshot(
            gpu_used_blocks=self.gpu_used_blocks(),
            host_used_blocks=len(self._host),
            sessions=[self.residency(sid, now) for sid in self._sessions],
            complete=True,
        )

    def gpu_used_blocks(self) -> int:
        """Returns GPU blocks held by steps or leases, or holding cached prefixes."""
        return self.gpu_capacity_blocks - self._free_count()

    def held_blocks(self) -> int:
        """Returns GPU blocks with a ref (running steps and leases)."""
        return self.gpu_capacity_blocks - len(self._free)

    def free_queue(self) -> list[int]:
        """Returns the free queue, next-evicted first (for tests and debugging)."""
        return list(self._free)

    def check_invariants(self) -> None:
        """Raises AssertionError when the pool's bookkeeping is inconsistent."""
        refs = [0] * self.gpu_capacity_blocks
        for s in self._sessions.values():
            assert len(set(s.held)) == len(s.held), "a session holds a block twice"
            assert s.running or s.lease_expiry_s is not None or not s.held, "stray hold"
            for b in s.held:
                refs[b] += 1
        for blk in self._blocks:
            assert blk.ref_cnt == refs[blk.block_id], f"ref count of block {blk.block_id}"
            assert (blk.ref_cnt == 0) == (blk.block_id in self._free), "free queue mismatch"
            if blk.block_hash is not None:
                assert self._cached.get(blk.block_hash) == blk.block_id, "cache map mismatch"
        assert len(self._cached) <= self.gpu_capacity_blocks
        assert not any(h in self._host for h in self._cached), "a block is on two tiers"
        assert len(self._host) <= self.host_capacity_blocks, "host capacity exceeded"

    # ------------------------------------------------------------- internals

    def _set_tokens(self, s: _Session, token_ids: list[int]) -> None:
        s.chain = extend_chain(s.token_ids, s.chain, token_ids, self.block_size_tokens, s.tenant_id)
        s.token_ids = token_ids

    def _gpu_prefix(self, chain: list[bytes]) -> list[int]:
        out = []
        for h in chain:
            b = self._cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def _free_count(self) -> int:
        """Blocks that hold nothing (not even a cached prefix)."""
        return sum(1 for b in self._free if self._blocks[b].block_hash is None)

    def _touch(self, block_id: int) -> None:
        blk = self._blocks[block_id]
        if blk.ref_cnt == 0:
            del self._free[block_id]
        blk.ref_cnt += 1

    def _free_blocks(self, block_ids: list[int]) -> None:
        for b in reversed(block_ids):
            blk = self._blocks[b]
            blk.ref_cnt -= 1
            if blk.ref_cnt == 0:
                self._free[b] = None

    def _set_lease(self, s: _Session, expiry_s: float, priority: int) -> None:
        s.lease_expiry_s = expiry_s
        s.lease_priority = priority
        heapq.heappush(self._lease_heap, (expiry_s, s.session_id))

    def _end_lease(self, s: _Session) -> None:
        s.lease_expiry_s = None
        if not s.running:
            self._free_blocks(s.held)
            s.held = []

    def _break_one_lease(self, exclude: str) -> bool:
        leased = [
            s
            for s in self._sessions.values()
            if s.lease_expiry_s is not None and not s.running and s.session_id != exclude
        ]
        if not leased:
            return False
        victim = min(leased, key=lambda s: (s.lease_priority, s.lease_expiry_s))
        self._end_lease(victim)
        self.stats.leases_broken += 1
        return True

    def _pop_free(self) -> _Block:
        block_id, _ = self._free.popitem(last=False)
        blk = self._blocks[block_id]
        if blk.block_hash is not None:
            del self._cached[blk.block_hash]
            self._log.removed(blk.block_hash, GPU)
            blk.block_hash = None
            self.stats.evicted_blocks += 1
        blk.ref_cnt = 1
        return blk

    def _uncache(self, blk: _Block) -> None:
        """Drops a free block's content; it moves to the head to be reused first."""
        assert blk.block_hash is not None and blk.ref_cnt == 0
        del self._cached[blk.block_hash]
        self._log.removed(blk.block_hash, GPU)
        blk.block_hash = None
        self._free.move_to_end(blk.block_id, last=False)

    def _cache_block(self, block_id: int, h: bytes, s: _Session, index: int) -> None:
        if h in self._host:
            self._host.pop(h)  # the GPU now holds it: one tier per block
        self._blocks[block_id].block_hash = h
        self._cached[h] = block_id
        parent = s.chain[index - 1] if index else None
        self._log.stored([h], parent, GPU, s.session_id)

    def _allocate_chain(self, s: _Session, start: int, n_total: int) -> list[int]:
        """Allocates blocks start..n_total-1 of the session; caches the full ones."""
        out: list[int] = []
        run: list[int] = []
        for i in range(start, n_total):
            h = s.chain[i] if i < len(s.chain) else None
            if h is not None and h in self._cached:
                # Matched after a gap: the engine recomputes it, the content is the same.
                self._touch(self._cached[h])
                out.append(self._cached[h])
                continue
            if h is not None and h in self._host:
                self._host.pop(h)  # recomputed on the GPU: the host copy must go
            blk = self._pop_free()
            out.append(blk.block_id)
            if h is not None:
                blk.block_hash = h
                self._cached[h] = blk.block_id
                if run and run[-1] != i - 1:
                    self._flush_run(run, s)
                run.append(i)
        self._flush_run(run, s)
        return out

    def _flush_run(self, run: list[int], s: _Session) -> None:
        """Emits one BlockStored for a contiguous run of chain indexes."""
        if run:
            parent = s.chain[run[0] - 1] if run[0] else None
            self._log.stored([s.chain[i] for i in run], parent, GPU, s.session_id)
            run.clear()

    def _load_run(self, hashes: list[bytes], session_id: str) -> list[int]:
        """Moves a contiguous run of a prefix from the host tier to GPU blocks."""
        if not hashes:
            return []
        parents = [self._host.pop(h) for h in hashes]
        out = []
        for h in hashes:
            blk = self._pop_free()
            blk.block_hash = h
            self._cached[h] = blk.block_id
            out.append(blk.block_id)
        self._log.stored(hashes, parents[0], GPU, session_id)
        return out

    def _transfer(self, n_blocks: int, now: float, *, to_gpu: bool) -> float:
        n_bytes = n_blocks * self.block_size_tokens * self.bytes_per_token
        return self._link.book(n_bytes, now, to_gpu=to_gpu)
