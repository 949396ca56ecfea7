"""Configuration: defaults, validation that names the key, file < environment precedence."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatkit_flask.settings import OPTIONS, ConfigError, Settings, load_config

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = {
    "OPENAI_API_KEY": "k",
    "SECRET_KEY": "test-secret-key-of-at-least-32-bytes",
    "CHATKIT_WORKFLOW_ID": "wf_1",
}


def test_defaults_match_the_documented_values() -> None:
    settings = Settings.from_mapping(REQUIRED)
    assert settings.session_ttl == 600
    assert settings.upstream_timeout == 15
    assert settings.upstream_retries == 2
    assert settings.url_prefix == "/api/chatkit"
    assert settings.limit_per_user == "10 per minute;100 per day"
    assert settings.limit_per_ip == "30 per minute;200 per day"
    assert settings.limit_per_ipv6_48 == "60 per minute;200 per day"
    assert settings.limit_global == "2000 per day"
    assert settings.cookie_secure is True
    assert settings.cookie_max_age == 30 * 24 * 3600
    assert settings.trusted_proxies == 0
    assert settings.allowed_workflows == frozenset({"wf_1"})
    assert settings.chatkit_configuration is None
    # Flask-Limiter's own defaults for its keys.
    assert settings.ratelimit_enabled is True
    assert settings.in_memory_fallback is False and settings.swallow_errors is False
    assert settings.headers_enabled is False and settings.key_prefix == ""
    assert settings.storage_uri == "memory://" and settings.strategy == "fixed-window"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", "10 per minute;100 per day"), ("off", ""), ("OFF", ""), ("5/second", "5/second")],
)
def test_one_rule_for_limit_values(value: str, expected: str) -> None:
    """Empty means the default, off turns the limit off."""
    settings = Settings.from_mapping({**REQUIRED, "CHATKIT_RATELIMIT_PER_USER": value})
    assert settings.limit_per_user == expected


@pytest.mark.parametrize(
    "value", ["0 per minute", "10 per minute;0 per day", "none", "10 per minite"]
)
def test_a_limit_that_cannot_admit_or_parse_is_a_configuration_error(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({**REQUIRED, "CHATKIT_RATELIMIT_PER_IP": value})
    assert info.value.key == "CHATKIT_RATELIMIT_PER_IP"


@pytest.mark.parametrize("key", sorted(REQUIRED))
def test_a_missing_required_key_is_named(key: str) -> None:
    # The workflow id is required by hosted mode, named here (unset, it would choose server).
    config = {k: v for k, v in REQUIRED.items() if k != key}
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({**config, "CHATKIT_BACKEND": "hosted"})
    assert info.value.key == key
    assert key in str(info.value)


@pytest.mark.parametrize(
    ("config", "backend", "why"),
    [
        ({}, "server", "the default"),
        ({"CHATKIT_BACKEND": ""}, "server", "the default"),
        ({"CHATKIT_WORKFLOW_ID": "wf_1"}, "hosted", "CHATKIT_WORKFLOW_ID is set"),
        ({"CHATKIT_BACKEND": "hosted", "CHATKIT_WORKFLOW_ID": "wf_1"}, "hosted", "BACKEND is set"),
        ({"CHATKIT_BACKEND": "server", "CHATKIT_WORKFLOW_ID": "wf_1"}, "server", "BACKEND is set"),
    ],
)
def test_server_mode_is_the_default_and_a_workflow_id_implies_hosted(
    config: dict, backend: str, why: str
) -> None:
    """A site with only the API key and the secret key runs server mode; a hosted site from
    before the change (a workflow id, no backend named) stays hosted; a named backend wins."""
    keys = {"OPENAI_API_KEY": "k", "SECRET_KEY": "test-secret-key-of-at-least-32-bytes"}
    settings = Settings.from_mapping({**keys, **config})
    assert settings.backend == backend
    assert why in settings.backend_reason


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("CHATKIT_SESSION_TTL", "0"),
        ("CHATKIT_SESSION_TTL", "601"),
        ("CHATKIT_SESSION_TTL", "ten"),
        ("CHATKIT_RATELIMIT_PER_USER", "10 per fortnight"),
        ("CHATKIT_RATELIMIT_PER_IP", "lots"),
        ("CHATKIT_RATELIMIT_GLOBAL", "5 each minute"),
        ("CHATKIT_COOKIE_SECURE", "maybe"),
        ("CHATKIT_API_BASE", "ftp://example.com"),
        ("CHATKIT_URL_PREFIX", "api/chatkit"),
        ("CHATKIT_UPSTREAM_TIMEOUT", "-1"),
        ("CHATKIT_UPSTREAM_RETRIES", "9"),
        ("CHATKIT_TRUSTED_PROXIES", "-1"),
        ("CHATKIT_ALLOWED_ORIGINS", "shop.example.com"),
        ("CHATKIT_WORKFLOW_VERSION", "latest"),
        ("CHATKIT_FILE_UPLOAD_MAX_FILE_SIZE", "513"),
        ("RATELIMIT_STRATEGY", "leaky-bucket"),
        ("RATELIMIT_STORAGE_URI", "localhost:6379"),
        ("CHATKIT_LOG_FORMAT", "xml"),
    ],
)
def test_an_invalid_value_is_named(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({**REQUIRED, key: value})
    assert info.value.key == key


def test_chatkit_configuration_only_carries_what_is_set() -> None:
    settings = Settings.from_mapping(
        {**REQUIRED, "CHATKIT_FILE_UPLOAD_ENABLED": "true", "CHATKIT_HISTORY_RECENT_THREADS": "5"}
    )
    assert settings.chatkit_configuration == {
        "file_upload": {"enabled": True},
        "history": {"recent_threads": 5},
    }


def test_openai_base_url_keeps_its_v1_but_the_chatkit_api_base_drops_it() -> None:
    # The openai client's base URL includes /v1; ChatKitClient adds /v1 itself.
    settings = Settings.from_mapping(
        {
            **REQUIRED,
            "OPENAI_BASE_URL": "http://127.0.0.1:8788/v1/",
            "CHATKIT_API_BASE": "https://api.openai.com/v1",
        }
    )
    assert settings.openai_base_url == "http://127.0.0.1:8788/v1"
    assert settings.api_base == "https://api.openai.com"
    with pytest.raises(ConfigError) as caught:
        Settings.from_mapping({**REQUIRED, "OPENAI_BASE_URL": "http://example.com/v1"})
    assert caught.value.key == "OPENAI_BASE_URL"


def test_domain_key_defaults_to_empty() -> None:
    assert Settings.from_mapping(REQUIRED).domain_key == ""
    key = {**REQUIRED, "CHATKIT_DOMAIN_KEY": "domain_pk_abc123"}
    assert Settings.from_mapping(key).domain_key == "domain_pk_abc123"


def test_limits_can_be_turned_off() -> None:
    settings = Settings.from_mapping({**REQUIRED, "CHATKIT_RATELIMIT_PER_USER": "off"})
    assert settings.limit_per_user == ""


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    file = tmp_path / "chatkit.toml"
    file.write_text('CHATKIT_SESSION_TTL = 300\nCHATKIT_RATELIMIT_PER_IP = "5 per minute"\n')
    config = load_config(file, {"CHATKIT_SESSION_TTL": "120", "UNRELATED": "x", **REQUIRED})
    settings = Settings.from_mapping(config)
    assert settings.session_ttl == 120  # environment wins
    assert settings.limit_per_ip == "5 per minute"  # file value kept
    assert "UNRELATED" not in config


def test_an_unknown_key_in_the_file_is_named(tmp_path: Path) -> None:
    file = tmp_path / "chatkit.toml"
    file.write_text("CHATKIT_SESSION_TTLL = 300\n")
    with pytest.raises(ConfigError) as info:
        load_config(file, {})
    assert info.value.key == "CHATKIT_SESSION_TTLL"


def test_the_shipped_config_file_is_valid_and_complete() -> None:
    config = load_config(ROOT / "config" / "chatkit.toml", REQUIRED)
    settings = Settings.from_mapping(config)
    assert settings.session_ttl == OPTIONS["CHATKIT_SESSION_TTL"].default
    assert not any(OPTIONS[key].secret for key in load_config(ROOT / "config" / "chatkit.toml", {}))


def _import_wsgi(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in OPTIONS}
    return subprocess.run(
        [sys.executable, "-c", "import wsgi"],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_service_start_without_the_api_key_names_it() -> None:
    result = _import_wsgi({k: v for k, v in REQUIRED.items() if k != "OPENAI_API_KEY"})
    assert result.returncode != 0
    assert "OPENAI_API_KEY" in result.stderr
    assert "Traceback" not in result.stderr


def test_service_start_with_a_bad_limit_names_it() -> None:
    result = _import_wsgi({**REQUIRED, "CHATKIT_RATELIMIT_PER_USER": "ten a minute"})
    assert result.returncode != 0
    assert "CHATKIT_RATELIMIT_PER_USER" in result.stderr


def test_service_starts_with_the_three_required_values() -> None:
    result = _import_wsgi(REQUIRED)
    assert result.returncode == 0, result.stderr
