"""The README stays true: its configuration table is the one the code defines."""

from __future__ import annotations

from pathlib import Path

from chatkit_flask.settings import OPTIONS, markdown_table

ROOT = Path(__file__).resolve().parent.parent


def test_readme_configuration_table_matches_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, (
        "README's configuration table is stale: run "
        "'.venv/bin/python bin/readme-config'"
    )
    for key in OPTIONS:
        assert f"`{key}`" in readme


def test_readme_names_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "bin/serve" in readme and "bash .ci/run" in readme
    assert (ROOT / "bin" / "serve").exists() and (ROOT / ".ci" / "run").exists()


def test_readme_opens_with_the_two_commands_then_server_mode_then_hosted() -> None:
    """A newcomer meets the set-up commands on the first screen, then server mode (the
    default); hosted mode has its own later section that says Agent Builder is shut down."""
    readme = (ROOT / "README.md").read_text()
    headings = [line for line in readme.splitlines() if line.startswith("## ")]
    assert headings[:2] == ["## Two commands", "## Server mode"]
    hosted = next(h for h in headings if h.startswith("## Hosted mode"))
    assert headings.index(hosted) > 1
    first_screen = "\n".join(readme.splitlines()[:40])
    assert "\nbin/serve " in first_screen and "\nbash .ci/run " in first_screen
    hosted_text = readme.split(hosted, 1)[1].split("\n## ", 1)[0]
    assert "shut down" in hosted_text and "2026-11-30" in hosted_text


def test_readme_quotes_the_shipped_worker_and_its_caps() -> None:
    """Figures that follow config/gunicorn.conf.py: server mode's worker, 500 replies each."""
    readme = (ROOT / "README.md").read_text()
    conf = (ROOT / "config" / "gunicorn.conf.py").read_text()
    assert 'SERVER_WORKER = "chatkit_flask.server.asgi_worker.ChatKitWorker"' in conf
    assert "per_worker = 500 if worker_class == SERVER_WORKER" in conf
    assert "chatkit_flask.server.asgi_worker.ChatKitWorker" in readme
    assert "`CHATKIT_MAX_STREAMS_PER_WORKER` replies (500)" in readme
    assert "3 x 128" not in readme
