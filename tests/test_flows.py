"""Prefect flows for real: a Prefect test server, a real MLflow store, the Dask task runner,
and the scheduled deployments served by `mixllm deploy` against a `prefect server` on 127.0.0.1."""

import json
import os
import sys
import time

import numpy as np
import pytest

from mixllm.cli.processes import free_port, start, stop, wait_http
from mixllm.config import load_config
from mixllm.core.router import MixLLMRouter
from mixllm.io.registry import Registry
from synthetic import make_log, write_params

pytestmark = pytest.mark.slow  # real servers, flows or training: `-m "not slow"` skips them

FAST = {"evaluation": {"baselines": ["random", "knn"]}, "gate": {"max_overhead_ms": 5000}}
QUERIES = ["Write a python function that reverses a string.", "What is 14 plus 29?", "When did the Roman Republic fall?"]


def _project(root, task_runner="thread"):
    root.mkdir(parents=True, exist_ok=True)
    write_params(root, pipeline={"task_runner": task_runner, "dask_workers": 2}, **FAST)
    make_log(n_queries=120, seed=21).to_csv(root / "log.csv", index=False)
    (root / "data" / "inbox").mkdir(parents=True)
    (root / "log.csv").rename(root / "data" / "inbox" / "log.csv")
    return root / "params.yaml"


@pytest.fixture(scope="module")
def thread_trained(prefect_harness, tmp_path_factory):
    """One project trained and registered by the flow on the thread runner, for the module: the
    registration and cache test reads it, the Dask test compares its own run with it."""
    from mixllm.flows.training import run

    root = tmp_path_factory.mktemp("thread")
    params = _project(root)
    before = os.getcwd()
    os.chdir(root)
    try:
        result = run(str(params))
    finally:
        os.chdir(before)
    return root, params, result


def test_training_flow_registers_and_caches(thread_trained, monkeypatch):
    from prefect.client.orchestration import get_client

    root, params, result = thread_trained
    monkeypatch.chdir(root)
    assert result["registration"]["version"] == 1 and result["registration"]["promoted"]
    assert "of" in result["headline"] and result["metrics"]["aiq"] > 0
    config = load_config(params)
    assert Registry(config).alias_version("champion") == 1
    assert (root / "data/pipeline/pareto.png").is_file()
    recorded = json.loads((root / "data/pipeline/registration.json").read_text())
    assert recorded["version"] == 1, "registered as mixllm train and dvc repro register: registration.json says so"
    # A second run with unchanged data and params: the expensive tasks come from the cache.
    from mixllm.flows.training import training
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    state = training(params_path=str(params), register_model=False, return_state=True)
    assert state.is_completed()
    flow_run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=flow_run_filter)
    states = {t.name.rsplit("-", 1)[0]: t.state.name for t in task_runs}
    cached = {name for name, state_name in states.items() if state_name == "Cached"}
    from mixllm.jobs.training import STAGE, ROUTER_STAGES

    assert {STAGE[name].description for name in ("split", *ROUTER_STAGES)} <= cached, states


def test_dask_runner_gives_the_same_model(thread_trained, tmp_path, monkeypatch):
    from mixllm.flows.training import run

    thread_root = thread_trained[0]
    dask_params = _project(tmp_path / "dask", task_runner="dask")
    monkeypatch.chdir(tmp_path)
    run(str(dask_params), register_model=False)
    thread_router = MixLLMRouter.load(thread_root / "data/pipeline/router")
    dask_router = MixLLMRouter.load(tmp_path / "dask/data/pipeline/router")
    a, b = thread_router.predict(QUERIES), dask_router.predict(QUERIES)
    np.testing.assert_allclose(a.quality, b.quality, atol=1e-9)
    np.testing.assert_allclose(a.cost_usd, b.cost_usd, atol=1e-12)
    assert [d.llm for d in thread_router.route(QUERIES)] == [d.llm for d in dask_router.route(QUERIES)]


def test_continual_flow_runs_once_per_feedback(prefect_harness, tmp_path, monkeypatch):
    from mixllm.flows.continual import continual
    from mixllm.flows.training import run
    from mixllm.io.store import InteractionLog

    params = _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    run(str(params))
    config = load_config(params)
    nothing = continual(params_path=str(params))
    assert nothing["registration"] is None
    store = InteractionLog(config.sqlalchemy_url(config.service.feedback_store_url))
    decision = store.log_decision(QUERIES[0], "coder", model_version=1, lambda_=1.0)
    store.add_feedback(decision_id=decision, quality=1.0, cost_usd=0.0001)
    learned = continual(params_path=str(params))
    assert learned["feedback_rows"] == 1 and learned["registration"]["version"] == 2
    assert store.watermark() == 1
    assert continual(params_path=str(params))["registration"] is None, "the same feedback is not learned twice"
    store.dispose()
    from mixllm.flows.evaluation import evaluate_on_feedback_flow

    judged = evaluate_on_feedback_flow(version="2", params_path=str(params), against="1")
    assert judged["version"] == 2 and judged["against"] == 1 and judged["logged"] == 1
    assert judged["estimates"]["n"] == 1 and set(judged["estimates"]["quality"]) >= {"ips", "snips", "dr"}
    assert set(judged["estimates"]["versus_baseline"]["score"]) == {"ips", "snips", "dr"}, "and version 2 minus 1"


def test_deploy_serves_cron_schedules(tmp_path):
    """`mixllm deploy` against a real `prefect server` started here; both stopped by their pids."""
    params = _project(tmp_path)
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    server = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                   log_path=tmp_path / "server.log", env=env)
    api = f"http://127.0.0.1:{port}/api"
    serving = None
    try:
        wait_http(f"{api}/health", 120, server)
        env["PREFECT_API_URL"] = api
        serving = start([sys.executable, "-m", "mixllm.cli", "--params", str(params), "deploy"],
                        log_path=tmp_path / "deploy.log", env=env, cwd=tmp_path)
        import httpx

        deadline = time.monotonic() + 120
        schedules = {}
        while time.monotonic() < deadline and len(schedules) < 2:
            assert serving.poll() is None, (tmp_path / "deploy.log").read_text()[-3000:]
            response = httpx.post(f"{api}/deployments/filter", json={}, timeout=10)
            for deployment in response.json():
                crons = [s["schedule"].get("cron") for s in deployment.get("schedules", [])]
                if crons:
                    schedules[deployment["name"]] = crons[0]
            time.sleep(1)
        config = load_config(params)
        assert schedules == {"nightly": config.pipeline.training_cron, "hourly": config.pipeline.continual_cron}
    finally:
        if serving is not None:
            stop(serving)
        stop(server)
