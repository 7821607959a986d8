"""Pool invariants under random operation sequences (hypothesis state machine)."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvsched_client._proto.kvsched.v1 import worker_pb2
from kvsched_client.pool import BlockPool, PoolExhaustedError

SESSIONS = st.sampled_from(["s0", "s1", "s2", "s3"])
ACTIONS = st.sampled_from(
    [
        worker_pb2.RETAIN_GPU,
        worker_pb2.OFFLOAD_HOST,
        worker_pb2.PREFETCH_GPU,
        worker_pb2.RELEASE,
        worker_pb2.EVICT_NOW,
    ]
)


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(gpu_capacity_blocks=12, block_size_tokens=4, host_capacity_blocks=6)
        self.now = 0.0
        self.tokens: dict[str, list[int]] = {}
        self.running: set[str] = set()
        self.leases: dict[str, float] = {}  # session -> expiry, as the model sees it

    @rule(dt=st.floats(min_value=0.0, max_value=3.0))
    def advance(self, dt: float) -> None:
        self.now += dt
        self.pool.expire_leases(self.now)

    @rule(sid=SESSIONS, n_new=st.integers(1, 14), shared=st.booleans())
    def start(self, sid: str, n_new: int, shared: bool) -> None:
        if sid in self.running:
            return
        base = self.tokens.get(sid, [7, 7, 7, 7] if shared else [hash(sid) % 1000])
        prompt = base + list(range(len(base), len(base) + n_new))
        try:
            alloc = self.pool.start_step(sid, "t", prompt, self.now)
        except PoolExhaustedError:
            return
        assert alloc.gpu_hit_tokens + alloc.host_hit_tokens + alloc.computed_tokens == len(prompt)
        self.tokens[sid] = prompt
        self.running.add(sid)

    @rule(sid=SESSIONS, n_gen=st.integers(0, 6))
    def end(self, sid: str, n_gen: int) -> None:
        if sid not in self.running:
            return
        gen = list(range(900, 900 + n_gen))
        try:
            self.pool.end_step(sid, self.now, gen)
        except PoolExhaustedError:
            self.pool.end_step(sid, self.now)
        else:
            self.tokens[sid] = self.tokens[sid] + gen
        self.running.discard(sid)

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data(), action=ACTIONS, ttl=st.floats(0.1, 5.0), prio=st.integers(0, 3))
    def directive(self, data: st.DataObject, action: int, ttl: float, prio: int) -> None:
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        d = worker_pb2.RetentionDirective(
            directive_id="d", session_id=sid, action=action, lease_ttl_s=ttl, priority=prio
        )
        res = self.pool.apply_directive(d, self.now)
        assert res.outcome in (worker_pb2.DIRECTIVE_APPLIED, worker_pb2.DIRECTIVE_REJECTED)
        assert res.ok or res.reason

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.pool.finish_session(sid, self.now)
        self.tokens.pop(sid)
        self.running.discard(sid)

    @invariant()
    def bookkeeping_is_consistent(self) -> None:
        self.pool.check_invariants()

    @invariant()
    def capacity_is_never_exceeded(self) -> None:
        assert 0 <= self.pool.gpu_used_blocks() <= self.pool.gpu_capacity_blocks
        snap = self.pool.snapshot(self.now)
        assert snap.host_used_blocks <= 6
        # No lease is ever longer than the longest TTL issued (5 s).
        assert all(r.lease_remaining_s <= 5.0 + 1e-9 for r in snap.sessions)
        assert {r.session_id for r in snap.sessions} == set(self.tokens) | self.running


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_every_lease_expires_and_nothing_stays_held() -> None:
    pool = BlockPool(gpu_capacity_blocks=64, block_size_tokens=4, host_capacity_blocks=8)
    for i in range(8):
        sid = f"s{i}"
        pool.start_step(sid, "t", list(range(i * 100, i * 100 + 20)), now=0.0)
        pool.retain(sid, 1.0 + i, i, now=0.0)
        pool.end_step(sid, now=0.5)
    assert pool.held_blocks() == 8 * 5
    pool.expire_leases(now=100.0)
    assert pool.held_blocks() == 0
    assert pool.stats.leases_expired == 8
