"""Logging (structlog) and OpenTelemetry traces + metrics (Prometheus /metrics)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from opentelemetry import metrics, trace
from opentelemetry.metrics import (
    CallbackOptions,
    Counter,
    Histogram,
    Meter,
    Observation,
    UpDownCounter,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

#: Distinct tenant label values on metrics; beyond it tenants share "other", so a
#: fleet with thousands of tenants cannot blow up Prometheus cardinality.
MAX_TENANT_LABELS = 64

_LATENCY_BUCKETS_S = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """structlog: JSON lines when stderr is not a TTY (or json=True), pretty otherwise."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


class Tally:
    """Cumulative counts by attribute set, read by an OpenTelemetry observable counter.

    For counters bumped on every message: ``Counter.add`` with attributes costs
    ~15–30 µs in the SDK, ``Tally.add`` a dict update; the reader collects the
    totals when Prometheus scrapes (the exposition is the same counter).
    """

    __slots__ = ("totals",)

    def __init__(self) -> None:
        self.totals: dict[tuple[tuple[str, str], ...], int] = {}

    def add(self, amount: int, attributes: Mapping[str, str] | None = None) -> None:
        """Count ``amount`` more under ``attributes``."""
        key = tuple(sorted(attributes.items())) if attributes else ()
        self.totals[key] = self.totals.get(key, 0) + amount

    def observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        """The observable counter's callback: every total so far."""
        # NOTE: dict.copy is one step under the GIL: the scrape runs on the
        # exporter's thread while the event loop keeps counting.
        return [Observation(n, dict(k)) for k, n in self.totals.copy().items()]


@dataclass(slots=True)
class Metrics:
    """The service's instruments (no-ops until a MeterProvider is installed)."""

    events: Tally
    acks: Tally
    duplicates: Counter
    directives: Tally
    rejected: Counter
    place_latency_s: Histogram
    streams_open: UpDownCounter
    journal_commit_latency_s: Histogram
    tenant_labels: dict[str, str] = field(default_factory=dict)

    def tenant_label(self, tenant_id: str) -> str:
        """The tenant as a metric label; past MAX_TENANT_LABELS tenants, "other"."""
        label = self.tenant_labels.get(tenant_id)
        if label is None:
            label = tenant_id if len(self.tenant_labels) < MAX_TENANT_LABELS else "other"
            self.tenant_labels[tenant_id] = label
        return label

    def count_events(self, events: Sequence[Any]) -> None:
        """Count accepted session events by tenant (bounded label cardinality)."""
        per: dict[str, int] = {}
        for ev in events:
            per[ev.tenant_id] = per.get(ev.tenant_id, 0) + 1
        for tenant, n in per.items():
            self.events.add(n, {"tenant": self.tenant_label(tenant)})

    @classmethod
    def create(cls, meter: Meter | None = None) -> Metrics:
        """Instruments on ``meter`` (default: the global meter provider's)."""
        m = meter or metrics.get_meter("kvsched")
        events, acks, directives = Tally(), Tally(), Tally()
        m.create_observable_counter(
            "kvsched_session_events",
            callbacks=[events.observe],
            description="Session events accepted",
        )
        m.create_observable_counter(
            "kvsched_acks", callbacks=[acks.observe], description="Acks sent to workers"
        )
        m.create_observable_counter(
            "kvsched_directives",
            callbacks=[directives.observe],
            description="Retention directives sent, by action",
        )
        return cls(
            events=events,
            acks=acks,
            directives=directives,
            duplicates=m.create_counter(
                "kvsched_duplicate_messages", description="Resent messages dropped as duplicates"
            ),
            rejected=m.create_counter(
                "kvsched_rejected_inputs", description="Inputs rejected, by gRPC code"
            ),
            place_latency_s=m.create_histogram(
                "kvsched_place_latency", unit="s", description="Place handling time in the server"
            ),
            streams_open=m.create_up_down_counter(
                "kvsched_worker_streams_open", description="Worker streams open"
            ),
            journal_commit_latency_s=m.create_histogram(
                "kvsched_journal_append_latency",
                unit="s",
                description="Time from append to durable",
            ),
        )


def configure_otel(
    metrics_port: int | None, metrics_host: str = "127.0.0.1", trace_console: bool = False
) -> Metrics:
    """Install tracer + meter providers; serve Prometheus /metrics when a port is given.

    Spans are made only when something exports them (``trace_console``): a
    recording span with nowhere to go cost ~75 µs a Place, ~15% of the server's
    time per call. Without an exporter the API's no-op tracer stays in place.
    """
    resource = Resource.create({"service.name": "kvsched"})
    if trace_console:
        tp = TracerProvider(resource=resource)
        tp.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
        trace.set_tracer_provider(tp)
    readers = []
    if metrics_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        start_http_server(port=metrics_port, addr=metrics_host)
        readers.append(PrometheusMetricReader())
    views = [
        View(
            instrument_name="kvsched_*latency",
            aggregation=ExplicitBucketHistogramAggregation(_LATENCY_BUCKETS_S),
        )
    ]
    metrics.set_meter_provider(
        MeterProvider(resource=resource, metric_readers=readers, views=views)
    )
    return Metrics.create()
