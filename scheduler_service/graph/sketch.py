"""Fixed-size log-bucket histograms: the per-node streaming sketches.

Bucket 0 holds [0, lo); bucket i (1 ≤ i < n−1) holds [lo·r^(i−1), lo·r^i); the
last bucket is open-ended. With r = √2 a value lands within ±19% of its
bucket's representative (the geometric mid), good enough for durations that
span milliseconds to hours in 40 floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class LogBuckets:
    """Bucket edges and representative values of one sketch layout."""

    lo: float
    ratio: float
    n: int
    upper_edges: npt.NDArray[np.float64] = field(init=False, repr=False, compare=False)
    mids: npt.NDArray[np.float64] = field(init=False, repr=False, compare=False)
    _log_ratio: float = field(init=False, repr=False, compare=False)
    _unit_spreads: npt.NDArray[np.float64] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        uppers = np.array([self.lo * self.ratio**i for i in range(self.n)], dtype=np.float64)
        uppers[-1] = np.inf
        mids = np.empty(self.n, dtype=np.float64)
        mids[0] = self.lo / 2.0
        for i in range(1, self.n):
            lower = self.lo * self.ratio ** (i - 1)
            mids[i] = lower * math.sqrt(self.ratio)
        object.__setattr__(self, "upper_edges", uppers)
        object.__setattr__(self, "mids", mids)
        object.__setattr__(self, "_log_ratio", math.log(self.ratio))
        # one unit-weight spread per bucket, built once (hints ask for one per wait)
        units = np.zeros((self.n, self.n), dtype=np.float64)
        for i in range(self.n):
            for off, share in ((-2, 0.1), (-1, 0.2), (0, 0.4), (1, 0.2), (2, 0.1)):
                units[i, min(max(i + off, 0), self.n - 1)] += share
        object.__setattr__(self, "_unit_spreads", units)

    def index(self, value: float) -> int:
        """The bucket ``value`` falls in."""
        if value < self.lo:
            return 0
        i = int(math.log(value / self.lo) / self._log_ratio) + 1
        return i if i < self.n else self.n - 1

    def mean(self, hist: npt.NDArray[np.float64]) -> float:
        """Mean of the sketched values (0 when empty)."""
        total = float(hist.sum())
        return float(hist @ self.mids) / total if total > 0 else 0.0

    def quantile(self, hist: npt.NDArray[np.float64], q: float) -> float:
        """Representative value of the bucket holding quantile ``q``."""
        total = float(hist.sum())
        if total <= 0:
            return 0.0
        i = int(np.searchsorted(np.cumsum(hist), q * total))
        return float(self.mids[min(i, self.n - 1)])

    def spread(self, value: float, weight: float) -> npt.NDArray[np.float64]:
        """A prior: ``weight`` spread over the bucket of ``value`` and its neighbours."""
        out: npt.NDArray[np.float64] = self._unit_spreads[self.index(value)] * weight
        return out


#: Tool and idle durations: 10 ms to ~3 h.
DURATION_BUCKETS = LogBuckets(lo=0.01, ratio=math.sqrt(2.0), n=40)
#: Tokens added between two steps: 16 to ~4M.
TOKEN_BUCKETS = LogBuckets(lo=16.0, ratio=math.sqrt(2.0), n=40)
