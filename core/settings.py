"""Settings for every ResearchFlow command, read from the environment once."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, urlsplit

# How long a command's start-up check waits for a dependency before it says it is down.
STARTUP_TIMEOUT_SECONDS = 5.0


class SettingsError(ValueError):
    """A setting in the environment has a value we cannot use."""


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value == "true":
        return True
    if value == "false":
        return False
    raise SettingsError(f"{name} must be true or false, not {raw!r}")


def _int(
    env: Mapping[str, str], name: str, default: int | None, maximum: int = 10**12
) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    text = raw.strip()
    digits = text[1:] if text[:1] in ("-", "+") else text
    if not (digits.isascii() and digits.isdigit()):
        raise SettingsError(f"{name} must be a whole number, not {raw[:40]!r}")
    value = int(text)
    if not 0 < value <= maximum:
        raise SettingsError(f"{name} must be from 1 to {maximum}, not {text[:40]}")
    return value


def _tokens(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list of secrets; each travels in an HTTP header as it is, so only
    visible ASCII (a token with other characters would be refused at every request). The
    value is never echoed."""
    raw = env.get(name) or ""
    tokens = tuple(t.strip() for t in raw.split(",") if t.strip())
    for n, token in enumerate(tokens, 1):
        if not all("!" <= c <= "~" for c in token):
            raise SettingsError(
                f"{name}: token {n} holds a character that is not visible ASCII (a space, a "
                "control or non-ASCII character); HTTP headers carry tokens as they are"
            )
    return tokens


_INSTANCE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _instance(env: Mapping[str, str], receiver_url: str) -> str:
    """RESEARCHFLOW_INSTANCE, or a name derived from RECEIVER_URL: the code of a FHIR tag
    that a `_tag` search finds by itself (FHIR search escapes `,` `|` `$` `\\`)."""
    raw = env.get("RESEARCHFLOW_INSTANCE") or ""
    if not raw:
        return instance_from_url(receiver_url)
    if not _INSTANCE.fullmatch(raw):
        raise SettingsError(
            f"RESEARCHFLOW_INSTANCE must be 1-64 letters, digits, '.', '_' or '-', not {raw[:80]!r}"
        )
    return raw


def _split(name: str, value: str, example: str) -> SplitResult:
    """`urlsplit` with its ValueError ("Invalid IPv6 URL", a port out of range) as a
    SettingsError naming the setting; the port is checked here too."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises on a port that is not a number or out of range)
    except ValueError:
        raise SettingsError(
            f"{name} is not a URL with a usable host and port (0-65535) ({example})"
        ) from None
    return parts


def _redis_options(url: str) -> dict[str, Any]:
    """The connection options redis-py reads from a Redis URL; ValueError naming a bad one."""
    from redis.connection import parse_url

    options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    return options


def _redis_url(env: Mapping[str, str], name: str, default: str) -> str:
    """A redis:// or rediss:// URL (unix:// too, as redis-py reads it) with a usable port and db.

    The value is never echoed: it may hold a password.
    """
    value = (env.get(name) or "").strip() or default
    example = "e.g. redis://localhost:6379/0"
    parts = _split(name, value, example)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise SettingsError(f"{name} must start with redis:// or rediss:// ({example})")
    if parts.scheme != "unix" and not parts.hostname:
        raise SettingsError(f"{name} names no host ({example})")
    db = parts.path.strip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        raise SettingsError(f"{name}: the database after the host must be a number ({example})")
    try:  # redis-py's own reading of it: the options after `?` too
        options = _redis_options(value)
    except ValueError as exc:  # its messages name the option, never the URL
        raise SettingsError(f"{name}: {exc} ({example})") from None
    if options.get("protocol", 2) not in (2, 3, "2", "3"):
        raise SettingsError(f"{name}: protocol must be 2 or 3 ({example})")
    return value


def _http_url(env: Mapping[str, str], name: str, default: str) -> str:
    """An http:// or https:// URL with a host (trailing slash removed)."""
    value = ((env.get(name) or "").strip() or default).rstrip("/")
    example = "e.g. http://localhost:8080/fhir"
    parts = _split(name, value, example)
    if parts.scheme not in ("http", "https"):
        raise SettingsError(f"{name} must start with http:// or https:// ({example})")
    if not parts.hostname:
        raise SettingsError(f"{name} names no host ({example})")
    return value


def _postgres_url(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    """A libpq connection string: a postgresql:// (or postgres://) URL, or key=value pairs."""
    value = (env.get(name) or "").strip() or default
    if value is None:
        return None
    example = "e.g. postgresql://localhost/researchflow"
    if "://" in value and _split(name, value, example).scheme not in ("postgresql", "postgres"):
        raise SettingsError(f"{name} must start with postgresql:// ({example})")
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(value)
    except Exception:  # psycopg's ProgrammingError: not a connection string at all
        raise SettingsError(f"{name} is not a PostgreSQL URL ({example})") from None
    for part in str(info.get("port") or "").split(","):
        if part and not (part.isascii() and part.isdigit() and int(part) <= 65535):
            raise SettingsError(f"{name} has a port that is not a TCP port (0-65535) ({example})")
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
        redis_url = _redis_url(env, "REDIS_URL", defaults.redis_url)
        redis_cluster = _bool(env, "REDIS_CLUSTER", False)
        if redis_cluster and _redis_options(redis_url).get("db", 0) != 0:
            raise SettingsError(
                "REDIS_URL must name database 0 (or none) with REDIS_CLUSTER=true: a Redis "
                "Cluster has database 0 only"
            )
        return cls(
            redis_url=redis_url,
            redis_cluster=redis_cluster,
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
            # Redis refuses an expiry past 2^63 ms; a century is plenty.
            speed_max_age_hours=_int(env, "SPEED_MAX_AGE_HOURS", None, maximum=876_000),
            min_cell_count=_int(env, "MIN_CELL_COUNT", None),
            instance=_instance(env, receiver_url),
            views_dir=_folder(env, "VIEWS_DIR"),
        )
