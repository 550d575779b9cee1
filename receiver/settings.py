"""Settings for every ResearchFlow command, read from the environment once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit


class SettingsError(ValueError):
    """A setting in the environment has a value we cannot use."""


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name} must be true or false, not {raw!r}")


def _int(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, not {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"{name} must be positive, not {value}")
    return value


def _tokens(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = env.get(name) or ""
    return tuple(t.strip() for t in raw.split(",") if t.strip())


def instance_from_url(url: str) -> str:
    """Derive a deployment name from the receiver URL (host, port and path)."""
    parts = urlsplit(url)
    text = f"{parts.hostname or 'localhost'}-{parts.port or ''}{parts.path}"
    return "".join(c if c.isalnum() or c in "-." else "-" for c in text).strip("-")[:64]


@dataclass(frozen=True)
class Settings:
    """Every setting of the contract (`../shared/interfaces.md`), with its default."""

    redis_url: str = "redis://localhost:6379/0"
    redis_cluster: bool = False
    database_url: str = "postgresql://localhost/researchflow"
    fhir_base_url: str = "http://localhost:8080/fhir"
    receiver_url: str = "http://localhost:8081/fhir"
    receiver_tokens: tuple[str, ...] = ()
    receiver_hmac_secret: str | None = None
    serving_tokens: tuple[str, ...] = ()
    use_speed_layer: bool = True
    poll_interval_seconds: int = 300
    hapi_database_url: str | None = None
    receiver_max_body_bytes: int = 8 * 1024 * 1024
    # Resource types the receiver takes (empty: every FHIR resource type). Not in the
    # contract's table: an operator's limit (issue "Reliability, security and scale-out").
    receiver_resource_types: tuple[str, ...] = ()
    speed_max_age_hours: int | None = None
    min_cell_count: int | None = None
    instance: str = field(default="")
    # Not in the contract's table: tuning knobs with safe defaults.
    watchdog_interval_seconds: int = 60
    poll_overlap_seconds: int = 120

    def __post_init__(self) -> None:
        if not self.instance:
            object.__setattr__(self, "instance", instance_from_url(self.receiver_url))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from `env` (default: `os.environ`)."""
        env = os.environ if env is None else env
        defaults = cls()
        receiver_url = env.get("RECEIVER_URL") or defaults.receiver_url
        return cls(
            redis_url=env.get("REDIS_URL") or defaults.redis_url,
            redis_cluster=_bool(env, "REDIS_CLUSTER", False),
            database_url=env.get("DATABASE_URL") or defaults.database_url,
            fhir_base_url=(env.get("FHIR_BASE_URL") or defaults.fhir_base_url).rstrip("/"),
            receiver_url=receiver_url.rstrip("/"),
            receiver_tokens=_tokens(env, "RECEIVER_TOKEN"),
            receiver_hmac_secret=env.get("RECEIVER_HMAC_SECRET") or None,
            serving_tokens=_tokens(env, "SERVING_TOKEN"),
            use_speed_layer=_bool(env, "USE_SPEED_LAYER", True),
            poll_interval_seconds=_int(env, "POLL_INTERVAL_SECONDS", 300) or 300,
            hapi_database_url=env.get("HAPI_DATABASE_URL") or None,
            receiver_max_body_bytes=_int(
                env, "RECEIVER_MAX_BODY_BYTES", defaults.receiver_max_body_bytes
            )
            or defaults.receiver_max_body_bytes,
            receiver_resource_types=_tokens(env, "RECEIVER_RESOURCE_TYPES"),
            speed_max_age_hours=_int(env, "SPEED_MAX_AGE_HOURS", None),
            min_cell_count=_int(env, "MIN_CELL_COUNT", None),
            instance=env.get("RESEARCHFLOW_INSTANCE") or instance_from_url(receiver_url),
        )
