"""One walk through every user journey with the real components, on small data the test makes:

train (Prefect flow) -> registry v1 champion -> BentoML service -> /route -> /feedback ->
continual flow -> v2 registered and promoted -> the service reloads v2 -> `mixllm registry rollback`
-> the service serves v1 again and routes as v1 did. `dvc repro` in a fresh clone of the project is
tests/test_dvc.py.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mixllm.cli.processes import free_port, start, stop, wait_http
from mixllm.config import load_config
from mixllm.io.registry import Registry
from synthetic import make_log, write_params

pytestmark = pytest.mark.slow  # real servers, flows or training: `-m "not slow"` skips them

ROOT = Path(__file__).resolve().parents[2]
QUERIES = ["Write a python function that reverses a string.", "What is 31 plus 11?", "Who built the great wall?"]
TOKEN = "e2e-token"


def _mixllm(args, project, env):
    result = subprocess.run([sys.executable, "-m", "mixllm.cli", "--params", str(project / "params.yaml"), *args],
                            cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _version(base):
    return httpx.get(f"{base}/model", timeout=30).json()["version"]


def _wait_version(base, version, seconds=90):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _version(base) == version:
            return
        time.sleep(0.5)
    raise AssertionError(f"the service did not reach version {version}; it serves {_version(base)}")


def _routes(base):
    """What the router decides and predicts for fixed queries (the latency penalty is off here)."""
    out = []
    for query in QUERIES:
        body = httpx.post(f"{base}/route", json={"query": query}, timeout=60).json()
        out.append((body["llm"], body["model_version"],
                    [(c["llm"], round(c["quality"], 10), round(c["cost_usd"], 14)) for c in body["candidates"]]))
    return out


def test_every_journey_end_to_end(prefect_harness, tmp_path, monkeypatch):
    from mixllm.flows.continual import continual
    from mixllm.flows.training import run as run_training_flow

    project = tmp_path / "project"
    project.mkdir()
    write_params(project, service={"poll_interval_s": 1}, gate={"max_overhead_ms": 5000, "tolerance": 1.0},
                 decision={"latency_tolerance_s": 1e6}, evaluation={"baselines": ["random", "per_source"]})
    (project / "data/inbox").mkdir(parents=True)
    make_log(n_queries=120, seed=77).to_csv(project / "data/inbox/log.csv", index=False)
    monkeypatch.chdir(project)
    params = str(project / "params.yaml")
    config = load_config(params)
    registry = Registry(config)

    # Journey: scheduled retraining's training flow -> version 1 is the champion.
    trained = run_training_flow(params)
    assert trained["registration"]["version"] == 1 and registry.alias_version("champion") == 1

    # Journey: call the route endpoint of the BentoML service.
    port = free_port()
    env = {**os.environ, "MIXLLM_PARAMS": params, "MIXLLM_API_TOKEN": TOKEN, "BENTOML_HOME": str(tmp_path / "bentoml")}
    service = start([sys.executable, "-m", "bentoml", "serve", "mixllm.service.app:MixLLMService", "--host", "127.0.0.1",
                     "--port", str(port)], log_path=tmp_path / "serve.log", env=env, cwd=project)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/readyz", 180, service)
        v1_routes = _routes(base)
        assert {version for _, version, _ in v1_routes} == {1}
        # Feedback for a batch of decisions (every one retried once: stored once).
        log = make_log(n_queries=30, seed=78).drop_duplicates("query_id")
        routed = httpx.post(f"{base}/route_batch", json={"requests": [{"query": q} for q in log["query"]]}, timeout=120)
        assert routed.status_code == 200, routed.text
        for decision in routed.json():
            for _ in range(2):
                response = httpx.post(f"{base}/feedback", json={"decision_id": decision["decision_id"], "thumbs": True},
                                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
                assert response.status_code == 200, response.text

        # Journey: the continual flow learns from exactly that feedback -> version 2, promoted.
        learned = continual(params_path=params)
        assert learned["feedback_rows"] == 30 and learned["registration"]["version"] == 2
        assert learned["registration"]["promoted"], learned["registration"]["verdict"]
        assert continual(params_path=params)["registration"] is None, "no new feedback: nothing registered"
        _wait_version(base, 2)
        assert {version for _, version, _ in _routes(base)} == {2}

        # Journey: browse the registry, then roll back; the service serves version 1 again.
        listing = _mixllm(["registry", "list"], project, env)
        assert "v1" in listing and "v2" in listing and "champion" in listing
        assert "rolled back: version 2 -> version 1" in _mixllm(["registry", "rollback"], project, env)
        _wait_version(base, 1)
        assert _routes(base) == v1_routes, "after the rollback the service routes exactly as version 1 did"
    finally:
        stop(service)
