"""The domain prior and the residual heads on data the tests plant: each must find its own signal."""

import numpy as np
import pytest

from mixllm.core.bayesian_linear import gcv_ridge
from mixllm.core.domains import DomainModel, domain_labels
from mixllm.core.predictors import QualityPredictor


def _planted(n=600, seed=0):
    """Three tasks told apart by the first two features; LLM skill depends on the task, and LLM b's
    also on feature 3 inside every task (a within-domain signal a per-domain lookup cannot see)."""
    rng = np.random.default_rng(seed)
    task = rng.integers(0, 3, size=n)
    centres = np.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]])
    X = np.hstack([centres[task] + rng.normal(0, 0.7, size=(n, 2)), rng.normal(size=(n, 2))])
    skill = np.array([[0.9, 0.2], [0.2, 0.9], [0.5, 0.5]])  # (task, llm)
    p = skill[task].copy()
    p[:, 1] = np.clip(p[:, 1] + 0.3 * np.clip(X[:, 3], -1, 1), 0.02, 0.98)
    quality = (rng.random((n, 2)) < p).astype(float)
    labels = np.array([f"task{t}" for t in task], dtype=object)
    return X, labels, quality, task, p


def test_domain_prior_learns_each_task_and_llm_mean():
    X, labels, quality, task, p = _planted()
    model = DomainModel(classifier_c=(0.1, 1.0), prior_strength=5.0).fit(X, labels, quality, ["a", "b"])
    assert model.classes_ == ["task0", "task1", "task2"]
    assert model.table_[1, 0] == pytest.approx(0.2, abs=0.08) and model.table_[1, 1] == pytest.approx(0.9, abs=0.08)
    proba = model.predict_proba(X)
    assert (proba.argmax(axis=1) == task).mean() > 0.9, "the classifier tells the planted tasks apart"
    # Training rows carry out-of-fold probabilities: never more confident than the final model on them.
    assert model.train_proba_.max(axis=1).mean() <= model.predict_proba(X).max(axis=1).mean() + 1e-9


def test_a_known_task_overrides_the_text():
    X, labels, quality, task, _ = _planted()
    model = DomainModel(classifier_c=(1.0,)).fit(X, labels, quality, ["a", "b"])
    far_from_task2 = X[task == 0][:1]
    forced = model.predict_proba(far_from_task2, tasks=["task2"])
    assert forced.tolist() == [[0.0, 0.0, 1.0]]
    unknown = model.predict_proba(far_from_task2, tasks=["never-seen"])
    assert unknown.argmax() == 0, "an unknown task leaves the text's prediction"
    assert model.task_index("never-seen") is None and model.task_index("task1") == 1


def test_shrinkage_pulls_small_domains_to_the_overall_mean():
    X = np.zeros((13, 1))
    labels = np.array(["big"] * 10 + ["tiny"] * 3, dtype=object)
    quality = np.array([[1.0]] * 10 + [[0.0]] * 3)
    loose = DomainModel(prior_strength=0.0, cross_fit_folds=2).fit(X, labels, quality, ["m"])
    shrunk = DomainModel(prior_strength=10.0, cross_fit_folds=2).fit(X, labels, quality, ["m"])
    assert loose.table_[1, 0] == pytest.approx(0.0)
    assert shrunk.table_[1, 0] == pytest.approx(10 * 10 / 13 / 13, abs=1e-9), "(0 + 10 x overall) / (3 + 10)"


def test_bandit_logs_with_missing_outcomes_fit():
    X, labels, quality, *_ = _planted()
    quality[::2, 0] = np.nan  # LLM a answered only half the queries
    model = DomainModel(classifier_c=(1.0,)).fit(X, labels, quality, ["a", "b"])
    assert np.isfinite(model.table_).all()


def test_one_domain_or_none_degrades_to_the_overall_mean():
    X, _, quality, *_ = _planted()
    model = DomainModel().fit(X, [""] * len(X), quality, ["a", "b"])
    assert model.classes_ == ["all"]
    assert np.allclose(model.prior(model.predict_proba(X[:3]), ["a", "b"]), quality.mean(axis=0))


def test_state_round_trip_predicts_identically():
    X, labels, quality, *_ = _planted()
    model = DomainModel(classifier_c=(1.0,)).fit(X, labels, quality, ["a", "b"])
    model.add_llm("c", np.array([0.1, 0.2, 0.3]))
    meta, arrays = model.state()
    again = DomainModel.from_state(meta, arrays)
    assert np.array_equal(again.predict_proba(X), model.predict_proba(X))
    assert np.array_equal(again.prior(again.predict_proba(X), ["c", "a"]), model.prior(model.predict_proba(X), ["c", "a"]))


def test_residual_head_finds_the_within_domain_signal_the_prior_cannot_see():
    X, labels, quality, task, p = _planted(n=1500, seed=1)
    train, test = slice(0, 1000), slice(1000, None)
    model = DomainModel(classifier_c=(1.0,)).fit(X[train], labels[train], quality[train], ["a", "b"])
    prior_train = model.prior(model.train_proba_, ["b"])[:, 0]
    prior_test = model.prior(model.predict_proba(X[test]), ["b"])[:, 0]
    head = QualityPredictor(ridge=1.0).fit(X[train], quality[train, 1], prior=prior_train)
    predicted = head.predict(X[test], prior=prior_test)
    truth = p[test][:, 1]
    err_prior = np.mean((prior_test - truth) ** 2)
    err_head = np.mean((predicted - truth) ** 2)
    assert err_head < 0.6 * err_prior, "inside each task, the head learns what feature 3 says"
    assert np.all((predicted >= 0) & (predicted <= 1))


def test_gcv_prefers_more_shrinkage_on_noise_and_less_on_signal():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 20))
    noise = rng.normal(size=(300, 2))
    signal = X[:, :2] @ np.array([[1.0, -1.0], [0.5, 2.0]]) + 0.1 * rng.normal(size=(300, 2))
    grid = (0.1, 1.0, 10.0, 100.0, 1000.0)
    assert gcv_ridge(X, noise, grid)[0] >= 100.0
    assert gcv_ridge(X, signal, grid)[0] <= 1.0
    with_gaps = signal.copy()
    with_gaps[::3, 0] = np.nan  # one LLM missing a third of the answers: scored on its own rows
    assert gcv_ridge(X, with_gaps, grid)[0] <= 1.0


def test_domain_labels_prefer_task_labels_and_fall_back_to_tags():
    sources = ["a"] * 12 + ["b"] * 12 + ["rare"] * 2
    tags = np.array([0] * 13 + [1] * 13)
    labels, origin = domain_labels(sources, tags, "auto", min_queries=10)
    assert origin == "source" and set(labels) == {"a", "b", ""}, "a label with too few queries is no domain"
    labels, origin = domain_labels(sources, tags, "tags", min_queries=10)
    assert origin == "tags" and set(labels) == {"tags:0", "tags:1"}
    labels, origin = domain_labels(["a"] * 26, tags, "auto", min_queries=10)
    assert origin == "tags", "one task label is no grouping: the tag domains are used"
    labels, origin = domain_labels(None, None, "auto", min_queries=10)
    assert origin == "none"
