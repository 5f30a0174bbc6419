"""Budgets that pace spend: the controller, the calendar periods, the key and spend records, and
spend that fails closed when its database refuses a write."""

import json
import sqlite3
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from mixllm.config import PacingConfig, config_from_dict
from mixllm.core.budgets import BudgetPacer, binding, period_bounds, standings
from mixllm.core.errors import ConfigError
from mixllm.io.ledger import TenantLedger, UnknownKeyError
from mixllm.io.store import InteractionLog

DAY = datetime(2026, 3, 4, tzinfo=timezone.utc)


def replay_day(budget_usd, base_lambda=0.3, n=1500, seed=0, settings=PacingConfig()):
    """A day of queries whose cost falls as lambda rises (a dear LLM's share is a logistic curve in
    log lambda, the rest cheap); returns spend / budget at the end of the day."""
    rng = np.random.default_rng(seed)
    pacer, spent = BudgetPacer(settings), 0.0
    for t in np.sort(rng.uniform(0, 86_400, n)):
        now = DAY + timedelta(seconds=float(t))
        standing = standings({"day": budget_usd}, {"day": spent}, now, settings.warmup_share)
        lambda_ = pacer.effective_lambda(base_lambda, pacer.factor("t", standing, now))
        dear_share = 1 / (1 + (lambda_ / 0.3) ** 4)
        spent += (1.0 if rng.random() < dear_share else 0.05) * rng.uniform(0.5, 1.5)
    return spent / budget_usd


@pytest.mark.parametrize("share", [0.15, 0.3, 0.6])
def test_pacing_ends_the_day_within_5_percent_of_the_budget(share):
    # Unpaced, lambda 0.3 spends ~0.53 per query: budgets below and above that are both met.
    assert replay_day(share * 1500) == pytest.approx(1.0, abs=0.05)


def test_without_pacing_the_same_day_misses_the_budget():
    off = PacingConfig(proportional_gain=0.0, integral_gain=0.0)
    assert abs(replay_day(0.15 * 1500, settings=off) - 1.0) > 0.5, "the test's budgets need pacing to be met"


def test_the_factor_rises_ahead_of_the_line_falls_behind_it_and_stays_bounded():
    settings = PacingConfig(max_lambda_factor=10)
    noon = DAY + timedelta(hours=12)

    def factor(spent):
        return BudgetPacer(settings).factor("t", standings({"day": 10.0}, {"day": spent}, noon, 0.02), noon)

    assert factor(5.0) == pytest.approx(1.0)  # on the line: half the budget at half the day
    assert factor(7.0) > 1.0 > factor(3.0)
    assert factor(1e6) == pytest.approx(10.0) and factor(0.0) >= 0.1 - 1e-12
    assert BudgetPacer(settings).factor("t", [], noon) == 1.0, "no budget, no pacing"


def test_periods_and_the_binding_budget():
    assert period_bounds("month", datetime(2026, 12, 31, 23, tzinfo=timezone.utc)) == (
        datetime(2026, 12, 1, tzinfo=timezone.utc), datetime(2027, 1, 1, tzinfo=timezone.utc))
    at = datetime(2026, 3, 4, 6, 30, tzinfo=timezone.utc)
    assert period_bounds("hour", at)[0] == datetime(2026, 3, 4, 6, tzinfo=timezone.utc)
    standing = standings({"day": 10.0, "hour": 1.0}, {"day": 2.0, "hour": 0.9}, at, 0.02)
    assert [s.period for s in standing] == ["hour", "day"]
    assert binding(standing).period == "hour", "the hour budget is further ahead of its line"
    spent = standings({"day": 10.0, "hour": 1.0}, {"day": 10.0, "hour": 0.1}, at, 0.02)
    assert binding(spent).period == "day" and binding(spent).exhausted
    early = standings({"day": 10.0}, {"day": 0.1}, DAY + timedelta(seconds=1), 0.02)[0]
    assert early.line_usd == pytest.approx(0.2) and early.pace == pytest.approx(0.5), "warm-up line"


def test_keys_are_hashed_revocable_and_spend_sums_by_period(tmp_path):
    ledger = TenantLedger(InteractionLog(f"sqlite:///{tmp_path / 'log.db'}"), key_cache_s=0)
    key_id, key = ledger.create_key("team")
    assert ledger.tenant_of(key) == "team" and ledger.tenant_of(key + "x") is None
    now = datetime(2026, 3, 4, 6, 30, tzinfo=timezone.utc)
    ledger.record_call(tenant="team", llm="a", cost_usd=1.0, estimated=False, at=now - timedelta(minutes=10))
    ledger.record_call(tenant="team", llm="a", cost_usd=2.0, estimated=True, at=now - timedelta(hours=2))
    ledger.record_call(tenant="team", llm="b", cost_usd=4.0, estimated=False, at=now - timedelta(days=3))
    ledger.record_call(tenant="team", llm="b", cost_usd=16.0, estimated=False, at=now - timedelta(days=5))  # last month
    ledger.record_call(tenant="other", llm="a", cost_usd=8.0, estimated=False, at=now)
    starts = {p: period_bounds(p, now)[0] for p in ("hour", "day", "month")}
    assert ledger.spent_since("team", starts) == {"hour": 1.0, "day": 3.0, "month": 7.0}
    frame = ledger.calls_frame(since=now - timedelta(days=4))
    assert sorted(frame["cost_usd"]) == [1.0, 2.0, 4.0, 8.0] and frame["estimated"].sum() == 1
    assert ledger.revoke(key_id) == "team" and ledger.tenant_of(key) is None
    with pytest.raises(UnknownKeyError, match="keys list"):
        ledger.revoke(key_id)


def test_budget_settings_that_are_wrong_fail_naming_the_key():
    llms = [{"name": "a", "input_usd_per_1k": 1, "output_usd_per_1k": 1}]
    with pytest.raises(ConfigError, match=r"budgets.tenants.0.allowed_llms.*'t'.*names b"):
        config_from_dict({"llms": llms, "budgets": {"tenants": [{"name": "t", "allowed_llms": ["b"]}]}})
    with pytest.raises(ConfigError, match=r"budgets.tenants.0.budgets_usd.*week"):
        config_from_dict({"budgets": {"tenants": [{"name": "t", "budgets_usd": {"week": 1}}]}})
    with pytest.raises(ConfigError, match=r"budgets.tenants.0.budgets_usd.*positive"):
        config_from_dict({"budgets": {"tenants": [{"name": "t", "budgets_usd": {"day": 0}}]}})
    with pytest.raises(ConfigError, match=r"repeated: t"):
        config_from_dict({"budgets": {"tenants": [{"name": "t"}, {"name": "t"}]}})


def _gateway(config, path):
    """The proxy's spending part on a real SQLite log whose writes give up after 0.2 s."""
    from mixllm.service.proxy import ChatProxy
    from mixllm.service.spending import TenantBudgets

    class Gateway(ChatProxy, TenantBudgets):
        def __init__(self):
            self.config = config
            self.ledger = TenantLedger(InteractionLog(f"sqlite:///{path}", busy_timeout_s=0.2))
            self.pacer = BudgetPacer(config.budgets.pacing)
            self._start_spend_records()  # its journal: under the config's root

    return Gateway()


def test_spend_that_cannot_be_written_is_kept_and_stops_the_tenants_calls_until_it_is(tmp_path):
    """Fails closed: the database is locked by another writer; the record waits in memory, the
    tenant's next call is a 503 (no spend nobody accounts for), and once the lock is gone the
    record is written and calls go through."""
    path = tmp_path / "log.db"
    config = config_from_dict({"llms": [{"name": "a", "input_usd_per_1k": 1, "output_usd_per_1k": 1}],
                               "budgets": {"tenants": [{"name": "t", "budgets_usd": {"day": 100}}]}}, root=tmp_path)

    gateway, tenant = _gateway(config, path), config.budgets.tenant("t")
    locker = sqlite3.connect(path, timeout=5, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        gateway._record_call(tenant, "a", 0.25, False, decision_id="d1", model_version=1, reference_cost_usd=1.0,
                             router_ms=2.0, attempts=1)  # logged, kept, not raised
        assert len(gateway._unwritten) == 1
        refused = gateway._spend_plan(tenant, ["a"], None, 1.0)
        assert refused.status_code == 503 and b"cannot be accounted for" in refused.body
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    plan = gateway._spend_plan(tenant, ["a"], None, 1.0)
    assert plan.candidates == ["a"] and not gateway._unwritten
    assert gateway.ledger.spent_since("t", {"day": datetime(2000, 1, 1, tzinfo=timezone.utc)}) == {"day": 0.25}


def test_a_failed_over_call_whose_decision_was_not_completed_teaches_the_llm_that_answered(tmp_path):
    """The proxy failed over from the policy's choice (a) to b, and the database refused both the
    decision's completion and the call's spend record. Once the record is written (the next call,
    the journal's replay, or the next feedback), the decision names the LLM that answered: feedback
    on it teaches b, not a, and the policy's choice stays in chosen_llm for off-policy evaluation."""
    from mixllm.core.errors import StoreBusyError

    path = tmp_path / "log.db"
    config = config_from_dict({"llms": [{"name": name, "input_usd_per_1k": 1, "output_usd_per_1k": 1}
                                        for name in ("a", "b")]}, root=tmp_path)
    gateway = _gateway(config, path)
    store = gateway.ledger.store
    decision_id = store.log_decision("a question", "a", model_version=1, lambda_=1.0)
    locker = sqlite3.connect(path, timeout=5, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        gateway._record_call(None, "b", 0.1, False, decision_id=decision_id, model_version=1,
                             reference_cost_usd=1.0, router_ms=2.0, attempts=2)  # kept, not written
        with pytest.raises(StoreBusyError):
            store.complete_decision(decision_id, cost_usd=0.1, latency_s=1.0, llm="b")
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert store.decision(decision_id)["llm"] == "a"
    gateway._write_spend_of("another decision")  # nothing waiting of that one: nothing written
    assert len(gateway._unwritten) == 1
    gateway._write_spend_of(decision_id)  # as /feedback on it does first
    decision = store.decision(decision_id)
    assert (decision["llm"], decision["chosen_llm"]) == ("b", "a")
    assert store.add_feedback(quality=1.0, decision_id=decision_id).llm == "b"
    # Feedback that came before the record was written is put right when it is.
    early = store.log_decision("another question", "a", model_version=1, lambda_=1.0)
    assert store.add_feedback(quality=0.0, decision_id=early).llm == "a"
    gateway._record_call(None, "b", 0.1, False, decision_id=early, model_version=1,
                         reference_cost_usd=1.0, router_ms=2.0, attempts=2)
    assert [row["llm"] for row in store.feedback_of(early)] == ["b"]
    gateway._record_call(None, "b", 0.1, False, decision_id=decision_id, model_version=1,
                         reference_cost_usd=1.0, router_ms=2.0, attempts=2)  # the same answer, again
    assert store.decision(decision_id)["chosen_llm"] == "a", "the policy's choice is kept once"


def test_past_max_unwritten_calls_every_caller_waits_until_the_records_are_written(tmp_path):
    """Memory is not the ledger: with too many call records waiting, callers without a budget get
    503s too, and nothing is dropped."""
    path = tmp_path / "log.db"
    config = config_from_dict({"llms": [{"name": "a", "input_usd_per_1k": 1, "output_usd_per_1k": 1}],
                               "service": {"max_unwritten_calls": 3}}, root=tmp_path)

    gateway = _gateway(config, path)
    locker = sqlite3.connect(path, timeout=5, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        for i in range(3):
            gateway._record_call(None, "a", 0.1, False, decision_id=f"d{i}", model_version=1, reference_cost_usd=1.0,
                                 router_ms=1.0, attempts=1)
        assert gateway._spend_plan(None, ["a"], None, 1.0).status_code == 503
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert gateway._spend_plan(None, ["a"], None, 1.0).candidates == ["a"]
    assert len(gateway.ledger.calls_frame()) == 3 and not gateway._unwritten


def test_spend_the_database_refuses_survives_a_restart_in_the_journal_and_is_written_once(config):
    """While the decision log refuses writes, an answered call's spend record goes to the journal on
    local disk; a restarted service writes it when the database takes it, and a record the database
    already has (a crash between its commit and the journal's rewrite) is not written twice."""
    from mixllm.io.ledger import calls
    from mixllm.service.spending import TenantBudgets

    url = config.sqlalchemy_url(config.service.feedback_store_url)

    class Service(TenantBudgets):  # what the service class gives the mixin
        def __init__(self):
            self.config = config
            self.ledger = TenantLedger(InteractionLog(url, busy_timeout_s=0.3), key_cache_s=0)
            self._start_spend_records()

    def answered(service, cost):
        service._record_call(None, "coder", cost, False, decision_id=None, model_version=None,
                             reference_cost_usd=None, router_ms=None, attempts=1)

    def stored():
        with first.ledger.store.engine.connect() as connection:
            return sorted(row.cost_usd for row in connection.execute(calls.select()))

    first = Service()
    journal = first.spend_journal.path
    locker = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=5)
    locker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    answered(first, 0.25)
    assert stored() == [] and len(first.spend_journal.pending()) == 1 and len(first._unwritten) == 1
    restarted = Service()  # the process died; the database still refuses
    assert len(restarted._unwritten) == 1 and journal.is_file()
    locker.rollback()
    locker.close()
    again = Service()  # the next start writes what the journal holds
    assert stored() == [0.25] and not journal.is_file()
    first._flush_spend()  # the first process, still holding the record: already stored, not again
    restarted._flush_spend()
    assert stored() == [0.25]
    # A crash between the database's commit and the journal's rewrite: the record is in both.
    answered(again, 0.5)
    row = again.ledger.calls_frame().iloc[-1]
    again.spend_journal.append({"tenant": None, "llm": "coder", "cost_usd": 0.5, "estimated": False,
                                "decision_id": None, "model_version": None, "reference_cost_usd": None,
                                "router_ms": None, "attempts": 1, "at": row["created_at"].to_pydatetime(),
                                "record_id": row["record_id"]})
    Service()
    assert stored() == [0.25, 0.5] and not journal.is_file()


def test_the_spend_journal_survives_a_torn_line_and_keeps_what_it_cannot_replay(tmp_path):
    from mixllm.io.spend_journal import SpendJournal

    journal = SpendJournal(tmp_path / "spend.jsonl")
    record = {"tenant": "t", "llm": "a", "cost_usd": 0.1, "estimated": False, "decision_id": None,
              "model_version": 1, "reference_cost_usd": None, "router_ms": None, "attempts": 1,
              "at": datetime.now(timezone.utc), "record_id": "r1"}
    journal.append(record)
    with open(journal.path, "a", encoding="utf-8") as torn:  # a crash mid-append
        torn.write('{"tenant": "t", "llm": "a", "cost')
    journal.append({**record, "record_id": "r2"})
    with open(journal.path, "a", encoding="utf-8") as foreign:
        foreign.write(json.dumps({**record, "at": record["at"].isoformat(), "record_id": "r3", "colour": "red"}) + "\n")
    pending = journal.pending()
    assert [r["record_id"] for r in pending] == ["r1", "r2"], "the torn line and the foreign one are not replayed"
    assert pending[0]["at"] == record["at"] and pending[0]["at"].tzinfo is not None
    journal.remove({"r1", "r2"})
    left = journal.path.read_text(encoding="utf-8").splitlines()
    assert len(left) == 2 and '"colour"' in left[1], "what cannot be replayed stays, for a person to read"


def test_a_record_the_database_refuses_for_good_is_set_aside_and_the_rest_are_written(tmp_path):
    from mixllm.io.ledger import calls

    path = tmp_path / "log.db"
    config = config_from_dict({"llms": [{"name": "a", "input_usd_per_1k": 1, "output_usd_per_1k": 1}]}, root=tmp_path)
    gateway = _gateway(config, path)
    bad = {"tenant": None, "llm": None, "cost_usd": 0.1, "estimated": False, "decision_id": None, "model_version": None,
           "reference_cost_usd": None, "router_ms": None, "attempts": 1, "at": datetime.now(timezone.utc),
           "record_id": "bad"}  # llm is NOT NULL: an IntegrityError, not a busy database
    gateway._unwritten.append(bad)
    gateway._record_call(None, "a", 0.25, False, decision_id=None, model_version=None, reference_cost_usd=None,
                         router_ms=None, attempts=1)
    with gateway.ledger.store.engine.connect() as connection:
        assert [row.cost_usd for row in connection.execute(calls.select())] == [0.25]
    assert gateway._unwritten == []
    rejected = (tmp_path / "data/spend_journal.jsonl.rejected").read_text(encoding="utf-8")
    assert '"bad"' in rejected and "IntegrityError" in rejected


def test_a_spend_journal_that_cannot_be_written_leaves_the_service_serving_with_records_in_memory(tmp_path):
    (tmp_path / "not-a-folder").write_text("a file where the journal's folder should be")
    config = config_from_dict({"llms": [{"name": "a", "input_usd_per_1k": 1, "output_usd_per_1k": 1}],
                               "service": {"spend_journal_path": "not-a-folder/spend.jsonl"}}, root=tmp_path)
    path = tmp_path / "log.db"
    gateway = _gateway(config, path)  # starts
    locker = sqlite3.connect(path, timeout=5, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        gateway._record_call(None, "a", 0.25, False, decision_id=None, model_version=None, reference_cost_usd=None,
                             router_ms=None, attempts=1)
        assert len(gateway._unwritten) == 1, "kept in memory when the journal refuses it"
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    gateway._flush_spend()
    assert gateway._unwritten == [] and len(gateway.ledger.calls_frame()) == 1
