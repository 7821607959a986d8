"""Every numba kernel agrees exactly with its plain-Python twin on random inputs."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler_service import kernels
from scheduler_service.graph import DURATION_BUCKETS

NB, PY = kernels.NUMBA, kernels.REFERENCE
kernels.warm()

finite = st.floats(min_value=0.0, max_value=1e4, allow_nan=False, allow_infinity=False)


@st.composite
def workers(draw: st.DrawFn) -> dict[str, object]:
    n = draw(st.integers(1, 40))

    def ints(lo: int, hi: int) -> np.ndarray:
        return np.array(draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n)), dtype=np.int64)

    cap = ints(0, 5000)
    return {
        "allowed": np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=np.bool_),
        "cap": cap,
        "used": np.minimum(ints(0, 6000), cap + 100),
        "queued": ints(0, 200_000),
        "placed": ints(0, 50_000),
        "prefix": ints(0, 3_000),
        "rate": np.array(
            draw(st.lists(st.floats(1e3, 1e5), min_size=n, max_size=n)), dtype=np.float64
        ),
        "bs": ints(1, 64),
        "bpt": ints(1, 400_000),
        "link": np.array(
            draw(st.lists(st.floats(1e9, 1e11), min_size=n, max_size=n)), dtype=np.float64
        ),
        "domain": ints(-1, 2),
        "n": n,
        "home": draw(st.integers(-1, n - 1)),
        "tier": draw(st.sampled_from([0, 1, 2])),
        "cached": draw(st.integers(0, 100_000)),
        "step": draw(st.integers(0, 120_000)),
        "k": draw(st.integers(1, 8)),
    }


@settings(max_examples=150, deadline=None)
@given(workers(), st.sampled_from([0.0, 0.01, 0.5]), st.sampled_from([0.0, 1.0, 2.5]))
def test_place_topk_matches_twin(w: dict[str, object], bestfit: float, rebuild: float) -> None:
    outs = []
    for ks in (NB, PY):
        slots = np.zeros(8, dtype=np.int32)
        scores = np.zeros(8, dtype=np.float64)
        cached = np.zeros(8, dtype=np.int64)
        tiers = np.zeros(8, dtype=np.int64)
        count = ks.place_topk(
            w["allowed"],
            w["cap"],
            w["used"],
            w["queued"],
            w["placed"],
            w["prefix"],
            w["rate"],
            w["bs"],
            w["bpt"],
            w["link"],
            w["domain"],
            w["n"],
            w["home"],
            w["tier"],
            w["cached"],
            w["step"],
            65536.0,
            1.0,
            bestfit,
            0.05,
            rebuild,
            w["k"],
            slots,
            scores,
            cached,
            tiers,
        )
        outs.append(
            (
                count,
                slots[:count].tolist(),
                scores[:count].tolist(),
                cached[:count].tolist(),
                tiers[:count].tolist(),
            )
        )
    assert outs[0] == outs[1]
    count, slots, scores, cached_out, tiers_out = outs[0]
    allowed = w["allowed"]
    assert count == min(int(np.sum(allowed)), w["k"])  # type: ignore[call-overload]
    assert all(allowed[s] for s in slots)  # type: ignore[index]
    assert scores == sorted(scores, reverse=True)
    # what each candidate has cached: the home's own KV, a prefix run, or the home's
    # KV loaded from a worker of its KV-transfer domain; never more
    domain, home = w["domain"], w["home"]
    for slot, c, tier in zip(slots, cached_out, tiers_out, strict=True):
        assert 0 <= c <= w["step"] and tier in (0, 1, 2, 3, 4)  # type: ignore[operator]
        assert tier != 0 or c == 0
        assert c == 0 or slot == home or w["prefix"][slot] > 0 or tier >= 3  # type: ignore[index]
        if tier >= 3:  # a load from the home: same domain, and the home's tier
            assert slot != home and home >= 0 and domain[slot] == domain[home] >= 0  # type: ignore[index,operator]
            assert tier == {1: 3, 2: 4}[w["tier"]]  # type: ignore[index]
            assert c == min(w["cached"], w["step"])  # type: ignore[type-var]


@st.composite
def residents(draw: st.DrawFn) -> dict[str, object]:
    n = draw(st.integers(1, 60))
    members = draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n))
    nxt = np.full(n, -1, dtype=np.int32)
    for a, b in itertools.pairwise(members):
        nxt[a] = b
    lst = lambda strat: draw(st.lists(strat, min_size=n, max_size=n))  # noqa: E731
    return {
        "head": members[0] if members else -1,
        "next": nxt,
        "tier": np.array(lst(st.sampled_from([0, 1, 2])), dtype=np.int8),
        "state": np.array(lst(st.sampled_from([1, 2, 3])), dtype=np.int8),
        "blocks": np.array(lst(st.integers(0, 500)), dtype=np.int64),
        # few distinct sizes and times so ties happen and tie-breaking is tested
        "ctx": np.array(lst(st.sampled_from([0, 160, 1600, 50_000])), dtype=np.int64),
        "next_use": np.array(lst(st.sampled_from([0.0, 5.0, 10.0, 300.0])), dtype=np.float64),
        "pc": np.array(lst(st.sampled_from([0.0, 0.5, 0.95])), dtype=np.float64),
        "tenant": np.array(lst(st.sampled_from([-1, 0, 1])), dtype=np.int32),
        "need": draw(st.integers(-5, 3000)),
        "exclude": draw(st.integers(-1, n - 1)),
    }


@settings(max_examples=150, deadline=None)
@given(residents())
def test_rank_victims_matches_twin(r: dict[str, object]) -> None:
    prot = np.array([1.0, 2.0], dtype=np.float64)
    outs = [
        ks.rank_victims(
            r["head"],
            r["next"],
            r["tier"],
            r["state"],
            r["blocks"],
            r["ctx"],
            r["next_use"],
            r["pc"],
            r["tenant"],
            prot,
            1.0,
            20_000.0,
            65536.0,
            r["need"],
            r["exclude"],
        ).tolist()
        for ks in (NB, PY)
    ]
    assert outs[0] == outs[1]
    victims = outs[0]
    tier, state, blocks = r["tier"], r["state"], r["blocks"]
    for v in victims:
        assert tier[v] == 1 and state[v] != 1 and blocks[v] > 0 and v != r["exclude"]  # type: ignore[index]
    # only the last victim may push the freed total past the need
    freed = [int(blocks[v]) for v in victims]  # type: ignore[index]
    assert sum(freed[:-1]) < max(r["need"], 1)  # type: ignore[call-overload]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 10_000),
    st.integers(0, 20_000),
    finite,
    finite,
    st.floats(0.0, 1.0),
    finite,
    finite,
    finite,
    st.booleans(),
)
def test_retention_choice_matches_twin(
    blocks: int,
    cap: int,
    price: float,
    rem: float,
    pc: float,
    rebuild: float,
    off: float,
    rel: float,
    host_ok: bool,
) -> None:
    args = (blocks, cap, price, rem, pc, rebuild, off, rel, host_ok, 0.25, 1.0, 300.0)
    nb, py = NB.retention_choice(*args), PY.retention_choice(*args)
    assert tuple(nb) == tuple(py)
    action, ttl = nb[0], nb[1]
    assert action in (1, 2, 4)
    if action == 1:
        assert 1.0 <= ttl <= 300.0  # a lease, never a pin


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from([0.0, 0.0, 0.5, 1.0, 3.0]),
        min_size=DURATION_BUCKETS.n,
        max_size=DURATION_BUCKETS.n,
    ),
    st.floats(0.0, 20_000.0),
    st.floats(0.01, 0.99),
)
def test_remaining_time_matches_twin(hist: list[float], waited: float, q: float) -> None:
    h = np.array(hist, dtype=np.float64)
    args = (h, DURATION_BUCKETS.upper_edges, DURATION_BUCKETS.mids, waited, q)
    nb, py = NB.remaining_time(*args), PY.remaining_time(*args)
    assert tuple(nb) == tuple(py)
    mean, early, mass = nb
    assert mean >= 0.0 and early >= 0.0 and mass >= 0.0


def test_remaining_time_conditions_on_the_wait() -> None:
    b = DURATION_BUCKETS
    h = np.zeros(b.n)
    h[b.index(1.0)] = 5.0
    h[b.index(100.0)] = 5.0
    mean0, _early0, mass0 = NB.remaining_time(h, b.upper_edges, b.mids, 0.0, 0.2)
    mean10, early10, mass10 = NB.remaining_time(h, b.upper_edges, b.mids, 10.0, 0.2)
    assert mass0 == 10.0 and mass10 == 5.0  # the 1-second mode is ruled out after 10 s
    assert mean10 == b.mids[b.index(100.0)] - 10.0
    assert mean0 == (b.mids[b.index(1.0)] + b.mids[b.index(100.0)]) / 2
    # the early quantile interpolates inside the surviving bucket, below its representative
    lo = b.upper_edges[b.index(100.0) - 1]
    assert early10 == lo + (b.upper_edges[b.index(100.0)] - lo) * 0.2 - 10.0


def test_victim_key_matches_twin() -> None:
    for args in [
        (10.0, 0.0, 0.5, 100, 1600, 20_000.0, 65536.0, 1.0),
        (0.0, 5.0, 0.0, 1, 0, 1.0, 1.0, 2.0),
    ]:
        assert NB.victim_key(*args) == PY.victim_key(*args)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_victim_keys_match_twin_and_the_scalar_key(data: st.DataObject) -> None:
    n_sessions = data.draw(st.integers(1, 30))
    n_workers = data.draw(st.integers(1, 5))
    lst = lambda strat, n=n_sessions: data.draw(st.lists(strat, min_size=n, max_size=n))  # noqa: E731
    next_use = np.array(lst(st.floats(0.0, 1e4)), dtype=np.float64)
    pc = np.array(lst(st.floats(0.0, 1.0)), dtype=np.float64)
    blocks = np.array(lst(st.integers(0, 10_000)), dtype=np.int64)
    tokens = np.array(lst(st.integers(0, 200_000)), dtype=np.int64)
    home = np.array(lst(st.integers(0, n_workers - 1)), dtype=np.int32)
    rates = np.array(lst(st.floats(1e3, 1e5), n_workers), dtype=np.float64)
    cand = np.array(
        data.draw(st.lists(st.integers(0, n_sessions - 1), max_size=n_sessions)), dtype=np.intp
    )
    now = data.draw(st.floats(0.0, 1e4))
    outs = []
    for ks in (NB, PY):
        out = np.zeros(cand.shape[0], dtype=np.float64)
        ks.victim_keys(cand, next_use, pc, blocks, tokens, home, rates, now, 65536.0, out)
        outs.append(out.tolist())
    assert outs[0] == outs[1]
    for i, c in enumerate(cand.tolist()):
        one = PY.victim_key(
            float(next_use[c]), now, float(pc[c]), int(blocks[c]), int(tokens[c]),
            float(rates[home[c]]), 65536.0, 1.0,
        )  # fmt: skip
        assert outs[1][i] == one


@settings(max_examples=200, deadline=None)
@given(workers(), st.data())
def test_pricier_workers_matches_twin(w: dict[str, object], data: st.DataObject) -> None:
    n = int(w["n"])  # type: ignore[call-overload]
    before = np.array(
        data.draw(st.lists(st.floats(0.0, 3.0), min_size=n, max_size=n)), dtype=np.float64
    )
    residents = np.array(
        data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)), dtype=np.int32
    )
    ratio = data.draw(st.sampled_from([1.0, 1.25, 2.0]))
    outs = []
    for ks in (NB, PY):
        b = before.copy()
        out = np.zeros(n, dtype=np.int64)
        k = ks.pricier_workers(
            w["cap"], w["used"], w["queued"], w["rate"], residents, w["allowed"], b,
            0.5, 1.0, 0.5, 5.0, ratio, out,
        )  # fmt: skip
        outs.append((out[:k].tolist(), b.tolist()))
    assert outs[0] == outs[1]
    # a worker listed has residents, is connected, and its price fell nowhere
    listed, after = outs[0]
    assert all(residents[x] > 0 and w["allowed"][x] for x in listed)  # type: ignore[index]
    assert all(a <= b for a, b in zip(after, before.tolist(), strict=True))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_leases_priced_below_matches_twin(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 30))
    order = data.draw(st.permutations(list(range(n))))
    linked = order[: data.draw(st.integers(0, n))]
    nxt = np.full(n, -1, dtype=np.int32)
    for a, b in itertools.pairwise(linked):
        nxt[a] = b
    head = linked[0] if linked else -1

    def col(strategy: st.SearchStrategy[object], dtype: type) -> np.ndarray:
        return np.array(data.draw(st.lists(strategy, min_size=n, max_size=n)), dtype=dtype)

    price = col(st.floats(0.0, 2.0), np.float64)
    state = col(st.integers(0, 3), np.int8)
    tier = col(st.integers(0, 2), np.int8)
    node = col(st.integers(-1, 3), np.int32)
    prefetch = col(st.sampled_from([0.0, -1.0, 5.0]), np.float64)
    floor = data.draw(st.floats(0.0, 2.0))
    outs = []
    for ks in (NB, PY):
        out = np.zeros(n, dtype=np.int64)
        k = ks.leases_priced_below(head, nxt, price, state, tier, node, prefetch, floor, out)
        outs.append(out[:k].tolist())
    assert outs[0] == outs[1]
    want = [
        s for s in linked
        if price[s] < floor and state[s] == 2 and tier[s] == 1 and node[s] != -1
        and prefetch[s] != -1.0
    ]  # fmt: skip
    assert outs[0] == want


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(-1, 5), st.floats(0.0, 1e6), st.floats(0.0, 1e4)), max_size=60),
    st.floats(0.0, 2e6),
    st.integers(1, 6),
)
def test_live_work_matches_twin(rows: list[tuple[int, float, float]], now: float, n: int) -> None:
    tenant = np.array([r[0] for r in rows], dtype=np.int32)
    started = np.array([r[1] for r in rows], dtype=np.float64)
    ideal = np.array([r[2] for r in rows], dtype=np.float64)
    outs = []
    for ks in (NB, PY):
        e, i = np.full(n, 7.0), np.full(n, 7.0)  # overwritten, not added to
        ks.live_work(tenant, started, ideal, now, e, i)
        outs.append((e.tolist(), i.tolist()))
    assert outs[0] == outs[1]
    want = [sum(ideal[s] for s in range(len(rows)) if tenant[s] == t) for t in range(n)]
    assert outs[0][1] == pytest.approx(want)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_columns_valid_matches_twin(data: st.DataObject) -> None:
    from scheduler_service.kernels import reference
    from scheduler_service.kernels.checks import columns_valid

    n = data.draw(st.integers(0, 12))
    owners = np.array(data.draw(st.lists(st.integers(-1, 2), min_size=4, max_size=4)), np.int32)

    def col(strategy: st.SearchStrategy[Any], dtype: type) -> np.ndarray:
        return np.array(data.draw(st.lists(strategy, min_size=n, max_size=n)), dtype=dtype)

    counts = st.integers(-1, 50)
    hints = st.sampled_from([0.0, 1.5, -0.5, float("nan"), float("inf")])
    args = (
        col(st.integers(-1, 3), np.int64),  # slots
        col(counts, np.int64),
        col(counts, np.int64),
        col(counts, np.int64),
        col(hints, np.float64),
        col(st.integers(-1, 2), np.int64),  # tenants named
    )
    # a plain event's session exists
    plain = col(st.booleans(), np.bool_) & (args[0] >= 0)
    got = columns_valid(*args, plain, owners)
    assert got == reference.columns_valid(*args, plain, owners)
    slots, ctx, new, step, hint, tenants = args
    want = all(
        ctx[i] >= 0 and new[i] >= 0 and step[i] >= 0 and 0.0 <= hint[i] < float("inf")
        and (not plain[i] or owners[slots[i]] == tenants[i])
        for i in range(n)
    )  # fmt: skip
    assert got == want
