"""Settings for every ResearchFlow command, read from the environment once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# How long a command's start-up check waits for a dependency before it says it is down.
STARTUP_TIMEOUT_SECONDS = 5.0


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


def _redis_url(env: Mapping[str, str], name: str, default: str) -> str:
    """A redis:// or rediss:// URL (unix:// too, as redis-py reads it) with a usable port and db.

    The value is never echoed: it may hold a password.
    """
    value = (env.get(name) or "").strip() or default
    parts = urlsplit(value)
    example = "e.g. redis://localhost:6379/0"
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise SettingsError(f"{name} must start with redis:// or rediss:// ({example})")
    if parts.scheme != "unix" and not parts.hostname:
        raise SettingsError(f"{name} names no host ({example})")
    try:
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError:
        raise SettingsError(f"{name} has a port that is not a number ({example})") from None
    db = parts.path.strip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        raise SettingsError(f"{name}: the database after the host must be a number ({example})")
    return value


def _http_url(env: Mapping[str, str], name: str, default: str) -> str:
    """An http:// or https:// URL with a host (trailing slash removed)."""
    value = ((env.get(name) or "").strip() or default).rstrip("/")
    parts = urlsplit(value)
    example = "e.g. http://localhost:8080/fhir"
    if parts.scheme not in ("http", "https"):
        raise SettingsError(f"{name} must start with http:// or https:// ({example})")
    if not parts.hostname:
        raise SettingsError(f"{name} names no host ({example})")
    try:
        parts.port  # noqa: B018
    except ValueError:
        raise SettingsError(f"{name} has a port that is not a number ({example})") from None
    return value


def _postgres_url(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    """A libpq connection string: a postgresql:// (or postgres://) URL, or key=value pairs."""
    value = (env.get(name) or "").strip() or default
    if value is None:
        return None
    example = "e.g. postgresql://localhost/researchflow"
    if "://" in value and urlsplit(value).scheme not in ("postgresql", "postgres"):
        raise SettingsError(f"{name} must start with postgresql:// ({example})")
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(value)
    except Exception:  # psycopg's ProgrammingError: not a connection string at all
        raise SettingsError(f"{name} is not a PostgreSQL URL ({example})") from None
    for part in str(info.get("port") or "").split(","):
        if part and not part.isdigit():
            raise SettingsError(f"{name} has a port that is not a number ({example})")
    return value


def _folder(env: Mapping[str, str], name: str) -> str | None:
    """An existing folder (the path as given), or None when unset."""
    value = (env.get(name) or "").strip()
    if not value:
        return None
    if not os.path.isdir(value):
        raise SettingsError(f"{name} must name an existing folder, not {value!r}")
    return value


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
    # A folder of the operator's ViewDefinitions (*.json), served beside the shipped ones;
    # serving.registry.served_views reads and checks them.
    views_dir: str | None = None
    # Not in the contract's table: tuning knobs with safe defaults.
    watchdog_interval_seconds: int = 60
    poll_overlap_seconds: int = 120
    # A change the poller finds is judged missed only after HAPI's retry window for its
    # notification (~60 s, ../shared/hapi-rest-hook.md) has passed: until then it may still
    # come. Kept below poll_overlap_seconds, so such a change is read again by the next poll.
    missed_grace_seconds: int = 90

    def __post_init__(self) -> None:
        if not self.instance:
            object.__setattr__(self, "instance", instance_from_url(self.receiver_url))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from `env` (default: `os.environ`).

        Raises SettingsError naming the setting when a value is malformed (a URL without its
        scheme, a port or number that is not one); a URL's value is never echoed (passwords).
        """
        env = os.environ if env is None else env
        defaults = cls()
        receiver_url = _http_url(env, "RECEIVER_URL", defaults.receiver_url)
        return cls(
            redis_url=_redis_url(env, "REDIS_URL", defaults.redis_url),
            redis_cluster=_bool(env, "REDIS_CLUSTER", False),
            database_url=_postgres_url(env, "DATABASE_URL", defaults.database_url)
            or defaults.database_url,
            fhir_base_url=_http_url(env, "FHIR_BASE_URL", defaults.fhir_base_url),
            receiver_url=receiver_url,
            receiver_tokens=_tokens(env, "RECEIVER_TOKEN"),
            receiver_hmac_secret=env.get("RECEIVER_HMAC_SECRET") or None,
            serving_tokens=_tokens(env, "SERVING_TOKEN"),
            use_speed_layer=_bool(env, "USE_SPEED_LAYER", True),
            poll_interval_seconds=_int(env, "POLL_INTERVAL_SECONDS", 300) or 300,
            hapi_database_url=_postgres_url(env, "HAPI_DATABASE_URL", None),
            receiver_max_body_bytes=_int(
                env, "RECEIVER_MAX_BODY_BYTES", defaults.receiver_max_body_bytes
            )
            or defaults.receiver_max_body_bytes,
            receiver_resource_types=_tokens(env, "RECEIVER_RESOURCE_TYPES"),
            speed_max_age_hours=_int(env, "SPEED_MAX_AGE_HOURS", None),
            min_cell_count=_int(env, "MIN_CELL_COUNT", None),
            instance=env.get("RESEARCHFLOW_INSTANCE") or instance_from_url(receiver_url),
            views_dir=_folder(env, "VIEWS_DIR"),
        )
