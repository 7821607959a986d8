"""Numba kernels over the state arrays, their reference twins, and warm-up.

``NUMBA`` and ``REFERENCE`` are two interchangeable kernel sets: the engine
runs on ``NUMBA``; tests and the benchmark swap in ``REFERENCE`` to compare.
``warm()`` compiles (or loads from the on-disk cache) every kernel with the
exact argument types the engine passes, so no request ever pays compilation.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from scheduler_service.kernels import reference
from scheduler_service.kernels.eviction import rank_victims, victim_key, victim_keys
from scheduler_service.kernels.placement import place_topk
from scheduler_service.kernels.pressure import leases_priced_below, live_work, pricier_workers
from scheduler_service.kernels.retention import retention_choice
from scheduler_service.kernels.sketch import remaining_time


@dataclass(frozen=True, slots=True)
class KernelSet:
    """The decision kernels, as one swappable bundle."""

    name: str
    place_topk: Any
    rank_victims: Any
    retention_choice: Any
    remaining_time: Any
    victim_key: Any
    victim_keys: Any
    pricier_workers: Any
    leases_priced_below: Any
    live_work: Any

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # NOTE: by name: an engine restored from a snapshot must run on this
        # process's kernel set itself (the engine checks ``is NUMBA``), not on a copy
        return (by_name, (self.name,))


def by_name(name: str) -> KernelSet:
    """The kernel set called ``name`` ("numba" or "reference")."""
    return {"numba": NUMBA, "reference": REFERENCE}[name]


NUMBA = KernelSet(
    "numba",
    place_topk,
    rank_victims,
    retention_choice,
    remaining_time,
    victim_key,
    victim_keys,
    pricier_workers,
    leases_priced_below,
    live_work,
)
REFERENCE = KernelSet(
    "reference",
    reference.place_topk,
    reference.rank_victims,
    reference.retention_choice,
    reference.remaining_time,
    reference.victim_key,
    reference.victim_keys,
    reference.pricier_workers,
    reference.leases_priced_below,
    reference.live_work,
)

_warm_lock = threading.Lock()
_warmed = False


def warm() -> None:
    """Compile or load every kernel once per process; later calls return at once."""
    global _warmed
    if _warmed:
        return
    with _warm_lock:
        if _warmed:
            return
        _call_all(NUMBA)
        _warmed = True


def _call_all(k: KernelSet) -> None:
    # NOTE: argument dtypes here must match what the engine passes (int64 /
    # float64 / int32 / int8 / bool arrays, Python int / float / bool scalars),
    # or the first real call would compile a second specialisation.
    n = 2
    i64 = np.ones(n, dtype=np.int64)
    f64 = np.ones(n, dtype=np.float64)
    i32 = np.full(n, -1, dtype=np.int32)
    i8 = np.ones(n, dtype=np.int8)
    allowed = np.ones(n, dtype=np.bool_)
    out_slots = np.zeros(n, dtype=np.int32)
    out_scores = np.zeros(n, dtype=np.float64)
    k.place_topk(
        allowed,
        i64,
        i64,
        i64,
        i64,
        i64,
        f64,
        i64,
        i64,
        f64,
        i64,
        n,
        0,
        1,
        1,
        1,
        1.0,
        1.0,
        1.0,
        1.0,
        1.0,
        1,
        out_slots,
        out_scores,
        np.zeros(n, dtype=np.int64),
        np.zeros(n, dtype=np.int64),
    )
    tenant = np.zeros(n, dtype=np.int32)
    k.rank_victims(0, i32, i8, i8, i64, i64, f64, f64, tenant, f64, 0.0, 1.0, 1.0, 1, -1)
    k.retention_choice(1, 1, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, True, 1.0, 1.0, 1.0)
    k.remaining_time(f64, f64, f64, 0.0, 0.5)
    k.victim_key(1.0, 0.0, 1.0, 1, 1, 1.0, 1.0, 1.0)
    cand = np.zeros(1, dtype=np.intp)
    home = np.zeros(n, dtype=np.int32)
    k.victim_keys(cand, f64, f64, i64, i64, home, f64, 0.0, 1.0, np.zeros(1, dtype=np.float64))
    out = np.zeros(n, dtype=np.int64)
    k.pricier_workers(i64, i64, i64, f64, home, allowed, f64, 0.5, 1.0, 1.0, 1.0, 1.5, out)
    k.leases_priced_below(-1, home, f64, i8, i8, home, f64, 1.0, out)
    k.live_work(home, f64, f64, 0.0, np.zeros(n), np.zeros(n))
