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


def test_data_import_refuses_a_file_it_cannot_read_in_one_line_with_a_failing_exit(project):
    (project / "random.pkl").write_bytes(bytes(range(256)) * 4)
    result = runner.invoke(app, ["data", "import", "random.pkl"])
    assert result.exit_code == 2, (result.output, result.exception)  # 1 with the exception's traceback before
    assert "as a pickled DataFrame" in result.output and "Traceback" not in result.output
    assert not (project / "data/reports/ingest.json").exists(), "nothing was imported"


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


def test_keys_budgets_and_report_walk_a_tenant_from_key_to_savings(project):
    """`mixllm keys create/list/revoke`, `mixllm budgets` and `mixllm report` on one tenant: the key
    is printed once and stored hashed, its spend shows against its budget, and revoking it ends it."""
    from mixllm.config import load_config
    from mixllm.io.ledger import TenantLedger
    from mixllm.io.store import InteractionLog
    from synthetic import write_params

    write_params(project, budgets={"tenants": [{"name": "acme", "budgets_usd": {"day": 2.0}}]})
    unknown = runner.invoke(app, ["keys", "create", "nobody"])
    assert unknown.exit_code == 2 and "budgets.tenants" in unknown.output and "acme" in unknown.output
    created = runner.invoke(app, ["keys", "create", "acme"])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[0]
    config = load_config(project / "params.yaml")
    ledger = TenantLedger(InteractionLog(config.sqlalchemy_url(config.service.feedback_store_url)), key_cache_s=0)
    import sqlalchemy as sa

    with ledger.store.engine.connect() as connection:
        stored = [tuple(row) for row in connection.execute(sa.text("SELECT * FROM api_keys"))]
    assert ledger.tenant_of(key) == "acme" and len(stored) == 1, "the key works"
    assert not any(key in str(value) for value in stored[0]), "and only its hash is stored"
    listing = runner.invoke(app, ["keys", "list"])
    key_id = listing.output.split()[0]
    assert "acme" in listing.output and "active" in listing.output and key not in listing.output
    ledger.record_call(tenant="acme", llm="strong", cost_usd=0.5, estimated=False, reference_cost_usd=1.0)
    budgets = runner.invoke(app, ["budgets"])
    assert budgets.exit_code == 0 and "acme" in budgets.output and "$0.5000 of $2.00 ( 25.0%)" in budgets.output
    report = runner.invoke(app, ["report", "--json"])
    summary = json.loads(report.stdout)
    assert summary["overall"]["calls"] == 1 and summary["overall"]["spend_usd"] == 0.5
    assert "1 calls" in runner.invoke(app, ["report"]).output
    revoked = runner.invoke(app, ["keys", "revoke", key_id])
    assert revoked.exit_code == 0 and "acme" in revoked.output
    assert ledger.tenant_of(key) is None and "revoked" in runner.invoke(app, ["keys", "list"]).output
    ledger.store.dispose()


def test_decision_shows_one_decisions_story(project):
    """`mixllm decision ID`: what the policy chose and why, who answered after a failover, every
    upstream call, and the feedback; an unknown id is a clear error."""
    from mixllm.config import load_config
    from mixllm.io.attempts import AttemptLog
    from mixllm.io.store import InteractionLog

    config = load_config(project / "params.yaml")
    store = InteractionLog(config.sqlalchemy_url(config.service.feedback_store_url))
    candidates = {"candidates": [
        {"llm": "strong", "quality": 0.9, "cost_usd": 0.01, "uncertainty": 0.1, "penalty": 0.0, "score": 0.8,
         "eligible": True, "probability": 1.0},
        {"llm": "coder", "quality": 0.7, "cost_usd": 0.001, "uncertainty": 0.1, "penalty": 0.0, "score": 0.69,
         "eligible": True, "probability": 0.0}], "relaxed": [], "notes": ["a note the router left"]}
    decision_id = store.log_decision("Write a python function.", "strong", model_version=3, lambda_=1.0,
                                     candidates=candidates, propensity=1.0)
    attempts = AttemptLog(store)
    attempts.record(decision_id=decision_id, attempt=1, llm="strong", outcome="upstream_error", status_code=500,
                    latency_s=0.2)
    attempts.record(decision_id=decision_id, attempt=2, llm="coder", outcome="ok", status_code=200, latency_s=0.5)
    store.complete_decision(decision_id, cost_usd=0.0012, latency_s=0.7, llm="coder")
    store.add_feedback(quality=1.0, decision_id=decision_id, kind="binary")
    store.dispose()
    result = runner.invoke(app, ["decision", decision_id])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "chose strong (probability 1.0); answered by coder" in out and "version 3" in out
    assert out.index("candidate strong") < out.index("candidate coder"), "best score first"
    assert "upstream call 1: strong upstream_error HTTP 500" in out and "upstream call 2: coder ok HTTP 200" in out
    assert "feedback: quality 1.0 (binary)" in out and "a note the router left" in out
    unknown = runner.invoke(app, ["decision", "no-such-id"])
    assert unknown.exit_code == 2 and "no decision 'no-such-id'" in unknown.output
