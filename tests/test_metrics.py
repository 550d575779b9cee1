"""/metrics on both services: the families the operations docs promise, with live values."""

from __future__ import annotations

import json

from core.settings import Settings
from core.store import SpeedStore
from receiver.app import create_app as create_receiver
from serving.api import create_app as create_api
from serving.derive import default_deriver
from tests.asgi import running
from tests.test_api import AUTH, api_settings, loaded  # noqa: F401  (fixtures)
from tests.test_cohort import own_store, put  # noqa: F401  (fixtures)


def sample(text: str, name: str) -> float:
    """The value of the first sample line starting with `name`."""
    for line in text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_query_api_metrics_report_speed_size_watermark_age_lag_and_latency(
    api_settings: Settings,  # noqa: F811
    loaded: SpeedStore,  # noqa: F811
) -> None:
    await put(
        loaded,
        {"resourceType": "Patient", "id": "new1", "gender": "male", "meta": {"versionId": "1"}},
    )
    await loaded.flush_stats()
    await loaded.count_missed(2)  # as a poller in another process recorded them
    async with running(create_api(api_settings)) as client:
        assert (
            await client.get("/cohort", params={"gender": "male"}, headers=AUTH)
        ).status_code == 200
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert sample(text, 'researchflow_speed_layer_entries{resource_type="Patient"}') >= 1
    assert sample(text, "researchflow_batch_watermark_age_seconds") > 0  # watermark of 2024
    assert sample(text, "researchflow_poller_lag_seconds") > 0
    assert sample(text, 'researchflow_query_seconds_count{endpoint="cohort"}') == 1
    assert "# TYPE researchflow_missed_notifications_total counter" in text
    assert sample(text, "researchflow_missed_notifications_recorded") == 2


async def test_receiver_metrics_count_notifications_rejects_and_write_latency(
    api_settings: Settings,  # noqa: F811
    own_store: SpeedStore,  # noqa: F811
) -> None:
    async def nobody(resource_type: str, resource_id: str) -> None:
        return None

    settings = Settings(redis_url=api_settings.redis_url, receiver_tokens=("t",))
    app = create_receiver(settings, derive=default_deriver(), latest_version=nobody)
    headers = {"Authorization": "Bearer t", "Content-Type": "application/fhir+json"}
    async with running(app) as client:
        for body in (
            {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p"}},
            {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p"}},
            {"resourceType": "Patient", "id": "p", "gender": "robot"},
        ):
            await client.put(
                f"/fhir/{body['resourceType']}/{body['id']}",
                content=json.dumps(body),
                headers=headers,
            )
        await client.delete("/fhir/Condition/c1", headers=headers)
        text = (await client.get("/metrics")).text
    assert (
        sample(
            text, 'researchflow_notifications_total{outcome="written",resource_type="Condition"}'
        )
        == 1
    )
    assert (
        sample(
            text, 'researchflow_notifications_total{outcome="duplicate",resource_type="Condition"}'
        )
        == 1
    )
    assert (
        sample(
            text, 'researchflow_notifications_total{outcome="deleted",resource_type="Condition"}'
        )
        == 1
    )
    assert sample(text, 'researchflow_rejects_total{resource_type="Patient"}') == 1
    assert sample(text, "researchflow_write_seconds_count") == 2
