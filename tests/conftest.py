"""Shared fixtures. The environment is made offline and private before any library is imported."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

_PRIVATE = Path(tempfile.mkdtemp(prefix="mixllm-tests-"))
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_HOME": str(_PRIVATE / "prefect"),
    "DVC_NO_ANALYTICS": "1",
    "BENTOML_DO_NOT_TRACK": "true",
    "BENTOML_HOME": str(_PRIVATE / "bentoml"),
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)
os.environ.pop("MIXLLM_PARAMS", None)

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

from mixllm.config import load_config  # noqa: E402
from synthetic import make_log, small_config, write_params  # noqa: E402

def _shared_subset_dir() -> Path:
    """The shared RouterBench subset: next to $MIXLLM_ROUTERBENCH if set, else ../shared beside the repo."""
    configured = os.environ.get("MIXLLM_ROUTERBENCH")
    if configured:
        path = Path(configured)
        return path.parent if path.is_file() else path
    return Path(__file__).resolve().parents[2] / "shared/data/routerbench_subset"


SHARED_SUBSET = _shared_subset_dir()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with a small params.yaml for the synthetic LLMs; the cwd for the test."""
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MIXLLM_ROUTERBENCH", raising=False)
    return tmp_path


@pytest.fixture
def config(project):
    return load_config(project / "params.yaml")


@pytest.fixture
def synthetic_log():
    return make_log(n_queries=60, seed=0)


@pytest.fixture(scope="session")
def shared_subset() -> Path:
    if not (SHARED_SUBSET / "routerbench_subset_long.csv.gz").is_file():
        pytest.skip(f"the shared RouterBench subset is not at {SHARED_SUBSET} (set MIXLLM_ROUTERBENCH)")
    return SHARED_SUBSET


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the session (it takes ~10 s to start): the flow tests and the
    journeys run their flows against it."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def train_log():
    return make_log(n_queries=150, seed=11)


@pytest.fixture(scope="session")
def fitted(train_log):
    """A router fitted once per session on the synthetic log (no fine-tuning: fast)."""
    from mixllm.core.router import MixLLMRouter

    return MixLLMRouter(small_config(), progress=False).fit(train_log)


def pytest_sessionfinish(session, exitstatus):
    """Leave no temporary folders behind: this session's private homes (Prefect, BentoML), and the
    downloads and registration copies of processes the tests killed (~100-200 MB each), which the
    project itself removes only at its next load or registration."""
    import shutil

    from mixllm.io.scratch_folders import DOWNLOAD_PREFIX, REGISTRATION_PREFIX, remove_orphaned_folders

    for prefix in (DOWNLOAD_PREFIX, REGISTRATION_PREFIX):
        remove_orphaned_folders(prefix=prefix)
    shutil.rmtree(_PRIVATE, ignore_errors=True)
