"""The per-message counters: tallied locally, exported as the same OpenTelemetry counters."""

from __future__ import annotations

from types import SimpleNamespace

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from scheduler_service.telemetry import MAX_TENANT_LABELS, Metrics


def _points(reader: InMemoryMetricReader) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    data = reader.get_metrics_data()
    assert data is not None
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for p in m.data.data_points:
                    key = tuple(sorted((k, str(v)) for k, v in (p.attributes or {}).items()))
                    out.setdefault(m.name, {})[key] = p.value
    return out


def test_event_ack_and_directive_counts_reach_the_reader_as_cumulative_counters() -> None:
    reader = InMemoryMetricReader()
    m = Metrics.create(MeterProvider(metric_readers=[reader]).get_meter("t"))
    ev = lambda t: SimpleNamespace(tenant_id=t)  # noqa: E731
    m.count_events([ev("a"), ev("b"), ev("a")])
    m.acks.add(1)
    m.acks.add(1)
    m.directives.add(1, {"action": "RETAIN_GPU"})
    first = _points(reader)
    assert first["kvsched_session_events"] == {(("tenant", "a"),): 2, (("tenant", "b"),): 1}
    assert first["kvsched_acks"] == {(): 2}
    assert first["kvsched_directives"] == {(("action", "RETAIN_GPU"),): 1}
    m.count_events([ev("a")])
    assert _points(reader)["kvsched_session_events"][(("tenant", "a"),)] == 3  # cumulative


def test_tenant_labels_stay_bounded() -> None:
    reader = InMemoryMetricReader()
    m = Metrics.create(MeterProvider(metric_readers=[reader]).get_meter("t"))
    m.count_events([SimpleNamespace(tenant_id=f"t{i}") for i in range(MAX_TENANT_LABELS + 10)])
    series = _points(reader)["kvsched_session_events"]
    assert len(series) == MAX_TENANT_LABELS + 1
    assert series[(("tenant", "other"),)] == 10
