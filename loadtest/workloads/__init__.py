"""Synthetic agent fleets shared by the simulator and the live load test."""

from loadtest.workloads.fleets import AgentSession
from loadtest.workloads.mix import (
    AGENT_TYPES,
    CLOSED_LOOP,
    Arrivals,
    FleetParams,
    TenantMix,
    build,
)

__all__ = [
    "AGENT_TYPES",
    "CLOSED_LOOP",
    "AgentSession",
    "Arrivals",
    "FleetParams",
    "TenantMix",
    "build",
]
