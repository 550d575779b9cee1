"""Prometheus metrics of every service, built on a registry of their own (one per app)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class Metrics:
    """All metric families; a service uses the ones it has."""

    registry: CollectorRegistry
    notifications: Counter
    refused: Counter
    rejects: Counter
    write_latency: Histogram
    missed: Counter
    missed_recorded: Gauge
    poller_lag: Gauge
    speed_size: Gauge
    batch_watermark_age: Gauge
    query_latency: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> Metrics:
        reg = registry if registry is not None else CollectorRegistry()
        return cls(
            registry=reg,
            notifications=Counter(
                "researchflow_notifications",
                "Notifications received, by resource type and outcome",
                ["resource_type", "outcome"],
                registry=reg,
            ),
            refused=Counter(
                "researchflow_refused_deliveries",
                "Requests the receiver refused (4xx), by HTTP status and reason; 401s mean HAPI "
                "sends no or a wrong token (see `subscriptions status`)",
                ["status", "reason"],
                registry=reg,
            ),
            rejects=Counter(
                "researchflow_rejects",
                "Resources the validation rejected, by resource type",
                ["resource_type"],
                registry=reg,
            ),
            write_latency=Histogram(
                "researchflow_write_seconds",
                "Time from request received to the speed-layer write applied",
                buckets=_LATENCY_BUCKETS,
                registry=reg,
            ),
            missed=Counter(
                "researchflow_missed_notifications",
                "Changes the poller found that no notification had delivered",
                ["resource_type"],
                registry=reg,
            ),
            missed_recorded=Gauge(
                "researchflow_missed_notifications_recorded",
                "Missed notifications the speed layer has recorded (every poller's count, "
                "read from Redis; back to 0 when Redis comes back empty)",
                registry=reg,
            ),
            poller_lag=Gauge(
                "researchflow_poller_lag_seconds",
                "Age of the poller's watermark (HAPI's clock) at its last run",
                registry=reg,
            ),
            speed_size=Gauge(
                "researchflow_speed_layer_entries",
                "Speed-layer entries per resource type",
                ["resource_type"],
                registry=reg,
            ),
            batch_watermark_age=Gauge(
                "researchflow_batch_watermark_age_seconds",
                "Age of the batch layer's watermark",
                registry=reg,
            ),
            query_latency=Histogram(
                "researchflow_query_seconds",
                "Query API latency by endpoint",
                ["endpoint"],
                buckets=_LATENCY_BUCKETS,
                registry=reg,
            ),
        )


def metrics_response(request: Request) -> Response:
    """GET /metrics: the app's registry in Prometheus text format (no auth)."""
    metrics: Metrics = request.app.state.metrics
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
