"""The scale-out path on a real PostgreSQL server (pgserver: the server binaries from PyPI, started
and stopped here): the feedback store's exactly-once writes from many threads and from two
processes, the continual watermark when commits land out of order, and the MLflow registry
(registration, promotion, rollback) on a PostgreSQL backend store."""

import json
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import psutil
import pytest
import sqlalchemy as sa

from mixllm.cli.processes import free_port, stop, wait_http
from mixllm.config import config_from_dict, load_config
from mixllm.io.data import ingest
from mixllm.io.registry import Registry
from mixllm.io.store import InteractionLog
from mixllm.io.store_schema import feedback
from mixllm.jobs.continual import read_new_feedback
from mixllm.jobs.training import run_training
from servers import llms_behind, serve
from synthetic import make_log, write_params

pytestmark = pytest.mark.slow  # real servers, flows or training: `-m "not slow"` skips them


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """One PostgreSQL server for the module (its socket in a temporary folder); each test makes its
    own database on it. Stopped at the end, and checked stopped by its process id."""
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("postgres") / "data", cleanup_mode="delete")
    pid = server.get_pid()
    admin = sa.create_engine(_sqlalchemy(server.get_uri()), isolation_level="AUTOCOMMIT")
    counter = iter(range(1_000))

    def database(name: str) -> str:
        name = f"{name}_{next(counter)}"
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        return _sqlalchemy(server.get_uri(database=name))

    def drop(url: str) -> None:  # the database goes away under its users (as a server that is down)
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE "{sa.engine.make_url(url).database}" WITH (FORCE)'))

    try:
        yield SimpleNamespace(database=database, drop=drop, pid=pid)
    finally:
        admin.dispose()
        server.cleanup()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _running(pid):
            time.sleep(0.2)
        assert not _running(pid), f"PostgreSQL (pid {pid}) still runs after the test stopped it"


def _sqlalchemy(uri: str) -> str:
    return uri.replace("postgresql://", "postgresql+psycopg://", 1)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_feedback_is_stored_exactly_once_under_concurrent_retries(postgres):
    store = InteractionLog(postgres.database("threads"))
    decisions = [store.log_decision(f"query {i}", "coder", model_version=1, lambda_=0.5, request_id=f"route-{i}")
                 for i in range(120)]
    # Every decision's feedback sent 4 times, and 120 direct reports each 4 times, from 32 threads at once.
    calls = [("decision", d) for d in decisions] * 4 + [("direct", f"report-{i}") for i in range(120)] * 4

    def send(call):
        kind, key = call
        if kind == "decision":
            return key, store.add_feedback(decision_id=key, quality=1.0, kind="binary")
        return key, store.add_feedback(query=f"direct {key}", llm="strong", quality=0.5, request_id=key)

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(send, calls))
    by_key: dict[str, set[int]] = {}
    created: dict[str, int] = {}
    for key, stored in results:
        by_key.setdefault(key, set()).add(stored.feedback_id)
        created[key] = created.get(key, 0) + int(stored.created)
    assert all(len(ids) == 1 for ids in by_key.values()), "every retry answers with the first row's id"
    assert set(created.values()) == {1}, "exactly one call per key created its row"
    assert store.count("feedback") == 240 and store.count("decisions") == 120
    rows = store.feedback_since(0)
    assert rows["feedback_id"].is_unique and set(rows["feedback_id"]) == {i for ids in by_key.values() for i in ids}
    store.dispose()


WRITER = textwrap.dedent("""
    import json, random, sys
    from mixllm.io.store import InteractionLog

    url, seed, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    store = InteractionLog(url)  # both processes create the schema at once on an empty database
    keys = list(range(300))
    random.Random(seed).shuffle(keys)
    ids = {}
    for i in keys:
        decision = store.log_decision(f"q{i}", "coder", model_version=1, lambda_=0.5, request_id=f"route-{i}")
        stored = store.add_feedback(decision_id=decision, quality=1.0, kind="binary")
        ids[i] = [decision, stored.feedback_id, stored.created]
    store.dispose()
    json.dump(ids, open(out, "w"))
""")


def test_a_server_that_accepts_and_never_answers_fails_the_connection_instead_of_hanging():
    """A PostgreSQL address whose listener accepts the connection and never speaks (a wedged
    server, a network that drops packets): opening the log fails after the connect timeout (the
    busy timeout, at least 2 s) instead of waiting forever, as libpq does by default."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    outcome: list[BaseException] = []

    def open_log() -> None:
        try:
            InteractionLog(f"postgresql+psycopg://mixllm@127.0.0.1:{listener.getsockname()[1]}/mixllm",
                           busy_timeout_s=2.0)
        except BaseException as exc:  # noqa: BLE001 - what it fails with is the assertion below
            outcome.append(exc)

    opener = threading.Thread(target=open_log, daemon=True)
    try:
        opener.start()
        opener.join(60)  # a liveness bound, thirty times the timeout: the failure is a hang
        assert not opener.is_alive(), "still waiting for a server that never answers"
        assert outcome and isinstance(outcome[0], sa.exc.OperationalError), outcome
        assert "timeout" in str(outcome[0]).lower(), outcome
    finally:
        listener.close()


def test_a_database_that_goes_away_is_a_retry_never_a_crash(postgres):
    """Every read and write the service makes answers a lost database with StoreBusyError (the
    service's 503 with Retry-After), not the driver's OperationalError (a 500)."""
    from mixllm.io.attempts import AttemptLog
    from mixllm.io.ledger import TenantLedger
    from mixllm.io.sessions import SessionLog
    from mixllm.core.errors import StoreBusyError

    url = postgres.database("vanishing")
    store = InteractionLog(url, busy_timeout_s=2.0)
    ledger, sessions, attempts = TenantLedger(store, key_cache_s=0.0), SessionLog(store, ttl_s=60.0), AttemptLog(store)
    decision_id = store.log_decision("q", "coder", model_version=1, lambda_=0.5, request_id="route-1")
    assert store.decision_by_request("route-1")["decision_id"] == decision_id
    postgres.drop(url)
    calls = {
        "decision_by_request": lambda: store.decision_by_request("route-1"),
        "log_decision": lambda: store.log_decision("q2", "coder", model_version=1, lambda_=0.5),
        "add_feedback": lambda: store.add_feedback(quality=1.0, decision_id=decision_id),
        "decisions_with_feedback": store.decisions_with_feedback,
        "tenant_of": lambda: ledger.tenant_of("some-key"),
        "llm_of": lambda: sessions.llm_of("a-session"),
        "record attempt": lambda: attempts.record(decision_id=decision_id, attempt=1, llm="coder", outcome="ok",
                                                  latency_s=0.1),
    }
    for name, call in calls.items():
        with pytest.raises(StoreBusyError, match="retry shortly"):
            call()
            pytest.fail(f"{name} went through on a database that is gone")
    store.dispose()


def test_two_processes_write_one_database_exactly_once(postgres, tmp_path):
    """Two service replicas on one database: the same requests reach both (a load balancer's retry)."""
    url = postgres.database("replicas")
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    outputs = [tmp_path / f"writer{n}.json" for n in (1, 2)]
    processes = [subprocess.Popen([sys.executable, str(script), url, str(n), str(out)], stderr=subprocess.PIPE, text=True)
                 for n, out in enumerate(outputs)]
    for process in processes:
        _, errors = process.communicate(timeout=180)
        assert process.returncode == 0, errors[-3000:]
    first, second = (json.loads(out.read_text()) for out in outputs)
    assert all(first[k][:2] == second[k][:2] for k in first), "both replicas answer with the same decision and row"
    assert all(first[k][2] + second[k][2] == 1 for k in first), "exactly one replica created each feedback row"
    store = InteractionLog(url)
    assert store.count("decisions") == 300 and store.count("feedback") == 300
    store.dispose()


def test_the_watermark_never_passes_a_row_that_commits_late(postgres):
    """Replicas commit out of order: id 1 can commit after id 2. A continual run that took id 2
    and moved the watermark past 1 would never learn row 1; rows younger than the settle time wait."""
    url = postgres.database("watermark")
    store = InteractionLog(url)
    # A long settle time while the late row is uncommitted (however slow this machine, the visible row
    # is younger than it), a short one after: the same rows, now older than it.
    config = config_from_dict({"service": {"feedback_store_url": url}, "pipeline": {"feedback_settle_s": 600.0}})
    settled = config_from_dict({"service": {"feedback_store_url": url}, "pipeline": {"feedback_settle_s": 2.0}})
    slow_writer = store.engine.connect()
    transaction = slow_writer.begin()
    late_id = slow_writer.execute(feedback.insert().values(
        query="late", llm="coder", quality=1.0, kind="binary", created_at=sa.func.now())).inserted_primary_key[0]
    early = store.add_feedback(query="early", llm="coder", quality=0.0, request_id="early")
    assert early.feedback_id > late_id, "the later insert committed first"

    assert store.feedback_since(0)["feedback_id"].tolist() == [early.feedback_id], "row 1 is not visible yet"
    rows, watermark = read_new_feedback(config)
    assert rows.empty and watermark == 0, "the visible row is younger than the settle time: nothing is taken"

    transaction.commit()
    slow_writer.close()
    time.sleep(2.2)
    rows, _ = read_new_feedback(settled)
    assert rows["feedback_id"].tolist() == [late_id, early.feedback_id], "both rows, in id order"
    store.set_watermark(int(rows["feedback_id"].max()))
    assert read_new_feedback(config)[0].empty and store.watermark() == early.feedback_id
    store.dispose()


@pytest.fixture(scope="module")
def pg_project(postgres, tmp_path_factory):
    """A trained project whose MLflow registry and decision log both live in PostgreSQL, version 1
    its champion. Its LLMs have upstreams with a key (no test here calls them); a client may send
    bursts of 40 queries, then one every 100 s: a test runs a client out however slow the machine."""
    root = tmp_path_factory.mktemp("pg_project")
    backend, decisions = postgres.database("mlflow"), postgres.database("decisions")
    write_params(root, llms=llms_behind("http://127.0.0.1:9/v1"), evaluation={"baselines": ["random"]}, gate={"max_overhead_ms": 5000},
                 mlflow={"tracking_uri": backend, "artifact_location": str(root / "artifacts")},
                 service={"feedback_store_url": decisions, "client_rate_per_s": 0.01, "client_burst": 40})
    make_log(n_queries=90, seed=12).to_csv(root / "log.csv", index=False)
    config = load_config(root / "params.yaml")
    ingest(root / "log.csv", config)
    first = run_training(config, progress=False, baselines=[])
    return SimpleNamespace(root=root, config=config, first=first, mlflow=backend, decisions=decisions)


def test_two_service_replicas_on_one_database_store_each_feedback_once_and_each_limits_a_flood(pg_project):
    """Two `bentoml serve` processes behind one load balancer, on one PostgreSQL database for the
    decision log and one for the registry. Each decision's feedback reaches both replicas (the
    balancer's retry): one row, both answers name it. The proxy, which spends upstream keys, wants a
    token on both. A client that floods one replica is refused there with a 429 (each replica keeps
    its own buckets: the limit is per process, README "Scale out")."""
    token = "replica-token"
    auth = {"Authorization": f"Bearer {token}"}
    env = {"MIXLLM_API_TOKEN": token, "STUB_KEY": "upstream-key"}
    ports = [free_port(), free_port()]
    processes = [serve(pg_project.root, port, log_name=f"replica{n}.log", extra_env=env) for n, port in enumerate(ports)]
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for base, process in zip(bases, processes):
            wait_http(f"{base}/readyz", 180, process)
        champion = Registry(pg_project.config).alias_version("champion")
        assert [httpx.get(f"{base}/model", timeout=30).json()["version"] for base in bases] == [champion] * 2
        routed = [httpx.post(f"{bases[i % 2]}/route", json={"query": f"Write a python function number {i}."},
                             timeout=60) for i in range(10)]
        assert [r.status_code for r in routed] == [200] * 10, routed[0].text
        sends = [(base, r.json()["decision_id"]) for r in routed for base in bases]

        def send(call):
            base, decision_id = call
            return decision_id, httpx.post(f"{base}/feedback", headers=auth, timeout=60,
                                           json={"decision_id": decision_id, "quality": 0.5})

        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(send, sends))
        assert all(answer.status_code == 200 for _, answer in answers), [a.text for _, a in answers][:3]
        ids: dict[str, set[int]] = {}
        created: dict[str, int] = {}
        for decision_id, answer in answers:
            ids.setdefault(decision_id, set()).add(answer.json()["feedback_id"])
            created[decision_id] = created.get(decision_id, 0) + int(answer.json()["created"])
        assert all(len(found) == 1 for found in ids.values()), "both replicas answer with the one row's id"
        assert set(created.values()) == {1}, "exactly one replica created each row"
        store = InteractionLog(pg_project.decisions)
        assert store.count("decisions") == 10 and store.count("feedback") == 10
        store.dispose()
        chat = {"model": "mixllm", "messages": [{"role": "user", "content": "hi"}]}
        for base in bases:
            refused = httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=30)
            assert refused.status_code == 401, "the proxy spends the upstream keys: no chat without a token"
        # Five routes of this client so far on each replica; one batch of 40 spends the rest of the
        # burst (a client with tokens left may overdraw), and the next call waits 100 s per token owed.
        batch = {"requests": [{"query": f"flood {i}"} for i in range(40)]}
        assert httpx.post(f"{bases[0]}/route_batch", json=batch, timeout=60).status_code == 200
        flooded = httpx.post(f"{bases[0]}/route", json={"query": "one more"}, timeout=30)
        assert flooded.status_code == 429 and int(flooded.headers["retry-after"]) >= 1
        assert "service.client_rate_per_s" in flooded.json()["error"]
        assert httpx.post(f"{bases[1]}/route", json={"query": "one more"}, timeout=30).status_code == 200
    finally:
        for process in processes:
            stop(process)
    assert all(process.poll() is not None for process in processes), "both replicas stopped by their pids"


def test_mlflow_registry_on_postgresql_registers_promotes_and_rolls_back(pg_project):
    config, backend, root = pg_project.config, pg_project.mlflow, pg_project.root
    first = pg_project.first
    assert first.registration.version == 1 and first.registration.promoted
    other = load_config(root / "params.yaml", overrides={"predictors.quality.ridge": 50.0})
    second = run_training(other, progress=False, baselines=[])
    registry = Registry(config)
    assert second.registration.version == 2
    registry.promote(2, "test: serve version 2")
    assert registry.alias_version("champion") == 2
    assert registry.rollback() == (2, 1) and registry.alias_version("champion") == 1
    router, number = registry.load_router("champion")
    assert number == 1 and router.route(["What is 2 plus 2?"])[0].llm in router.llms_
    tags = {v.version: v.tags for v in registry.versions()}
    assert "rollback from version 2" in tags[1]["mixllm.promoted"]
    engine = sa.create_engine(backend)
    with engine.connect() as connection:  # the registry really lives in PostgreSQL
        aliases = connection.execute(sa.text("SELECT alias, version FROM registered_model_aliases")).all()
    engine.dispose()
    assert ("champion", 1) in [tuple(row) for row in aliases]

