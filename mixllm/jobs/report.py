"""The evaluation report of a router: MixLLM and its baselines on the holdout (quality, cost,
AIQ, bootstrap intervals), lambda calibrated on validation, and the files it is written to."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mixllm.config import MixLLMConfig
from mixllm.core.embeddings import EmbeddingCache, QueryEncoder
from mixllm.core.errors import MixLLMError
from mixllm.core.router import MixLLMRouter
from mixllm.evaluation.baselines import MixLLMAdapter, make_baseline, query_frame
from mixllm.evaluation.bootstrap import (
    BOOTSTRAP_METRICS,
    Interval,
    at_lambda_bootstrap,
    bootstrap_metrics,
    bootstrap_weights,
)
from mixllm.evaluation.calibration import Calibration, calibrate_lambda
from mixllm.evaluation.evaluate import (
    OperatingPoint,
    Outcomes,
    Reference,
    RouterCurve,
    best_single_llm,
    hull_quality,
    measure_router,
    operating_point,
    routing_overhead_ms,
    sweep,
)
from mixllm.evaluation.results import curve_records, format_table, pareto_plot, results_table, to_jsonable
from mixllm.io.workspace import SplitData, Workspace, write_atomic

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ evaluation


@dataclass
class EvaluationReport:
    """Everything measured about a router on the holdout, plus the baselines of the same run."""

    reference: Reference
    curves: list[RouterCurve]
    calibration: Calibration
    holdout_at_calibrated: OperatingPoint
    single_llms: dict[str, OperatingPoint]
    metrics: dict[str, float] = field(default_factory=dict)
    predictor_scores: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    backend_metrics: dict[str, float] = field(default_factory=dict)  # the encoder backends compared in training
    predictions_finite: bool = True  # every q, sigma and cost the router predicted on the holdout
    # Bootstrap over holdout queries: per router, per metric, the estimate and its interval; and
    # MixLLM minus each baseline on the same resamples (paired).
    intervals: dict[str, dict[str, Interval]] = field(default_factory=dict)
    differences: dict[str, dict[str, Interval]] = field(default_factory=dict)

    @property
    def mixllm(self) -> RouterCurve:
        return self.curves[0]

    def table(self, config: MixLLMConfig) -> pd.DataFrame:
        return results_table(self.curves, self.reference, config.evaluation.cost_budget_share,
                             config.evaluation.quality_target_share)

    def uncertainty_lines(self) -> list[str]:
        """MixLLM's AIQ with its interval, and its paired difference to the strongest learned baseline."""
        mine = self.intervals.get(self.mixllm.name, {})
        if "aiq" not in mine:
            return []
        lines = [f"AIQ {mine['aiq'].format(4)} (95% bootstrap interval over holdout queries)"]
        learned = {name: d for name, d in self.differences.items() if name not in ("oracle", "random")}
        if learned:
            rival = max(learned, key=lambda n: self.intervals[n]["aiq"].estimate
                        if np.isfinite(self.intervals[n]["aiq"].estimate) else -np.inf)
            lines.append(f"MixLLM - {rival} (the best baseline by AIQ): {learned[rival]['aiq'].format(4)} AIQ, paired")
        return lines

    def headline(self) -> str:
        point = self.holdout_at_calibrated
        return (f"{100 * point.quality_share:.2f}% of {self.reference.llm}'s quality at "
                f"{100 * point.cost_share:.2f}% of its cost (lambda={point.lambda_:g}, calibrated on validation)")


def reference_llm(config: MixLLMConfig, train: pd.DataFrame) -> str:
    return config.evaluation.reference_llm or best_single_llm(train)


def reference_on(log: pd.DataFrame, query_ids: Sequence[str], outcomes: Outcomes, llm: str) -> Reference:
    """The reference measured on these queries, also when it is not in the routed pool (disabled)."""
    yardstick = outcomes if llm in outcomes.llms else Outcomes.from_log(log, query_ids, [llm])
    return Reference.of(outcomes, llm, yardstick)


def reference_columns(log: pd.DataFrame, query_ids: Sequence[str], outcomes: Outcomes,
                      llm: str) -> tuple[np.ndarray, np.ndarray]:
    """The reference LLM's quality and cost on each of these queries (for per-query bounds and the bootstrap)."""
    yardstick = outcomes if llm in outcomes.llms else Outcomes.from_log(log, query_ids, [llm])
    j = yardstick.llms.index(llm)
    return yardstick.quality[:, j], yardstick.cost_usd[:, j]


def bootstrap_report(curves: Sequence[RouterCurve], outcomes: Outcomes, reference: Reference,
                     reference_quality: np.ndarray, reference_cost: np.ndarray, config: MixLLMConfig,
                     calibrated_lambda: float | None = None) -> tuple[dict[str, dict[str, Interval]], dict[str, dict[str, Interval]]]:
    """Bootstrap intervals of every router's metrics, and of the first router minus each other one."""
    evaluation = config.evaluation
    if evaluation.bootstrap_resamples == 0 or not curves:
        return {}, {}
    weights = bootstrap_weights(len(outcomes.query_ids), evaluation.bootstrap_resamples, evaluation.seed)
    level = evaluation.confidence_level
    estimates = results_table(curves, reference, evaluation.cost_budget_share,
                              evaluation.quality_target_share).set_index("router")
    replicates = {curve.name: bootstrap_metrics(curve, outcomes, reference_quality, reference_cost, weights,
                                                evaluation.cost_budget_share, evaluation.quality_target_share)
                  for curve in curves}
    intervals: dict[str, dict[str, Interval]] = {}
    for curve in curves:
        row = estimates.loc[curve.name]
        intervals[curve.name] = {metric: Interval.of(_number(row.get(metric)), replicates[curve.name][metric], level)
                                 for metric in BOOTSTRAP_METRICS}
    first = curves[0]
    if calibrated_lambda is not None and first.path is not None:
        at = at_lambda_bootstrap(first.path, calibrated_lambda, outcomes, reference_quality, reference_cost, weights)
        if first.calibrated is not None:
            intervals[first.name]["calibrated_quality_pct"] = Interval.of(100 * first.calibrated.quality_share,
                                                                          at["quality_pct"], level)
            intervals[first.name]["calibrated_cost_pct"] = Interval.of(100 * first.calibrated.cost_share,
                                                                       at["cost_pct"], level)
    differences: dict[str, dict[str, Interval]] = {}
    for curve in curves[1:]:
        if not curve.sweeps_lambda:
            continue
        differences[curve.name] = {}
        for metric in ("aiq", "quality_at_budget_pct"):
            mine, theirs = intervals[first.name][metric].estimate, intervals[curve.name][metric].estimate
            differences[curve.name][metric] = Interval.of(
                mine - theirs, replicates[first.name][metric] - replicates[curve.name][metric], level)
    return intervals, differences


def _number(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and not np.isfinite(value)) else float(value)


def evaluate_router(
    config: MixLLMConfig,
    router: MixLLMRouter,
    split: SplitData,
    *,
    baselines: Sequence[str] | None = None,
    name: str = "mixllm",
    bootstrap: bool = True,
) -> EvaluationReport:
    """Curves on the holdout for the router (and baselines), lambda calibrated on validation, and
    (with `bootstrap`) confidence intervals and paired differences to the baselines."""
    evaluation = config.evaluation
    llms = router.enabled_llms_
    holdout_queries, outcomes, reference = holdout_context(config, split, llms)
    adapter = MixLLMAdapter(router)
    overhead = routing_overhead_ms(router, holdout_queries["query"].tolist())
    curves = [measure_router(name, adapter, holdout_queries, outcomes, reference, overhead)]
    # Calibrate lambda for the cost budget on validation, then read the holdout at that lambda.
    validation_queries = query_frame(split.validation)
    if len(validation_queries):
        calibration = calibrate_on_validation(config, adapter, split, llms, reference.llm, "cost_share",
                                              evaluation.cost_budget_share)
    else:
        logger.warning("no validation queries: lambda is taken from the config, not calibrated")
        fixed = router.default_lambda
        calibration = Calibration("config", fixed, fixed, curves[0].points[0], False)
    predictions = adapter.predict(holdout_queries)
    calibrated = sweep(predictions, outcomes, reference, [calibration.lambda_], router.cost_scale_usd_)[0]
    curves[0].calibrated = calibrated
    single = {llm: operating_point(np.full(len(holdout_queries), j), llms, outcomes, reference)
              for j, llm in enumerate(llms)}
    for baseline in baselines if baselines is not None else evaluation.baselines:
        curves.append(measure_baseline(config, baseline, split, llms, router.encoder_))
    finite = all(np.isfinite(values).all() for values in (predictions.quality, predictions.uncertainty,
                                                          predictions.cost_usd))
    report = EvaluationReport(reference, curves, calibration, calibrated, single, predictions_finite=bool(finite))
    reference_quality, reference_cost = reference_columns(split.holdout, holdout_queries["query_id"], outcomes,
                                                          reference.llm)
    if bootstrap:
        report.intervals, report.differences = bootstrap_report(curves, outcomes, reference, reference_quality,
                                                                reference_cost, config, calibration.lambda_)
    report.predictor_scores = predictor_scores(predictions, outcomes)
    report.timings = {f"timing.{k}": float(v) for k, v in getattr(router, "timings_", {}).items()}
    choice = getattr(router, "backend_choice_", None) or {}
    report.backend_metrics = {f"backend.{name}.{key}": float(value)
                              for name, figures in choice.get("candidates", {}).items()
                              for key, value in figures.items() if np.isfinite(value)}
    report.metrics = flat_metrics(report, config)
    return report


def calibrate_on_validation(config: MixLLMConfig, adapter: Any, split: SplitData, llms: Sequence[str],
                            reference_llm: str, target: str, value: float) -> Calibration:
    """The lambda meeting a target on the validation part, with the budget's confidence bound."""
    evaluation = config.evaluation
    validation, outcomes, reference = validation_context(config, split, llms, reference_llm)
    _, reference_cost = reference_columns(split.validation, validation["query_id"], outcomes, reference.llm)
    return calibrate_lambda(adapter.predict(validation), outcomes, reference, adapter.cost_scale_usd_, target, value,
                            confidence=evaluation.budget_confidence,
                            window_queries=evaluation.budget_window_queries, reference_cost_usd=reference_cost)


def validation_context(config: MixLLMConfig, split: SplitData, llms: Sequence[str],
                       reference_llm_name: str | None = None) -> tuple[pd.DataFrame, Outcomes, Reference]:
    """The validation part's queries, every LLM's real outcome on them, and the reference LLM
    (the train part's, unless named): for choices made before the holdout is looked at."""
    queries = query_frame(split.validation)
    if queries.empty:
        raise MixLLMError("no validation queries to calibrate lambda or choose the encoder backend on; "
                          "set split.validation_fraction > 0")
    outcomes = Outcomes.from_log(split.validation, queries["query_id"], llms)
    reference = reference_on(split.validation, queries["query_id"], outcomes,
                             reference_llm_name or reference_llm(config, split.train))
    return queries, outcomes, reference


def predictor_scores(predictions: Any, outcomes: Outcomes) -> dict[str, float]:
    """Per LLM on the holdout: the quality predictor's mean squared error, and the share of it the
    predictor removes compared with always predicting that LLM's mean (1 - MSE / variance)."""
    scores = {}
    for j, llm in enumerate(predictions.llms):
        truth = outcomes.quality[:, outcomes.llms.index(llm)]
        mse = float(np.mean((predictions.quality[:, j] - truth) ** 2))
        variance = float(np.var(truth))
        scores[f"predictor.{llm}.quality_mse"] = mse
        if variance > 0:
            scores[f"predictor.{llm}.quality_r2"] = 1.0 - mse / variance
        cost_truth = outcomes.cost_usd[:, outcomes.llms.index(llm)]
        scores[f"predictor.{llm}.cost_mape"] = float(np.mean(np.abs(predictions.cost_usd[:, j] - cost_truth)
                                                             / np.maximum(cost_truth, 1e-12)))
    return scores


def calibrate_router(config: MixLLMConfig, router: MixLLMRouter, split: SplitData, target: str,
                     value: float) -> tuple[Calibration, OperatingPoint]:
    """The lambda meeting a target on validation, and what that lambda gives on the holdout."""
    adapter = MixLLMAdapter(router)
    llms = router.enabled_llms_
    result = calibrate_on_validation(config, adapter, split, llms, reference_llm(config, split.train), target, value)
    holdout_queries, outcomes, reference = holdout_context(config, split, llms)
    on_holdout = sweep(adapter.predict(holdout_queries), outcomes, reference, [result.lambda_], router.cost_scale_usd_)[0]
    return result, on_holdout


def holdout_context(config: MixLLMConfig, split: SplitData, llms: Sequence[str]) -> tuple[pd.DataFrame, Outcomes, Reference]:
    """The holdout's queries, every LLM's real outcome on them, and the reference LLM."""
    holdout_queries = query_frame(split.holdout)
    outcomes = Outcomes.from_log(split.holdout, holdout_queries["query_id"], llms)
    reference = reference_on(split.holdout, holdout_queries["query_id"], outcomes, reference_llm(config, split.train))
    return holdout_queries, outcomes, reference


def frozen_embedder(config: MixLLMConfig, encoder: QueryEncoder) -> Any:
    """queries -> embeddings with the given encoder, through the work folder's embedding cache."""
    cache = EmbeddingCache(Workspace.of(config).cache)
    return lambda queries: cache.transform(encoder, list(queries))


def measure_baseline(config: MixLLMConfig, name: str, split: SplitData, llms: Sequence[str],
                     encoder: QueryEncoder | None) -> RouterCurve:
    """Fit one baseline on train (the oracle on the holdout itself) and measure it on the holdout.

    The embedding baselines (kNN, MLP) use the router's encoder, frozen (RouterBench's recipe),
    through the embedding cache; their ms/query is timed separately on a fresh sample so that it
    includes the encoder, as MixLLM's does.
    """
    started = time.perf_counter()
    holdout_queries, outcomes, reference = holdout_context(config, split, llms)
    embed = frozen_embedder(config, encoder) if encoder is not None else None
    model = make_baseline(name, embed=embed, random_state=config.evaluation.seed)
    fit_on = split.holdout if name == "oracle" else split.train
    model.fit(fit_on[fit_on["llm"].isin(llms)])
    overhead = None
    if getattr(model, "embed", None) is not None and encoder is not None:
        sample = holdout_queries.head(64)
        model.embed = encoder.transform
        timer = time.perf_counter()
        model.predict(sample)
        overhead = 1000 * (time.perf_counter() - timer) / max(len(sample), 1)
        model.embed = embed
    curve = measure_router(name, model, holdout_queries, outcomes, reference, overhead)
    logger.info("baseline %s measured in %.1fs", name, time.perf_counter() - started)
    return curve


def flat_metrics(report: EvaluationReport, config: MixLLMConfig) -> dict[str, float]:
    """`metric` for MixLLM, `baseline.<name>.metric` for the others (MLflow / DVC metrics)."""
    table = report.table(config)
    metrics: dict[str, float] = {}
    for row in table.to_dict(orient="records"):
        prefix = "" if row["router"] == report.mixllm.name else f"baseline.{row['router']}."
        for key, value in row.items():
            if key != "router" and value is not None and isinstance(value, (int, float)) and np.isfinite(value):
                metrics[f"{prefix}{key}"] = float(value)
    reference = report.reference
    metrics["reference.mean_quality"] = reference.mean_quality
    metrics["reference.mean_cost_usd"] = reference.mean_cost_usd
    budget = config.evaluation.cost_budget_share * reference.mean_cost_usd
    metrics["quality_at_budget"] = hull_quality(report.mixllm.hull(), budget)
    if report.calibration.cost_bound is not None:
        metrics["calibration.validation_cost_bound"] = float(report.calibration.cost_bound)
    for router, intervals in report.intervals.items():
        prefix = "" if router == report.mixllm.name else f"baseline.{router}."
        for metric, interval in intervals.items():
            if np.isfinite(interval.low):
                metrics[f"{prefix}{metric}.ci_low"] = interval.low
                metrics[f"{prefix}{metric}.ci_high"] = interval.high
    for router, differences in report.differences.items():
        for metric, interval in differences.items():
            if np.isfinite(interval.estimate):
                metrics[f"vs.{router}.{metric}.diff"] = interval.estimate
                metrics[f"vs.{router}.{metric}.ci_low"] = interval.low
                metrics[f"vs.{router}.{metric}.ci_high"] = interval.high
    metrics.update(report.predictor_scores)
    metrics.update(report.timings)
    metrics.update(report.backend_metrics)
    return metrics


def objective(report: EvaluationReport, config: MixLLMConfig) -> float:
    """The number the gate compares: AIQ, or quality at the configured budget (share of the reference)."""
    # Missing means not measurable (e.g. no cost range for AIQ): NaN, which the gate refuses.
    if config.gate.objective == "aiq":
        return report.metrics.get("aiq", float("nan"))
    return report.metrics.get("quality_at_budget_pct", float("nan")) / 100

# What metrics.json holds (a dozen columns in `dvc metrics show`); metrics_detail.json has every figure.
SUMMARY_METRICS = ("aiq", "aiq.ci_low", "aiq.ci_high", "quality_at_budget_pct", "calibrated_quality_pct",
                   "calibrated_cost_pct", "ms_per_query")


def summary_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """MixLLM's headline figures and each baseline's AIQ, from the full flat metrics."""
    summary = {key: metrics[key] for key in SUMMARY_METRICS if key in metrics}
    summary.update({key: value for key, value in metrics.items()
                    if key.startswith("baseline.") and key.endswith(".aiq")})
    return summary


def write_evaluation(config: MixLLMConfig, report: EvaluationReport, workspace: Workspace) -> None:
    workspace.root.mkdir(parents=True, exist_ok=True)
    write_atomic(workspace.metrics, json.dumps(to_jsonable(summary_metrics(report.metrics)), indent=2, sort_keys=True))
    write_atomic(workspace.metrics_detail, json.dumps(to_jsonable(report.metrics), indent=2, sort_keys=True))
    curve_records(report.curves).to_csv(workspace.curve, index=False)
    table = report.table(config)
    write_atomic(workspace.table, format_table(table) + "\n\n" + report.headline() + "\n")
    pareto_plot(report.curves, report.reference, report.single_llms, workspace.plot,
                title=f"Holdout quality vs cost (reference: {report.reference.llm})",
                budget_share=config.evaluation.cost_budget_share, quality_share=config.evaluation.quality_target_share)
    write_atomic(workspace.evaluation, json.dumps(to_jsonable({
        "reference": report.reference, "calibration": report.calibration,
        "holdout_at_calibrated": report.holdout_at_calibrated, "headline": report.headline(),
    }), indent=2))


def finish_report(config: MixLLMConfig, report: EvaluationReport, baseline_curves: Sequence[RouterCurve]) -> EvaluationReport:
    """MixLLM's report joined with baseline curves measured separately (in parallel, by the flow):
    the metrics are recomputed with them, and the evaluation files written."""
    report.curves.extend(baseline_curves)
    report.metrics = flat_metrics(report, config)
    write_evaluation(config, report, Workspace.of(config))
    return report
