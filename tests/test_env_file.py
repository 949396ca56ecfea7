""".env is read one way everywhere: python-dotenv (as Flask's CLI does), by the app factory, by
config/gunicorn.conf.py and so by bin/serve and `flask chatkit`; the environment wins over .env
and the last of duplicate keys wins, as with Docker Compose."""

from __future__ import annotations

import logging
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from chatkit_flask.service import service_config
from chatkit_flask.settings import OPTIONS, ConfigError, Settings, load_config

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = (
    "OPENAI_API_KEY=test-key-from-dotenv\n"
    "SECRET_KEY=test-secret-key-from-dotenv-0123456789abcdef\n"
    "CHATKIT_WORKFLOW_ID=wf_from_dotenv\n"
)


def env_file(tmp_path: Path, text: str, newline: str = "\n") -> Path:
    path = tmp_path / "test.env"
    path.write_bytes((REQUIRED + text).replace("\n", newline).encode())
    return path


def settings_from(path: Path, **environ: str) -> Settings:
    return Settings.from_mapping(load_config(None, environ, path))


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("export CHATKIT_SESSION_TTL=120", 120),
        ("CHATKIT_SESSION_TTL = 120", 120),
        ("CHATKIT_SESSION_TTL=120  # two minutes", 120),
        ('CHATKIT_SESSION_TTL="120"', 120),
        ("  # an indented comment\nCHATKIT_SESSION_TTL=120", 120),
        ("CHATKIT_SESSION_TTL", 600),  # a bare key sets nothing (bin/serve's loop set KEY=KEY)
    ],
)
def test_malformed_lines_are_read_as_compose_reads_them(
    tmp_path: Path, line: str, expected: int
) -> None:
    assert settings_from(env_file(tmp_path, line + "\n")).session_ttl == expected


def test_crlf_line_ends(tmp_path: Path) -> None:
    path = env_file(tmp_path, "CHATKIT_RATELIMIT_PER_USER=5 per minute\n", newline="\r\n")
    settings = settings_from(path)
    assert settings.limit_per_user == "5 per minute"
    assert settings.workflow_id == "wf_from_dotenv"


def test_values_with_spaces_and_semicolons_need_no_quotes(tmp_path: Path) -> None:
    path = env_file(tmp_path, "CHATKIT_RATELIMIT_PER_IP=7 per minute;70 per day\n")
    assert settings_from(path).limit_per_ip == "7 per minute;70 per day"


def test_the_last_duplicate_wins_like_compose(tmp_path: Path) -> None:
    path = env_file(tmp_path, "CHATKIT_SESSION_TTL=100\nCHATKIT_SESSION_TTL=200\n")
    assert settings_from(path).session_ttl == 200


def test_the_environment_beats_dotenv(tmp_path: Path) -> None:
    path = env_file(tmp_path, "CHATKIT_SESSION_TTL=100\n")
    assert settings_from(path, CHATKIT_SESSION_TTL="300").session_ttl == 300


def test_dotenv_beats_the_toml_file(tmp_path: Path) -> None:
    toml = tmp_path / "chatkit.toml"
    toml.write_text("CHATKIT_SESSION_TTL = 50\nCHATKIT_COOKIE_MAX_AGE = 3600\n")
    path = env_file(tmp_path, "CHATKIT_SESSION_TTL=100\n")
    settings = Settings.from_mapping(load_config(toml, {}, path))
    assert (settings.session_ttl, settings.cookie_max_age) == (100, 3600)


def test_the_service_reads_chatkit_env_file(tmp_path: Path) -> None:
    path = env_file(tmp_path, "CHATKIT_SESSION_TTL=90\n")
    config = service_config(environ={"CHATKIT_ENV_FILE": str(path)})
    assert Settings.from_mapping(config).session_ttl == 90


def test_a_missing_chatkit_env_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        service_config(environ={"CHATKIT_ENV_FILE": str(tmp_path / "nope.env")})
    assert info.value.key == "CHATKIT_ENV_FILE"


def test_an_explicit_environ_reads_no_unnamed_file() -> None:
    # Tests and host apps that pass their own mapping never pick up a developer's .env.
    assert "OPENAI_API_KEY" not in service_config(environ={})


@pytest.mark.parametrize("where", ["environment", "dotenv"])
def test_an_unknown_variable_is_reported_by_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    logger = logging.getLogger("chatkit_flask")
    logger.addHandler(caplog.handler)
    try:
        caplog.set_level(logging.WARNING)
        if where == "dotenv":
            load_config(None, {}, env_file(tmp_path, "CHATKIT_RATELIMIT_PER_USR=1 per day\n"))
        else:
            load_config(None, {"RATELIMIT_STRATEGEY": "x", "CHATKIT_TEST_REDIS_URL": "redis://"})
    finally:
        logger.removeHandler(caplog.handler)
    # A set: the record may reach caplog twice (our handler, and the root when propagating).
    messages = sorted({r.getMessage() for r in caplog.records if r.levelno == logging.WARNING})
    name = "CHATKIT_RATELIMIT_PER_USR" if where == "dotenv" else "RATELIMIT_STRATEGEY"
    assert len(messages) == 1 and name in messages[0], messages


def _clean_env(**extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in OPTIONS and k != "CHATKIT_ENV_FILE"}
    return {**clean, **extra}


def test_flask_cli_commands_read_dotenv(tmp_path: Path) -> None:
    path = env_file(tmp_path, "CHATKIT_RATELIMIT_PER_USER = 3 per minute  # support case\n")
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "chatkit", "limits"],
        cwd=ROOT,
        env=_clean_env(CHATKIT_ENV_FILE=str(path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "3 per minute" in result.stdout


def test_gunicorn_conf_reads_dotenv_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = env_file(tmp_path, "export GUNICORN_WORKERS=5\nGUNICORN_THREADS = 7\n")
    monkeypatch.setenv("CHATKIT_ENV_FILE", str(path))
    monkeypatch.delenv("GUNICORN_WORKERS", raising=False)
    monkeypatch.setenv("GUNICORN_THREADS", "9")
    conf = runpy.run_path(str(ROOT / "config" / "gunicorn.conf.py"))
    assert (conf["workers"], conf["threads"]) == (5, 9)


def test_bin_serve_does_not_parse_dotenv_in_bash() -> None:
    script = (ROOT / "bin" / "serve").read_text()
    assert "read -r" not in script and "< .env" not in script


# What a gunicorn worker loads (wsgi:app), in the same directory and environment as the CLI.
WORKER_VIEW = (
    "import sys; sys.path.insert(0, sys.argv[1]); import wsgi; "
    "print(wsgi.app.config['CHATKIT_RATELIMIT_PER_USER']); "
    "print(wsgi.app.config.get('CHATKIT_AGENT_INSTRUCTIONS', '-'))"
)


@pytest.mark.parametrize("named", ["another file", "the same file"])
def test_flask_cli_sees_the_values_gunicorn_sees(tmp_path: Path, named: str) -> None:
    # Flask's CLI loads the .env of its working directory (expanding ${...}) into the environment
    # before it imports the app; the service must still read CHATKIT_ENV_FILE alone, unexpanded.
    site = tmp_path / "site"
    site.mkdir()
    (site / ".env").write_text(
        REQUIRED + "CHATKIT_RATELIMIT_PER_USER=7 per minute\nCHATKIT_AGENT_INSTRUCTIONS=a${HOME}b\n"
    )
    other = tmp_path / "other.env"
    other.write_text(
        REQUIRED + "CHATKIT_RATELIMIT_PER_USER=3 per minute\nCHATKIT_AGENT_INSTRUCTIONS=c${HOME}d\n"
    )
    chosen = other if named == "another file" else site / ".env"
    env = _clean_env(CHATKIT_ENV_FILE=str(chosen), RATELIMIT_STORAGE_URI="memory://")
    env.pop("FLASK_SKIP_DOTENV", None)

    def run(*args: str) -> str:
        done = subprocess.run(
            args, cwd=site, env=env, capture_output=True, text=True, timeout=60
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    check = run(sys.executable, "-m", "flask", "--app", str(ROOT / "wsgi.py"), "chatkit", "check")
    shown = dict(
        line.strip().split(" = ", 1)[0:2] for line in check.splitlines() if " = " in line
    )
    worker = run(sys.executable, "-c", WORKER_VIEW, str(ROOT)).splitlines()
    # The named file's values, unexpanded (python-dotenv with interpolate=False).
    expected = {
        "another file": ["3 per minute", "c${HOME}d"],
        "the same file": ["7 per minute", "a${HOME}b"],
    }[named]
    assert worker == expected
    assert [shown["CHATKIT_RATELIMIT_PER_USER"], shown["CHATKIT_AGENT_INSTRUCTIONS"]] == expected
