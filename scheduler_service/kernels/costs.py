"""Cost formulas the kernels share (jitted twins of ``scheduler_service.costs``).

# NOTE: numba's on-disk cache keys a kernel on its own module's source, not on
# the jitted functions it calls from here. After editing this file, delete
# ``kernels/__pycache__`` (or touch the kernel modules) so no kernel keeps an
# old copy of the formula compiled in.
"""

from __future__ import annotations

from numba import njit


@njit(cache=True, inline="always")
def prefill_s(tokens: float, prefill_tokens_per_s: float, knee_tokens: float) -> float:
    """Prefill seconds: the linear term plus the quadratic attention term."""
    linear = tokens / prefill_tokens_per_s
    return linear + linear * (tokens / knee_tokens)
