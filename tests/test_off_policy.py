"""Exploration with known probabilities, and off-policy estimates checked against known answers."""

import sqlite3

import numpy as np
import pandas as pd
import pytest

from mixllm.core.decision import action_probabilities
from mixllm.evaluation.off_policy import LoggedBandit, off_policy_estimates
from mixllm.io.store import InteractionLog

POLICY = {"temperature": 0.05, "epsilon": 0.2, "top_k": 3, "max_leave_share": 0.3, "max_cost_ratio": 2.0}


def _scores(seed=0, n=200, m=4):
    rng = np.random.default_rng(seed)
    score = rng.normal(0, 0.1, (n, m))
    score[rng.random((n, m)) < 0.1] = -np.inf  # ineligible
    score[np.arange(n), rng.integers(0, m, n)] = 0.5  # each row has an eligible best
    cost = rng.uniform(0.5, 3.0, (n, m))
    return score, cost, score.argmax(axis=1)


@pytest.mark.parametrize("policy", ["argmax", "softmax", "epsilon_greedy"])
def test_probabilities_sum_to_one_and_stay_within_the_exploration_budget(policy):
    score, cost, best = _scores()
    p = action_probabilities(score, cost, best, policy=policy, **POLICY)
    rows = np.arange(len(best))
    assert np.allclose(p.sum(axis=1), 1.0) and (p >= 0).all()
    assert (1 - p[rows, best] <= POLICY["max_leave_share"] + 1e-12).all(), "at most the budget leaves the argmax"
    assert (p[~np.isfinite(score)] == 0).all(), "an ineligible LLM is never taken"
    dear = cost > POLICY["max_cost_ratio"] * cost[rows, best][:, None]
    assert (p[dear] == 0).all(), "nothing dearer than max_cost_ratio x the argmax is explored"
    if policy == "argmax":
        assert (p[rows, best] == 1).all()
    else:
        assert (p[rows, best] < 1).any()
    if policy == "epsilon_greedy":
        assert ((p > 0).sum(axis=1) <= POLICY["top_k"]).all()


def test_estimators_on_a_hand_computed_log():
    # Two actions; the target always takes action 1. Logged: (a=1, p=0.5, y=1), (a=0, p=0.5, y=0),
    # (a=1, p=0.25, y=0). Weights 2, 0, 4. IPS = (2*1 + 0 + 4*0)/3; SNIPS = 2/6.
    # DR with a model predicting 0.5 everywhere: mean(0.5 + w (y - 0.5)) = (0.5+1 + 0.5 + 0.5-2)/3.
    data = LoggedBandit(actions=np.array([1, 0, 1]), logging_probability=np.array([0.5, 0.5, 0.25]),
                        outcomes=np.array([1.0, 0.0, 0.0]), target_probabilities=np.array([[0, 1.0]] * 3),
                        predicted=np.full((3, 2), 0.5))
    result = off_policy_estimates(data, resamples=50)
    assert result["ips"].estimate == pytest.approx(2 / 3)
    assert result["snips"].estimate == pytest.approx(1 / 3)
    assert result["dr"].estimate == pytest.approx((1.5 + 0.5 - 1.5) / 3)
    assert result["support"] == 2 and result["effective_sample_size"] == pytest.approx(36 / 20)
    with pytest.raises(ValueError, match="probabilit"):
        LoggedBandit(np.array([0]), np.array([0.0]), np.array([1.0]), np.ones((1, 2)), np.ones((1, 2)))


def test_on_full_information_data_the_true_value_lies_in_the_interval_at_the_nominal_rate():
    """Fixed outcomes for every (query, action), a softmax logging policy, a deterministic target:
    over replications of the logging draws, each estimator is nearly unbiased and its 95% interval
    holds the target's true value on the same queries at least 90% of the time."""
    rng = np.random.default_rng(7)
    n, m = 300, 3
    skill = rng.uniform(0.2, 0.8, (n, m))
    outcomes = (rng.random((n, m)) < skill).astype(float)
    score, cost, best = rng.normal(0, 0.05, (n, m)) + skill, np.ones((n, m)), None
    best = score.argmax(axis=1)
    logging = action_probabilities(score, cost, best, policy="softmax", temperature=0.1, epsilon=0.0, top_k=3,
                                   max_leave_share=0.5, max_cost_ratio=10.0)
    target_action = (skill + rng.normal(0, 0.1, (n, m))).argmax(axis=1)  # another policy
    target = np.eye(m)[target_action]
    truth = outcomes[np.arange(n), target_action].mean()
    covered, errors = {k: 0 for k in ("ips", "snips", "dr")}, {k: [] for k in ("ips", "snips", "dr")}
    replications = 60
    for r in range(replications):
        draw = np.random.default_rng(100 + r)
        actions = (logging.cumsum(axis=1) < draw.random(n)[:, None]).sum(axis=1)
        data = LoggedBandit(actions, logging[np.arange(n), actions], outcomes[np.arange(n), actions], target, skill)
        result = off_policy_estimates(data, resamples=200, seed=r)
        for name in covered:
            covered[name] += result[name].low <= truth <= result[name].high
            errors[name].append(result[name].estimate - truth)
    for name in covered:
        assert covered[name] / replications >= 0.9, (name, covered[name])
        assert abs(np.mean(errors[name])) < 0.02, (name, np.mean(errors[name]))


def test_a_decision_log_written_before_propensities_gains_the_column(tmp_path):
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE decisions (decision_id VARCHAR(64) PRIMARY KEY, request_id VARCHAR(128) UNIQUE, "
                "query TEXT NOT NULL, llm VARCHAR(256) NOT NULL, model_version INTEGER, lambda_ FLOAT, "
                "candidates TEXT, cost_usd FLOAT, latency_s FLOAT, input_tokens FLOAT, output_tokens FLOAT, "
                "created_at DATETIME NOT NULL)")
    old.execute("INSERT INTO decisions (decision_id, query, llm, created_at) VALUES ('d0', 'q', 'a', '2026-01-01')")
    old.commit()
    old.close()
    store = InteractionLog(f"sqlite:///{path}")
    decision_id = store.log_decision("q2", "b", model_version=1, lambda_=0.5, propensity=0.25)
    store.add_feedback(quality=1.0, decision_id=decision_id)
    store.add_feedback(quality=0.0, decision_id="d0")
    logged = store.decisions_with_feedback().set_index("decision_id")
    assert logged.loc[decision_id, "propensity"] == 0.25 and np.isnan(logged.loc["d0", "propensity"])


def test_a_decision_another_llm_answered_keeps_the_policys_choice(tmp_path):
    """A failover (or a kept session) changes the LLM that answered; the policy's choice, whose
    probability was logged, moves to chosen_llm, once."""
    store = InteractionLog(f"sqlite:///{tmp_path / 'log.db'}")
    failed_over = store.log_decision("q1", "a", model_version=1, lambda_=0.5, propensity=0.8)
    answered = store.log_decision("q2", "a", model_version=1, lambda_=0.5, propensity=0.8)
    store.complete_decision(failed_over, cost_usd=0.01, latency_s=1.0, llm="b")
    store.complete_decision(failed_over, cost_usd=0.01, latency_s=1.0, llm="c")  # a later record keeps the first
    store.complete_decision(answered, cost_usd=0.01, latency_s=1.0, llm="a")
    for decision_id in (failed_over, answered):
        store.add_feedback(quality=1.0, decision_id=decision_id)
    logged = store.decisions_with_feedback().set_index("decision_id")
    assert logged.loc[failed_over, ["llm", "chosen_llm"]].tolist() == ["c", "a"]
    assert logged.loc[answered, "llm"] == "a" and pd.isna(logged.loc[answered, "chosen_llm"])
    assert store.decision(failed_over)["propensity"] == 0.8


def _argmax_log(train_log, llms, n, seed):
    """n logged decisions of the log's first queries, each LLM in turn, probability 1, random quality."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"decision_id": [f"d{i}" for i in range(n)],
                         "query": train_log["query"].drop_duplicates().head(n).tolist(),
                         "llm": [llms[i % len(llms)] for i in range(n)], "chosen_llm": None,
                         "propensity": 1.0, "quality": rng.random(n), "cost_usd": 0.001})


def test_off_policy_estimates_leave_out_decisions_the_policy_did_not_choose(fitted, train_log):
    from mixllm.jobs.policy_evaluation import evaluate_on_feedback

    llms = list(fitted.enabled_llms_)
    logged = _argmax_log(train_log, llms, 40, seed=3)
    overridden = logged.copy()
    overridden.loc[:9, "chosen_llm"] = [llms[(i + 1) % len(llms)] for i in range(10)]  # another LLM answered
    overridden.loc[:9, "quality"] = 0.0  # what a biased estimate would read
    settings = {"lambda_": 0.1, "cost_scale_usd": 0.001, "resamples": 50}
    kept = evaluate_on_feedback(fitted, logged.iloc[10:].reset_index(drop=True), **settings)
    result = evaluate_on_feedback(fitted, overridden, **settings)
    assert result["not_policy_choice"] == 10 and result["n"] == 30 and result["logged"] == 40
    assert result["quality"]["dr"].estimate == pytest.approx(kept["quality"]["dr"].estimate)


def test_decisions_made_before_the_shadow_version_loads_are_counted_not_lost_silently(tmp_path):
    from mixllm.service.shadow import ShadowLog, ShadowScorer

    store = InteractionLog(f"sqlite:///{tmp_path / 'log.db'}")
    scorer = ShadowScorer(ShadowLog(store), share=1.0, seed=0)
    scorer.offer("d1", "What is 2 plus 2?", "coder")
    scorer.offer("d2", "Write a python function.", "coder")
    assert scorer.before_loaded == 2 and scorer._queue.empty(), "counted, and nothing to score"
    store.dispose()


def test_a_paired_difference_shares_the_resamples_of_both_estimates():
    """The same logged decisions and resamples for both policies: the difference's point is the
    difference of the points, two identical policies differ by exactly 0, and noise both share
    (here: the logged outcomes) cancels, so the paired interval is narrower than either estimate's."""
    from mixllm.evaluation.off_policy import paired_difference

    rng = np.random.default_rng(5)
    n, m = 400, 3
    logging = np.full((n, m), 1 / m)
    actions = rng.integers(0, m, n)
    outcomes = rng.random(n)
    predicted = rng.random((n, m))
    first = np.eye(m)[rng.integers(0, m, n)]
    second = first.copy()
    second[:40] = np.eye(m)[(first[:40].argmax(axis=1) + 1) % m]  # disagrees on a tenth of the queries

    def bandit(target):
        return LoggedBandit(actions, logging[np.arange(n), actions], outcomes, target, predicted)

    a, b = off_policy_estimates(bandit(first), resamples=300), off_policy_estimates(bandit(second), resamples=300)
    difference = paired_difference(bandit(first), bandit(second), resamples=300)
    for name in ("ips", "snips", "dr"):
        assert difference[name].estimate == pytest.approx(a[name].estimate - b[name].estimate)
        assert difference[name].high - difference[name].low < min(a[name].high - a[name].low,
                                                                   b[name].high - b[name].low)
    same = paired_difference(bandit(first), bandit(first), resamples=50)
    assert all(same[name].estimate == same[name].low == same[name].high == 0 for name in ("ips", "snips", "dr"))
    with pytest.raises(ValueError, match="same logged decisions"):
        paired_difference(bandit(first), LoggedBandit(actions[:-1], logging[:-1, 0], outcomes[:-1], first[:-1],
                                                       predicted[:-1]))


def test_two_versions_are_judged_on_the_same_decisions_with_one_shared_reward_model(fitted, train_log):
    """compare_on_feedback: both versions' doubly-robust estimates read the two versions'
    predictions averaged (not each its own: a version would fill the log's gaps with its own
    optimism), on the decisions both can judge; the paired difference is the difference."""
    from mixllm.config import config_from_dict
    from mixllm.core.router import MixLLMRouter
    from mixllm.jobs.policy_evaluation import compare_on_feedback
    from synthetic import small_config

    other = MixLLMRouter(small_config(predictors__quality={"ridge": 500.0}), progress=False).fit(train_log)
    llms = list(fitted.enabled_llms_)
    logged = _argmax_log(train_log, llms, 60, seed=4)
    queries = logged["query"].tolist()
    config = config_from_dict({"evaluation": {"bootstrap_resamples": 50}})
    mine, theirs = compare_on_feedback(config, other, fitted, logged)
    assert mine["n"] == theirs["n"] == 60

    def by_hand(router):
        """DR for quality with the averaged reward model, from the routers' own route output."""
        own, peer = ([{c.llm: c for c in d.candidates} for d in r.route(queries)] for r in (router, fitted if
                                                                                              router is other else other))
        total = 0.0
        for i, (mine_row, peer_row) in enumerate(zip(own, peer)):
            reward = {llm: (mine_row[llm].quality + peer_row[llm].quality) / 2 for llm in llms}
            direct = sum(mine_row[llm].probability * reward[llm] for llm in llms)
            taken = logged.loc[i, "llm"]
            total += direct + mine_row[taken].probability * (logged.loc[i, "quality"] - reward[taken])
        return total / len(queries)

    assert mine["quality"]["dr"].estimate == pytest.approx(by_hand(other))
    assert theirs["quality"]["dr"].estimate == pytest.approx(by_hand(fitted))
    assert mine["versus_baseline"]["quality"]["dr"].estimate == pytest.approx(
        mine["quality"]["dr"].estimate - theirs["quality"]["dr"].estimate)
