import json

from typer.testing import CliRunner

from mixllm.cli.commands import app

runner = CliRunner()


def test_data_import_reports_counts_and_writes_report(project, synthetic_log):
    synthetic_log.to_csv(project / "log.csv", index=False)
    result = runner.invoke(app, ["data", "import", "log.csv"])
    assert result.exit_code == 0, result.output
    assert "accepted 180 new rows (60 queries, 3 LLMs)" in result.output
    report = json.loads((project / "data/reports/ingest.json").read_text())
    assert report["accepted"] == 180 and report["quarantined"] == 0
    again = runner.invoke(app, ["data", "import", "log.csv"])
    assert "already stored 180" in again.output


def test_data_show_on_empty_store_says_how_to_fill_it(project):
    result = runner.invoke(app, ["data", "show"])
    assert result.exit_code == 2
    assert "mixllm data import" in result.output


def test_bad_override_is_a_clear_error(project):
    result = runner.invoke(app, ["-S", "decision.lambda=-1", "config"])
    assert result.exit_code == 2
    assert "decision.lambda" in result.output


def test_fetch_without_copy_offline_says_how(project, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    result = runner.invoke(app, ["data", "fetch", "routerbench"])
    assert result.exit_code == 2
    assert "MIXLLM_ROUTERBENCH" in result.output
