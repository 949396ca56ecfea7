"""The processes bench/server.py compares: the fake Responses API, our service under gunicorn as
shipped, and OpenAI's official advanced-samples server (FastAPI + uvicorn), all on loopback.

The official sample is never vendored: it is copied at run time out of a git directory the
caller names (``fetch github:openai/openai-chatkit-advanced-samples`` or ``git clone --bare``),
and installed into its own virtualenv with the SDK versions this project's .venv has.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from run import children, free_port, proc_cpu, proc_status, stop, wait_http

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL_KEY = "sk-bench-not-a-real-key"
SECRET_KEY = "bench-secret-key-0123456789abcdef-server"
HIGH = "1000000 per minute"
OFFICIAL_EXAMPLE = "examples/cat-lounge/backend"  # the one sample with one model call per message
# Same SDK versions as ours, so that the comparison is about the servers around them. The
# sample pins fastapi<0.116, which cannot install next to openai-agents 0.24 (starlette>=1.3.1):
# fastapi is left to pip.
MATCHED = ("openai-chatkit", "openai-agents", "openai", "pydantic", "uvicorn")

__all__ = ["Served", "fake_model", "official_server", "official_venv", "our_server"]


@dataclass
class Served:
    """One server process tree on 127.0.0.1."""

    name: str
    proc: subprocess.Popen
    port: int
    path: str
    cookie_path: str | None = None  # GET it for a visitor cookie (ours)
    log: Path | None = None
    info: dict[str, str] = field(default_factory=dict)

    def pids(self) -> list[int]:
        return [self.proc.pid, *children(self.proc.pid)]

    def cpu(self) -> float:
        return sum(proc_cpu(p) for p in self.pids())

    def rss_kb(self) -> int:
        return sum(proc_status(p, "VmRSS") for p in self.pids())

    def pss_kb(self) -> int:
        """Proportional set size: shared pages split between the processes sharing them."""
        total = 0
        for pid in self.pids():
            try:
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                continue
            total += next((int(x.split()[1]) for x in text.splitlines() if x.startswith("Pss:")), 0)
        return total

    def stop(self) -> None:
        stop(self.proc)


def _spawn(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def _clean_env() -> dict[str, str]:
    prefixes = ("CHATKIT_", "GUNICORN_", "OPENAI_", "RATELIMIT_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def fake_model(token_delay: float, workdir: Path) -> Served:
    """``python -m chatkit_flask.testing.fake_responses`` with ``token_delay`` between deltas."""
    port = free_port()
    proc = _spawn(
        [sys.executable, "-m", "chatkit_flask.testing.fake_responses", "--port", str(port),
         "--token-delay", str(token_delay)],
        ROOT, _clean_env(), workdir / f"fake-{port}.log",
    )  # fmt: skip
    wait_http(port, "/", 15, proc)
    return Served("fake model", proc, port, "/v1/responses")


def our_server(
    name: str, fake: Served, store_url: str, workdir: Path, redis_url: str, extra: list[str]
) -> Served:
    """``gunicorn -c config/gunicorn.conf.py wsgi:app`` in server mode, limits on in Redis."""
    port = free_port()
    env = _clean_env()
    env.update(
        CHATKIT_BACKEND="server",
        OPENAI_API_KEY=MODEL_KEY,
        OPENAI_BASE_URL=f"http://127.0.0.1:{fake.port}/v1",
        SECRET_KEY=SECRET_KEY,
        CHATKIT_STORE_URL=store_url,
        CHATKIT_COOKIE_SECURE="false",
        # Every limit is checked in Redis; none is low enough to refuse (one client IP).
        CHATKIT_RATELIMIT_PER_USER=HIGH,
        CHATKIT_RATELIMIT_PER_IP=HIGH,
        CHATKIT_RATELIMIT_REQUESTS_PER_IP=HIGH,
        RATELIMIT_STORAGE_URI=redis_url,
        GUNICORN_BIND=f"127.0.0.1:{port}",
        PYTHONDONTWRITEBYTECODE="1",
    )
    for item in extra:
        key, _, value = item.partition("=")
        env[key] = value
    log = workdir / f"ours-{port}.log"
    proc = _spawn([str(BIN / "gunicorn"), "-c", "config/gunicorn.conf.py", "wsgi:app"],
                  ROOT, env, log)  # fmt: skip
    wait_http(port, "/healthz", 40, proc)
    return Served(name, proc, port, "/api/chatkit", "/api/chatkit/config", log)


def official_venv(venv: Path | None, workdir: Path) -> Path:
    """The python of a virtualenv for the sample: ``venv`` if it has one, else a new one."""
    venv = venv or workdir / "official-venv"
    python = venv / "bin" / "python"
    if python.exists():
        return python
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    pins = [f"{name}=={metadata.version(name)}" for name in MATCHED]
    pins[-1] = pins[-1].replace("uvicorn==", "uvicorn[standard]==")  # as the sample ships
    subprocess.run([str(python), "-m", "pip", "install", "-q", "fastapi", "jinja2", *pins],
                   check=True)  # fmt: skip
    return python


def official_server(repo: Path, python: Path, fake: Served, workdir: Path) -> Served:
    """The cat-lounge backend of openai-chatkit-advanced-samples, as its run script starts it
    (``uvicorn app.main:app``, one process, its in-memory store) minus ``--reload``."""
    dest = workdir / "official"
    if not (dest / OFFICIAL_EXAMPLE).exists():
        archive = subprocess.run(
            ["git", "--git-dir", str(repo), "archive", "HEAD", OFFICIAL_EXAMPLE],
            check=True, capture_output=True,
        ).stdout  # fmt: skip
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
    commit = subprocess.run(["git", "--git-dir", str(repo), "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    port = free_port()
    env = _clean_env()
    env.update(
        OPENAI_API_KEY=MODEL_KEY,
        OPENAI_BASE_URL=f"http://127.0.0.1:{fake.port}/v1",
        # Like ours: the default trace exporter would try to reach api.openai.com.
        OPENAI_AGENTS_DISABLE_TRACING="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    log = workdir / f"official-{port}.log"
    proc = _spawn(
        [str(python), "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
        dest / OFFICIAL_EXAMPLE, env, log,
    )  # fmt: skip
    wait_http(port, "/docs", 40, proc)
    versions = subprocess.run(
        [str(python), "-c", "from importlib import metadata as m;print(' '.join(n+'=='+"
         "m.version(n) for n in ('fastapi','starlette','uvicorn','uvloop','openai-chatkit',"
         "'openai-agents','openai','pydantic')))"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    return Served(
        "official (uvicorn)",
        proc,
        port,
        "/chatkit",
        None,
        log,
        {"commit": commit, "example": OFFICIAL_EXAMPLE, "packages": versions},
    )
