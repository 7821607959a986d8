"""Cluster state as struct-of-arrays: workers and sessions in dense numpy slots.

Each table keeps one numpy array per field, indexed by a dense integer slot,
a dict from public id to slot and a free list of released slots. Arrays grow
by doubling, so a kernel reads the live arrays directly and nothing is copied
per event. Sessions homed on a worker form an intrusive doubly-linked list
(``prev``/``next`` arrays, ``head`` per worker): eviction walks one worker's
residents without touching the other 10^5 sessions.
"""

from __future__ import annotations

import math
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from scheduler_service.domain import SessionId, SessionState, Tier, WorkerId, WorkerSpec

NO_SLOT = -1
NO_TIMER = math.inf

#: Integer codes the kernels compare against (the domain enums' values).
TIER_NONE = int(Tier.NONE)
TIER_GPU = int(Tier.GPU)
TIER_HOST = int(Tier.HOST)
STATE_RUNNING = int(SessionState.RUNNING)
STATE_TOOL_WAIT = int(SessionState.TOOL_WAIT)
STATE_IDLE = int(SessionState.IDLE)

IdT = TypeVar("IdT", bound=str)
_ALIGN = 64  # bytes: a cache line


class Elements(Protocol):
    """Single-element access to one field's array (a memoryview of its buffer)."""

    def __getitem__(self, i: int, /) -> Any: ...

    def __setitem__(self, i: int, value: Any, /) -> None: ...


_WORKER_FIELDS: tuple[tuple[str, type, float], ...] = (
    ("gpu_cap_blocks", np.int64, 0),
    ("host_cap_blocks", np.int64, 0),
    ("gpu_used_blocks", np.int64, 0),
    ("host_used_blocks", np.int64, 0),
    # NOTE: blocks the engine told the worker to free but whose REMOVED events
    # have not arrived yet; the optimistic decrement is not counted twice.
    ("pending_free_blocks", np.int64, 0),
    ("queued_prefill_tokens", np.int64, 0),
    ("running_steps", np.int64, 0),
    ("prefill_tokens_per_s", np.float64, 1.0),
    ("host_link_bytes_per_s", np.float64, 1.0),
    ("block_size_tokens", np.int64, 1),
    ("bytes_per_token", np.int64, 0),
    ("block_bytes", np.int64, 0),  # block_size_tokens × bytes_per_token
    ("kv_domain", np.int64, -1),  # interned kv_transfer_domain; -1: shares KV with none
    ("epoch", np.int64, 0),
    ("live", np.bool_, False),  # connected and not draining: may take new steps
    ("connected", np.bool_, False),
    ("draining", np.bool_, False),
    ("kv_feed", np.bool_, False),  # publishes KV block events: trust those for usage
    ("head", np.int32, NO_SLOT),  # first session homed here
    ("residents", np.int32, 0),
    ("price_at_decision", np.float64, 0.0),  # shadow price the waiting leases were set at
    # NOTE: the fastest seconds per output token seen lately (decaying minimum):
    # what a step's decode would take alone, for fair share's standalone times.
    ("decode_s_per_token", np.float64, 0.0),
    ("decode_s_per_context_token", np.float64, 0.0),  # KV read per token of context
)

_SESSION_FIELDS: tuple[tuple[str, type, float], ...] = (
    ("tenant", np.int32, NO_SLOT),
    ("agent", np.int32, NO_SLOT),
    ("home", np.int32, NO_SLOT),
    ("prev", np.int32, NO_SLOT),
    ("next", np.int32, NO_SLOT),
    ("tier", np.int8, TIER_NONE),
    ("state", np.int8, STATE_IDLE),
    ("gpu_blocks", np.int64, 0),
    ("host_blocks", np.int64, 0),
    ("context_tokens", np.int64, 0),
    ("wait_context_tokens", np.int64, 0),
    ("step_index", np.int64, 0),
    ("events", np.int64, 0),
    ("node", np.int32, NO_SLOT),  # graph node of the current / last tool wait
    # NOTE: one timer per session (a lease expiry or a planned prefetch), kept
    # in the arrays: setting or cancelling is one write, and tick finds the due
    # ones with a vectorised scan instead of a heap full of stale entries.
    ("timer_due_s", np.float64, math.inf),
    ("timer_kind", np.int8, 0),
    ("last_event_s", np.float64, 0.0),
    ("wait_started_s", np.float64, 0.0),
    ("next_use_s", np.float64, 0.0),  # predicted time of the next step
    ("lease_expires_s", np.float64, 0.0),  # 0: no lease
    ("prefetch_at_s", np.float64, 0.0),  # 0: none planned; -1: reloaded, awaiting use
    ("p_continue", np.float64, 1.0),
    ("hint_s", np.float64, 0.0),  # declared latency of the current tool wait (0: none)
    ("price_at_grant", np.float64, 0.0),  # shadow price its current lease was priced at
    ("started_s", np.float64, 0.0),
    ("ideal_s", np.float64, 0.0),  # standalone time of the work done (fair share)
    ("step_started_s", np.float64, -1.0),  # STEP_START of the step running (-1: none)
)


class _Table(Generic[IdT]):
    """Dense slots with an id→slot dict, a free list and doubling growth."""

    _fields: tuple[tuple[str, type, float], ...] = ()

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.slot_of: dict[IdT, int] = {}
        self.ids: list[IdT | None] = []
        self._free: list[int] = []
        self._freed: list[int] = []  # freed by ``remove(later=True)``, not yet reusable
        self._reallocate(self.capacity, keep=0)

    def _reallocate(self, capacity: int, keep: int) -> None:
        """Every field's array anew, at ``capacity``: the first ``keep`` slots as they
        are, the rest at their defaults, all carved out of one buffer.

        # NOTE: one buffer of every field is big enough for the kernel to map
        # it with huge pages (numpy asks for them from 4 MiB): a session's
        # fields are far apart, and with 4 KiB pages nearly every field of a
        # random session missed the TLB as well as the cache.
        """
        dtypes = [np.dtype(dtype) for _name, dtype, _fill in self._fields]
        sizes = [-(-capacity * d.itemsize // _ALIGN) * _ALIGN for d in dtypes]
        buf = np.empty(sum(sizes) + _ALIGN, dtype=np.uint8)
        at = -buf.ctypes.data % _ALIGN  # the first field starts on a cache line
        for (name, _dtype, fill), d, size in zip(self._fields, dtypes, sizes, strict=True):
            arr = buf[at : at + capacity * d.itemsize].view(d)
            arr[keep:] = fill
            if keep:
                arr[:keep] = getattr(self, name)[:keep]
            setattr(self, name, arr)
            at += size
        self.capacity = capacity
        self._refresh_views()

    def _refresh_views(self) -> None:
        # NOTE: ``<field>_v`` is a memoryview of the same buffer: Python code
        # reads and writes single elements through it at about half the cost of
        # numpy scalar indexing (and gets plain ints and floats back), while the
        # kernels take the numpy arrays. Views are rebuilt whenever arrays grow.
        for name, _dtype, _fill in self._fields:
            setattr(self, f"{name}_v", memoryview(getattr(self, name)))
        # each field's view and default, for ``remove``
        self._resets = [(getattr(self, f"{n}_v"), fill) for n, _d, fill in self._fields]

    def __getstate__(self) -> dict[str, Any]:
        # memoryviews do not pickle: a snapshot carries the arrays, and the
        # views are rebuilt over the restored arrays on load
        return {
            k: v
            for k, v in self.__dict__.items()
            if not isinstance(v, memoryview) and k != "_resets"
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_freed", [])  # a snapshot from before deferred reuse
        # the arrays come back one by one: into one buffer again
        self._reallocate(self.capacity, keep=self.capacity)

    def __len__(self) -> int:
        return len(self.slot_of)

    @property
    def high_water(self) -> int:
        """Slots ever handed out: arrays past this index are untouched."""
        return len(self.ids)

    def add(self, key: IdT) -> int:
        """A fresh slot for ``key`` with every field at its default."""
        if self._free:
            # NOTE: the most recently freed slot is reused first (its cache lines
            # are warm); LIFO is deterministic, which a journal replay needs.
            slot = self._free.pop()
        else:
            slot = len(self.ids)
            if slot >= self.capacity:
                self._grow()
            self.ids.append(None)
        self.ids[slot] = key
        self.slot_of[key] = slot
        return slot

    def remove(self, key: IdT, later: bool = False) -> int:
        """Free ``key``'s slot and reset its fields; returns the slot.

        ``later``: the slot is handed out again only after ``reuse_freed``.
        """
        slot = self.slot_of.pop(key)
        self.ids[slot] = None
        for view, fill in self._resets:
            view[slot] = fill
        (self._freed if later else self._free).append(slot)
        return slot

    def reuse_freed(self) -> None:
        """Make the slots freed with ``remove(later=True)`` available, in the order freed."""
        if self._freed:
            self._free.extend(self._freed)
            self._freed.clear()

    def _grow(self) -> None:
        self._reallocate(self.capacity * 2, keep=self.capacity)

    def nbytes(self) -> int:
        """Bytes held by the numpy arrays."""
        return sum(int(getattr(self, n).nbytes) for n, _d, _f in self._fields)


class WorkerTable(_Table[WorkerId]):
    """Workers: capacity, usage, load, link speeds, epoch, liveness, residents."""

    _fields = _WORKER_FIELDS
    gpu_cap_blocks: npt.NDArray[np.int64]
    host_cap_blocks: npt.NDArray[np.int64]
    gpu_used_blocks: npt.NDArray[np.int64]
    host_used_blocks: npt.NDArray[np.int64]
    pending_free_blocks: npt.NDArray[np.int64]
    queued_prefill_tokens: npt.NDArray[np.int64]
    running_steps: npt.NDArray[np.int64]
    prefill_tokens_per_s: npt.NDArray[np.float64]
    host_link_bytes_per_s: npt.NDArray[np.float64]
    block_size_tokens: npt.NDArray[np.int64]
    bytes_per_token: npt.NDArray[np.int64]
    block_bytes: npt.NDArray[np.int64]
    kv_domain: npt.NDArray[np.int64]
    epoch: npt.NDArray[np.int64]
    live: npt.NDArray[np.bool_]
    connected: npt.NDArray[np.bool_]
    draining: npt.NDArray[np.bool_]
    kv_feed: npt.NDArray[np.bool_]
    head: npt.NDArray[np.int32]
    residents: npt.NDArray[np.int32]
    price_at_decision: npt.NDArray[np.float64]
    decode_s_per_token: npt.NDArray[np.float64]
    decode_s_per_context_token: npt.NDArray[np.float64]
    gpu_cap_blocks_v: Elements
    host_cap_blocks_v: Elements
    gpu_used_blocks_v: Elements
    host_used_blocks_v: Elements
    pending_free_blocks_v: Elements
    queued_prefill_tokens_v: Elements
    running_steps_v: Elements
    prefill_tokens_per_s_v: Elements
    host_link_bytes_per_s_v: Elements
    block_size_tokens_v: Elements
    bytes_per_token_v: Elements
    block_bytes_v: Elements
    kv_domain_v: Elements
    epoch_v: Elements
    live_v: Elements
    connected_v: Elements
    draining_v: Elements
    kv_feed_v: Elements
    head_v: Elements
    residents_v: Elements
    price_at_decision_v: Elements
    decode_s_per_token_v: Elements
    decode_s_per_context_token_v: Elements

    def __init__(self, capacity: int = 64) -> None:
        super().__init__(capacity)
        self.specs: list[WorkerSpec | None] = []
        self.kv_domains: dict[str, int] = {}

    def set_spec(self, slot: int, spec: WorkerSpec) -> None:
        """Copy a worker's declared cache into the arrays."""
        while len(self.specs) <= slot:
            self.specs.append(None)
        self.specs[slot] = spec
        c = spec.cache
        self.gpu_cap_blocks[slot] = c.gpu_capacity_blocks
        self.host_cap_blocks[slot] = c.host_capacity_blocks
        self.prefill_tokens_per_s[slot] = max(c.prefill_tokens_per_s, 1.0)
        self.host_link_bytes_per_s[slot] = max(c.host_link_bytes_per_s, 1.0)
        self.block_size_tokens[slot] = max(c.block_size_tokens, 1)
        self.bytes_per_token[slot] = c.bytes_per_token
        # declared: fixed; unknown (0): the engine learns a floor from steps
        rate = c.decode_tokens_per_s
        self.decode_s_per_token[slot] = 1.0 / rate if rate > 0 else 0.0
        hbm = c.hbm_bytes_per_s
        self.decode_s_per_context_token[slot] = c.bytes_per_token / hbm if hbm > 0 else 0.0
        self.epoch[slot] = spec.epoch
        d = c.kv_transfer_domain
        self.kv_domain[slot] = self.kv_domains.setdefault(d, len(self.kv_domains)) if d else -1

    def spec(self, slot: int) -> WorkerSpec:
        """The declared spec of the worker in ``slot``."""
        s = self.specs[slot]
        assert s is not None
        return s

    def free_blocks(self, slot: int) -> int:
        """GPU blocks the engine believes are free on the worker."""
        return int(self.gpu_cap_blocks[slot] - self.gpu_used_blocks[slot])


class SessionTable(_Table[SessionId]):
    """Sessions: owner, home, tier, size, state, timing, predictions, lease."""

    _fields = _SESSION_FIELDS
    tenant: npt.NDArray[np.int32]
    agent: npt.NDArray[np.int32]
    home: npt.NDArray[np.int32]
    prev: npt.NDArray[np.int32]
    next: npt.NDArray[np.int32]
    tier: npt.NDArray[np.int8]
    state: npt.NDArray[np.int8]
    gpu_blocks: npt.NDArray[np.int64]
    host_blocks: npt.NDArray[np.int64]
    context_tokens: npt.NDArray[np.int64]
    wait_context_tokens: npt.NDArray[np.int64]
    step_index: npt.NDArray[np.int64]
    events: npt.NDArray[np.int64]
    node: npt.NDArray[np.int32]
    timer_due_s: npt.NDArray[np.float64]
    timer_kind: npt.NDArray[np.int8]
    last_event_s: npt.NDArray[np.float64]
    wait_started_s: npt.NDArray[np.float64]
    next_use_s: npt.NDArray[np.float64]
    lease_expires_s: npt.NDArray[np.float64]
    prefetch_at_s: npt.NDArray[np.float64]
    p_continue: npt.NDArray[np.float64]
    hint_s: npt.NDArray[np.float64]
    price_at_grant: npt.NDArray[np.float64]
    started_s: npt.NDArray[np.float64]
    ideal_s: npt.NDArray[np.float64]
    step_started_s: npt.NDArray[np.float64]
    tenant_v: Elements
    agent_v: Elements
    home_v: Elements
    prev_v: Elements
    next_v: Elements
    tier_v: Elements
    state_v: Elements
    gpu_blocks_v: Elements
    host_blocks_v: Elements
    context_tokens_v: Elements
    wait_context_tokens_v: Elements
    step_index_v: Elements
    events_v: Elements
    node_v: Elements
    timer_due_s_v: Elements
    timer_kind_v: Elements
    last_event_s_v: Elements
    wait_started_s_v: Elements
    next_use_s_v: Elements
    lease_expires_s_v: Elements
    prefetch_at_s_v: Elements
    p_continue_v: Elements
    hint_s_v: Elements
    price_at_grant_v: Elements
    started_s_v: Elements
    ideal_s_v: Elements
    step_started_s_v: Elements

    def __init__(self, capacity: int = 1024) -> None:
        super().__init__(capacity)


class Interned(Generic[IdT]):
    """Strings (tenant ids, agent types) mapped to small dense integers."""

    def __init__(self) -> None:
        self.index: dict[IdT, int] = {}
        self.names: list[IdT] = []

    def get(self, name: IdT) -> int:
        """The integer for ``name``, interning it on first sight."""
        i = self.index.get(name)
        if i is None:
            i = len(self.names)
            self.index[name] = i
            self.names.append(name)
        return i


class ClusterState:
    """Workers, sessions and the residency lists that join them.

    Per tenant slot it also keeps live sessions and the KV bytes its sessions
    hold on GPU and host tiers (blocks × the home worker's ``block_bytes``),
    moved by every method that changes a session's blocks or home, so a quota
    check reads one counter instead of scanning sessions. A session with no
    home is charged nothing.
    """

    def __init__(self, worker_capacity: int = 64, session_capacity: int = 1024) -> None:
        self.workers = WorkerTable(worker_capacity)
        self.sessions = SessionTable(session_capacity)
        self.tenant_sessions: list[int] = []
        self.tenant_gpu_bytes: list[int] = []
        self.tenant_host_bytes: list[int] = []

    # -- sessions and tenants -----------------------------------------------------

    def ensure_tenant(self, t: int) -> None:
        """Make room in the per-tenant counters for tenant slot ``t``."""
        while len(self.tenant_sessions) <= t:
            self.tenant_sessions.append(0)
            self.tenant_gpu_bytes.append(0)
            self.tenant_host_bytes.append(0)

    def add_session(self, sid: SessionId, t: int) -> int:
        """A fresh session slot owned by tenant slot ``t``."""
        ss = self.sessions
        s = ss.add(sid)
        ss.tenant_v[s] = t
        if t >= 0:
            self.ensure_tenant(t)
            self.tenant_sessions[t] += 1
        return s

    def remove_session(self, s: int) -> None:
        """Drop session ``s`` (unlinked from its home, its charges with it).

        # NOTE: its slot is handed out again only after ``sessions.reuse_freed()``
        # (the engine calls it at the end of each batch and tick): a batch's
        # new sessions then get the slots free when the batch began, whatever
        # its own events end, so the compiled path can allocate them up front.
        """
        self.unlink(s)
        ss = self.sessions
        t = int(ss.tenant_v[s])
        if t >= 0:
            self.tenant_sessions[t] -= 1
        ss.remove(SessionId(ss.ids[s] or ""), later=True)

    def set_worker_spec(self, w: int, spec: WorkerSpec) -> None:
        """Adopt a worker's declared cache; re-charges its residents if a block's size changed."""
        ws, ss = self.workers, self.sessions
        old = int(ws.block_bytes_v[w])
        ws.set_spec(w, spec)
        ws.block_bytes_v[w] = int(ws.block_size_tokens_v[w]) * int(ws.bytes_per_token_v[w])
        delta = int(ws.block_bytes_v[w]) - old
        if delta:
            for s in self.residents_of(w):
                t = int(ss.tenant_v[s])
                if t >= 0:
                    self.tenant_gpu_bytes[t] += int(ss.gpu_blocks_v[s]) * delta
                    self.tenant_host_bytes[t] += int(ss.host_blocks_v[s]) * delta

    def _charge(self, s: int, w: int, sign: int) -> None:
        # add (sign 1) or remove (sign -1) session ``s``'s blocks as held on ``w``
        ss = self.sessions
        t = int(ss.tenant_v[s])
        if t < 0:
            return
        bb = sign * int(self.workers.block_bytes_v[w])
        self.tenant_gpu_bytes[t] += int(ss.gpu_blocks_v[s]) * bb
        self.tenant_host_bytes[t] += int(ss.host_blocks_v[s]) * bb

    def _charge_gpu(self, s: int, w: int, delta_blocks: int) -> None:
        t = int(self.sessions.tenant_v[s])
        if t >= 0 and w != NO_SLOT:
            self.tenant_gpu_bytes[t] += delta_blocks * int(self.workers.block_bytes_v[w])

    def _charge_host(self, s: int, w: int, delta_blocks: int) -> None:
        t = int(self.sessions.tenant_v[s])
        if t >= 0 and w != NO_SLOT:
            self.tenant_host_bytes[t] += delta_blocks * int(self.workers.block_bytes_v[w])

    # -- residency lists ----------------------------------------------------------

    def link(self, s: int, w: int) -> None:
        """Make worker ``w`` the home of session ``s`` (unlinking any old home)."""
        ss = self.sessions
        if ss.home_v[s] == w:
            return
        if ss.home_v[s] != NO_SLOT:
            self.unlink(s)
        ws = self.workers
        head = int(ws.head_v[w])
        ss.prev_v[s] = NO_SLOT
        ss.next_v[s] = head
        if head != NO_SLOT:
            ss.prev_v[head] = s
        ws.head_v[w] = s
        ws.residents_v[w] += 1
        ss.home_v[s] = w
        self._charge(s, w, 1)

    def unlink(self, s: int) -> None:
        """Remove session ``s`` from its home's resident list."""
        ss, ws = self.sessions, self.workers
        w = int(ss.home_v[s])
        if w == NO_SLOT:
            return
        self._charge(s, w, -1)
        p, n = int(ss.prev_v[s]), int(ss.next_v[s])
        if p != NO_SLOT:
            ss.next_v[p] = n
        else:
            ws.head_v[w] = n
        if n != NO_SLOT:
            ss.prev_v[n] = p
        ss.prev_v[s] = ss.next_v[s] = NO_SLOT
        ss.home_v[s] = NO_SLOT
        ws.residents_v[w] -= 1

    def residents_of(self, w: int) -> list[int]:
        """Session slots homed on worker ``w``, most recently linked first."""
        out: list[int] = []
        s = int(self.workers.head[w])
        nxt = self.sessions.next
        while s != NO_SLOT:
            out.append(s)
            s = int(nxt[s])
        return out

    # -- residency accounting ----------------------------------------------------
    # NOTE: a worker that publishes KV events reports its own growth (STORED);
    # for it the engine only books the frees it orders, and parks them in
    # ``pending_free_blocks`` so the REMOVED events that follow are not
    # subtracted twice. A worker without a KV feed is booked from session sizes.

    def set_gpu_blocks(self, s: int, blocks: int) -> None:
        """Session ``s`` now holds ``blocks`` on its home GPU."""
        ss, ws = self.sessions, self.workers
        w = int(ss.home_v[s])
        if ss.tier_v[s] == TIER_HOST:
            self._drop_host(s)
        delta = blocks - int(ss.gpu_blocks_v[s])
        ss.gpu_blocks_v[s] = blocks
        ss.tier_v[s] = TIER_GPU
        if w != NO_SLOT and delta:
            self._charge_gpu(s, w, delta)
            if not ws.kv_feed_v[w]:
                ws.gpu_used_blocks_v[w] += delta

    def free_gpu(self, s: int) -> int:
        """The engine ordered ``s``'s GPU blocks freed; returns how many."""
        ss, ws = self.sessions, self.workers
        n = int(ss.gpu_blocks_v[s])
        w = int(ss.home_v[s])
        ss.gpu_blocks_v[s] = 0
        if ss.tier_v[s] == TIER_GPU:
            ss.tier_v[s] = TIER_NONE
        if w != NO_SLOT and n:
            self._charge_gpu(s, w, -n)
            ws.gpu_used_blocks_v[w] = max(0, int(ws.gpu_used_blocks_v[w]) - n)
            if ws.kv_feed_v[w]:
                ws.pending_free_blocks_v[w] += n
        return n

    def to_host(self, s: int) -> int:
        """Move ``s``'s GPU blocks to its home's host tier; returns how many."""
        n = self.free_gpu(s)
        ss = self.sessions
        w = int(ss.home_v[s])
        self._charge_host(s, w, n - int(ss.host_blocks_v[s]))
        ss.host_blocks_v[s] = n
        ss.tier_v[s] = TIER_HOST
        if w != NO_SLOT:
            self.workers.host_used_blocks[w] += n
        return n

    def release(self, s: int) -> None:
        """The engine ordered every copy of ``s`` dropped."""
        self.free_gpu(s)
        self._drop_host(s)
        self.sessions.tier[s] = TIER_NONE

    def forget(self, s: int) -> None:
        """``s`` holds nothing any more (the worker said so; usage came from it)."""
        ss = self.sessions
        w = int(ss.home_v[s])
        if w != NO_SLOT:
            self._charge(s, w, -1)
        ss.tier_v[s] = TIER_NONE
        ss.gpu_blocks_v[s] = 0
        ss.host_blocks_v[s] = 0
        ss.lease_expires_s_v[s] = 0.0
        ss.prefetch_at_s_v[s] = 0.0
        ss.timer_due_s_v[s] = NO_TIMER

    def _drop_host(self, s: int) -> None:
        ss = self.sessions
        n = int(ss.host_blocks_v[s])
        w = int(ss.home_v[s])
        ss.host_blocks_v[s] = 0
        if w != NO_SLOT and n:
            self._charge_host(s, w, -n)
            self.workers.host_used_blocks[w] = max(0, int(self.workers.host_used_blocks[w]) - n)

    def set_residency(self, s: int, gpu_blocks: int, host_blocks: int) -> None:
        """Adopt what the worker says ``s`` holds (its usage figures come from it too)."""
        ss = self.sessions
        w = int(ss.home_v[s])
        self._charge_gpu(s, w, gpu_blocks - int(ss.gpu_blocks_v[s]))
        self._charge_host(s, w, host_blocks - int(ss.host_blocks_v[s]))
        ss.gpu_blocks_v[s] = gpu_blocks
        ss.host_blocks_v[s] = host_blocks
        ss.tier_v[s] = TIER_GPU if gpu_blocks else (TIER_HOST if host_blocks else TIER_NONE)

    def nbytes(self) -> int:
        """Bytes in the numpy arrays of both tables."""
        return self.workers.nbytes() + self.sessions.nbytes()
