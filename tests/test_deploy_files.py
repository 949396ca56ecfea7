"""Deployment files: docker-compose.yml, Dockerfile, .dockerignore, .env.example and
config/gunicorn.conf.py. (config/Caddyfile runs for real in tests/test_proxy.py.)

No Docker engine needed. docker-compose.yml is checked twice: as plain YAML (PyYAML,
always) and after the real Compose parser resolved it (`docker-compose config`: schema
validation, ${VAR} substitution, env_file reading). The second variant skips when the
`docker-compose` binary is missing (CI installs it with .ci/install-docker-compose.sh).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import runpy
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
GUNICORN_CONF = ROOT / "config" / "gunicorn.conf.py"

DUMMY_SECRETS = {
    "OPENAI_API_KEY": "sk-test-dummy",
    "SECRET_KEY": "test-secret-key-dummy",
    "CHATKIT_WORKFLOW_ID": "wf_dummy",
    "REDIS_PASSWORD": "0123456789abcdef0123456789abcdef",
    "POSTGRES_PASSWORD": "fedcba9876543210fedcba9876543210",
}
SECRET_KEYS = {
    "OPENAI_API_KEY", "SECRET_KEY", "SECRET_KEY_FALLBACKS", "REDIS_PASSWORD", "POSTGRES_PASSWORD"
}  # fmt: skip

# Every key the service reads, with the default .env.example must show (None = blank).
ENV_DEFAULTS: dict[str, str | None] = {
    "OPENAI_API_KEY": None,
    "SECRET_KEY": None,
    "CHATKIT_WORKFLOW_ID": None,
    "CHATKIT_ALLOWED_WORKFLOWS": None,
    "CHATKIT_WORKFLOW_VERSION": None,
    "CHATKIT_API_BASE": "https://api.openai.com",
    "CHATKIT_URL_PREFIX": "/api/chatkit",
    "CHATKIT_SESSION_TTL": "600",
    "CHATKIT_UPSTREAM_TIMEOUT": "15",
    "CHATKIT_UPSTREAM_RETRIES": "2",
    "CHATKIT_SESSION_RATE_LIMIT": None,
    "CHATKIT_FILE_UPLOAD_ENABLED": None,
    "CHATKIT_FILE_UPLOAD_MAX_FILES": None,
    "CHATKIT_FILE_UPLOAD_MAX_FILE_SIZE": None,
    "CHATKIT_HISTORY_ENABLED": None,
    "CHATKIT_HISTORY_RECENT_THREADS": None,
    "CHATKIT_THREAD_TITLING_ENABLED": None,
    "CHATKIT_BACKEND": "server",
    "CHATKIT_AGENT": None,
    "CHATKIT_AGENT_MODEL": "gpt-4.1-mini",
    "CHATKIT_AGENT_INSTRUCTIONS": "@instructions.md",
    "CHATKIT_HISTORY_ITEMS": "30",
    "CHATKIT_HISTORY_MAX_CHARS": "32000",
    "CHATKIT_MAX_OUTPUT_TOKENS": "1024",
    "CHATKIT_AGENT_MAX_TURNS": "4",
    "OPENAI_BASE_URL": None,
    "CHATKIT_AGENT_TRACING": "false",
    "CHATKIT_MODEL_TIMEOUT": "120",
    "CHATKIT_REPLY_TIMEOUT": "180",
    "CHATKIT_STORE_URL": None,
    "CHATKIT_STORE_TABLE_PREFIX": "chatkit_",
    "CHATKIT_STORE_BIND": None,
    "CHATKIT_STORE_POOL_SIZE": "5",
    "CHATKIT_STORE_TIMEOUT": "10",
    "CHATKIT_THREAD_TTL": "2592000",
    "CHATKIT_RATELIMIT_REQUESTS_PER_IP": "300 per minute",
    "CHATKIT_TOKENS_PER_USER": "off",
    "CHATKIT_TOKENS_GLOBAL": "off",
    "CHATKIT_MAX_STREAMS_PER_USER": "2",
    "CHATKIT_MAX_INPUT_CHARS": "4000",
    "CHATKIT_CLIENT_TOOL_MAX_CHARS": "8000",
    "CHATKIT_COOKIE_NAME": "chatkit_session_id",
    "CHATKIT_COOKIE_SECURE": "true",
    "CHATKIT_COOKIE_MAX_AGE": "2592000",
    "CHATKIT_RATELIMIT_PER_USER": "10 per minute;100 per day",
    "CHATKIT_RATELIMIT_PER_IP": "30 per minute;200 per day",
    "CHATKIT_RATELIMIT_PER_IPV6_48": "60 per minute;200 per day",
    "CHATKIT_RATELIMIT_GLOBAL": "2000 per day",
    "CHATKIT_REDIS_TIMEOUT": "0.3",
    "CHATKIT_TRUSTED_PROXIES": "0",
    "CHATKIT_TRUSTED_PROXY_NETWORKS": "127.0.0.0/8,::1/128",
    "CHATKIT_IPV6_PREFIX": "64",
    "CHATKIT_ALLOWED_ORIGINS": None,
    "CHATKIT_LOG_LEVEL": "INFO",
    "CHATKIT_LOG_FORMAT": "text",
    "CHATKIT_DEMO": "true",
    "RATELIMIT_STRATEGY": "fixed-window",
    "RATELIMIT_IN_MEMORY_FALLBACK_ENABLED": "true",
    "RATELIMIT_HEADERS_ENABLED": "false",
    "RATELIMIT_ENABLED": "true",
    "RATELIMIT_SWALLOW_ERRORS": "false",
    "GUNICORN_BIND": None,
    "GUNICORN_WORKERS": None,
    "GUNICORN_THREADS": "32",
    "GUNICORN_WORKER_CLASS": None,
    "GUNICORN_TIMEOUT": "30",
    "GUNICORN_GRACEFUL_TIMEOUT": "20",
    "GUNICORN_KEEPALIVE": "5",
    "GUNICORN_MAX_REQUESTS": "0",
    "GUNICORN_MAX_REQUESTS_JITTER": "0",
    "GUNICORN_LOG_LEVEL": "info",
    "GUNICORN_ACCESS_LOG": "on",
    "FORWARDED_ALLOW_IPS": "127.0.0.1,::1",
    "PORT": "8000",
    "REDIS_MAXMEMORY": "64mb",
    "REDIS_PASSWORD": None,
    "POSTGRES_PASSWORD": None,
    "CHATKIT_SITE_HOST": "localhost",
    "PROXY_SUBNET": "10.203.47.0/24",
}

# Variables config/gunicorn.conf.py reads; cleared before each exec of the file.
GUNICORN_ENV = [key for key in ENV_DEFAULTS if key.startswith("GUNICORN_")] + [
    "GUNICORN_CONTROL_SOCKET",
    "FORWARDED_ALLOW_IPS",
    "PORT",
    "PROMETHEUS_MULTIPROC_DIR",
    "HOST",
    # The backend decides the default thread count.
    "CHATKIT_BACKEND",
    "CHATKIT_WORKFLOW_ID",
]


# --------------------------------------------------------------------------- helpers


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file (comments and blank lines skipped, no unquoting)."""
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, value = stripped.partition("=")
        assert sep, f"{path.name}: not a KEY=VALUE line: {line!r}"
        assert key not in values, f"{path.name}: {key} is set twice"
        values[key] = value
    return values


def duration_seconds(value: str | int | float) -> float:
    """A Compose duration ("30s", "1m30s", "1h", "500ms") in seconds."""
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def env_mapping(service: dict) -> dict[str, str | None]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return {k: v for k, _, v in (item.partition("=") for item in environment)}
    return {k: None if v is None else str(v) for k, v in environment.items()}


def published_ports(service: dict) -> list[tuple[str, str]]:
    """(published, target) per ports entry, short ("8000:8000") or long syntax."""
    result = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            result.append((str(entry.get("published")), str(entry["target"])))
            continue
        text = str(entry).split("/", 1)[0]
        # host:container or ip:host:container; ${VAR:-x} contains a ':' of its own.
        fields = re.findall(r"\$\{[^}]*\}|[^:]+", text)
        assert len(fields) in (2, 3), f"unexpected ports entry {entry!r}"
        result.append((fields[-2], fields[-1]))
    return result


def healthcheck_text(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def command_args(service: dict) -> list[str]:
    command = service.get("command")
    return command if isinstance(command, list) else str(command).split()


def size_bytes(value: str | int) -> int:
    """A Compose / Redis size ("512m", "64mb", "1g", 1048576) in bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"(\d+)([kmg]?)b?", str(value).lower())
    assert match, f"bad size {value!r}"
    return int(match.group(1)) * 1024 ** " kmg".index(match.group(2) or " ")


def exec_gunicorn_conf(monkeypatch, **env: str) -> dict:
    """Run config/gunicorn.conf.py the way gunicorn does, with a controlled environment."""
    for key in GUNICORN_ENV:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return runpy.run_path(str(GUNICORN_CONF))


def gunicorn_defaults() -> dict:
    with pytest.MonkeyPatch.context() as mp:
        return exec_gunicorn_conf(mp)


# --------------------------------------------------------------------------- (a) compose


def _compose_env_file(path: Path, **overrides: str) -> Path:
    """.env.example with dummy secrets (and overrides) filled in, written to path."""
    lines = []
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        key, sep, _ = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            if key in overrides:
                line = f"{key}={overrides[key]}"
            elif key in DUMMY_SECRETS:
                line = f"{key}={DUMMY_SECRETS[key]}"
        lines.append(line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def docker_compose_binary() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip(
            "docker-compose binary not installed (run .ci/install-docker-compose.sh); "
            "the PyYAML checks of docker-compose.yml still ran"
        )
    return binary


def run_compose_config(
    workdir: Path, compose_text: str | None = None, **overrides: str
) -> subprocess.CompletedProcess:
    """`docker-compose --env-file <.env> config` on a copy of the files in workdir."""
    binary = docker_compose_binary()
    if compose_text is None:
        compose_text = COMPOSE_FILE.read_text(encoding="utf-8")
    (workdir / "docker-compose.yml").write_text(compose_text, encoding="utf-8")
    shutil.copy(DOCKERFILE, workdir / "Dockerfile")
    env_file = _compose_env_file(workdir / ".env", **overrides)
    # A clean environment: a PORT or REDIS_MAXMEMORY exported in the developer's shell
    # would otherwise win over the env file.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir)}
    return subprocess.run(
        [binary, "-f", "docker-compose.yml", "--env-file", str(env_file), "config"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def compose_resolved(tmp_path_factory) -> dict:
    result = run_compose_config(tmp_path_factory.mktemp("compose"))
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def compose_raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(params=["pyyaml", "docker-compose"])
def compose(request) -> dict:
    """The compose model, as written (PyYAML) and as resolved by the Compose parser."""
    if request.param == "pyyaml":
        return request.getfixturevalue("compose_raw")
    return request.getfixturevalue("compose_resolved")


def test_compose_services(compose):
    # store-redis only runs with --profile redis-store, postgres and migrate with --profile
    # postgres (server mode on several hosts).
    assert set(compose["services"]) == {
        "proxy", "app", "redis", "store-redis", "postgres", "migrate"
    }  # fmt: skip
    assert compose["services"]["store-redis"]["profiles"] == ["redis-store"]
    assert compose["services"]["postgres"]["profiles"] == ["postgres"]
    assert compose["services"]["migrate"]["profiles"] == ["postgres"]
    # Caddy's certificates and server mode's threads persist; the counters do not (no volume
    # for the limiter's Redis).
    assert set(compose.get("volumes") or {}) == {
        "caddy_data", "chat_data", "store_data", "pg_data"
    }  # fmt: skip
    assert "volumes" not in compose["services"]["redis"]


def test_server_mode_threads_survive_restarts(compose):
    app = compose["services"]["app"]
    store_url = env_mapping(app)["CHATKIT_STORE_URL"]  # raw ${...:-default} or resolved
    assert store_url.removesuffix("}").endswith("sqlite:////data/chatkit-threads.db")
    assert any(str(v).startswith("chat_data:/data") or (
        isinstance(v, dict) and v.get("source") == "chat_data" and v.get("target") == "/data"
    ) for v in app["volumes"])
    store = compose["services"]["store-redis"]
    command = " ".join(map(str, store["command"]))
    assert "--maxmemory-policy noeviction" in command
    assert "--appendonly yes" in command
    assert "--requirepass" in command


def test_the_postgres_profile_keeps_its_data_and_migrates_before_the_chat_uses_it(compose):
    """The several-host setup: the official image with its data on a volume, a healthcheck,
    the password from .env (never inline), reachable only on the internal network; a one-shot
    `flask chatkit db upgrade` once it is healthy (the app never changes the schema)."""
    postgres = compose["services"]["postgres"]
    assert str(postgres["image"]).startswith("postgres:")
    env = env_mapping(postgres)
    assert env["POSTGRES_PASSWORD"] in (
        "${POSTGRES_PASSWORD:-}", DUMMY_SECRETS["POSTGRES_PASSWORD"]
    )  # fmt: skip
    assert any(str(v).startswith("pg_data:/var/lib/postgresql/data") or (
        isinstance(v, dict) and v.get("source") == "pg_data"
        and v.get("target") == "/var/lib/postgresql/data"
    ) for v in postgres["volumes"])
    assert "pg_isready" in healthcheck_text(postgres)
    assert "ports" not in postgres
    assert list(postgres["networks"]) == ["backend"]  # a list, or a mapping once resolved
    migrate = compose["services"]["migrate"]
    assert command_args(migrate) == ["flask", "--app", "wsgi", "chatkit", "db", "upgrade"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate.get("restart") in ("no", None)
    assert "migrate" not in (compose["services"]["app"].get("depends_on") or {})


def test_dockerfile_gives_the_service_user_its_data_directory():
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "mkdir -p /data && chown 10001:10001 /data" in text


def test_redis_healthcheck_checks_pong(compose):
    redis = compose["services"]["redis"]
    assert "PONG" in healthcheck_text(redis)
    for key in ("interval", "timeout", "retries", "start_period"):
        assert key in redis["healthcheck"], key


def test_redis_is_not_published(compose):
    assert "ports" not in compose["services"]["redis"]


def test_redis_image_pinned_to_a_major_version(compose):
    image = compose["services"]["redis"]["image"]
    name, _, tag = image.partition(":")
    assert name == "redis"
    assert tag and tag != "latest" and re.match(r"\d+", tag), image


def test_redis_without_persistence_and_with_a_volatile_memory_policy(compose):
    redis = compose["services"]["redis"]
    args = command_args(redis)
    assert args[0] == "redis-server"
    assert args[args.index("--save") + 1] == ""
    assert args[args.index("--appendonly") + 1] == "no"
    assert "--maxmemory" in args
    policy = args[args.index("--maxmemory-policy") + 1]
    assert policy.startswith("volatile-"), policy
    assert not redis.get("volumes")


def test_app_waits_for_healthy_redis(compose):
    assert compose["services"]["app"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_app_healthcheck_uses_python_against_readyz(compose):
    text = healthcheck_text(compose["services"]["app"])
    assert "python" in text and "/readyz" in text
    assert "curl" not in text and "wget" not in text


def test_every_service_restarts_unless_stopped(compose):
    for name, service in compose["services"].items():
        if name == "migrate":  # a one-shot: it runs the migrations and exits
            assert service["restart"] == "no"
            continue
        assert service["restart"] == "unless-stopped", name


def test_app_is_hardened(compose):
    app = compose["services"]["app"]
    assert app["read_only"] is True
    assert "/tmp" in [str(t).split(":")[0] for t in as_list(app.get("tmpfs"))]
    assert "ALL" in app["cap_drop"]
    assert "no-new-privileges:true" in app["security_opt"]


# Capabilities each service keeps after cap_drop: [ALL].
CAPABILITIES = {"proxy": {"NET_BIND_SERVICE"}, "app": set(), "redis": set()}


@pytest.mark.parametrize("name", sorted(CAPABILITIES))
def test_every_service_is_hardened(compose, name):
    service = compose["services"][name]
    assert service["read_only"] is True, name
    assert service["cap_drop"] == ["ALL"], name
    assert set(service.get("cap_add") or []) == CAPABILITIES[name], name
    assert "no-new-privileges:true" in service["security_opt"], name
    assert size_bytes(service["mem_limit"]) > 0, name
    assert int(service["pids_limit"]) > 0, name
    for mount in as_list(service.get("tmpfs")):
        _, _, options = str(mount).partition(":")
        assert {"noexec", "nosuid"} <= set(options.split(",")), (name, mount)
        assert any(o.startswith("size=") for o in options.split(",")), (name, mount)


@pytest.mark.parametrize("name", ["proxy", "app", "redis"])
def test_every_service_rotates_its_logs(compose, name):
    logging = compose["services"][name]["logging"]
    assert logging["driver"] == "json-file"
    assert size_bytes(logging["options"]["max-size"]) <= 100 * 1024**2
    assert 1 <= int(logging["options"]["max-file"]) <= 10


def test_app_limits_leave_room_for_gunicorn(compose):
    app = compose["services"]["app"]
    conf = gunicorn_defaults()
    # pids_limit counts threads: every worker's threads, a few of its own, and the master.
    assert int(app["pids_limit"]) >= conf["workers"] * (conf["threads"] + 8) + 16
    assert size_bytes(app["mem_limit"]) >= conf["workers"] * 100 * 1024**2


def test_redis_mem_limit_leaves_room_above_maxmemory(compose_resolved):
    redis = compose_resolved["services"]["redis"]
    args = command_args(redis)
    maxmemory = size_bytes(args[args.index("--maxmemory") + 1])
    assert size_bytes(redis["mem_limit"]) >= 1.5 * maxmemory


def test_redis_runs_as_the_image_user_with_a_writable_data_tmpfs(compose):
    redis = compose["services"]["redis"]
    # redis:7-alpine's own user; its entrypoint then needs no chown/setuid capability.
    assert str(redis["user"]) == "999:1000"
    data = [str(t) for t in as_list(redis["tmpfs"]) if str(t).startswith("/data:")]
    assert data and {"uid=999", "gid=1000"} <= set(data[0].split(":", 1)[1].split(","))


def test_stop_grace_period_exceeds_gunicorn_graceful_timeout(compose):
    graceful = gunicorn_defaults()["graceful_timeout"]
    grace = duration_seconds(compose["services"]["app"]["stop_grace_period"])
    assert grace > graceful, f"stop_grace_period {grace}s <= graceful_timeout {graceful}s"


def test_only_the_proxy_publishes_ports(compose):
    services = compose["services"]
    assert sorted(published_ports(services["proxy"])) == [("443", "443"), ("80", "80")]
    # gunicorn has no read timeouts of its own: reachable only through the proxy.
    assert "ports" not in services["app"]
    assert len(as_list(services["app"]["expose"])) == 1


def test_proxy_runs_the_project_caddyfile_and_keeps_its_certificates(compose_raw):
    proxy = compose_raw["services"]["proxy"]
    assert re.fullmatch(r"caddy:2\.\d+-alpine", proxy["image"]), proxy["image"]
    volumes = as_list(proxy["volumes"])
    assert "./config/Caddyfile:/etc/caddy/Caddyfile:ro" in volumes
    assert "caddy_data:/data" in volumes
    env = env_mapping(proxy)
    assert env["CHATKIT_SITE_HOST"] == "${CHATKIT_SITE_HOST:-localhost}"
    assert env["CHATKIT_UPSTREAM"] == "app:${PORT:-8000}"
    assert proxy["depends_on"]["app"]["condition"] == "service_healthy"
    grace = duration_seconds(proxy["stop_grace_period"])
    caddyfile = (ROOT / "config" / "Caddyfile").read_text(encoding="utf-8")
    caddy_grace = re.search(r"(?m)^\s*grace_period (\S+)$", caddyfile)
    assert caddy_grace and grace > duration_seconds(caddy_grace.group(1))


def test_networks_keep_redis_internal_and_pin_the_proxy_subnet(compose):
    services, networks = compose["services"], compose["networks"]
    # A list as written, a mapping once resolved: set() gives the names either way.
    assert set(services["proxy"]["networks"]) == {"edge"}
    assert set(services["app"]["networks"]) == {"edge", "backend"}
    assert set(services["redis"]["networks"]) == {"backend"}
    assert networks["backend"]["internal"] is True
    assert not networks["edge"].get("internal")
    subnets = [c["subnet"] for c in networks["edge"]["ipam"]["config"]]
    trusted = env_mapping(services["app"])["CHATKIT_TRUSTED_PROXY_NETWORKS"]
    assert subnets == [trusted]
    assert env_mapping(services["app"])["CHATKIT_TRUSTED_PROXIES"] == "1"


def test_storage_uri_points_at_the_redis_service(compose_resolved):
    uri = env_mapping(compose_resolved["services"]["app"])["RATELIMIT_STORAGE_URI"]
    parts = urlsplit(uri)
    assert parts.scheme == "redis" and parts.hostname == "redis", uri
    assert parts.password, "the compose Redis requires a password"


def test_redis_password_comes_from_env(compose_raw):
    reference = "${REDIS_PASSWORD:-}"
    app, redis = compose_raw["services"]["app"], compose_raw["services"]["redis"]
    assert env_mapping(app)["RATELIMIT_STORAGE_URI"] == f"redis://:{reference}@redis:6379/0"
    args = command_args(redis)
    assert args[args.index("--requirepass") + 1] == reference
    # The healthcheck's redis-cli reads the password from REDISCLI_AUTH, not its command line.
    assert env_mapping(redis)["REDISCLI_AUTH"] == reference
    assert "-a " not in healthcheck_text(redis) and "AUTH" not in healthcheck_text(redis)


def test_no_secrets_inline(compose_raw):
    app = compose_raw["services"]["app"]
    inline = env_mapping(app)
    assert not SECRET_KEYS & set(inline), "secrets belong in .env, not in the compose file"
    assert set(inline) == {
        "RATELIMIT_STORAGE_URI",
        "CHATKIT_TRUSTED_PROXIES",
        "CHATKIT_TRUSTED_PROXY_NETWORKS",
        "CHATKIT_STORE_URL",
        "CHATKIT_STORE_REQUIRE_PERSISTENCE",
        "HOST",
    }, "only what the compose file itself defines is inline"
    for name, service in compose_raw["services"].items():
        for key, value in env_mapping(service).items():
            assert "$" in str(value) or key not in SECRET_KEYS | {"REDISCLI_AUTH"}, (name, key)
    assert ".env" in as_list(app["env_file"])
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert not re.search(r"sk-[A-Za-z0-9]", text), "something like an API key in the file"


def test_compose_variables_are_documented_in_env_example(compose_raw):
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE_FILE.read_text(encoding="utf-8")))
    assert used, "expected ${PORT...} substitutions"
    missing = used - set(parse_env_file(ENV_EXAMPLE))
    assert not missing, f"used in docker-compose.yml, missing in .env.example: {missing}"


def test_compose_resolves_env_example_exactly(compose_resolved):
    """The real parser reads .env.example's values unchanged (no quotes, `;` kept)."""
    app = compose_resolved["services"]["app"]
    env = env_mapping(app)
    assert env["CHATKIT_RATELIMIT_PER_USER"] == "10 per minute;100 per day"
    assert env["CHATKIT_RATELIMIT_PER_IP"] == "30 per minute;200 per day"
    assert env["OPENAI_API_KEY"] == DUMMY_SECRETS["OPENAI_API_KEY"]
    # The inline values win over env_file.
    password = DUMMY_SECRETS["REDIS_PASSWORD"]
    assert env["RATELIMIT_STORAGE_URI"] == f"redis://:{password}@redis:6379/0"
    assert env["CHATKIT_TRUSTED_PROXIES"] == "1"
    assert env["CHATKIT_TRUSTED_PROXY_NETWORKS"] == "10.203.47.0/24"
    assert [str(port) for port in app["expose"]] == ["8000"]
    redis = compose_resolved["services"]["redis"]
    args = command_args(redis)
    assert args[args.index("--maxmemory") + 1] == "64mb"
    assert args[args.index("--requirepass") + 1] == password
    assert env_mapping(redis)["REDISCLI_AUTH"] == password
    proxy = env_mapping(compose_resolved["services"]["proxy"])
    assert proxy["CHATKIT_SITE_HOST"] == "localhost"
    assert proxy["CHATKIT_UPSTREAM"] == "app:8000"


def test_compose_port_follows_port_variable(tmp_path):
    result = run_compose_config(
        tmp_path,
        PORT="9000",
        REDIS_MAXMEMORY="128mb",
        CHATKIT_SITE_HOST="chat.example.com",
        PROXY_SUBNET="192.168.254.0/24",
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    app = resolved["services"]["app"]
    # gunicorn binds $PORT, the healthcheck and the proxy dial it.
    assert [str(port) for port in app["expose"]] == ["9000"]
    assert env_mapping(app)["PORT"] == "9000"
    proxy = env_mapping(resolved["services"]["proxy"])
    assert proxy["CHATKIT_UPSTREAM"] == "app:9000"
    assert proxy["CHATKIT_SITE_HOST"] == "chat.example.com"
    assert env_mapping(app)["CHATKIT_TRUSTED_PROXY_NETWORKS"] == "192.168.254.0/24"
    assert resolved["networks"]["edge"]["ipam"]["config"] == [{"subnet": "192.168.254.0/24"}]
    args = command_args(resolved["services"]["redis"])
    assert args[args.index("--maxmemory") + 1] == "128mb"


def test_compose_starts_from_a_env_with_only_the_two_keys(tmp_path):
    """A fresh .env holding OPENAI_API_KEY and SECRET_KEY only: the file resolves, the app runs
    server mode (no backend, no workflow id) with threads on the volume, and the limiter's Redis
    runs without a password, reachable only on the internal backend network."""
    (tmp_path / "docker-compose.yml").write_text(COMPOSE_FILE.read_text(encoding="utf-8"))
    (tmp_path / ".env").write_text("OPENAI_API_KEY=sk-test-dummy\nSECRET_KEY=" + "k" * 40 + "\n")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    result = subprocess.run(
        [docker_compose_binary(), "-f", "docker-compose.yml", "config"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    app, redis = resolved["services"]["app"], resolved["services"]["redis"]
    app_env = env_mapping(app)
    assert "CHATKIT_BACKEND" not in app_env and "CHATKIT_WORKFLOW_ID" not in app_env
    assert app_env["CHATKIT_STORE_URL"] == "sqlite:////data/chatkit-threads.db"
    assert app_env["HOST"] == "0.0.0.0"  # the proxy reaches gunicorn over the network
    assert urlsplit(app_env["RATELIMIT_STORAGE_URI"]).password in (None, "")
    args = command_args(redis)
    assert args[args.index("--requirepass") + 1] == ""
    assert list(redis["networks"]) == ["backend"]
    assert resolved["networks"]["backend"]["internal"] is True
    assert "ports" not in redis
    from chatkit_flask.settings import Settings

    settings = Settings.from_mapping(app_env)
    assert (settings.backend, settings.storage_uri) == ("server", "redis://:@redis:6379/0")


def test_redis_command_and_healthcheck_work_against_a_real_redis(compose_resolved, tmp_path):
    """The resolved command line, run by this machine's redis-server on a private port:
    the password is enforced, the healthcheck passes only with REDISCLI_AUTH, and the app's
    storage URI authenticates."""
    redis_lib = pytest.importorskip("redis")
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not (server and cli):
        pytest.skip("redis-server / redis-cli not installed")
    redis = compose_resolved["services"]["redis"]
    args = command_args(redis)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [server, *args[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        check = healthcheck_text(redis).replace("CMD-SHELL ", "", 1)
        check = check.replace("redis-cli", f"{cli} -p {port}")
        base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        with_auth = dict(base_env, REDISCLI_AUTH=env_mapping(redis)["REDISCLI_AUTH"])
        for _ in range(50):
            if subprocess.run(["sh", "-c", check], env=with_auth).returncode == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the healthcheck never passed with REDISCLI_AUTH")
        assert subprocess.run(["sh", "-c", check], env=base_env).returncode != 0
        uri = env_mapping(compose_resolved["services"]["app"])["RATELIMIT_STORAGE_URI"]
        local = uri.replace("@redis:6379/", f"@127.0.0.1:{port}/")
        assert redis_lib.Redis.from_url(local, socket_timeout=2).ping()
        with pytest.raises(redis_lib.AuthenticationError):
            redis_lib.Redis(port=port, socket_timeout=2).ping()
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_redis_without_a_password_serves_the_app_and_the_healthcheck(tmp_path):
    """REDIS_PASSWORD empty: the resolved redis command runs, the healthcheck passes (an empty
    REDISCLI_AUTH only warns) and the app's storage URI reaches it."""
    redis_lib = pytest.importorskip("redis")
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not (server and cli):
        pytest.skip("redis-server / redis-cli not installed")
    result = run_compose_config(tmp_path, REDIS_PASSWORD="")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    redis = resolved["services"]["redis"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [server, *command_args(redis)[1:], "--port", str(port), "--bind", "127.0.0.1",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        check = healthcheck_text(redis).replace("CMD-SHELL ", "", 1)
        check = check.replace("redis-cli", f"{cli} -p {port}")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env_mapping(redis)}
        for _ in range(50):
            if subprocess.run(["sh", "-c", check], env=env).returncode == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the healthcheck never passed without a password")
        uri = env_mapping(resolved["services"]["app"])["RATELIMIT_STORAGE_URI"]
        local = uri.replace("@redis:6379/", f"@127.0.0.1:{port}/")
        assert redis_lib.Redis.from_url(local, socket_timeout=2).ping()
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_compose_parser_rejects_an_invalid_file(tmp_path):
    """Guards the guard: the parser used above really validates the schema."""
    broken = COMPOSE_FILE.read_text(encoding="utf-8").replace(
        "condition: service_healthy", "condition: service_healty"
    )
    result = run_compose_config(tmp_path, broken)
    assert result.returncode != 0
    assert "service_healty" in result.stderr


# --------------------------------------------------------------------------- (b) Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends with a line continuation"
    return instructions


def _index(instructions, keyword, predicate=lambda args: True) -> int:
    for i, (kw, args) in enumerate(instructions):
        if kw == keyword and predicate(args):
            return i
    raise AssertionError(f"no {keyword} matching in Dockerfile")


def test_dockerfile_base_image_and_env():
    instructions = dockerfile_instructions()
    assert instructions[0][0] == "FROM"
    assert re.fullmatch(r"python:3\.11[.\w-]*-slim[\w@:.-]*", instructions[0][1].split()[0])
    env = " ".join(args for kw, args in instructions if kw == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env


def test_dockerfile_runs_as_fixed_non_root_user():
    users = [args for kw, args in dockerfile_instructions() if kw == "USER"]
    assert users, "no USER instruction: the service would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "--uid 10001" in text and user in ("10001", "app")


def test_dockerfile_healthcheck_uses_python_not_curl():
    checks = [args for kw, args in dockerfile_instructions() if kw == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "python" in checks[0] and "/readyz" in checks[0]
    assert "curl" not in checks[0] and "wget" not in checks[0]


def test_dockerfile_cmd_runs_gunicorn_with_the_config():
    cmds = [args for kw, args in dockerfile_instructions() if kw == "CMD"]
    assert len(cmds) == 1
    assert json.loads(cmds[0]) == ["gunicorn", "-c", "config/gunicorn.conf.py", "wsgi:app"]


def test_dockerfile_installs_requirements_before_copying_the_source():
    instructions = dockerfile_instructions()
    copy_reqs = _index(instructions, "COPY", lambda a: "requirements.txt" in a)
    install = _index(instructions, "RUN", lambda a: "pip install" in a)
    copy_src = _index(instructions, "COPY", lambda a: "chatkit_flask" in a)
    assert copy_reqs < install < copy_src
    assert "--no-cache-dir" in instructions[install][1]
    assert "requirements.txt" in instructions[copy_reqs][1].split()[0]
    for kw, args in instructions:
        if kw == "COPY" and not args.startswith("--from"):
            *sources, _dest = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY source {source} missing"
            assert "." not in sources, "COPY . would pull in the whole context"


def test_dockerfile_runtime_filter_keeps_runtime_and_drops_test_tools():
    """The grep in the install step, applied to requirements.txt as the build would."""
    install = next(a for kw, a in dockerfile_instructions() if kw == "RUN" and "pip install" in a)
    match = re.search(r"grep -viE '([^']+)'", install)
    assert match, "expected grep -viE '<pattern>' filtering requirements.txt"
    pattern = re.compile(match.group(1), re.IGNORECASE)
    kept = {
        re.split(r"[=<>~!\[ ;]", line.strip(), maxsplit=1)[0].lower()
        for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#") and not pattern.search(line)
    }
    for runtime in ("flask", "flask-limiter", "limits", "redis", "requests", "gunicorn",
                    "sqlalchemy", "psycopg", "psycopg-binary", "alembic"):  # fmt: skip
        assert runtime in kept, f"{runtime} would not be installed in the image"
    text = (ROOT / "requirements.txt").read_text(encoding="utf-8")
    tooling = text.split("# Tests and tooling", 1)[1]
    tools = {
        re.split(r"[=<>~!\[ ;]", line.strip(), maxsplit=1)[0].lower()
        for line in tooling.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    assert {"pytest", "ruff", "hypothesis", "fakeredis"} <= tools
    for tool in tools:
        assert tool not in kept, f"test tool {tool} would be installed in the image"


def test_dockerfile_exposes_8000():
    assert ("EXPOSE", "8000") in dockerfile_instructions()


def test_dockerignore_keeps_secrets_and_clutter_out():
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".env", ".env.*", ".git", ".venv", "**/__pycache__", "**/*.pyc"):
        assert required in patterns, required


# --------------------------------------------------------------------------- (c) .env.example


def test_env_example_lists_every_key_with_its_default():
    values = parse_env_file(ENV_EXAMPLE)
    missing = set(ENV_DEFAULTS) - set(values)
    assert not missing, f"missing in .env.example: {sorted(missing)}"
    for key, default in ENV_DEFAULTS.items():
        assert values[key] == (default or ""), f"{key}={values[key]!r}, expected {default!r}"


def test_env_example_leaves_secrets_blank():
    values = parse_env_file(ENV_EXAMPLE)
    for key in ("OPENAI_API_KEY", "SECRET_KEY", "SECRET_KEY_FALLBACKS"):
        assert values.get(key, "") == "", f"{key} must be blank in .env.example"


def test_env_example_values_are_portable():
    """Unquoted, no `#` or `$`: read the same by Compose v1/v2 and `docker run --env-file`."""
    for key, value in parse_env_file(ENV_EXAMPLE).items():
        assert not value.startswith(("'", '"')), f"{key}: quotes would be kept by docker run"
        assert "#" not in value and "$" not in value, f"{key}: # or $ in value"
        assert value == value.strip(), f"{key}: surrounding whitespace"


def test_env_example_covers_every_service_setting():
    try:
        from chatkit_flask import settings
    except ImportError as exc:  # the package's own tests report a broken import
        pytest.skip(f"chatkit_flask.settings does not import: {exc}")
    options = getattr(settings, "OPTIONS", None)
    if not options:
        pytest.skip("chatkit_flask.settings.OPTIONS not available")
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    missing = [key for key in options if not re.search(rf"^#? ?{key}=", text, re.MULTILINE)]
    assert not missing, f"settings not documented in .env.example: {missing}"


# --------------------------------------------------------------------------- (d) gunicorn


def test_gunicorn_defaults(monkeypatch):
    conf = exec_gunicorn_conf(monkeypatch)
    assert conf["bind"] == ["127.0.0.1:8000"]  # bin/serve is not reachable from the network
    assert conf["workers"] == 2  # server mode, the default: one per core of a 2-core host
    assert conf["threads"] == 32  # the Flask app's requests; a reply holds none
    assert conf["worker_class"] == "chatkit_flask.server.asgi_worker.ChatKitWorker"
    assert conf["timeout"] == 30
    assert conf["graceful_timeout"] == 20
    assert conf["keepalive"] == 5
    assert conf["max_requests"] == 0
    assert conf["max_requests_jitter"] == 0
    assert conf["loglevel"] == "info"
    assert conf["accesslog"] == "-"
    assert conf["errorlog"] == "-"
    assert conf["forwarded_allow_ips"] == "127.0.0.1,::1"
    # No control socket under $HOME (read-only in the container).
    assert conf["control_socket_disable"] is True
    expected_tmp = "/dev/shm" if os.path.isdir("/dev/shm") else None
    assert conf["worker_tmp_dir"] == expected_tmp


def test_gunicorn_env_example_values_equal_the_defaults(monkeypatch):
    example = parse_env_file(ENV_EXAMPLE)
    env = {k: v for k, v in example.items() if k in GUNICORN_ENV}
    from_example = exec_gunicorn_conf(monkeypatch, **env)
    defaults = exec_gunicorn_conf(monkeypatch)
    for key in ("bind", "workers", "threads", "worker_class", "timeout", "graceful_timeout"):
        assert from_example[key] == defaults[key], key


def test_gunicorn_env_vars_map_to_settings(monkeypatch):
    conf = exec_gunicorn_conf(
        monkeypatch,
        PORT="9001",
        GUNICORN_WORKERS="5",
        GUNICORN_THREADS="3",
        GUNICORN_WORKER_CLASS="sync",
        GUNICORN_TIMEOUT="45",
        GUNICORN_GRACEFUL_TIMEOUT="7",
        GUNICORN_KEEPALIVE="9",
        GUNICORN_MAX_REQUESTS="1000",
        GUNICORN_MAX_REQUESTS_JITTER="50",
        GUNICORN_LOG_LEVEL="WARNING",
        GUNICORN_ACCESS_LOG="off",
        FORWARDED_ALLOW_IPS="10.0.0.1",
        GUNICORN_CONTROL_SOCKET="/tmp/gunicorn.ctl",
    )
    assert conf["bind"] == ["127.0.0.1:9001"]
    assert (conf["workers"], conf["threads"], conf["worker_class"]) == (5, 3, "sync")
    assert (conf["timeout"], conf["graceful_timeout"], conf["keepalive"]) == (45, 7, 9)
    assert (conf["max_requests"], conf["max_requests_jitter"]) == (1000, 50)
    assert conf["loglevel"] == "warning"
    assert conf["accesslog"] is None
    assert conf["forwarded_allow_ips"] == "10.0.0.1"
    assert conf["control_socket_disable"] is False
    assert conf["control_socket"] == "/tmp/gunicorn.ctl"


def test_gunicorn_bind_overrides_port(monkeypatch):
    conf = exec_gunicorn_conf(monkeypatch, PORT="9001", GUNICORN_BIND="127.0.0.1:7000,[::1]:7000")
    assert conf["bind"] == ["127.0.0.1:7000", "[::1]:7000"]


def test_gunicorn_blank_values_mean_default(monkeypatch):
    conf = exec_gunicorn_conf(monkeypatch, GUNICORN_WORKERS="", GUNICORN_BIND=" ", PORT="")
    assert conf["workers"] == 2
    assert conf["bind"] == ["127.0.0.1:8000"]


def test_gunicorn_host_and_the_image_binding_every_interface(monkeypatch):
    assert exec_gunicorn_conf(monkeypatch, HOST="0.0.0.0")["bind"] == ["0.0.0.0:8000"]
    assert exec_gunicorn_conf(monkeypatch, HOST="::", PORT="9")["bind"] == ["[::]:9"]
    # Inside the container the proxy reaches the app over the network, not the loopback.
    env = " ".join(args for kw, args in dockerfile_instructions() if kw == "ENV")
    assert "HOST=0.0.0.0" in env.split()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GUNICORN_WORKERS", "abc"),
        ("GUNICORN_WORKERS", "0"),
        ("GUNICORN_THREADS", "2.5"),
        ("GUNICORN_TIMEOUT", "-1"),
        ("GUNICORN_GRACEFUL_TIMEOUT", "20s"),
        ("GUNICORN_KEEPALIVE", "x"),
        ("GUNICORN_MAX_REQUESTS", "many"),
        ("GUNICORN_MAX_REQUESTS_JITTER", "-5"),
        ("GUNICORN_LOG_LEVEL", "verbose"),
        ("GUNICORN_ACCESS_LOG", "maybe"),
        ("PORT", "http"),
        ("PORT", "70000"),
    ],
)
def test_gunicorn_invalid_value_names_the_variable(monkeypatch, name, value):
    with pytest.raises(ValueError, match=name):
        exec_gunicorn_conf(monkeypatch, **{name: value})


def test_gunicorn_logs_in_the_apps_log_format(monkeypatch, tmp_path):
    """CHATKIT_LOG_FORMAT=json makes gunicorn's own lines JSON too, resolved as the app resolves
    it (environment > .env > config file); a bad value stops gunicorn naming the key."""
    import io

    from gunicorn.config import Config

    toml = tmp_path / "chatkit.toml"
    toml.write_text('CHATKIT_LOG_FORMAT = "json"\n')
    (tmp_path / "empty.env").write_text("")
    files = {"CHATKIT_CONFIG_FILE": str(toml), "CHATKIT_ENV_FILE": str(tmp_path / "empty.env")}
    monkeypatch.delenv("CHATKIT_LOG_FORMAT", raising=False)
    conf = exec_gunicorn_conf(monkeypatch, **files)
    assert conf["LOG_FORMAT"] == "json"
    env_wins = exec_gunicorn_conf(monkeypatch, CHATKIT_LOG_FORMAT="text", **files)
    assert env_wins["LOG_FORMAT"] == "text"
    with pytest.raises(ValueError, match="CHATKIT_LOG_FORMAT"):
        exec_gunicorn_conf(monkeypatch, CHATKIT_LOG_FORMAT="xml", **files)

    logger = conf["logger_class"](Config())
    out = io.StringIO()
    (own,) = [h for h in logger.error_log.handlers if getattr(h, "_gunicorn", False)]
    own.setStream(out)
    logger.error_log.info("Booting worker with pid: %s", 7)
    entry = json.loads(out.getvalue())
    assert (entry["logger"], entry["level"]) == ("gunicorn.error", "info")
    assert entry["message"] == "Booting worker with pid: 7"


def test_gunicorn_accepts_its_own_settings(monkeypatch):
    """Every module-level name that looks like a setting is one gunicorn knows."""
    from gunicorn.config import Config

    conf = exec_gunicorn_conf(monkeypatch)
    known = set(Config().settings)
    names = {k for k, v in conf.items() if not k.startswith("_") and not callable(v)}
    names -= {"os", "annotations"}
    unknown = {n for n in names if n not in known and not n.isupper()}
    assert not unknown, f"not gunicorn settings (typo?): {unknown}"


def test_access_log_format_records_no_query_cookie_or_body(monkeypatch):
    fmt = exec_gunicorn_conf(monkeypatch)["access_log_format"]
    for forbidden in ("%(r)s", "%(q)s", "%(a)s", "%(f)s", "}i)s", "}e)s"):
        assert forbidden not in fmt, forbidden  # request line, query, headers, environ
    for required in ("%(h)s", "%(m)s", "%(U)s", "%(s)s", "%(M)s", "%({x-request-id}o)s"):
        assert required in fmt, required


def test_access_log_line_rendered_by_gunicorn_leaks_nothing(monkeypatch):
    """Render the format with gunicorn's own atoms for a request full of secrets."""
    from gunicorn import glogging
    from gunicorn.config import Config

    fmt = exec_gunicorn_conf(monkeypatch)["access_log_format"]
    cfg = Config()
    logger = glogging.Logger(cfg)

    resp = SimpleNamespace(
        status="200 OK",
        sent=123,
        headers=[
            ("Content-Type", "application/json"),
            ("X-Request-ID", "req-42"),
            ("Set-Cookie", "chatkit_session_id=SETCOOKIE-SECRET"),
        ],
    )
    req = SimpleNamespace(
        headers=[
            ("COOKIE", "chatkit_session_id=COOKIE-SECRET"),
            ("AUTHORIZATION", "Bearer AUTH-SECRET"),
        ]
    )
    environ = {
        "REQUEST_METHOD": "POST",
        "RAW_URI": "/api/chatkit/secret?token=QUERY-SECRET",
        "PATH_INFO": "/api/chatkit/secret",
        "QUERY_STRING": "token=QUERY-SECRET",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "203.0.113.7",
        "HTTP_COOKIE": "chatkit_session_id=COOKIE-SECRET",
        "HTTP_AUTHORIZATION": "Bearer AUTH-SECRET",
    }
    atoms = logger.atoms(resp, req, environ, datetime.timedelta(milliseconds=37))
    line = fmt % glogging.SafeAtoms(atoms)
    assert "SECRET" not in line, line
    for expected in ("203.0.113.7", "POST", "/api/chatkit/secret", "200", "123", "37", "req-42"):
        assert expected in line, (expected, line)


# --------------------------------------------------------------------------- metrics hooks

_SERVER = SimpleNamespace(log=SimpleNamespace(warning=lambda *args: None))


def test_on_starting_creates_a_private_metrics_dir_and_on_exit_removes_it(monkeypatch):
    conf = exec_gunicorn_conf(monkeypatch)
    # Both restored after the test (the hooks set them in os.environ directly).
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    monkeypatch.setenv("CHATKIT_GUNICORN_METRICS_DIR", "")
    conf["on_starting"](_SERVER)
    created = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    try:
        assert created.is_dir() and created.name.startswith("chatkit-prometheus-")
    finally:
        conf["on_exit"](_SERVER)
    assert not created.exists()


def test_on_starting_empties_a_named_metrics_dir_and_keeps_it(monkeypatch, tmp_path):
    directory = tmp_path / "prometheus"
    directory.mkdir()
    (directory / "counter_4242.db").write_bytes(b"")
    (directory / "README").write_text("not ours", encoding="utf-8")
    conf = exec_gunicorn_conf(monkeypatch, PROMETHEUS_MULTIPROC_DIR=str(directory))
    monkeypatch.delenv("CHATKIT_GUNICORN_METRICS_DIR", raising=False)
    conf["on_starting"](_SERVER)
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["README"]
    conf["on_exit"](_SERVER)
    assert directory.is_dir()


def test_on_starting_creates_a_missing_named_metrics_dir(monkeypatch, tmp_path):
    directory = tmp_path / "missing" / "prometheus"
    conf = exec_gunicorn_conf(monkeypatch, PROMETHEUS_MULTIPROC_DIR=str(directory))
    conf["on_starting"](_SERVER)
    assert directory.is_dir()


def test_config_load_has_no_side_effects(monkeypatch):
    """--check-config / --print-config exec the file: nothing may be created then."""
    exec_gunicorn_conf(monkeypatch)
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ


SERVER_WORKER = "chatkit_flask.server.asgi_worker.ChatKitWorker"


@pytest.mark.parametrize(
    ("env", "worker_class", "workers", "streams"),
    [({}, SERVER_WORKER, 2, "500"),
     ({"CHATKIT_BACKEND": "server"}, SERVER_WORKER, 2, "500"),
     ({"CHATKIT_BACKEND": "hosted"}, "gthread", 3, None),
     ({"CHATKIT_WORKFLOW_ID": "wf_x"}, "gthread", 3, None),
     ({"CHATKIT_BACKEND": "server", "CHATKIT_WORKFLOW_ID": "wf_x"}, SERVER_WORKER,
      2, "500"),
     ({"CHATKIT_BACKEND": "server", "GUNICORN_WORKER_CLASS": "gthread", "GUNICORN_THREADS": "48"},
      "gthread", 2, "40")],
)  # fmt: skip
def test_gunicorn_worker_class_follows_the_backend(
    env: dict, worker_class: str, workers: int, streams: str | None, tmp_path: Path
) -> None:
    """Server mode runs its own worker, one process per core, 500 replies each; under gthread a
    reply holds a thread, so the per-worker cap keeps 8 threads for reads (docs/deploy.md)."""
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if not k.startswith(("GUNICORN_", "CHATKIT_"))}
    (tmp_path / "empty.env").write_text("")
    environ["CHATKIT_ENV_FILE"] = str(tmp_path / "empty.env")
    probe = (
        "import os, runpy; conf = runpy.run_path('config/gunicorn.conf.py'); "
        "print(conf['worker_class'], conf['workers'], "
        "os.environ.get('CHATKIT_MAX_STREAMS_PER_WORKER'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env={**environ, **env}, capture_output=True,
        text=True, timeout=30, check=True,
    ).stdout.split()  # fmt: skip
    assert out == [worker_class, str(workers), str(streams)]


def test_the_image_puts_the_sites_agent_module_on_the_import_path(tmp_path):
    """CHATKIT_AGENT=my_agent:agent finds site/my_agent.py in the image: the Dockerfile copies
    site/ to /app/site and puts that on PYTHONPATH (replayed here with /app mapped to tmp)."""
    instructions = dockerfile_instructions()
    workdir = [args for kw, args in instructions if kw == "WORKDIR"][-1]
    assert ("COPY", "site/ ./site/") in instructions
    assert (ROOT / "site").is_dir()
    env = " ".join(args for kw, args in instructions if kw == "ENV").split()
    pythonpath = next(item.split("=", 1)[1] for item in env if item.startswith("PYTHONPATH="))
    assert pythonpath == f"{workdir}/site"
    site_dir = tmp_path / pythonpath.lstrip("/")
    site_dir.mkdir(parents=True)
    (site_dir / "my_site_agent.py").write_text(
        "from agents import Agent\nagent = Agent(name='Site agent', instructions='Be brief.')\n"
    )
    script = (
        "from chatkit_flask.service import create_app\n"
        "app = create_app({'OPENAI_API_KEY': 'k', 'SECRET_KEY': 's' * 40,"
        " 'CHATKIT_AGENT': 'my_site_agent:agent',"
        f" 'CHATKIT_STORE_URL': 'sqlite:///{tmp_path}/t.db'}}, environ={{}})\n"
        "print(app.extensions['chatkit'].server.server.agent.name)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": f"{site_dir}:{ROOT}"},
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("Site agent")


def test_the_images_instance_folder_is_the_data_volume():
    """With CHATKIT_STORE_URL unset (plain `docker run`), threads land on /data, the only
    writable place: the service's instance folder is <project>/var, which the image links there."""
    from chatkit_flask.service import SERVICE_INSTANCE_DIR

    assert SERVICE_INSTANCE_DIR == ROOT / "var"
    workdir = [args for kw, args in dockerfile_instructions() if kw == "WORKDIR"][-1]
    run = " ".join(args for kw, args in dockerfile_instructions() if kw == "RUN")
    assert f"ln -s /data {workdir}/var" in run
