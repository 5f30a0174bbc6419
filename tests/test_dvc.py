"""`dvc repro` in a fresh clone of the project (its own dvc.yaml and DVC config), on synthetic data."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from synthetic import make_log, write_params

pytestmark = pytest.mark.slow  # real servers, flows or training: `-m "not slow"` skips them

ROOT = Path(__file__).resolve().parents[1]


def _run(command, cwd, env):
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def _ran(output):
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture
def repo(tmp_path):
    """A fresh git clone of the project, as a new user gets it, with small settings and data of our own."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    if not (clone / "dvc.yaml").is_file():
        pytest.skip("the project has no commits with dvc.yaml yet (run from a clone of main)")
    write_params(clone, complete=True, evaluation={"baselines": ["random"]}, gate={"max_overhead_ms": 5000})
    log = tmp_path / "log.csv"
    make_log(n_queries=90, seed=31).to_csv(log, index=False)
    env = {**os.environ, "MIXLLM_ROUTERBENCH": str(log), "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MIXLLM_PARAMS", None)
    return clone, env


def test_repro_noop_and_partial_rerun(repo):
    root, env = repo
    dvc = [sys.executable, "-m", "dvc"]
    first = _run([*dvc, "repro"], root, env)
    assert _ran(first) == {"ingest", "split", "tags", "encoder", "predictors", "evaluate", "register"}
    assert (root / "data/pipeline/metrics.json").is_file() and (root / "dvc.lock").is_file()
    assert (root / "data/pipeline/registration.json").is_file()
    status = _run(["git", "status", "--porcelain", "--untracked-files=all"], root, env)
    untracked = sorted(line[3:] for line in status.splitlines() if line.startswith("??"))
    assert untracked == ["dvc.lock"], f"git ignores every output; only dvc.lock is new: {untracked}"
    second = _run([*dvc, "repro"], root, env)
    assert _ran(second) == set() and "up to date" in second
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "first run"], root, env)
    # An experiment with one decision setting changed re-runs the predictors stage and what follows,
    # not ingest, tags or the encoder (which settings each stage reads: tests/test_repo.py).
    exp = _run([*dvc, "exp", "run", "-S", "decision.lambda=0.3"], root, env)
    assert _ran(exp) == {"predictors", "evaluate", "register"}
    diff = _run([*dvc, "params", "diff", "--json"], root, env)
    changed = json.loads(diff[diff.index("{"):])["params.yaml"]
    assert list(changed) == ["decision.lambda"] and changed["decision.lambda"]["new"] == 0.3
    metrics = _run([*dvc, "metrics", "diff", "--all", "--json"], root, env)
    changes = json.loads(metrics[metrics.index("{"):])["data/pipeline/metrics.json"]
    budget = changes["quality_at_budget_pct"]
    assert budget["old"] is not None and budget["new"] is not None, "the committed run's figures come from the cache"
