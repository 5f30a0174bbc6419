"""Training, gate, registry and continual learning with a real MLflow store (SQLite in tmp_path)."""

import dataclasses
import json
import os

import numpy as np
import pandas as pd
import pytest

from mixllm.config import load_config
from mixllm.core.errors import RegistryError
from mixllm.io.data import ingest
from mixllm.io.registry import Registry
from mixllm.io.store import InteractionLog
from mixllm.io.workspace import Workspace
from mixllm.jobs.continual import run_continual, update_champion
from mixllm.jobs.gate import GateVerdict, gate
from mixllm.jobs.training import completed_stages, run_training
from synthetic import make_log, write_params

pytestmark = pytest.mark.slow  # real servers, flows or training: `-m "not slow"` skips them

FAST = {
    "evaluation": {"baselines": ["random", "best_single"]},
    "gate": {"tolerance": 0.005, "max_overhead_ms": 5000},
}


@pytest.fixture(scope="module")
def first_training(tmp_path_factory):
    """One project for the module, ingested and trained once: its first registered version and the
    stage outputs every test reuses (stages are cached, so a test's own training run is quick)."""
    root = tmp_path_factory.mktemp("mlops")
    write_params(root, **FAST)
    make_log(n_queries=150, seed=4).to_csv(root / "log.csv", index=False)
    config = load_config(root / "params.yaml")
    ingest(root / "log.csv", config)
    outcome = run_training(config, progress=False)
    # The stages this training left recorded, read at once: other tests train other settings in the
    # same work folder and record their own stage keys, so a later read depends on the tests' order.
    return root, outcome, completed_stages(config)


@pytest.fixture(scope="module")
def project(first_training):
    return first_training[0]


def _config(project, **overrides):
    return load_config(project / "params.yaml", overrides=overrides)


def _own_registry_and_store(project, tmp_path, **overrides):
    """The module's project (its cached stages) with an MLflow registry and a feedback store of this
    test's own, so the test sees version numbers and watermarks from its own steps only."""
    return _config(project, **{"mlflow.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                               "mlflow.artifact_location": str(tmp_path / "artifacts"),
                               "service.feedback_store_url": f"sqlite:///{tmp_path}/feedback.db", **overrides})


def test_gate_rules():
    config = _config_from_defaults()
    assert gate(config, 0.8, None, []).promote, "the first model needs only the sanity checks"
    assert not gate(config, 0.8, None, ["no predictors for enabled LLM(s): x"]).promote
    assert gate(config, 0.797, 0.8, []).promote, "within tolerance"
    worse = gate(config, 0.7, 0.8, [])
    assert isinstance(worse, GateVerdict) and not worse.promote and "below the champion" in worse.summary()


def _config_from_defaults():
    from mixllm.config import config_from_dict

    return config_from_dict({"gate": {"tolerance": 0.005}})


def test_first_training_registers_champion_and_reuses_stages(first_training):
    project, outcome, completed = first_training
    config = _config(project)
    assert outcome.registration.version == 1 and outcome.registration.promoted
    registry = Registry(config)
    assert registry.alias_version("champion") == 1
    workspace = Workspace.of(config)
    for path in (workspace.plot, workspace.table, workspace.metrics, workspace.curve, workspace.router / "router.json"):
        assert path.exists(), path
    summary = json.loads(workspace.metrics.read_text())
    assert {"aiq", "aiq.ci_low", "quality_at_budget_pct", "ms_per_query"} <= set(summary)
    assert len(summary) <= 15, "metrics.json is the summary dvc metrics show prints on one line"
    detail = json.loads(workspace.metrics_detail.read_text())
    assert set(summary) <= set(detail) and "baseline.random.quality_at_budget_pct" in detail
    baseline_aiq = {key for key in detail if key.startswith("baseline.") and key.endswith(".aiq")}
    assert baseline_aiq <= set(summary), "each baseline's AIQ (where it has one) is in the summary"
    assert completed == {"split", "tags", "encoder", "predictors", "evaluate"}
    summary = outcome.summary(config)
    assert "pareto.png" in summary and "version 1" in summary
    first = {v.version: v for v in registry.versions()}[1]
    assert first.tags["mixllm.data_hash"] and "aiq" in first.metrics


def test_the_predictors_stage_runs_the_encoder_stages_onnx_export_without_torch(project, tmp_path):
    """The encoder stage saves the graph with the weights, so re-running the predictors stage (a `dvc exp
    run` that changes a decision setting) exports nothing and imports no torch: its router embeds with
    that graph."""
    import shutil
    import subprocess
    import sys

    from mixllm.core.embeddings import QueryEncoder
    from mixllm.core.router import MixLLMRouter

    copy = tmp_path / "copy"
    shutil.copytree(project, copy, ignore=shutil.ignore_patterns("mlflow*", "cache", "router"))
    workspace = Workspace.of(_config(copy))
    assert (workspace.encoder / "onnx" / "model.onnx").is_file()
    run = ("import sys; from mixllm.config import load_config; from mixllm.jobs.training import run_stage; "
           "run_stage(load_config('params.yaml'), 'predictors'); "
           "print(sorted(m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", run], cwd=copy, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "[]", out.stdout
    router, exported = MixLLMRouter.load(workspace.router), QueryEncoder.load(workspace.encoder)
    assert router.encoder_.fingerprint_ == exported.fingerprint_, "the graph the encoder stage exported"
    queries = ["What is 14 plus 29?", "Write a python function that reverses a string."]
    np.testing.assert_array_equal(router.encoder_.transform(queries), exported.transform(queries))
    assert len(router.route(queries)) == 2


def test_worse_candidate_is_challenger_better_is_promoted_and_rollback(project, tmp_path):
    base = _own_registry_and_store(project, tmp_path)
    first = run_training(base, progress=False)
    assert first.registration.version == 1 and Registry(base).alias_version("champion") == 1
    with pytest.raises(RegistryError, match="no earlier one"):
        Registry(base).rollback()
    # A deliberately worse router: a huge ridge flattens every quality prediction to the prior.
    worse = _own_registry_and_store(project, tmp_path, **{
        "predictors.quality.ridge": 1e7, "features.use_domains": False, "features.tfidf.enabled": False})
    outcome = run_training(worse, progress=False, register=True)
    assert outcome.registration.version == 2 and not outcome.registration.promoted
    assert "below the champion" in outcome.registration.verdict.summary()
    registry = Registry(worse)
    assert registry.alias_version("champion") == 1 and registry.alias_version("challenger") == 2
    # Back to the good config: not worse than the champion, so promoted.
    good = base
    outcome = run_training(good, progress=False)
    assert outcome.registration.version == 3 and outcome.registration.promoted
    assert registry.alias_version("champion") == 3
    described = lambda: registry.client.get_registered_model(registry.name).description  # noqa: E731
    assert "Champion: version 3 (holdout: AIQ" in described() and "mlflow.pyfunc.load_model" in described()
    # Rollback: champion back to version 1, which routes exactly as version 1 did.
    queries = ["Write a python function to sort a list.", "What is 12 plus 9?", "Who founded Rome?"]
    v1, _ = registry.load_router(1)
    assert registry.rollback() == (3, 1)
    champion, number = registry.load_router("champion")
    assert number == 1 and "Champion: version 1 (" in described()
    assert [d.to_dict() for d in champion.route(queries)] == [d.to_dict() for d in v1.route(queries)]
    versions = {v.version: v for v in registry.versions()}
    assert "rollback from version 3" in versions[1].tags["mixllm.promoted"]
    assert "replaced by version 1" in versions[3].tags["mixllm.rolled_back"]
    with pytest.raises(RegistryError, match="no earlier one"):
        registry.rollback()
    registry.promote(3, "undo the rollback")
    assert registry.alias_version("champion") == 3
    with pytest.raises(RegistryError, match="has no version 42"):
        registry.promote(42, "nope")


def test_a_download_left_by_a_killed_process_is_removed_by_the_next_load(project, tmp_path, monkeypatch):
    """A process stopped while it loads a version cannot delete its download (~110 MB each): one that
    exits normally removes it on the way out, and after a kill the next load in any process does."""
    import subprocess
    import sys
    import tempfile

    downloads = tmp_path / "tmp"
    downloads.mkdir()

    def download_then(exit_call: str) -> None:
        script = ("import os, sys; from mixllm.config import load_config; from mixllm.io.registry import Registry; "
                  f"Registry(load_config(sys.argv[1])).download_router('champion'); {exit_call}")
        subprocess.run([sys.executable, "-c", script, str(project / "params.yaml")], check=True, cwd=project,
                       env={**os.environ, "TMPDIR": str(downloads)}, timeout=300)

    download_then("sys.exit(0)")  # a service stopped while it loads in a background thread
    assert list(downloads.iterdir()) == []
    download_then("os._exit(0)")  # kill -9: no cleanup runs
    (orphan,) = downloads.iterdir()
    assert (orphan / "artifacts").is_dir()
    unrelated = downloads / "mixllm-model-no-pid"  # made before pids were recorded: its owner is unknown
    unrelated.mkdir()
    # Another machine's (a container sharing the folder): the same dead pid means another process there.
    from mixllm.io.scratch_folders import host_tag

    other_host = "h00000000" if host_tag() != "h00000000" else "h11111111"
    elsewhere = downloads / orphan.name.replace(host_tag(), other_host)
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))
    registry = Registry(_config(project))
    router, number = registry.load_router("champion")
    assert number == registry.alias_version("champion") and router.llms_
    own = [p for p in downloads.iterdir() if p not in (orphan, unrelated, elsewhere)]
    assert orphan not in list(downloads.iterdir()) and unrelated in list(downloads.iterdir())
    assert elsewhere in list(downloads.iterdir()), "another machine's folder is never judged by a pid of ours"
    # The champion's encoder is onnx (the tests' default, as the shipped auto's choice): it reads its
    # transformer from the download on demand, so the download stays while the router lives. Saving
    # it (continual learning does, after the update) copies the transformer from there, torch unloaded.
    assert router.encoder_.backend == "onnx" and router.encoder_.loads_transformer_on_demand and len(own) == 1
    from mixllm.core.router import MixLLMRouter

    router.save(tmp_path / "saved")
    assert router.encoder_.loads_transformer_on_demand, "saving did not load the transformer"
    queries = make_log(9, seed=5)["query"].unique().tolist()
    reloaded = MixLLMRouter.load(tmp_path / "saved", progress=False)
    assert [d.to_dict() for d in reloaded.route(queries)] == [d.to_dict() for d in router.route(queries)]
    assert reloaded.encoder_.with_settings(backend="torch").transform(queries).shape[0] == len(queries), \
        "the saved copy holds the transformer itself"
    import gc

    del router
    gc.collect()
    assert sorted(downloads.iterdir()) == sorted([unrelated, elsewhere]), "the download goes with the router that read it"


def _feedback(config, n=12, seed=0):
    """Route some queries with the champion through the store, as the service would, then rate them."""
    registry = Registry(config)
    router, version_number = registry.load_router("champion")
    store = InteractionLog(config.sqlalchemy_url(config.service.feedback_store_url))
    log = make_log(n, seed=seed + 100)
    queries = log.drop_duplicates("query_id")
    ids = []
    for query, decision in zip(queries["query"], router.route(queries["query"].tolist())):
        decision_id = store.log_decision(query, decision.llm, model_version=version_number, lambda_=decision.lambda_)
        truth = log[(log["query"] == query) & (log["llm"] == decision.llm)].iloc[0]
        store.add_feedback(decision_id=decision_id, quality=float(truth["quality"]), cost_usd=float(truth["cost_usd"]),
                           kind="binary")
        ids.append(decision_id)
    store.dispose()
    return ids


def test_continual_consumes_feedback_once_and_not_on_failure(project, tmp_path, monkeypatch):
    config = _own_registry_and_store(project, tmp_path)
    run_training(config, progress=False)
    registry = Registry(config)
    champion_before = registry.alias_version("champion")
    _feedback(config, n=12)
    # A failure after the update must leave the watermark where it was.
    import mixllm.jobs.continual as continual_module

    def boom(*args, **kwargs):
        raise RuntimeError("registry unreachable")

    failing = dataclasses.replace(continual_module.CONTINUAL_STEP["register"], run=boom)
    monkeypatch.setitem(continual_module.CONTINUAL_STEP, "register", failing)
    with pytest.raises(RuntimeError):
        run_continual(config, watch_drift=False)
    store = InteractionLog(config.sqlalchemy_url(config.service.feedback_store_url))
    assert store.watermark() == 0
    monkeypatch.undo()
    outcome = run_continual(config, watch_drift=False)
    assert outcome.feedback_rows == 12 and outcome.watermark_after == 12 and store.watermark() == 12
    registration = outcome.registration
    assert registration.version > champion_before
    version = {v.version: v for v in registry.versions()}[registration.version]
    assert version.tags["mixllm.parent_version"] == str(champion_before)
    assert version.tags["mixllm.feedback_ids"] == "1-12"
    versions_before = len(registry.versions())
    again = run_continual(config)
    assert again.registration is None and again.feedback_rows == 0
    assert again.drift is not None and again.drift["retrained"] is None, "the drift step ran; too few decisions to retrain"
    assert len(registry.versions()) == versions_before, "no new feedback: nothing registered"
    store.dispose()


def test_continual_applies_pool_changes(project):
    config = _config(project)
    raw = config.model_dump(mode="json", by_alias=True, exclude={"root"})
    raw["llms"][0]["enabled"] = False
    raw["llms"].append({"name": "newcomer", "input_usd_per_1k": 0.0005, "output_usd_per_1k": 0.0005})
    from mixllm.config import config_from_dict

    changed = config_from_dict(raw, root=config.root)
    rows = pd.DataFrame({"feedback_id": [1], "query": ["What is 2 plus 2?"], "llm": ["strong"], "quality": [1.0],
                         "cost_usd": [0.001]})
    router_dir, _, changes = update_champion(changed, rows)
    assert sorted(changes) == sorted([f"disabled {config.llms[0].name}", "added newcomer"])
    from mixllm.core.router import MixLLMRouter

    router = MixLLMRouter.load(router_dir)
    assert "newcomer" in router.enabled_llms_ and config.llms[0].name not in router.enabled_llms_


def test_store_is_idempotent(tmp_path):
    store = InteractionLog(f"sqlite:///{tmp_path}/feedback.db")
    first = store.log_decision("q", "m", model_version=1, lambda_=0.5, request_id="r1")
    assert store.log_decision("q", "m", model_version=1, lambda_=0.5, request_id="r1") == first
    assert store.record_decision("q2", "m", model_version=1, lambda_=0.5, request_id="r1") == (first, False)
    fresh, created = store.record_decision("q", "m", model_version=1, lambda_=0.5, request_id="r2")
    assert created and fresh != first
    a = store.add_feedback(decision_id=first, quality=1.0, kind="binary")
    b = store.add_feedback(decision_id=first, quality=1.0, kind="binary")
    assert a.created and not b.created and a.feedback_id == b.feedback_id
    assert store.count("feedback") == 1 and store.count("decisions") == 2
    from mixllm.io.store import UnknownDecisionError

    with pytest.raises(UnknownDecisionError, match="unknown decision_id"):
        store.add_feedback(decision_id="nope", quality=1.0)
    full = store.add_feedback(query="direct", llm="m2", quality=0.4, cost_usd=0.01, request_id="r9")
    assert full.created and store.add_feedback(query="direct", llm="m2", quality=0.4, request_id="r9").feedback_id == full.feedback_id
    rows = store.feedback_since(0)
    assert rows["model_version"].tolist()[0] == 1 and np.isnan(rows["model_version"].tolist()[1])
    store.dispose()


def test_a_decision_log_out_of_connections_is_busy_within_its_timeout_not_a_crash(tmp_path):
    from mixllm.core.errors import StoreBusyError

    store = InteractionLog(f"sqlite:///{tmp_path}/feedback.db", busy_timeout_s=0.5)
    assert store.engine.pool.timeout() == 0.5, "the pool waits as long as a lock would (its own default: 30 s)"
    held = [store.engine.connect() for _ in range(store.engine.pool.size() + store.engine.pool._max_overflow)]
    with pytest.raises(StoreBusyError, match="retry shortly"):
        store.decision("some-decision")
    for connection in held:
        connection.close()
    assert store.decision("some-decision") is None
    store.dispose()


def test_feedback_says_whether_the_service_timed_the_call_itself(tmp_path):
    """So a latency_s sent with feedback on a proxied call is not counted a second time."""
    store = InteractionLog(f"sqlite:///{tmp_path}/feedback.db")
    proxied = store.log_decision("q1", "coder", model_version=1, lambda_=0.5)
    store.complete_decision(proxied, cost_usd=0.001, latency_s=0.8, llm="coder")
    routed = store.log_decision("q2", "coder", model_version=1, lambda_=0.5)
    assert store.add_feedback(quality=1.0, decision_id=proxied, latency_s=0.9).latency_measured
    assert store.add_feedback(quality=1.0, decision_id=proxied, latency_s=0.9).latency_measured, "a retry says so too"
    assert not store.add_feedback(quality=1.0, decision_id=routed, latency_s=0.9).latency_measured
    assert not store.add_feedback(quality=1.0, query="q3", llm="coder", latency_s=0.9).latency_measured
    store.dispose()


def test_the_decision_log_is_compacted_without_losing_feedback(tmp_path):
    """Old decisions lose their candidates' scores, then (with no feedback) the whole row; feedback
    rows and the decisions they name stay, and a compacted SQLite file gives its space back."""
    from datetime import datetime, timedelta, timezone

    import sqlalchemy as sa

    from mixllm.io.store import UnknownDecisionError
    from mixllm.io.store_schema import decisions

    store = InteractionLog(f"sqlite:///{tmp_path}/feedback.db")
    scores = [{"llm": f"llm-{j}", "quality": 0.5, "cost_usd": 0.001, "score": 0.4} for j in range(30)]
    ages_days = {"fresh": 0.1, "two_days": 2.0, "old": 40.0, "old_rated": 40.0}
    ids = {name: [store.log_decision(f"{name} {i}", "coder", model_version=1, lambda_=0.5, candidates=scores,
                                     request_id=f"{name}-{i}") for i in range(200)] for name in ages_days}
    now = datetime.now(timezone.utc)
    with store.engine.begin() as connection:
        for name, age in ages_days.items():
            connection.execute(decisions.update().where(decisions.c.decision_id.in_(ids[name]))
                               .values(created_at=now - timedelta(days=age)))
    rated = store.add_feedback(decision_id=ids["old_rated"][0], quality=1.0, kind="binary")
    size_before = (tmp_path / "feedback.db").stat().st_size
    counts = store.compact(detail_days=1.0, retention_days=30.0, now=now)
    assert counts == {"scores_dropped": 600, "deleted": 399}, "every old decision but the one with feedback"
    assert store.decision(ids["fresh"][0])["candidates"] is not None, "a fresh decision keeps its scores"
    assert store.decision(ids["two_days"][0])["candidates"] is None and store.decision(ids["two_days"][0])["llm"] == "coder"
    assert store.decision(ids["old"][0]) is None and store.decision(ids["old_rated"][0]) is not None
    assert store.count("decisions") == 401 and store.count("feedback") == 1
    assert store.feedback_since(0)["feedback_id"].tolist() == [rated.feedback_id]
    with pytest.raises(UnknownDecisionError, match="decision_retention_days"):
        store.add_feedback(decision_id=ids["old"][1], quality=1.0, kind="binary")
    with store.engine.connect() as connection:
        connection.execute(sa.text("PRAGMA wal_checkpoint(TRUNCATE)"))
    assert (tmp_path / "feedback.db").stat().st_size < size_before / 2, "the file shrinks"
    assert store.compact(detail_days=1.0, retention_days=30.0, now=now) == {"scores_dropped": 0, "deleted": 0}
    store.dispose()


def test_upstream_attempts_are_kept_with_their_decision_and_forgotten_past_retention(tmp_path):
    from datetime import datetime, timedelta, timezone

    from mixllm.io.attempts import AttemptLog, attempts
    from mixllm.io.store_schema import decisions

    store = InteractionLog(f"sqlite:///{tmp_path}/feedback.db")
    log = AttemptLog(store)
    decision_id = store.log_decision("q", "strong", model_version=1, lambda_=0.5)
    log.record(decision_id=decision_id, attempt=1, llm="strong", outcome="upstream_error", status_code=500,
               latency_s=0.2)
    log.record(decision_id=decision_id, attempt=2, llm="coder", outcome="unreachable", latency_s=0.1)
    log.record(decision_id=decision_id, attempt=3, llm="cheap", outcome="ok", status_code=200, latency_s=0.4)
    log.record(decision_id=None, attempt=1, llm="coder", outcome="ok", status_code=200, latency_s=0.3)
    story = [(a["attempt"], a["llm"], a["outcome"], a["status_code"]) for a in log.of_decision(decision_id)]
    assert story == [(1, "strong", "upstream_error", 500), (2, "coder", "unreachable", None), (3, "cheap", "ok", 200)]
    with pytest.raises(ValueError, match="outcome"):
        log.record(decision_id=decision_id, attempt=4, llm="cheap", outcome="fine", latency_s=0.1)
    with store.engine.begin() as connection:
        connection.execute(attempts.update().where(attempts.c.attempt < 3)
                           .values(created_at=datetime.now(timezone.utc) - timedelta(days=40)))
    assert log.forget_older(days=30.0) == 1, "the old direct chat's; a decision still kept keeps its calls"
    assert [a["attempt"] for a in log.of_decision(decision_id)] == [1, 2, 3]
    with store.engine.begin() as connection:  # the decision goes, as compaction deletes one without feedback
        connection.execute(decisions.delete().where(decisions.c.decision_id == decision_id))
    assert log.forget_older(days=30.0) == 2
    assert [a["attempt"] for a in log.of_decision(decision_id)] == [3], "the recent one stays its retention"
    # In the service a background thread writes them, in order, so no request waits on the database.
    queued = AttemptLog(store, background=True)
    later = store.log_decision("q2", "strong", model_version=1, lambda_=0.5)
    for attempt, llm in enumerate(["strong", "coder", "cheap"], start=1):
        queued.submit(decision_id=later, attempt=attempt, llm=llm, outcome="ok", latency_s=0.1)
    assert queued.flush(timeout_s=10.0)
    assert [a["llm"] for a in queued.of_decision(later)] == ["strong", "coder", "cheap"]
    store.dispose()


def test_a_session_keeps_its_llm_until_it_idles_past_its_ttl_and_tenants_do_not_share_sessions(tmp_path):
    from datetime import datetime, timedelta, timezone

    from mixllm.io.sessions import SessionLog, session_key, sessions

    store = InteractionLog(f"sqlite:///{tmp_path}/feedback.db")
    log = SessionLog(store, ttl_s=600.0)
    acme, globex = session_key("acme", "chat-1"), session_key("globex", "chat-1")
    log.remember(acme, "coder")
    log.remember(acme, "strong")  # the conversation moved (its LLM failed over)
    assert log.llm_of(acme) == "strong" and log.llm_of(globex) is None, "the same session id of another tenant"
    with store.engine.begin() as connection:  # idle for longer than the TTL
        connection.execute(sessions.update().values(updated_at=datetime.now(timezone.utc) - timedelta(seconds=601)))
    assert log.llm_of(acme) is None, "an idle conversation is routed afresh"
    assert log.forget_idle() == 1 and log.llm_of(acme) is None
    store.dispose()


def test_registered_model_carries_the_calibrated_lambda(project):
    config = _config(project)
    registry = Registry(config)
    router, _ = registry.load_router("champion")
    assert config.decision.lambda_ is None
    assert router.calibrated_lambda_ >= 0 and router.default_lambda == router.calibrated_lambda_
    assert router.route(["What is 3 plus 4?"])[0].lambda_ == router.calibrated_lambda_
    fixed = _config(project, **{"decision.lambda": 0.25})
    router.config = fixed
    assert router.route(["What is 3 plus 4?"])[0].lambda_ == 0.25, "a configured lambda wins"
    import json

    workspace_manifest = json.loads((Workspace.of(config).router / "router.json").read_text())
    assert workspace_manifest.get("calibrated_lambda") is None, "the DVC output itself is never modified"


def test_cli_calibrate_route_and_registry_list(project):
    from typer.testing import CliRunner

    from mixllm.cli.commands import app

    runner = CliRunner()
    params = str(project / "params.yaml")
    calibrated = runner.invoke(app, ["--params", params, "calibrate", "--cost-share", "0.3"])
    assert calibrated.exit_code == 0, calibrated.output
    assert "target cost_share=0.3" in calibrated.output and "holdout" in calibrated.output
    both = runner.invoke(app, ["--params", params, "calibrate", "--cost-share", "0.3", "--quality-share", "0.9"])
    assert both.exit_code != 0 and "exactly one" in both.output
    routed = runner.invoke(app, ["--params", params, "route", "What is 2 plus 2?", "--lambda", "0"])
    assert routed.exit_code == 0 and "(lambda=0)" in routed.output and "score=" in routed.output
    overridden = runner.invoke(app, ["--params", params, "-S", "decision.lambda=0.25", "route", "What is 2 plus 2?"])
    assert overridden.exit_code == 0 and "(lambda=0.25)" in overridden.output, "-S reaches the loaded model"
    refused = runner.invoke(app, ["--params", params, "-S", "decision.lambda=0.25", "flow", "continual"])
    assert refused.exit_code == 2 and "-S does not apply" in refused.output
    listing = runner.invoke(app, ["--params", params, "registry", "list"])
    assert listing.exit_code == 0 and "champion" in listing.output and "gate:" in listing.output
    shown = runner.invoke(app, ["--params", params, "tags", "show"])
    assert shown.exit_code == 0 and "domain  0" in shown.output


def test_a_disabled_reference_llm_is_still_the_yardstick(project):
    """Disabling the best LLM (an outage) must not break evaluation: it stays the reference."""
    from mixllm.io.workspace import load_split
    from mixllm.jobs.report import evaluate_router

    config = _config(project)
    split = load_split(config)
    router, _ = Registry(config).load_router("champion")
    best = split.train.groupby("llm")["quality"].mean().idxmax()
    router.set_enabled(best, False)
    report = evaluate_router(config, router, split, baselines=["best_single"])
    assert report.reference.llm == best
    assert all(best not in point.traffic for point in report.mixllm.points), "never routed to the disabled LLM"
    assert np.isfinite(report.metrics["aiq"]) and report.predictions_finite


def test_retraining_replays_the_feedback_continual_runs_learned(project, tmp_path):
    """A nightly retrain must not forget the feedback: it replays rows up to the watermark, once."""
    from mixllm.core.router import MixLLMRouter
    from mixllm.jobs.continual import consumed_feedback

    config = _own_registry_and_store(project, tmp_path)
    run_training(config, progress=False, baselines=[])
    _feedback(config, n=12)
    assert run_continual(config, watch_drift=False).feedback_rows == 12
    consumed = consumed_feedback(config)
    assert len(consumed) == 12, "what the continual run learned is what a retrain replays"
    outcome = run_training(config, progress=False, baselines=[])
    registration = outcome.registration
    version = {v.version: v for v in Registry(config).versions()}[registration.version]
    assert version.tags["mixllm.replayed_feedback"] == "12 rows (ids up to 12)"
    workspace = Workspace.of(config)
    offline = MixLLMRouter.load(workspace.router).predict(consumed["query"].tolist())
    replayed = MixLLMRouter.load(workspace.replayed).predict(consumed["query"].tolist())
    for llm in set(consumed["llm"]):
        j = offline.llms.index(llm)
        assert not np.allclose(offline.quality[:, j], replayed.quality[:, j]), f"{llm} learned nothing"
    untouched = [k for k, llm in enumerate(offline.llms) if llm not in set(consumed["llm"])]
    assert all(np.array_equal(offline.quality[:, k], replayed.quality[:, k]) for k in untouched)
    from mixllm.jobs.continual import stage_replay

    off = _own_registry_and_store(project, tmp_path, **{"pipeline.replay_feedback": False})
    assert stage_replay(off)[0] == workspace.router, "replay off: the offline fit is what gets evaluated"
    from mixllm.jobs.training import unreplayed_feedback_tags

    # dvc repro's register stage (stage_register): tracked data only, and its version says so.
    assert unreplayed_feedback_tags(config) == {
        "mixllm.replayed_feedback": "0 of 12 consumed rows (dvc repro: tracked data only)"}
    assert unreplayed_feedback_tags(off) == {}, "replay off: nothing is left out"


def test_a_poisoned_cost_scale_is_a_degenerate_model_the_gate_refuses(project):
    """One absurd cost can make every lambda route alike; the sanity checks must say so, first model or not."""
    from mixllm.core.router import MixLLMRouter
    from mixllm.io.workspace import load_split
    from mixllm.jobs.gate import sanity_problems
    from mixllm.jobs.report import evaluate_router

    config = _config(project)
    run_training(config, progress=False, register=False)  # the module's stages, reused when already built
    router = MixLLMRouter.load(Workspace.of(config).router)
    split = load_split(config)
    healthy = evaluate_router(config, router, split, bootstrap=False)
    assert sanity_problems(config, router, healthy) == []
    healthy_scale = router.cost_scale_usd_
    router.cost_scale_usd_ = float("inf")  # what a cost of 1e308 in the training log did to the scale
    poisoned = evaluate_router(config, router, split, bootstrap=False)
    problems = sanity_problems(config, router, poisoned)
    assert any("cost scale" in p for p in problems), problems
    assert any("every lambda gives the same routing" in p for p in problems), problems
    verdict = gate(config, 0.99, None, problems)
    assert not verdict.promote and "cost scale" in verdict.summary()
    # The other checks, each on the healthy report with one thing wrong.
    from dataclasses import replace

    router.cost_scale_usd_ = healthy_scale
    nan_predictions = replace(healthy, predictions_finite=False)
    assert any("NaN or infinite predictions" in p for p in sanity_problems(config, router, nan_predictions))
    unmet = replace(healthy, calibration=replace(healthy.calibration, met=False))
    assert any("no lambda met" in p and "decision.lambda" in p for p in sanity_problems(config, router, unmet))
    assert sanity_problems(config.model_copy(update={"decision": config.decision.model_copy(update={"lambda_": 0.5})}),
                           router, unmet) == [], "an explicit lambda needs no calibration"
    not_finite = gate(config, float("nan"), 0.8, [])
    assert not not_finite.promote and "not finite" in not_finite.summary(), "a NaN objective never beats a champion"


def test_explored_traffic_judges_a_second_version_and_the_gate_records_both_verdicts(project, tmp_path):
    """Route with a stochastic policy (logged probabilities) -> feedback -> an off-policy estimate of
    a second version -> the gate's verdict. The second version routes everything to the cheapest
    LLM (lambda 1000): offline its AIQ equals the champion's (lambda does not change the curve), but
    on the logged traffic its score is worse, so the production evidence keeps it a challenger."""
    from typer.testing import CliRunner

    from mixllm.cli.commands import app

    settings = {"decision.policy": "softmax", "decision.seed": 0, "decision.exploration_budget.share": 0.3,
                "decision.temperature": 0.1, "gate.min_logged_feedback": 100}
    config = _own_registry_and_store(project, tmp_path, **settings)
    assert run_training(config, progress=False).registration.promoted
    router, version = Registry(config).load_router("champion")
    log = make_log(240, seed=11)
    queries = log.drop_duplicates("query_id")
    decisions = router.route(queries["query"].tolist())
    assert all(0 < d.propensity <= 1 for d in decisions)
    explored = [d for d in decisions if max(d.candidates, key=lambda c: c.score).llm != d.llm]
    assert 0 < len(explored) < 0.3 * len(decisions) + 15, "some traffic explores, within the budget"
    store = InteractionLog(config.sqlalchemy_url(config.service.feedback_store_url))
    for query, decision in zip(queries["query"], decisions):
        decision_id = store.log_decision(query, decision.llm, model_version=version, lambda_=decision.lambda_,
                                         propensity=decision.propensity)
        truth = log[(log["query"] == query) & (log["llm"] == decision.llm)].iloc[0]
        store.add_feedback(decision_id=decision_id, quality=float(truth["quality"]), cost_usd=float(truth["cost_usd"]))
    store.dispose()

    cheapest = _own_registry_and_store(project, tmp_path, **settings, **{"decision.lambda": 1000.0})
    outcome = run_training(cheapest, progress=False)
    summary = outcome.registration.verdict.summary()
    assert not outcome.registration.promoted and "production (240 logged decisions" in summary and "worse" in summary
    assert "below the champion" not in summary, "the offline gate alone would have passed it"
    tags = {v.version: v for v in Registry(config).versions()}[outcome.registration.version].tags
    assert "doubly-robust" in tags["mixllm.gate.production"] and tags["mixllm.gate"]
    assert "difference -" in tags["mixllm.gate.production"], "paired: the candidate minus the champion, below 0"

    result = CliRunner().invoke(app, ["--params", str(project / "params.yaml"),
                                      *[arg for key, value in {**settings, "mlflow.tracking_uri": config.mlflow.tracking_uri,
                                                               "mlflow.artifact_location": config.mlflow.artifact_location,
                                                               "service.feedback_store_url": config.service.feedback_store_url,
                                                               }.items() for arg in ("-S", f"{key}={value}")],
                                      "evaluate", "--on-feedback", str(outcome.registration.version)])
    assert result.exit_code == 0, result.output
    assert "240 logged decisions with feedback" in result.output and result.output.count("  dr ") == 3
    assert "minus version 1, paired" in result.output


def test_planted_drift_is_found_and_retrains_once_and_steady_traffic_is_not_drift(project, tmp_path):
    from mixllm.jobs.monitoring import check_drift, watch_drift

    config = _own_registry_and_store(project, tmp_path, **{"drift.min_queries": 60, "drift.window": 120})
    assert run_training(config, progress=False).registration.version == 1
    store = InteractionLog(config.sqlalchemy_url(config.service.feedback_store_url))

    def log_traffic(queries):
        for query in queries:
            store.log_decision(query, "strong", model_version=1, lambda_=0.5)

    log_traffic(make_log(120, seed=21).drop_duplicates("query_id")["query"])  # the training distribution
    steady = check_drift(config)
    assert steady.queries == 120 and not steady.drifted, steady.reasons
    assert steady.domain_psi < 0.2 and steady.feature_shift_p_value > 0.01

    rng = np.random.default_rng(3)
    dishes = ["risotto", "ramen", "paella", "goulash", "tagine", "pho", "moussaka", "biryani"]
    log_traffic([f"Give me a recipe for {rng.choice(dishes)} for {rng.integers(2, 12)} people, with wine pairing."
                 for _ in range(120)])  # a topic the router never saw
    watched = watch_drift(config)
    assert watched["drift"]["drifted"] and watched["retrained"]["version"] == 2, watched
    version = {v.version: v for v in Registry(config).versions()}[2]
    trigger = version.tags["mixllm.trigger"]
    assert trigger.startswith("drift: ") and ("shifted" in trigger or "PSI" in trigger), trigger
    again = watch_drift(config)
    assert again["drift"]["drifted"] and again["retrained"] is None, "one retrain per drift.window new decisions"
    store.dispose()
