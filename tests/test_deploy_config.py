"""docker-compose.yml and hapi-config/application.yaml agree with each other and the code."""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
HAPI_CONFIG_FILE = ROOT / "hapi-config" / "application.yaml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"

# What each of our services cannot work without (interfaces.md, "used by").
REQUIRED: dict[str, set[str]] = {
    "receiver": {"REDIS_URL", "RECEIVER_TOKEN"},
    "serve": {"DATABASE_URL", "REDIS_URL", "SERVING_TOKEN"},
    "poller": {"FHIR_BASE_URL", "REDIS_URL", "DATABASE_URL"},
    "bootstrap": {"FHIR_BASE_URL", "RECEIVER_URL", "RECEIVER_TOKEN"},
    "batch-refresh": {"DATABASE_URL", "FHIR_BASE_URL", "REDIS_URL"},
    "batch-init": {"DATABASE_URL"},
}
# Secrets that must come from the operator, never from a default in the compose file.
SECRETS = {"RECEIVER_TOKEN", "SERVING_TOKEN"}
# Environment our containers may set that is not a ResearchFlow setting, and why.
NOT_SETTINGS = {"TZ": "the container clock's zone, which the nightly refresh loop reads"}
# Our HTTP services: command name -> the service that runs it.
HTTP_SERVICES = ("receiver", "serve")
HAPI_PORT = 8080
SAMPLE_SECRET = "s3cret"

Compose = dict[str, Any]


# --- reading the files ---------------------------------------------------------------


class RecordingEnv(Mapping[str, str]):
    """An environment that remembers every name looked up in it (`get`, `[]`, `in`)."""

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        self._values = dict(values or {})
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def settings_names() -> set[str]:
    """The environment variables `Settings.from_env` reads, found by calling it."""
    env = RecordingEnv()
    Settings.from_env(env)
    return env.read


_COMPOSE_VAR = re.compile(
    r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
)


def interpolate(value: str) -> str:
    """Resolve compose `${X}`, `${X:-default}`, `${X:?msg}` as a fresh checkout would.

    Variables with a default take it; required ones take a URL-safe sample secret.
    """

    def one(match: re.Match[str]) -> str:
        op, arg = match.group("op"), match.group("arg")
        if op in (":-", "-"):
            return arg or ""
        return SAMPLE_SECRET

    return _COMPOSE_VAR.sub(one, value.replace("$$", "\0")).replace("\0", "$")


def load_compose() -> Compose:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), (
        f"{COMPOSE_FILE.name} has no services mapping"
    )
    return data


def load_hapi_config() -> dict[str, Any]:
    data = yaml.safe_load(HAPI_CONFIG_FILE.read_text())
    assert isinstance(data, dict), f"{HAPI_CONFIG_FILE} is not a YAML mapping"
    return data


def _build_context(service: Mapping[str, Any]) -> str | None:
    build = service.get("build")
    if isinstance(build, dict):
        build = build.get("context")
    return None if build is None else str(build).rstrip("/") or "."


def ours(compose: Compose) -> dict[str, dict[str, Any]]:
    """Services built from our Dockerfile (the root one; hapi-config/ builds the HAPI server)."""
    return {name: svc for name, svc in compose["services"].items() if _build_context(svc) == "."}


def raw_env(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        return {p[0]: p[1] if len(p) > 1 else "" for p in pairs}
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def env_of(service: Mapping[str, Any]) -> dict[str, str]:
    return {k: interpolate(v) for k, v in raw_env(service).items()}


def argv(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def healthcheck_text(service: Mapping[str, Any]) -> str:
    test = (service.get("healthcheck") or {}).get("test")
    return " ".join(argv(test)) if isinstance(test, list) else str(test or "")


def has_healthcheck(service: Mapping[str, Any]) -> bool:
    hc = service.get("healthcheck") or {}
    test = argv(hc.get("test")) if isinstance(hc.get("test"), list) else [hc.get("test")]
    return bool(hc) and not hc.get("disable") and test not in ([], [None], ["NONE"])


def container_ports(service: Mapping[str, Any]) -> set[int]:
    found: set[int] = set()
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            found.add(int(entry["target"]))
        else:
            found.add(int(str(entry).split("/")[0].rsplit(":", 1)[-1]))
    return found


def depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def spring_default(value: str) -> str:
    """`${NAME:default}` -> default; a plain value is returned as is."""
    match = re.fullmatch(r"\$\{[^:}]+:(?P<default>.*)\}", value.strip())
    return match.group("default") if match else value


def dig(data: Mapping[str, Any], *path: str) -> Any:
    node: Any = data
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


# --- the checks: each returns a list of problems, empty when the files are right ------


def unknown_settings(compose: Compose) -> list[str]:
    known = settings_names()
    return [
        f"service {name!r} sets {var}, which core/settings.py never reads"
        for name, svc in ours(compose).items()
        for var in sorted(raw_env(svc))
        if var not in known and var not in NOT_SETTINGS
    ]


def missing_settings(compose: Compose) -> list[str]:
    problems = []
    for name, needed in REQUIRED.items():
        svc = compose["services"].get(name)
        if svc is None:
            problems.append(f"no service {name!r} in {COMPOSE_FILE.name}")
            continue
        env = env_of(svc)
        problems += [
            f"service {name!r} does not set {var}" for var in sorted(needed) if not env.get(var)
        ]
    return problems


def unparsable_settings(compose: Compose) -> list[str]:
    problems = []
    for name, svc in ours(compose).items():
        try:
            Settings.from_env(env_of(svc))
        except ValueError as exc:
            problems.append(f"service {name!r}: Settings.from_env refuses its environment: {exc}")
    return problems


def secrets_with_defaults(compose: Compose) -> list[str]:
    return [
        f"service {name!r} sets {var} to {value!r}; it must be ${{{var}:?...}} (no default)"
        for name, svc in ours(compose).items()
        for var, value in raw_env(svc).items()
        if var in SECRETS and not re.fullmatch(rf"\$\{{{var}:\?[^}}]*\}}", value)
    ]


def http_port_mismatches(compose: Compose) -> list[str]:
    problems = []
    for name in HTTP_SERVICES:
        svc = compose["services"].get(name)
        if svc is None:
            problems.append(f"no service {name!r}")
            continue
        args = argv(svc.get("command"))
        port = flag(args, "--port")
        if args[:2] != ["researchflow", name] or port is None:
            problems.append(f"service {name!r} must run `researchflow {name} --port N`, not {args}")
            continue
        if flag(args, "--host") != "0.0.0.0":
            problems.append(f"service {name!r} must listen on --host 0.0.0.0 inside its container")
        published = container_ports(svc)
        if published and published != {int(port)}:
            problems.append(f"service {name!r} listens on {port} but publishes {sorted(published)}")
        health = healthcheck_text(svc)
        if not re.search(rf":{port}/health\b", health):
            problems.append(f"service {name!r} health check {health!r} is not GET :{port}/health")
    return problems


def receiver_url_problems(compose: Compose) -> list[str]:
    services = compose["services"]
    receiver_port = flag(argv(services.get("receiver", {}).get("command")), "--port")
    expected = f"http://receiver:{receiver_port}/fhir"
    problems = []
    for name in ("receiver", "bootstrap"):
        url = env_of(services.get(name, {})).get("RECEIVER_URL")
        if url != expected:
            problems.append(f"service {name!r} has RECEIVER_URL={url!r}; HAPI must call {expected}")
    for name, svc in ours(compose).items():
        url = env_of(svc).get("RECEIVER_URL")
        if url is not None and url != expected:
            problems.append(f"service {name!r} has RECEIVER_URL={url!r}, not {expected}")
    return problems


def fhir_base_url_problems(compose: Compose) -> list[str]:
    services = compose["services"]
    problems = []
    hapi = services.get("hapi")
    if hapi is None:
        return ["no service 'hapi'"]
    if not re.search(rf"localhost:{HAPI_PORT}/fhir/metadata\b", healthcheck_text(hapi)):
        problems.append(f"hapi's health check is not GET :{HAPI_PORT}/fhir/metadata")
    published = container_ports(hapi)
    if published and published != {HAPI_PORT}:
        problems.append(f"hapi listens on {HAPI_PORT} but publishes {sorted(published)}")
    for name, svc in ours(compose).items():
        url = env_of(svc).get("FHIR_BASE_URL")
        if url is None:
            continue
        parts = urlsplit(url)
        if (parts.hostname, parts.port, parts.path.rstrip("/")) != ("hapi", HAPI_PORT, "/fhir"):
            problems.append(
                f"service {name!r} has FHIR_BASE_URL={url!r}, not http://hapi:{HAPI_PORT}/fhir"
            )
    return problems


def store_url_problems(compose: Compose) -> list[str]:
    """REDIS_URL names the redis service; DATABASE_URL the batch-db service and its db/user."""
    services = compose["services"]
    batch_db = env_of(services.get("batch-db", {}))
    problems = []
    for name, svc in ours(compose).items():
        env = env_of(svc)
        if "REDIS_URL" in env:
            redis = urlsplit(env["REDIS_URL"])
            if (redis.hostname, redis.port or 6379) != ("redis", 6379) or "redis" not in services:
                problems.append(f"service {name!r}: REDIS_URL does not point at redis:6379")
            if redis.password is None and "--requirepass" in argv(services["redis"]["command"]):
                problems.append(f"service {name!r}: REDIS_URL carries no password")
        if "DATABASE_URL" in env:
            db = urlsplit(env["DATABASE_URL"])
            want = (
                "batch-db",
                batch_db.get("POSTGRES_USER"),
                "/" + batch_db.get("POSTGRES_DB", ""),
            )
            if (db.hostname, db.username, db.path) != want:
                problems.append(
                    f"service {name!r}: DATABASE_URL does not match the batch-db service"
                )
    return problems


def dependency_problems(compose: Compose) -> list[str]:
    services = compose["services"]
    problems = []
    for name, svc in services.items():
        for target, condition in depends_on(svc).items():
            if target not in services:
                problems.append(f"{name!r} depends on unknown service {target!r}")
            elif condition == "service_healthy" and not has_healthcheck(services[target]):
                problems.append(
                    f"{name!r} waits for {target!r} to be healthy; it has no healthcheck"
                )
            elif (
                condition == "service_completed_successfully"
                and str(services[target].get("restart", "no")) != "no"
            ):
                problems.append(f"{name!r} waits for one-shot {target!r}, which restarts")
    boot = services.get("bootstrap", {})
    if depends_on(boot).get("hapi") != "service_healthy":
        problems.append("bootstrap must wait for hapi: service_healthy")
    if str(boot.get("restart")) != "no":
        problems.append('bootstrap is one-shot: it needs restart: "no"')
    return problems


def unpinned_images(compose: Compose) -> list[str]:
    problems = []
    images = {name: svc["image"] for name, svc in compose["services"].items() if "image" in svc}
    base = re.search(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    images["Dockerfile"] = base.group(1) if base else ""
    for name, image in images.items():
        reference = image.split("@", 1)[0]
        tag = reference.rsplit(":", 1)[1] if ":" in reference.rsplit("/", 1)[-1] else ""
        if "@sha256:" not in image and (not tag or tag == "latest"):
            problems.append(f"{name}: image {image!r} is not pinned to a tag")
    return problems


def redis_persistence_problems(compose: Compose) -> list[str]:
    redis = compose["services"].get("redis")
    if redis is None:
        return ["no service 'redis'"]
    args = argv(redis.get("command"))
    problems = [
        f"redis must run with {opt} {want} (has {flag(args, opt)!r})"
        for opt, want in (
            ("--appendonly", "yes"),
            ("--appendfsync", "always"),
            ("--maxmemory-policy", "noeviction"),
        )
        if flag(args, opt) != want
    ]
    if "redis-cli ping" not in healthcheck_text(redis):
        problems.append("redis health check must be `redis-cli ping`")
    return problems


def hapi_config_problems(config: Mapping[str, Any]) -> list[str]:
    sub = dig(config, "hapi", "fhir", "subscription") or {}
    ds = dig(config, "spring", "datasource") or {}
    problems = []
    for key in ("resthook_enabled", "immediately_queued"):
        if sub.get(key) is not True:
            problems.append(f"hapi.fhir.subscription.{key} must be true, not {sub.get(key)!r}")
    if "email" in sub:
        problems.append("hapi.fhir.subscription.email is present: the starter then enables e-mail")
    if dig(config, "hapi", "fhir", "fhir_version") != "R4":
        problems.append("hapi.fhir.fhir_version must be R4")
    if ds.get("driverClassName") != "org.postgresql.Driver":
        problems.append(f"spring.datasource.driverClassName is {ds.get('driverClassName')!r}")
    if not spring_default(str(ds.get("url", ""))).startswith("jdbc:postgresql://"):
        problems.append(f"spring.datasource.url {ds.get('url')!r} is not PostgreSQL")
    dialect = dig(config, "spring", "jpa", "properties", "hibernate.dialect")
    if dialect != "ca.uhn.fhir.jpa.model.dialect.HapiFhirPostgresDialect":
        problems.append(f"hibernate.dialect is {dialect!r}, not HAPI's PostgreSQL dialect")
    return problems


def hapi_wiring_problems(compose: Compose, config: Mapping[str, Any]) -> list[str]:
    """The hapi service loads the file we parsed and gives it what it needs."""
    services = compose["services"]
    hapi = services.get("hapi", {})
    env = env_of(hapi)
    targets = []
    for volume in hapi.get("volumes") or []:
        if isinstance(volume, dict):
            source, target = str(volume.get("source", "")), str(volume.get("target", ""))
        else:
            source, target = ([*str(volume).split(":"), ""])[:2]
        if source.startswith((".", "/")) and (ROOT / source).resolve() == HAPI_CONFIG_FILE:
            targets.append(target)
    if not targets:
        return [f"hapi does not mount {HAPI_CONFIG_FILE.relative_to(ROOT)}"]
    location = env.get("SPRING_CONFIG_ADDITIONAL_LOCATION") or env.get("SPRING_CONFIG_LOCATION")
    location = location or flag(argv(hapi.get("command")), "--spring.config.location") or ""
    paths = [re.sub(r"^(optional:)?(file:)?", "", p.strip()) for p in location.split(",")]
    problems = []
    if not any(p == t or (p.endswith("/") and t.startswith(p)) for p in paths for t in targets):
        problems.append(f"hapi mounts the config at {targets} but Spring loads {location!r}")
    # Spring placeholders with no default must come from hapi's environment.
    ds = dig(config, "spring", "datasource") or {}
    for key, value in ds.items():
        for name in re.findall(r"\$\{([^:}]+)\}", str(value)):
            if not env.get(name):
                problems.append(f"spring.datasource.{key} needs {name}, which hapi's env lacks")
    jdbc = urlsplit(
        spring_default(env.get("HAPI_JDBC_URL") or str(ds.get("url", ""))).removeprefix("jdbc:")
    )
    hapi_db = env_of(services.get("hapi-db", {}))
    if (jdbc.hostname, jdbc.path) != ("hapi-db", "/" + hapi_db.get("POSTGRES_DB", "")):
        problems.append(
            f"HAPI's JDBC URL does not name the hapi-db service and its database: {jdbc}"
        )
    return problems


def env_example_problems(compose: Compose) -> list[str]:
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?", COMPOSE_FILE.read_text()))
    listed = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    return [f".env.example does not list {name}" for name in sorted(required - listed)]


# --- the tests -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> Compose:
    return load_compose()


@pytest.fixture(scope="module")
def hapi_config() -> dict[str, Any]:
    return load_hapi_config()


def test_recorder_sees_the_settings_of_the_contract() -> None:
    names = settings_names()
    for var in ("REDIS_URL", "DATABASE_URL", "FHIR_BASE_URL", "RECEIVER_URL", "RECEIVER_TOKEN"):
        assert var in names, f"Settings.from_env no longer reads {var} through its env mapping"


COMPOSE_CHECKS: dict[str, Callable[[Compose], list[str]]] = {
    "unknown_settings": unknown_settings,
    "missing_settings": missing_settings,
    "unparsable_settings": unparsable_settings,
    "secrets_with_defaults": secrets_with_defaults,
    "http_ports": http_port_mismatches,
    "receiver_url": receiver_url_problems,
    "fhir_base_url": fhir_base_url_problems,
    "store_urls": store_url_problems,
    "depends_on": dependency_problems,
    "pinned_images": unpinned_images,
    "redis_persistence": redis_persistence_problems,
    "env_example": env_example_problems,
}


@pytest.mark.parametrize("check", COMPOSE_CHECKS, ids=str)
def test_compose(compose: Compose, check: str) -> None:
    problems = COMPOSE_CHECKS[check](compose)
    assert not problems, "\n".join(problems)


def test_every_required_setting_is_checked_per_service(compose: Compose) -> None:
    for name in ("receiver", "serve", "poller", "bootstrap"):
        assert name in compose["services"], f"docker-compose.yml has no {name!r} service"
        assert name in ours(compose), f"{name!r} is not built from our Dockerfile"


def test_hapi_config(hapi_config: dict[str, Any]) -> None:
    problems = hapi_config_problems(hapi_config)
    assert not problems, "\n".join(problems)


def hapi_build_problems(compose: Compose) -> list[str]:
    """The hapi service is the server the real-HAPI tests ran: hapi-config/, HAPI 8.8.0."""
    hapi = compose["services"].get("hapi", {})
    context = _build_context(hapi)
    if context is None or (ROOT / context).resolve() != HAPI_CONFIG_FILE.parent:
        return [f"hapi is not built from hapi-config/ (build: {hapi.get('build')!r})"]
    pom = (HAPI_CONFIG_FILE.parent / "pom.xml").read_text()
    dockerfile = (HAPI_CONFIG_FILE.parent / "Dockerfile").read_text()
    problems = []
    if "<hapi.version>8.8.0</hapi.version>" not in pom:
        problems.append("hapi-config/pom.xml no longer builds HAPI FHIR 8.8.0")
    if "mvn" not in dockerfile or "researchflow-hapi.jar" not in dockerfile:
        problems.append("hapi-config/Dockerfile does not build and run the pom's jar")
    return problems


def test_hapi_service_is_the_tested_server(compose: Compose) -> None:
    problems = hapi_build_problems(compose)
    assert not problems, "\n".join(problems)


def test_hapi_build_check_catches_the_upstream_image(compose: Compose) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["hapi"].pop("build")
    broken["services"]["hapi"]["image"] = "hapiproject/hapi:v8.10.0-1"
    assert hapi_build_problems(broken), "an untested HAPI image went unnoticed"


def test_hapi_service_loads_that_config(compose: Compose, hapi_config: dict[str, Any]) -> None:
    problems = hapi_wiring_problems(compose, hapi_config)
    assert not problems, "\n".join(problems)


# --- the checks can fail: each broken copy of the files must be caught -----------------


def _set(path: str, value: Any) -> Callable[[Compose], None]:
    def mutate(data: Compose) -> None:
        *parents, last = path.split(".")
        node = data["services"]
        for key in parents:
            node = node[key]
        node[last] = value

    return mutate


def _drop_env(service: str, var: str) -> Callable[[Compose], None]:
    return lambda data: data["services"][service]["environment"].pop(var)


MUTATIONS: list[tuple[str, Callable[[Compose], None], Callable[[Compose], list[str]]]] = [
    (
        "typo in a setting name",
        _set("serve.environment.REDIS_URI", "redis://redis"),
        unknown_settings,
    ),
    ("serve lacks SERVING_TOKEN", _drop_env("serve", "SERVING_TOKEN"), missing_settings),
    ("bad boolean", _set("serve.environment.USE_SPEED_LAYER", "maybe"), unparsable_settings),
    (
        "token with default",
        _set("receiver.environment.RECEIVER_TOKEN", "changeme"),
        secrets_with_defaults,
    ),
    (
        "receiver port moved",
        _set(
            "receiver.command", ["researchflow", "receiver", "--host", "0.0.0.0", "--port", "9000"]
        ),
        http_port_mismatches,
    ),
    ("serve publishes wrong port", _set("serve.ports", ["8083:8083"]), http_port_mismatches),
    (
        "bootstrap URL drifts",
        _set("bootstrap.environment.RECEIVER_URL", "http://localhost:8081/fhir"),
        receiver_url_problems,
    ),
    (
        "FHIR base without /fhir",
        _set("poller.environment.FHIR_BASE_URL", "http://hapi:8080"),
        fhir_base_url_problems,
    ),
    (
        "redis host typo",
        _set("serve.environment.REDIS_URL", "redis://:x@rediss:6379/0"),
        store_url_problems,
    ),
    ("healthy wait on no healthcheck", _set("hapi-db.healthcheck", None), dependency_problems),
    ("bootstrap restarts", _set("bootstrap.restart", "always"), dependency_problems),
    ("latest image", _set("redis.image", "redis:latest"), unpinned_images),
    ("untagged image", _set("hapi.image", "hapiproject/hapi"), unpinned_images),
    (
        "eviction allowed",
        _set("redis.command", ["redis-server", "--appendonly", "yes"]),
        redis_persistence_problems,
    ),
]


@pytest.mark.parametrize(("what", "mutate", "check"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_check_catches(
    compose: Compose,
    what: str,
    mutate: Callable[[Compose], None],
    check: Callable[[Compose], list[str]],
) -> None:
    broken = copy.deepcopy(compose)
    mutate(broken)
    assert check(broken), f"the {check.__name__} check did not notice: {what}"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("hapi.fhir.subscription.resthook_enabled", False),
        ("hapi.fhir.subscription.immediately_queued", "true"),
        ("hapi.fhir.fhir_version", "R5"),
        ("spring.datasource.driverClassName", "org.h2.Driver"),
        ("spring.datasource.url", "jdbc:h2:file:./target/database/h2"),
    ],
)
def test_hapi_config_check_catches(hapi_config: dict[str, Any], path: str, value: Any) -> None:
    broken = copy.deepcopy(hapi_config)
    *parents, last = path.split(".")
    node = broken
    for key in parents:
        node = node[key]
    node[last] = value
    assert hapi_config_problems(broken), f"the hapi config check did not notice {path}={value!r}"


def test_wiring_check_catches_an_unmounted_config(
    compose: Compose, hapi_config: dict[str, Any]
) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["hapi"]["volumes"] = [
        "./elsewhere.yaml:/config/researchflow/application.yaml"
    ]
    assert hapi_wiring_problems(broken, hapi_config), "an unmounted hapi config went unnoticed"
