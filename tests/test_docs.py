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
