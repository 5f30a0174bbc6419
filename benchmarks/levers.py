"""Modelling levers that are not in the router, measured the way they were chosen: by 5-fold
cross-validation on the train + validation parts of each log (the holdout is never read).

    python benchmarks/levers.py [--datasets routerbench_subset,llmrouter_dc] [--work DIR]

Each fold fits MixLLM's default router on four folds and predicts the fifth; the levers reuse that
fold's router features, domain prior and cost predictions, so only the quality model differs.
Reported: AIQ of the out-of-fold predictions and the paired bootstrap difference to the default.

- default: domain prior + Bayesian linear residual head (what the router ships)
- + stacked TF-IDF logistic: each LLM's cross-fitted TF-IDF logistic prediction joins its head's input
- NNLS stack: default, TF-IDF logistic and kNN predictions blended per LLM by non-negative least squares
- reduced-rank heads: the heads' coefficients projected on their top-k shared directions (an
  IRT-like "query difficulty x LLM ability" structure shared across LLMs)
- logistic heads: per-LLM logistic regression (calibrated 0/1 probabilities) on the same features
- boosted base: a stronger offline model per LLM (gradient-boosted trees on the same features, early
  stopping on a slice of the training fold), alone and with a ridge head learning its residual (the
  head fitted on the base's cross-fitted predictions, as an online Bayesian head would be)
- no domain prior: a ridge on the same features, starting from each LLM's mean
- domain prior alone: no head
- cost linear in length: the default's quality, each LLM's cost a line in the prompt's length (the
  baselines' cost model) instead of the log-scale regression
- with the task label: the default routing with each query's true task, and per_source (the
  per-task mean, the baseline that reads the same label) for comparison
- the text-only baselines of the leaderboard (tfidf_logistic; mlp on the fold's frozen-encoder
  embeddings), each with its own cost model, fitted on the same folds: the router's lead over them
  on every train + validation query, a larger sample than a holdout

The encoder is the frozen base model here (fine-tuning per fold would multiply the time by five).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mixllm.config import load_config  # noqa: E402
from mixllm.core.bayesian_linear import gcv_ridge  # noqa: E402
from mixllm.core.decision import Predictions  # noqa: E402
from mixllm.core.router import MixLLMRouter  # noqa: E402
from mixllm.evaluation.baselines import make_baseline, query_frame  # noqa: E402
from mixllm.evaluation.bootstrap import Interval, bootstrap_metrics, bootstrap_weights  # noqa: E402
from mixllm.evaluation.evaluate import Outcomes, Reference, RouterCurve, exact_sweep  # noqa: E402
from mixllm.io.benchmark_config import load_benchmark_config  # noqa: E402
from mixllm.io.data import TrainingStore, ingest  # noqa: E402
from mixllm.io.splitting import normalised_text  # noqa: E402
from mixllm.io.workspace import Workspace, load_split, write_split  # noqa: E402

logger = logging.getLogger("benchmarks.levers")


def folds_of(frame: pd.DataFrame, k: int = 5, seed: int = 7) -> np.ndarray:
    """A fold per query; same-text queries share a fold."""
    from mixllm.io.splitting import stable_unit

    return np.array([int(stable_unit(seed, normalised_text(q)) * k) for q in frame["query"]])


def logistic_columns(X_train: np.ndarray, Y: np.ndarray, X_test: np.ndarray, C: float) -> np.ndarray:
    """Per-column logistic regression on 0/1 (or fractional, as weighted 0/1 pairs) targets."""
    from sklearn.linear_model import LogisticRegression

    out = np.zeros((len(X_test), Y.shape[1]))
    for j in range(Y.shape[1]):
        y = np.clip(Y[:, j], 0, 1)
        if len(np.unique(y)) < 2:
            out[:, j] = y.mean()
            continue
        binary = np.isin(y, (0.0, 1.0)).all()
        X2 = X_train if binary else np.vstack([X_train, X_train])
        y2 = y.astype(int) if binary else np.r_[np.ones(len(y)), np.zeros(len(y))].astype(int)
        w2 = None if binary else np.r_[y, 1 - y]
        model = LogisticRegression(C=C, max_iter=3000).fit(X2, y2, sample_weight=w2)
        out[:, j] = model.predict_proba(X_test)[:, 1]
    return out


def tfidf_logistic(train_texts: list[str], Y: np.ndarray, test_texts: list[str]) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=20000, sublinear_tf=True)
    A = vectorizer.fit_transform(train_texts)
    B = vectorizer.transform(test_texts)
    from sklearn.linear_model import LogisticRegression

    out = np.zeros((len(test_texts), Y.shape[1]))
    for j in range(Y.shape[1]):
        y = (Y[:, j] >= 0.5).astype(int)
        out[:, j] = (LogisticRegression(C=1.0, max_iter=3000).fit(A, y).predict_proba(B)[:, 1]
                     if len(np.unique(y)) > 1 else y.mean())
    return out


def ridge_fit(X: np.ndarray, R: np.ndarray, ridge: float) -> np.ndarray:
    """Coefficients (with a bias row last) of the ridge the heads use, for all columns at once."""
    Xb = np.hstack([X, np.ones((len(X), 1))])
    return np.linalg.solve(Xb.T @ Xb + ridge * np.eye(Xb.shape[1]), Xb.T @ R)


def with_bias(X: np.ndarray) -> np.ndarray:
    return np.hstack([X, np.ones((len(X), 1))])


def nnls_blend(parts_train: list[np.ndarray], y_train: np.ndarray, parts_test: list[np.ndarray]) -> np.ndarray:
    from scipy.optimize import nnls

    out = np.zeros_like(parts_test[0])
    for j in range(y_train.shape[1]):
        A = np.column_stack([p[:, j] for p in parts_train] + [np.ones(len(y_train)), -np.ones(len(y_train))])
        B = np.column_stack([p[:, j] for p in parts_test] + [np.ones(len(parts_test[0])), -np.ones(len(parts_test[0]))])
        weights, _ = nnls(A, y_train[:, j])
        out[:, j] = B @ weights
    return np.clip(out, 0, 1)


def boosted_columns(X_train: np.ndarray, Y: np.ndarray, X_test: np.ndarray) -> np.ndarray:
    """Per-column gradient-boosted trees; the number of trees chosen by early stopping on 15% of the
    training rows (never the test rows)."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    out = np.zeros((len(X_test), Y.shape[1]))
    for j in range(Y.shape[1]):
        model = HistGradientBoostingRegressor(learning_rate=0.05, max_iter=300, max_leaf_nodes=15,
                                              min_samples_leaf=20, l2_regularization=1.0, early_stopping=True,
                                              validation_fraction=0.15, n_iter_no_change=20, random_state=0)
        out[:, j] = model.fit(X_train, Y[:, j]).predict(X_test)
    return out


def knn_predict(E_train: np.ndarray, Y: np.ndarray, E_test: np.ndarray, k: int = 50) -> np.ndarray:
    from sklearn.neighbors import KNeighborsRegressor

    return KNeighborsRegressor(n_neighbors=min(k, len(E_train)), metric="cosine").fit(E_train, Y).predict(E_test)


def run(name: str, entry, data_path: Path, work: Path, n_boot: int, skip: frozenset[str] = frozenset()) -> pd.DataFrame:
    from quality import make_project

    config = make_project(name, entry, work / name)
    config = load_config(config.root / "params.yaml", overrides={"embedding.fine_tune.enabled": False,
                                                                    "pipeline.work_dir": "data/work-levers"})
    if not TrainingStore(config.path(config.data.store_dir)).parts():
        ingest(data_path, config)
    write_split(config)
    split = load_split(config)
    log = pd.concat([split.train, split.validation], ignore_index=True)
    frame = query_frame(log)
    llms = sorted(log["llm"].unique())
    outcomes = Outcomes.from_log(log, frame["query_id"], llms)
    fold = folds_of(frame)
    cache = Workspace.of(config).cache
    Q = outcomes.quality
    predictions: dict[str, np.ndarray] = {}
    costs = np.zeros_like(Q)
    names = ["default", "+ stacked TF-IDF logistic", "NNLS stack (default, TF-IDF logistic, kNN)",
             "reduced-rank heads (k=1)", "reduced-rank heads (k=2)", "logistic heads", "boosted base",
             "boosted base + residual head", "no domain prior",
             "domain prior alone", "cost linear in length", "default + task label", "per_source (task label)",
             "tfidf_logistic (baseline)", "mlp (baseline)", "knn (baseline)"]
    for name_ in names:
        predictions[name_] = np.zeros_like(Q)
    length_costs = np.zeros_like(Q)
    text_baselines = ("tfidf_logistic", "mlp", "knn")
    baseline_costs = {f"{kind} (baseline)": np.zeros_like(Q) for kind in text_baselines}
    for f in range(5):
        started = time.perf_counter()
        train_ids = set(frame["query_id"][fold != f])
        test = fold == f
        router = MixLLMRouter(config, cache_dir=cache, progress=False).fit(log[log["query_id"].isin(train_ids)])
        tr_frame, te_frame = frame[~test], frame[test]
        X_tr = router.features(tr_frame["query"].tolist())
        X_te = router.features(te_frame["query"].tolist())
        # The training rows' features with their out-of-fold domain probabilities, as the heads saw them.
        X_tr = router.join_domain_proba(X_tr[:, :router.n_base_features_], router.domain_model_.train_proba_)
        chars_te = te_frame["query"].str.len().to_numpy()
        default = router.predict_from_features(X_te, chars_te, llms)
        predictions["default"][test] = default.quality
        predictions["cost linear in length"][test] = default.quality
        costs[test] = default.cost_usd
        from mixllm.evaluation.baselines import LengthCostModel

        length_costs[test] = LengthCostModel().fit(log[log["query_id"].isin(train_ids)]).predict(
            te_frame["query"].tolist(), llms)
        prior_tr = router.domain_model_.prior(router.domain_proba(X_tr), llms)
        prior_te = router.domain_model_.prior(router.domain_proba(X_te), llms)
        predictions["domain prior alone"][test] = prior_te
        tasks = te_frame["source"].tolist() if "source" in te_frame else None
        predictions["default + task label"][test] = router.predict_from_features(
            router.features(te_frame["query"].tolist(), tasks), chars_te, llms).quality
        from mixllm.evaluation.baselines import PerSourceRouter

        predictions["per_source (task label)"][test] = PerSourceRouter().fit(
            log[log["query_id"].isin(train_ids)]).predict(te_frame).quality
        for kind in text_baselines:  # the embedding baselines read the fold router's embeddings, as on the leaderboard
            label = f"{kind} (baseline)"
            baseline = make_baseline(kind, embed=lambda texts: router.embed(texts))
            fitted_baseline = baseline.fit(log[log["query_id"].isin(train_ids)]).predict(te_frame)
            predictions[label][test], baseline_costs[label][test] = fitted_baseline.quality, fitted_baseline.cost_usd
        Y = Q[~test]
        R = Y - prior_tr
        # The alternatives below model each LLM's whole residual (no shared difficulty head), so they
        # get a ridge chosen by GCV on that residual; router.ridge_ is the departures' ridge, chosen
        # for a smaller target.
        grid = config.predictors.quality.ridge_grid
        residual_ridge, _ = gcv_ridge(X_tr, R, grid)
        # + stacked TF-IDF logistic (cross-fitted inside the training folds)
        inner = np.arange(len(tr_frame)) % 5
        stacked_tr = np.zeros_like(Y)
        for k in range(5):
            stacked_tr[inner == k] = tfidf_logistic(tr_frame["query"][inner != k].tolist(), Y[inner != k],
                                                    tr_frame["query"][inner == k].tolist())
        stacked_te = tfidf_logistic(tr_frame["query"].tolist(), Y, te_frame["query"].tolist())
        for j in range(len(llms)):
            G_tr = np.hstack([X_tr, 30 * (stacked_tr[:, [j]] - prior_tr[:, [j]])])
            G_te = np.hstack([X_te, 30 * (stacked_te[:, [j]] - prior_te[:, [j]])])
            coef = ridge_fit(G_tr, R[:, [j]], residual_ridge)
            predictions["+ stacked TF-IDF logistic"][test, j] = np.clip(prior_te[:, j] + (with_bias(G_te) @ coef)[:, 0], 0, 1)
        # NNLS stack of the default (in-sample on train, a mild optimism), TF-IDF logistic and kNN
        embed_tr = router.embed(tr_frame["query"].tolist())
        embed_te = router.embed(te_frame["query"].tolist())
        knn_tr = np.zeros_like(Y)
        for k in range(5):
            knn_tr[inner == k] = knn_predict(embed_tr[inner != k], Y[inner != k], embed_tr[inner == k])
        default_tr = router.predict_from_features(X_tr, tr_frame["query"].str.len().to_numpy(), llms).quality
        predictions["NNLS stack (default, TF-IDF logistic, kNN)"][test] = nnls_blend(
            [default_tr, stacked_tr, knn_tr], Y, [default.quality, stacked_te, knn_predict(embed_tr, Y, embed_te)])
        # Reduced-rank heads
        coef = ridge_fit(X_tr, R, residual_ridge)
        fitted = with_bias(X_tr) @ coef
        _, _, directions = np.linalg.svd(fitted - fitted.mean(axis=0), full_matrices=False)
        for rank in (1, 2):
            projected = coef @ directions[:rank].T @ directions[:rank]
            predictions[f"reduced-rank heads (k={rank})"][test] = np.clip(prior_te + with_bias(X_te) @ projected, 0, 1)
        # Logistic heads on the same features (the domain block included), C matched to the ridge
        predictions["logistic heads"][test] = logistic_columns(X_tr * np.sqrt(X_tr.shape[1]), Y,
                                                               X_te * np.sqrt(X_tr.shape[1]), C=0.01)
        # Boosted base per LLM; its residual head learns from the base's cross-fitted predictions
        if not {"boosted base", "boosted base + residual head"} <= skip:  # most of the time on the larger logs
            boosted_tr = np.zeros_like(Y)
            for k in range(5):
                boosted_tr[inner == k] = boosted_columns(X_tr[inner != k], Y[inner != k], X_tr[inner == k])
            boosted_te = boosted_columns(X_tr, Y, X_te)
            predictions["boosted base"][test] = np.clip(boosted_te, 0, 1)
            residual = Y - boosted_tr
            coef = ridge_fit(X_tr, residual, gcv_ridge(X_tr, residual, grid)[0])
            predictions["boosted base + residual head"][test] = np.clip(boosted_te + with_bias(X_te) @ coef, 0, 1)
        # No domain prior: a ridge on the features around each LLM's mean
        mean = Y.mean(axis=0)
        coef = ridge_fit(X_tr, Y - mean, gcv_ridge(X_tr, Y - mean, grid)[0])
        predictions["no domain prior"][test] = np.clip(mean + with_bias(X_te) @ coef, 0, 1)
        logger.info("%s fold %d: %.0f s", name, f, time.perf_counter() - started)
    reference_llm = entry.reference_llm
    reference = Reference.of(outcomes, reference_llm)
    j_ref = llms.index(reference_llm)
    weights = bootstrap_weights(len(frame), n_boot, seed=0)
    replicates, rows = {}, []
    for label, quality in predictions.items():
        if label in skip:
            continue
        cost = length_costs if label == "cost linear in length" else baseline_costs.get(label, costs)
        pred = Predictions(llms, quality, np.zeros_like(quality), cost, np.zeros_like(quality))
        points, path = exact_sweep(pred, outcomes, reference, 1.0)
        curve = RouterCurve(label, points, 0.0, True, path=path)
        replicates[label] = bootstrap_metrics(curve, outcomes, Q[:, j_ref], outcomes.cost_usd[:, j_ref], weights,
                                              config.evaluation.cost_budget_share, config.evaluation.quality_target_share)
        summary = curve.summary(reference, config.evaluation.cost_budget_share, config.evaluation.quality_target_share)
        rows.append({"lever": label, "aiq": summary["aiq"],
                     "aiq_ci": Interval.of(summary["aiq"], replicates[label]["aiq"]).format(4)})
    base = rows[0]["aiq"]
    for row in rows:
        row["minus_default"] = Interval.of(row["aiq"] - base,
                                           replicates[row["lever"]]["aiq"] - replicates["default"]["aiq"]).format(4)
    return pd.DataFrame(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=None)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mixllm-levers", help="Work folder (kept: caches).")
    parser.add_argument("--resamples", type=int, default=500)
    parser.add_argument("--skip", default="", help="Comma-separated rows to leave out, e.g. 'boosted base,boosted base + "
                        "residual head' (gradient-boosted trees per LLM take most of the time on the larger logs).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("sentence_transformers", "mixllm", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    bench = load_benchmark_config(ROOT / "benchmarks/datasets.yaml")
    names = list(bench.datasets) if not args.datasets else args.datasets.split(",")
    for name in names:
        entry = bench.datasets[name]
        skip = frozenset(label.strip() for label in args.skip.split(",") if label.strip())
        table = run(name, entry, bench.data_path(entry), args.work, args.resamples, skip)
        print(f"\n### {name} (5-fold cross-validation on train + validation; AIQ of out-of-fold predictions)\n")
        print(table[["lever", "aiq_ci", "minus_default"]].rename(
            columns={"aiq_ci": "AIQ (95% CI)", "minus_default": "lever − default (95% CI)"}).to_markdown(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
