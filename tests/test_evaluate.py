"""Metrics on hand-made cases with known answers; calibration; the simulations' information rules."""

import numpy as np
import pandas as pd
import pytest

from mixllm.core.decision import Predictions
from mixllm.core.errors import ConfigError, MixLLMError
from mixllm.core.router import MixLLMRouter
from mixllm.evaluation.baselines import OracleRouter, PerSourceRouter, SingleLLMRouter, make_baseline, query_frame
from mixllm.evaluation.calibration import calibrate_lambda
from mixllm.evaluation.evaluate import (
    Outcomes,
    Reference,
    aiq,
    hull_quality,
    least_cost_for_quality,
    operating_point,
    upper_hull,
)
from mixllm.evaluation.simulate import PoolEvent, oracle_stream, simulate_latency, simulate_online
from synthetic import make_log


def test_upper_hull_keeps_only_the_concave_non_decreasing_front():
    hull = upper_hull([0, 1, 2, 3, 1.5], [0.5, 0.6, 0.9, 0.85, 0.6])
    assert hull.tolist() == [[0.0, 0.5], [2.0, 0.9]]


def test_aiq_of_a_known_curve():
    hull = upper_hull([1, 3], [0.5, 0.9])
    assert aiq(hull, 1, 3) == pytest.approx(0.7, abs=1e-6), "mean of a straight line from 0.5 to 0.9"
    # Over [0, 4]: nothing reachable below cost 1, flat at 0.9 above 3: (0 + 1.4 + 0.9) / 4.
    assert aiq(hull, 0, 4) == pytest.approx(2.3 / 4, abs=1e-3)
    with pytest.raises(MixLLMError, match="high > low"):
        aiq(hull, 2, 2)


def test_quality_at_budget_and_least_cost_for_target():
    hull = upper_hull([1, 3], [0.5, 0.9])
    assert hull_quality(hull, 2.0) == pytest.approx(0.7)
    assert hull_quality(hull, 0.5) == 0.0 and hull_quality(hull, 10) == 0.9
    assert least_cost_for_quality(hull, 0.7) == pytest.approx(2.0)
    assert least_cost_for_quality(hull, 0.95) is None
    assert least_cost_for_quality(hull, 0.3) == 1.0


def _outcomes():
    # 3 queries x 3 LLMs: the oracle picks the cheapest LLM among those with the best quality.
    quality = np.array([[1, 1, 0], [0, 1, 1], [0, 0, 0]], dtype=float)
    cost = np.array([[3, 1, 2], [1, 5, 2], [2, 3, 1]], dtype=float)
    return Outcomes(["a", "b", "c"], ["m1", "m2", "m3"], quality, cost)


def test_oracle_picks_the_cheapest_best_llm():
    outcomes = _outcomes()
    log = pd.DataFrame([
        {"query_id": q, "query": f"query {q}", "llm": m, "quality": outcomes.quality[i, j], "cost_usd": outcomes.cost_usd[i, j],
         "source": "s"}
        for i, q in enumerate(outcomes.query_ids) for j, m in enumerate(outcomes.llms)
    ])
    oracle = OracleRouter().fit(log)
    from mixllm.core.decision import decide

    p = oracle.predict(query_frame(log))
    choice, _ = decide(p.quality, p.cost_usd, p.uncertainty, np.zeros_like(p.quality), lambda_=0.0,
                       exploration=0.0, cost_scale_usd=1.0)
    assert [outcomes.llms[c] for c in choice] == ["m2", "m3", "m3"]
    stream = oracle_stream(outcomes)
    assert stream.choices == ["m2", "m3", "m3"] and stream.mean_cost_usd == pytest.approx((1 + 2 + 1) / 3)


def test_operating_point_shares_are_against_the_reference():
    outcomes = _outcomes()
    reference = Reference.of(outcomes, "m2")
    point = operating_point(np.array([1, 1, 1]), outcomes.llms, outcomes, reference)
    assert point.quality_share == pytest.approx(1.0) and point.cost_share == pytest.approx(1.0)
    assert point.traffic == {"m2": 1.0}


def _synthetic_predictions(n=400, seed=0):
    rng = np.random.default_rng(seed)
    llms = ["cheap", "mid", "dear"]
    skill = np.array([0.4, 0.65, 0.9])
    true_p = np.clip(skill + rng.normal(0, 0.15, size=(n, 3)), 0, 1)
    quality = (rng.random((n, 3)) < true_p).astype(float)
    cost = np.tile([0.1, 1.0, 10.0], (n, 1)) * rng.uniform(0.8, 1.2, size=(n, 1))
    outcomes = Outcomes([f"q{i}" for i in range(n)], llms, quality, cost)
    predictions = Predictions(llms, true_p, np.zeros_like(true_p), cost, np.zeros_like(true_p))
    return predictions, outcomes


@pytest.mark.parametrize(("target", "value"), [("cost_share", 0.3), ("budget_usd_per_1k", 2000.0), ("quality_share", 0.9)])
def test_calibration_hits_its_target(target, value):
    predictions, outcomes = _synthetic_predictions()
    reference = Reference.of(outcomes, "dear")
    result = calibrate_lambda(predictions, outcomes, reference, 10.0, target, value)
    assert result.met
    point = result.validation
    if target == "cost_share":
        assert point.cost_share <= value
    elif target == "budget_usd_per_1k":
        assert point.mean_cost_usd * 1000 <= value
    else:
        assert point.quality_share >= value
    # Calibration is tight: the chosen point is the best (or cheapest) among those meeting the target.
    looser = calibrate_lambda(predictions, outcomes, reference, 10.0, target, value * (1.5 if target != "quality_share" else 0.9))
    if target == "quality_share":
        assert looser.validation.mean_cost_usd <= point.mean_cost_usd
    else:
        assert looser.validation.mean_quality >= point.mean_quality


def test_calibration_reports_an_unreachable_target():
    predictions, outcomes = _synthetic_predictions()
    reference = Reference.of(outcomes, "dear")
    assert not calibrate_lambda(predictions, outcomes, reference, 10.0, "quality_share", 5.0).met
    with pytest.raises(MixLLMError, match="unknown calibration target"):
        calibrate_lambda(predictions, outcomes, reference, 10.0, "vibes", 1.0)


def test_outcomes_need_full_information():
    log = make_log(10).groupby("query_id").head(1)
    with pytest.raises(MixLLMError, match="full-information"):
        Outcomes.from_log(log, log["query_id"].unique(), ["cheap-chat", "coder", "strong"])


def test_static_baselines(train_log):
    single = SingleLLMRouter().fit(train_log)
    assert single.llm_ == train_log.groupby("llm")["quality"].mean().idxmax()
    per_source = PerSourceRouter().fit(train_log)
    p = per_source.predict(pd.DataFrame({"query_id": ["x"], "query": ["q"], "source": ["code"]}))
    expected = train_log[train_log["source"] == "code"].groupby("llm")["quality"].mean()
    assert p.quality[0].tolist() == pytest.approx(expected.reindex(p.llms).tolist())
    with pytest.raises(ConfigError, match="unknown baseline"):
        make_baseline("telepathy")


class SpyRouter(MixLLMRouter):
    """Records what partial_fit is shown, in a class-level list that survives the simulation's copy."""

    shown: list = []

    def partial_fit(self, interactions, features=None):
        type(self).shown.append(interactions.copy())
        return super().partial_fit(interactions, features)


def test_online_simulation_reveals_only_the_chosen_outcome(fitted):
    router = SpyRouter(fitted.config, progress=False)
    router.__dict__.update({k: v for k, v in fitted.__dict__.items() if k.endswith("_")})
    SpyRouter.shown = []
    stream_log = make_log(40, seed=99)
    queries = query_frame(stream_log)
    outcomes = Outcomes.from_log(stream_log, queries["query_id"], router.llms_)
    before = router.predict(queries["query"].tolist())
    result = simulate_online(router, queries, outcomes, lambda_=0.5, feedback="binary")
    assert len(SpyRouter.shown) == len(queries), "one update per query"
    for i, frame in enumerate(SpyRouter.shown):
        assert len(frame) == 1 and frame["llm"].iloc[0] == result.choices[i], "only the chosen LLM's outcome"
        j = outcomes.llms.index(result.choices[i])
        assert frame["quality"].iloc[0] == float(outcomes.quality[i, j] >= 0.5)
    after = router.predict(queries["query"].tolist())
    assert np.array_equal(before.quality, after.quality), "the caller's router is left untouched"


def test_online_pool_changes_add_and_remove(fitted):
    stream_log = make_log(60, seed=5)
    queries = query_frame(stream_log)
    outcomes = Outcomes.from_log(stream_log, queries["query_id"], fitted.llms_)
    import copy

    from mixllm.jobs.training import ablation_config

    router = copy.deepcopy(fitted)
    # A newcomer with a weak prior (a large uncertainty), so that exploration tries it at once.
    router.config = ablation_config(router.config, predictors__quality__new_llm_prior_ridge=1.0)
    router.remove_llm("coder")
    events = [PoolEvent(20, "add", "coder", (0.001, 0.001)), PoolEvent(40, "remove", "strong")]
    result = simulate_online(router, queries, outcomes, lambda_=0.0, exploration=1.0, events=events, window=20)
    assert "coder" not in result.choices[:20]
    assert "coder" in result.choices[20:40], "an added LLM is explored"
    assert "strong" not in result.choices[40:]
    windows = result.windows()
    assert len(windows) == 3 and {"mean_quality", "mean_cost_usd"} <= set(windows.columns)


def test_latency_penalty_cuts_waiting_on_an_overloaded_llm(fitted):
    stream_log = make_log(120, seed=8)
    queries = query_frame(stream_log)
    outcomes = Outcomes.from_log(stream_log, queries["query_id"], fitted.llms_)
    tokens = np.full((len(queries), len(fitted.llms_)), 10.0)
    off = simulate_latency(fitted, queries, outcomes, tokens, arrival_rate_per_s=20.0, lambda_=0.0, penalty=False)
    on = simulate_latency(fitted, queries, outcomes, tokens, arrival_rate_per_s=20.0, lambda_=0.0, penalty=True)
    busiest = max(off.traffic, key=off.traffic.get)
    assert on.p95(busiest) < off.p95(busiest)
    assert set(off.table()["llm"]) == set(off.waits_s)


# ------------------------------------------------------------------------ exact sweep and bootstrap


def test_exact_path_matches_the_decision_rule_at_every_lambda():
    from mixllm.core.decision import decide
    from mixllm.evaluation.evaluate import decision_path, segment_lambdas

    predictions, _ = _synthetic_predictions(n=200, seed=3)
    path = decision_path(predictions.quality, predictions.cost_usd, 10.0, predictions.llms)
    assert np.all(np.diff(path.lambdas) >= 0)
    probes = np.concatenate([segment_lambdas(path), np.logspace(-3, 3, 301)])
    for lam in probes:
        expected, _ = decide(predictions.quality, predictions.cost_usd, predictions.uncertainty,
                             np.zeros_like(predictions.quality), lambda_=float(lam), exploration=0.0, cost_scale_usd=10.0)
        assert np.array_equal(path.choices_at(float(lam)), expected), lam
    # Every choice change is a move to a cheaper LLM: a query has at most (LLMs - 1) corners.
    assert np.all(predictions.cost_usd[path.rows, path.to] < predictions.cost_usd[path.rows, path.from_])
    assert np.bincount(path.rows, minlength=200).max() <= 2


def test_exact_sweep_hull_dominates_any_grid():
    from mixllm.evaluation.evaluate import aiq, exact_sweep, sweep

    predictions, outcomes = _synthetic_predictions(n=300, seed=4)
    reference = Reference.of(outcomes, "dear")
    points, _ = exact_sweep(predictions, outcomes, reference, 10.0)
    grid = sweep(predictions, outcomes, reference, [0.0, 0.1, 1.0, 10.0, 100.0], 10.0)
    exact_hull = upper_hull([p.mean_cost_usd for p in points], [p.mean_quality for p in points])
    grid_hull = upper_hull([p.mean_cost_usd for p in grid], [p.mean_quality for p in grid])
    low, high = reference.cheapest_mean_cost_usd, reference.mean_cost_usd
    assert aiq(exact_hull, low, high) >= aiq(grid_hull, low, high) - 1e-12
    costs = [p.mean_cost_usd for p in points]
    assert costs == sorted(costs) and all(b.mean_quality > a.mean_quality for a, b in zip(points, points[1:])), \
        "kept points are the Pareto front"


def test_bootstrap_of_a_router_against_itself_is_exactly_zero_and_intervals_cover_the_estimate():
    from mixllm.evaluation.bootstrap import Interval, bootstrap_metrics, bootstrap_weights
    from mixllm.evaluation.evaluate import RouterCurve, measure_router

    predictions, outcomes = _synthetic_predictions(n=300, seed=5)
    reference = Reference.of(outcomes, "dear")

    class Fixed:
        sweeps_lambda = True
        cost_scale_usd_ = 10.0

        def predict(self, queries):
            return predictions

    curve = measure_router("fixed", Fixed(), pd.DataFrame({"query": ["q"] * 300}), outcomes, reference)
    assert isinstance(curve, RouterCurve) and curve.path is not None
    weights = bootstrap_weights(300, 200, seed=0)
    j = outcomes.llms.index("dear")
    first = bootstrap_metrics(curve, outcomes, outcomes.quality[:, j], outcomes.cost_usd[:, j], weights, 0.3, 0.9)
    again = bootstrap_metrics(curve, outcomes, outcomes.quality[:, j], outcomes.cost_usd[:, j], weights, 0.3, 0.9)
    assert np.array_equal(first["aiq"], again["aiq"])
    estimate = curve.summary(reference, 0.3, 0.9)["aiq"]
    interval = Interval.of(estimate, first["aiq"])
    assert interval.low < estimate < interval.high
    assert Interval.of(0.0, first["aiq"] - again["aiq"]).high == 0.0
    # Unit weights reproduce the point estimate exactly.
    ones = bootstrap_metrics(curve, outcomes, outcomes.quality[:, j], outcomes.cost_usd[:, j], np.ones((1, 300)), 0.3, 0.9)
    assert ones["aiq"][0] == pytest.approx(estimate, abs=1e-3)


def test_a_confidence_bound_keeps_the_budget_where_the_mean_alone_overspends():
    from mixllm.evaluation.evaluate import sweep

    # Validation and a fresh sample from the same distribution: the plain calibration lands on the
    # budget line, so a fresh sample overspends about half the time; the 95% bound rarely does.
    overspent = {0.5: 0, 0.95: 0}
    trials = 40
    for trial in range(trials):
        validation, val_outcomes = _synthetic_predictions(n=300, seed=100 + trial)
        fresh, fresh_outcomes = _synthetic_predictions(n=300, seed=500 + trial)
        val_ref = Reference.of(val_outcomes, "dear")
        fresh_ref = Reference.of(fresh_outcomes, "dear")
        for confidence in overspent:
            result = calibrate_lambda(validation, val_outcomes, val_ref, 10.0, "cost_share", 0.3, confidence=confidence,
                                      reference_cost_usd=val_outcomes.cost_usd[:, 2])
            point = sweep(fresh, fresh_outcomes, fresh_ref, [result.lambda_], 10.0)[0]
            overspent[confidence] += point.cost_share > 0.3
    assert overspent[0.95] <= 0.15 * trials < overspent[0.5], overspent


def test_shifted_order_changes_the_task_mix_once():
    from mixllm.evaluation.simulate import shifted_order

    sources = ["a"] * 30 + ["b"] * 50 + ["c"] * 20
    order, boundary = shifted_order(sources, seed=2)
    assert sorted(order.tolist()) == list(range(100))
    first = {sources[i] for i in order[:boundary]}
    second = {sources[i] for i in order[boundary:]}
    assert first and second and not first & second, "no task on both sides of the change"
    assert boundary >= 50
    for seed in range(6):  # two tasks, either first: the smaller one first must not swallow the other
        order, boundary = shifted_order(["small"] * 10 + ["large"] * 90, seed=seed)
        assert 0 < boundary < 100 and len({bool(i >= 10) for i in order[boundary:]}) == 1


def test_adaptation_known_answers():
    from mixllm.evaluation.simulate import OnlineResult, adaptation

    n = 400
    quality = np.ones(n)
    cost = np.ones(n)
    full = OnlineResult("full", ["new" if i % 2 else "old" for i in range(n)], quality, cost, 100)
    same = adaptation(full, full, "new", 100, 200, lambda_=1.0, cost_scale_usd=1.0, reference_quality=1.0,
                      reference_cost_usd=1.0)
    assert same.share_online == same.share_full_pool == 0.5 and same.regret_per_query == 0.0
    assert same.queries_to_converge == 100, "within tolerance from the first rolling window"
    never = OnlineResult("online", ["old"] * n, quality * 0.5, cost, 100)
    late = adaptation(never, full, "new", 100, 200, lambda_=1.0, cost_scale_usd=1.0, reference_quality=1.0,
                      reference_cost_usd=1.0)
    assert late.share_online == 0.0 and late.queries_to_converge is None
    assert late.regret_per_query == pytest.approx(0.5) and late.quality_online_pct == pytest.approx(50.0)
