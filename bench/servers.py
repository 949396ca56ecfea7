"""The processes bench/server.py measures, each in its own process group on 127.0.0.1: the fake
Responses API, our service as shipped, and OpenAI's official customer-support sample server.

A server's figures are those of its whole process group (gunicorn's master and workers; uvicorn's
one process): the command may be a shell line (``--ours-cmd``), so its children are found by
group, not by parent. The official sample is set up outside the repository by
``bench/setup_official.sh`` (pinned commit, unmodified, its own ``uv.lock``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from procs import CLK_TCK, free_port, wait_http

ROOT = Path(__file__).resolve().parents[1]
MODEL_KEY = "sk-bench-not-a-real-key"
SECRET_KEY = "bench-secret-key-0123456789abcdef-server"
# The shipped limits' shape (config/chatkit.toml: two windows per visitor and per IP, one
# global, one on all requests per IP: 6 counters a message), set high enough never to refuse.
HIGH = "1000000 per minute;100000000 per day"
HIGH_DAY = "100000000 per day"
HIGH_MINUTE = "1000000 per minute"
OURS_CMD = f"exec {sys.executable} -m gunicorn -c config/gunicorn.conf.py wsgi:app"
PEER = Path("/tmp/peer")
OFFICIAL_DIR = PEER / "official" / "examples" / "customer-support" / "backend"
OFFICIAL_PYTHON = PEER / "official-venv-customer-support" / "bin" / "python"
OFFICIAL_CMD = "exec {python} -m uvicorn app.main:app --host 127.0.0.1 --port {port}"

__all__ = ["Served", "fake_model", "official_server", "our_server"]


@dataclass
class Served:
    """One server: the leader of a process group, the port it answers on, the ChatKit path."""

    name: str
    proc: subprocess.Popen
    port: int
    path: str
    log: Path
    info: dict[str, str] = field(default_factory=dict)

    def pids(self) -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(stat[2]) == self.proc.pid:
                    pids.append(int(entry))
        return pids

    def cpu(self) -> float:
        """utime+stime seconds of the group, reaped children (restarted workers) included."""
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += sum(int(fields[i]) for i in (11, 12, 13, 14))
        return total / CLK_TCK

    def _sum(self, name: str, key: str) -> int:
        total = 0
        for pid in self.pids():
            try:
                text = Path(f"/proc/{pid}/{name}").read_text()
            except OSError:
                continue
            total += next((int(x.split()[1]) for x in text.splitlines() if x.startswith(key)), 0)
        return total

    def rss_kb(self) -> int:
        return self._sum("status", "VmRSS:")

    def pss_kb(self) -> int:
        """Proportional set size: pages shared between the group's processes counted once."""
        return self._sum("smaps_rollup", "Pss:")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            pass
        # whatever is left of the group (workers of a master that did not wait for them)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _start(
    name: str,
    cmd: str,
    cwd: Path,
    env: dict[str, str],
    port: int,
    path: str,
    ready: str,
    log: Path,
    timeout: float = 60,
) -> Served:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", "-c", cmd],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    served = Served(name, proc, port, path, log, {"command": cmd})
    try:
        wait_http(port, ready, timeout, proc)
    except RuntimeError as exc:
        served.stop()
        tail = log.read_text(errors="replace")[-1500:]
        raise SystemExit(f"{name} did not start ({exc}); its log ends:\n{tail}") from None
    return served


def _clean_env() -> dict[str, str]:
    prefixes = ("CHATKIT_", "GUNICORN_", "OPENAI_", "RATELIMIT_", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def fake_model(workdir: Path, token_delay: float, words: int | None = None) -> Served:
    """``python -m chatkit_flask.testing.fake_responses``: an echo (or ``words`` words), one
    text delta per word, ``token_delay`` apart."""
    port = free_port()
    cmd = (
        f"exec {sys.executable} -m chatkit_flask.testing.fake_responses --port {port} "
        f"--token-delay {token_delay}" + (f" --words {words}" if words else "")
    )
    return _start(
        "model",
        cmd,
        ROOT,
        _clean_env(),
        port,
        "/v1/responses",
        "/",
        workdir / f"fake-{port}.log",
        20,
    )


def _model_env(fake: Served) -> dict[str, str]:
    return {
        "OPENAI_API_KEY": MODEL_KEY,
        "OPENAI_BASE_URL": f"http://127.0.0.1:{fake.port}/v1",
        "OPENAI_AGENTS_DISABLE_TRACING": "1",
    }


def our_server(
    fake: Served,
    workdir: Path,
    redis_url: str,
    cmd: str | None,
    extra: list[str],
    name: str = "ours",
) -> Served:
    """Ours as shipped (``cmd`` overrides the command, run by bash in the repository root with
    ``$BENCH_PORT`` and ``GUNICORN_BIND`` set): server mode, the Redis store, limits on in
    Redis (high enough never to refuse), visitors told apart by X-Forwarded-For from the
    loopback proxy so that per-IP limits and stream caps see many clients."""
    port = free_port()
    env = _clean_env()
    env.update(
        _model_env(fake),
        CHATKIT_BACKEND="server",
        SECRET_KEY=SECRET_KEY,
        CHATKIT_COOKIE_SECURE="false",
        CHATKIT_STORE_URL=f"{redis_url}/0",
        RATELIMIT_STORAGE_URI=f"{redis_url}/1",
        CHATKIT_TRUSTED_PROXIES="1",
        CHATKIT_RATELIMIT_PER_USER=HIGH,
        CHATKIT_RATELIMIT_PER_IP=HIGH,
        CHATKIT_RATELIMIT_GLOBAL=HIGH_DAY,
        CHATKIT_RATELIMIT_REQUESTS_PER_IP=HIGH_MINUTE,
        GUNICORN_BIND=f"127.0.0.1:{port}",
        BENCH_PORT=str(port),
    )
    for item in extra:
        key, _, value = item.partition("=")
        env[key] = value
    return _start(
        name,
        cmd or OURS_CMD,
        ROOT,
        env,
        port,
        "/api/chatkit",
        "/healthz",
        workdir / f"ours-{port}.log",
    )


def official_server(
    fake: Served, workdir: Path, backend: Path = OFFICIAL_DIR, python: Path = OFFICIAL_PYTHON
) -> Served:
    """The customer-support backend of openai-chatkit-advanced-samples as its README starts it
    (``uvicorn app.main:app``: one process, its in-memory store, no limits)."""
    if not (backend / "app" / "main.py").exists() or not python.exists():
        raise SystemExit(
            f"no official sample at {backend} (python {python}): run "
            "bench/setup_official.sh first, or pass --no-official"
        )
    port = free_port()
    env = _clean_env()
    env.update(_model_env(fake))
    cmd = OFFICIAL_CMD.format(python=python, port=port)
    served = _start(
        "official",
        cmd,
        backend,
        env,
        port,
        "/support/chatkit",
        "/",
        workdir / f"official-{port}.log",
    )
    commit = subprocess.run(
        ["git", "-C", str(backend), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    served.info["commit"] = commit
    served.info["packages"] = subprocess.run(
        [str(python), "-c", "from importlib import metadata as m; print(' '.join(n + '==' + "
         "m.version(n) for n in ('openai-chatkit', 'openai-agents', 'openai', 'pydantic', "
         "'fastapi', 'uvicorn')))"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    return served
