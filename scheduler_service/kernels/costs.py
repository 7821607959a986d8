"""Cost formulas the kernels share (jitted twins of ``scheduler_service.costs``)."""

from __future__ import annotations

from numba import njit


@njit(cache=True)
def prefill_s(tokens: float, prefill_tokens_per_s: float, knee_tokens: float) -> float:
    """Prefill seconds: the linear term plus the quadratic attention term."""
    linear = tokens / prefill_tokens_per_s
    return linear + linear * (tokens / knee_tokens)
