"""The README's commands are the ones CI runs, and every CLI command explains itself."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mixllm.cli.commands import app

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


def test_dvc_yaml_declares_what_the_stage_table_says():
    """dvc.yaml and mixllm.jobs.training.STAGES (which drives `mixllm train`, the Prefect tasks and the
    cache keys) must agree on every stage's command, inputs, settings and outputs."""
    import yaml

    from mixllm.config import load_config
    from mixllm.jobs.training import STAGES, dvc_stage

    config = load_config(ROOT / "params.yaml")
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    names = lambda entries: {next(iter(e)) if isinstance(e, dict) else e for e in entries or []}  # noqa: E731
    for stage in STAGES:
        expected, found = dvc_stage(config, stage), declared.get(stage.name)
        assert found is not None, f"dvc.yaml has no stage {stage.name}"
        assert found["cmd"] == expected["cmd"]
        assert names(found.get("deps")) == set(expected["deps"]), f"{stage.name}: deps"
        assert names(found.get("params")) == set(expected["params"]), f"{stage.name}: params"
        written = names(found.get("outs")) | names(found.get("metrics")) | names(found.get("plots"))
        assert written == set(expected["outs"]), f"{stage.name}: outs, metrics and plots"
    table = [stage.name for stage in STAGES]
    assert [name for name in declared if name in table] == table, "the same order"
    assert set(declared) - set(table) == {"ingest", "register"}, "the only stages outside the table"
