"""Crash safety: `kill -9` in the middle of an import, a registration and a continual update.

Each job is run once to see how long it takes, then killed (SIGKILL, no cleanup) at points spread
over that time, and restarted. Wherever it died, afterwards: the training store reads and holds
either nothing or all of the file; the champion is unchanged unless a registration finished; the
watermark has not passed feedback that no registered version learned; and a rerun completes.
"""

import os
import signal
import sys
import time

import pytest

from mixllm.cli.processes import start
from mixllm.config import load_config
from mixllm.io.data import ingest, load_interactions
from mixllm.io.registry import Registry
from mixllm.io.store import InteractionLog
from mixllm.jobs.continual import consumed_feedback
from mixllm.jobs.training import run_training
from synthetic import make_log, write_params

pytestmark = pytest.mark.slow  # real servers, flows or training: `-m "not slow"` skips them

KILL_AT = (0.5, 0.75, 0.9)  # shares of an undisturbed run's duration (most of it is starting Python)


def _mixllm(root, *args):
    return [sys.executable, "-m", "mixllm.cli", "--params", str(root / "params.yaml"), *args]


def _timed_run(command, root, **env) -> float:
    started = time.monotonic()
    process = start(command, log_path=root / "crash.log", cwd=root, env=_env(**env))
    assert process.wait(timeout=600) == 0, (root / "crash.log").read_text()[-3000:]
    return time.monotonic() - started


def _killed_after(command, root, delay_s: float, **env) -> bool:
    """Run `command` and SIGKILL it after `delay_s`; True if it was still running (and so was killed)."""
    process = start(command, log_path=root / "crash.log", cwd=root, env=_env(**env))
    try:
        process.wait(timeout=delay_s)
        return False
    except Exception:  # still running: kill it the hard way
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        return True


def _env(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MIXLLM_ROUTERBENCH": "", **extra}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A trained project with a champion (version 1) and 30 rated decisions in its feedback store."""
    root = tmp_path_factory.mktemp("crash")
    write_params(root, evaluation={"baselines": ["random"]}, gate={"max_overhead_ms": 5000})
    make_log(n_queries=120, seed=8).to_csv(root / "log.csv", index=False)
    config = load_config(root / "params.yaml")
    ingest(root / "log.csv", config)
    assert run_training(config, progress=False, baselines=[]).registration.promoted
    registry = Registry(config)
    router, version = registry.load_router("champion")
    store = InteractionLog(config.sqlalchemy_url(config.service.feedback_store_url))
    truth = make_log(30, seed=99)
    queries = truth.drop_duplicates("query_id")["query"].tolist()
    for query, decision in zip(queries, router.route(queries)):
        decision_id = store.log_decision(query, decision.llm, model_version=version, lambda_=decision.lambda_)
        row = truth[(truth["query"] == query) & (truth["llm"] == decision.llm)].iloc[0]
        store.add_feedback(decision_id=decision_id, quality=float(row["quality"]), kind="binary")
    store.dispose()
    return root


def test_a_killed_import_stores_all_of_the_file_or_nothing(project, tmp_path):
    big = make_log(n_queries=3000, seed=21)
    big["query_id"] = "big-" + big["query_id"].astype(str)
    big["query"] = big["query"] + " (batch " + big["query_id"] + ")"
    path = tmp_path / "big.csv"
    big.to_csv(path, index=False)
    config = load_config(project / "params.yaml")
    before = len(load_interactions(config))
    command = _mixllm(project, "data", "import", str(path))
    # How long an undisturbed import takes, measured on a copy of the store so this one stays untouched.
    probe = tmp_path / "probe"
    probe.mkdir()
    write_params(probe, evaluation={"baselines": ["random"]})
    duration = _timed_run(_mixllm(probe, "data", "import", str(path)), probe)
    killed = 0
    for share in KILL_AT:
        killed += _killed_after(command, project, share * duration)
        stored = load_interactions(config)  # the store still reads
        new = len(stored) - before
        assert new in (0, len(big)), f"killed at {share:.0%}: {new} of {len(big)} rows stored (half a file)"
    assert killed, "at least one import was killed mid-way"
    _timed_run(command, project)  # a rerun finishes, and adds nothing twice
    assert len(load_interactions(config)) - before == len(big)

    # One more kill at an exact point, whatever the machine's speed: the new part is written to its
    # temporary file and not yet renamed. The store is as before; the next import removes the
    # half-written part (it names a process that no longer runs) and stores the file once.
    exact = make_log(n_queries=200, seed=22)
    exact["query_id"] = "exact-" + exact["query_id"].astype(str)
    exact["query"] = exact["query"] + " (exact " + exact["query_id"] + ")"
    exact_path = tmp_path / "exact.csv"
    exact.to_csv(exact_path, index=False)
    store_dir = config.path(config.data.store_dir)
    script = ("import os, sys; real = os.replace; "
              "os.replace = lambda src, dst, *a, **k: os._exit(9) if str(src).endswith('writing.tmp') "
              "else real(src, dst, *a, **k); "
              "from mixllm.cli.commands import app; app(['--params', sys.argv[1], 'data', 'import', sys.argv[2]])")
    stored_before = len(load_interactions(config))
    process = start([sys.executable, "-c", script, str(project / "params.yaml"), str(exact_path)],
                    log_path=project / "crash.log", cwd=project, env=_env())
    assert process.wait(timeout=600) == 9, (project / "crash.log").read_text()[-3000:]
    assert len(load_interactions(config)) == stored_before, "killed before the rename: nothing stored"
    assert list(store_dir.glob("part-*.parquet.*.tmp")), "the killed import left its half-written part"
    _timed_run(_mixllm(project, "data", "import", str(exact_path)), project)
    assert len(load_interactions(config)) - stored_before == len(exact)
    assert not list(store_dir.glob("*.tmp")), "the rerun removed what the killed import left"


def test_a_killed_registration_leaves_the_champion_and_a_rerun_registers(project, tmp_path):
    config = load_config(project / "params.yaml")
    registry = Registry(config)
    champion = registry.alias_version("champion")
    command = _mixllm(project, "pipeline", "register")
    scratch = tmp_path / "tmp"  # the runs' temporary folder: what a killed run leaves stays in the test's
    scratch.mkdir()
    duration = _timed_run(command, project, TMPDIR=str(scratch))
    versions = {v.version for v in registry.versions()}
    killed = 0
    # Late in the run first (mid-way through logging to MLflow; each run costs ~10 s). A run can
    # outpace the timed one (its MLflow store already exists), finish before the kill, and then the
    # next, earlier point is tried: one kill is the point of the test.
    for share in sorted(KILL_AT, reverse=True):
        before = registry.alias_version("champion")
        if _killed_after(command, project, share * duration, TMPDIR=str(scratch)):
            killed += 1
            after = registry.alias_version("champion")
            newest = max(v.version for v in registry.versions())
            assert after in (before, newest), "the champion is the old one, or a version that finished registering"
            assert {v.version for v in registry.versions()} >= versions, "no version was lost"
            break
    assert killed, "at least one registration was killed mid-way"
    router, number = registry.load_router("champion")
    assert number >= champion and router.route(["What is 2 plus 2?"])[0].llm in router.llms_
    # One more kill at an exact point: MLflow has saved the
    # model to its temporary folder and starts the upload (Model.log calls MlflowClient.log_model_artifacts).
    # The killed run cannot remove its copies of the model (~110 MB each: the calibrated router it
    # logs, and MLflow's save); the rerun, in another process, removes them (and the random kill's).
    script = ("import os, sys; import mlflow; "
              "mlflow.MlflowClient.log_model_artifacts = lambda *args, **kwargs: os._exit(9); "
              "from mixllm.cli.commands import app; app(['--params', sys.argv[1], 'pipeline', 'register'])")
    process = start([sys.executable, "-c", script, str(project / "params.yaml")], log_path=project / "crash.log",
                    cwd=project, env=_env(TMPDIR=str(scratch)))
    assert process.wait(timeout=600) == 9, (project / "crash.log").read_text()[-3000:]
    left_by_the_kill = sorted(p.name for p in scratch.iterdir() if any(p.rglob("MLmodel")))
    assert left_by_the_kill, "the killed runs left MLflow's save of the model behind"
    _timed_run(command, project, TMPDIR=str(scratch))
    left = [p.name for p in scratch.iterdir() if p.name.startswith("mixllm-register-") or any(p.rglob("MLmodel"))]
    assert left == [], f"left by the killed run: {left_by_the_kill}; still there after the rerun: {left}"


def test_a_killed_continual_update_never_skips_feedback(project):
    config = load_config(project / "params.yaml")
    store = InteractionLog(config.sqlalchemy_url(config.service.feedback_store_url))
    last_id = int(store.feedback_since(0)["feedback_id"].max())
    command = _mixllm(project, "continual")
    killed = 0
    for delay_s in (4.0, 8.0):  # the update loads the champion, learns, evaluates and registers
        killed += _killed_after(command, project, delay_s)
        watermark = store.watermark()
        learned = [v.tags["mixllm.feedback_ids"] for v in Registry(config).versions() if "mixllm.feedback_ids" in v.tags]
        assert watermark == 0 or f"1-{watermark}" in learned, (
            f"watermark {watermark} but no registered version learned feedback 1-{watermark}: {learned}")
        assert len(consumed_feedback(config)) == watermark
    assert killed, "at least one run was killed mid-way"
    _timed_run(command, project)  # the restart learns what the killed runs did not, and nothing twice
    assert store.watermark() == last_id
    learned = [v.tags["mixllm.feedback_ids"] for v in Registry(config).versions() if "mixllm.feedback_ids" in v.tags]
    assert learned == [f"1-{last_id}"], f"each feedback row learned by exactly one version: {learned}"

    # The narrowest window, made on purpose: the version is registered, the watermark not yet moved.
    from mixllm.jobs.continual import read_new_feedback, recover_watermark, register_update, update_champion

    for i in range(12):
        store.add_feedback(query=f"What is {i} plus 1?", llm="strong", quality=1.0, request_id=f"late-{i}")
    rows, before = read_new_feedback(config)
    router_dir, champion, _ = update_champion(config, rows)
    register_update(config, router_dir, champion, rows, before)  # ... and the process dies here
    assert store.watermark() == last_id
    assert recover_watermark(config) == last_id + 12, "the next run moves it to what the version learned"
    assert read_new_feedback(config)[0].empty, "and has nothing left to learn twice"
    store.dispose()

