"""The README's commands are the ones CI runs, and every CLI command explains itself."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mixllm.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _readme_block(section: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"^## {section}\n.*?```bash\n(.*?)```", text, flags=re.S | re.M)
    assert match, f"README has no bash block under '## {section}'"
    return match.group(1).strip()


@pytest.mark.parametrize("section", ["Install", "Tests"])
def test_ci_runs_the_readme_commands_verbatim(section):
    ci = (ROOT / ".ci/run").read_text(encoding="utf-8")
    assert _readme_block(section) in ci, f"README's {section} command must be what .ci/run runs"


def _commands(typer_app, prefix=()):
    import typer.main

    group = typer.main.get_command(typer_app)
    stack = [(prefix, group)]
    while stack:
        path, command = stack.pop()
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            stack.append(((*path, name), sub))


def test_every_command_has_help():
    runner = CliRunner()
    for path, command in _commands(app):
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output
        explanation = (command.help or "").strip()
        assert len(explanation) >= 20, f"`mixllm {' '.join(path)} --help` explains nothing: {explanation!r}"
        assert explanation.split("\n")[0][:40] in " ".join(result.output.split()), "the help shows the explanation"
