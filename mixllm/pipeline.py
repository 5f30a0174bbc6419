"""The training and continual-learning steps, as plain functions over the config and a work folder.

DVC stages (`mixllm pipeline STAGE`), Prefect tasks (flows/) and `mixllm train` all call these; no
orchestration lives here. Each step reads its inputs from, and writes its outputs to, the work
folder (`pipeline.work_dir`), so any orchestrator can cache and skip it:

    split.parquet -> tags.json -> encoder/ -> router/ -> metrics.json, curve.csv, table.md, pareto.png
    -> registration.json (MLflow: a new version, promoted to champion only through the gate)
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mixllm.baselines import MixLLMAdapter, make_baseline, query_frame
from mixllm.config import MixLLMConfig, PlausibilityConfig, config_from_dict
from mixllm.data import InteractionStore, load_interactions, split_queries
from mixllm.embeddings import EmbeddingCache, QueryEncoder
from mixllm.errors import MixLLMError
from mixllm.evaluate import (
    Calibration,
    OperatingPoint,
    Outcomes,
    Reference,
    RouterCurve,
    best_single_llm,
    calibrate_lambda,
    curve_records,
    format_table,
    hull_quality,
    BOOTSTRAP_METRICS,
    Interval,
    at_lambda_bootstrap,
    bootstrap_metrics,
    bootstrap_weights,
    measure_router,
    operating_point,
    pareto_plot,
    results_table,
    routing_overhead_ms,
    sweep,
    to_jsonable,
)
from mixllm.router import MixLLMRouter

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ workspace


@dataclass(frozen=True)
class Workspace:
    """Where each step's outputs live (one folder; dvc.yaml names the same paths)."""

    root: Path

    @classmethod
    def of(cls, config: MixLLMConfig) -> Workspace:
        return cls(config.path(config.pipeline.work_dir))

    split = property(lambda self: self.root / "split.parquet")
    tags = property(lambda self: self.root / "tags.json")
    encoder = property(lambda self: self.root / "encoder")
    router = property(lambda self: self.root / "router")
    metrics = property(lambda self: self.root / "metrics.json")
    curve = property(lambda self: self.root / "curve.csv")
    table = property(lambda self: self.root / "table.md")
    plot = property(lambda self: self.root / "pareto.png")
    evaluation = property(lambda self: self.root / "evaluation.json")
    registration = property(lambda self: self.root / "registration.json")
    replayed = property(lambda self: self.root / "replayed" / "router")
    cache = property(lambda self: self.root / "cache")


def stable_hash(*parts: Any) -> str:
    digest = hashlib.blake2b(digest_size=12)
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def data_hash(frame: pd.DataFrame) -> str:
    """Content hash of an interaction set (order-independent)."""
    hashes = frame["row_hash"] if "row_hash" in frame else pd.util.hash_pandas_object(frame, index=False).astype(str)
    return stable_hash(sorted(hashes.astype(str).tolist()))


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _replace_dir(target: Path, write: Any) -> Path:
    """Write a folder next to `target`, then swap it in: a failed step never leaves half a folder."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.replace(target)
    return target


# ---------------------------------------------------------------------------------------- split


@dataclass
class SplitData:
    train: pd.DataFrame
    validation: pd.DataFrame
    holdout: pd.DataFrame

    @property
    def fingerprint(self) -> str:
        return stable_hash(data_hash(self.train), data_hash(self.validation), data_hash(self.holdout))


def stage_split(config: MixLLMConfig) -> Path:
    """Assign every stored query to train / validation / holdout (split.parquet: query_id, part)."""
    log = load_interactions(config)
    parts = split_queries(log, config.split)
    workspace = Workspace.of(config)
    workspace.root.mkdir(parents=True, exist_ok=True)
    frame = parts.rename("part").rename_axis("query_id").reset_index()
    frame.to_parquet(workspace.split, index=False)
    counts = frame["part"].value_counts().to_dict()
    logger.info("split %d queries: %s", len(frame), counts)
    return workspace.split


def load_split(config: MixLLMConfig) -> SplitData:
    """The stored interactions divided by split.parquet (made on demand when missing)."""
    workspace = Workspace.of(config)
    if not workspace.split.is_file():
        stage_split(config)
    log = load_interactions(config)
    parts = pd.read_parquet(workspace.split).set_index("query_id")["part"]
    part = log["query_id"].astype(str).map(parts)
    unassigned = int(part.isna().sum())
    if unassigned:
        logger.warning("%d interactions of queries newer than split.parquet go to train; re-run the split stage", unassigned)
        part = part.fillna("train")
    log = log.assign(part=part.to_numpy())
    return SplitData(*(log[log["part"] == name].reset_index(drop=True) for name in ("train", "validation", "holdout")))


# ----------------------------------------------------------------------------- tags and encoder


def stage_tags(config: MixLLMConfig, split: SplitData | None = None, progress: bool | None = None) -> Path:
    """Each training query's domain: its task label, or its tag cluster (tags.json: labels and the report)."""
    split = split or load_split(config)
    router = MixLLMRouter(config, progress=progress)
    frame = query_frame(split.train)
    sources = frame["source"].tolist() if "source" in frame else None
    labels, report = router.fit_domains(frame["query"].tolist(), sources)
    workspace = Workspace.of(config)
    payload = {"domains": dict(zip(frame["query_id"].astype(str), map(str, labels))), "report": report,
               "timings": getattr(router, "timings_", {})}
    _write_atomic(workspace.tags, json.dumps(to_jsonable(payload), indent=1))
    return workspace.tags


def read_tags(config: MixLLMConfig) -> tuple[dict[str, str], dict[str, Any]]:
    path = Workspace.of(config).tags
    if not path.is_file():
        raise MixLLMError(f"{path} is missing; run the tags stage first (`mixllm pipeline tags` or `dvc repro tags`)")
    payload = json.loads(path.read_text(encoding="utf-8"))
    return {k: str(v) for k, v in payload["domains"].items()}, payload["report"]


def stage_encoder(config: MixLLMConfig, split: SplitData | None = None, progress: bool | None = None) -> Path:
    """Fine-tune (or just load) the encoder on the training queries' domains; saved as a ST folder."""
    split = split or load_split(config)
    domains, _ = read_tags(config)
    frame = query_frame(split.train)
    labels = frame["query_id"].astype(str).map(lambda q: domains.get(q, "")).tolist()
    encoder = MixLLMRouter(config, progress=progress).fit_encoder(frame["query"].tolist(), labels)
    return _replace_dir(Workspace.of(config).encoder, encoder.save)


def stage_predictors(config: MixLLMConfig, split: SplitData | None = None, progress: bool | None = None) -> Path:
    """Fit the featurizer and the per-LLM predictors; router/ is the complete, loadable router."""
    split = split or load_split(config)
    workspace = Workspace.of(config)
    domains, report = read_tags(config)
    encoder = QueryEncoder.load(workspace.encoder)
    encoder.progress = progress
    router = MixLLMRouter(config, cache_dir=workspace.cache, progress=progress)
    router.tag_report_ = report
    router.fit(split.train, domains=domains, encoder=encoder)
    return _replace_dir(workspace.router, router.save)


def train_router(config: MixLLMConfig, split: SplitData, progress: bool | None = None) -> MixLLMRouter:
    """The three training stages (tags -> encoder -> predictors) through the work folder; a stage
    whose inputs are unchanged since it last ran there (same stage key, output present) is reused."""
    done = completed_stages(config)
    for stage, run in (("tags", stage_tags), ("encoder", stage_encoder), ("predictors", stage_predictors)):
        if stage in done:
            logger.info("stage %s: inputs unchanged, reusing its output", stage)
            continue
        run(config, split, progress)
        record_stage(config, stage)
        done = {s for s in done if STAGES.index(s) < STAGES.index(stage)}
    return MixLLMRouter.load(Workspace.of(config).router, progress=progress)


def reuse_stage_outputs(source: MixLLMConfig, target: MixLLMConfig) -> list[str]:
    """Copy the outputs of every leading stage whose key is the same under both configs (for
    ablations that share tags or the encoder with a trained run); returns the stages copied."""
    source_keys, target_keys = stage_keys(source), stage_keys(target)
    source_out, target_out = _stage_outputs(Workspace.of(source)), _stage_outputs(Workspace.of(target))
    copied = []
    for stage in STAGES:
        if source_keys[stage] != target_keys[stage] or not source_out[stage].exists():
            break
        if source_out[stage].is_dir():
            shutil.copytree(source_out[stage], target_out[stage], dirs_exist_ok=True)
        else:
            target_out[stage].parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source_out[stage], target_out[stage])
        record_stage(target, stage)
        copied.append(stage)
    return copied


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


def _reference_llm(config: MixLLMConfig, train: pd.DataFrame) -> str:
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
    report.metrics = flat_metrics(report, config)
    return report


def calibrate_on_validation(config: MixLLMConfig, adapter: Any, split: SplitData, llms: Sequence[str],
                            reference_llm: str, target: str, value: float) -> Calibration:
    """The lambda meeting a target on the validation part, with the budget's confidence bound."""
    evaluation = config.evaluation
    validation = query_frame(split.validation)
    if validation.empty:
        raise MixLLMError("no validation queries to calibrate on; set split.validation_fraction > 0")
    validation_outcomes = Outcomes.from_log(split.validation, validation["query_id"], llms)
    validation_reference = reference_on(split.validation, validation["query_id"], validation_outcomes, reference_llm)
    _, reference_cost = reference_columns(split.validation, validation["query_id"], validation_outcomes, reference_llm)
    return calibrate_lambda(adapter.predict(validation), validation_outcomes, validation_reference,
                            adapter.cost_scale_usd_, target, value, confidence=evaluation.budget_confidence,
                            window_queries=evaluation.budget_window_queries, reference_cost_usd=reference_cost)


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
    result = calibrate_on_validation(config, adapter, split, llms, _reference_llm(config, split.train), target, value)
    holdout_queries, outcomes, reference = holdout_context(config, split, llms)
    on_holdout = sweep(adapter.predict(holdout_queries), outcomes, reference, [result.lambda_], router.cost_scale_usd_)[0]
    return result, on_holdout


def holdout_context(config: MixLLMConfig, split: SplitData, llms: Sequence[str]) -> tuple[pd.DataFrame, Outcomes, Reference]:
    """The holdout's queries, every LLM's real outcome on them, and the reference LLM."""
    holdout_queries = query_frame(split.holdout)
    outcomes = Outcomes.from_log(split.holdout, holdout_queries["query_id"], llms)
    reference = reference_on(split.holdout, holdout_queries["query_id"], outcomes, _reference_llm(config, split.train))
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
    return metrics


def objective(report: EvaluationReport, config: MixLLMConfig) -> float:
    """The number the gate compares: AIQ, or quality at the configured budget (share of the reference)."""
    # Missing means not measurable (e.g. no cost range for AIQ): NaN, which the gate refuses.
    if config.gate.objective == "aiq":
        return report.metrics.get("aiq", float("nan"))
    return report.metrics.get("quality_at_budget_pct", float("nan")) / 100


def stage_evaluate(config: MixLLMConfig, split: SplitData | None = None, progress: bool | None = None,
                   baselines: Sequence[str] | None = None, router_dir: Path | None = None) -> EvaluationReport:
    """Evaluate router/ (or `router_dir`) on the holdout; write metrics.json, curve.csv, table.md
    and pareto.png."""
    split = split or load_split(config)
    workspace = Workspace.of(config)
    router = MixLLMRouter.load(router_dir or workspace.router, progress=progress)
    router.cache_dir = workspace.cache
    report = evaluate_router(config, router, split, baselines=baselines)
    write_evaluation(config, report, workspace)
    return report


def write_evaluation(config: MixLLMConfig, report: EvaluationReport, workspace: Workspace) -> None:
    workspace.root.mkdir(parents=True, exist_ok=True)
    _write_atomic(workspace.metrics, json.dumps(to_jsonable(report.metrics), indent=2, sort_keys=True))
    curve_records(report.curves).to_csv(workspace.curve, index=False)
    table = report.table(config)
    _write_atomic(workspace.table, format_table(table) + "\n\n" + report.headline() + "\n")
    pareto_plot(report.curves, report.reference, report.single_llms, workspace.plot,
                title=f"Holdout quality vs cost (reference: {report.reference.llm})",
                budget_share=config.evaluation.cost_budget_share, quality_share=config.evaluation.quality_target_share)
    _write_atomic(workspace.evaluation, json.dumps(to_jsonable({
        "reference": report.reference, "calibration": report.calibration,
        "holdout_at_calibrated": report.holdout_at_calibrated, "headline": report.headline(),
    }), indent=2))


# -------------------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class GateVerdict:
    promote: bool
    reasons: tuple[str, ...]
    objective: str
    candidate: float
    champion: float | None

    def summary(self) -> str:
        verdict = "promote to champion" if self.promote else "keep as challenger"
        return f"{verdict}: " + "; ".join(self.reasons)


def sanity_problems(config: MixLLMConfig, router: MixLLMRouter, report: EvaluationReport) -> list[str]:
    """What must hold for any router to serve: predictors for every enabled LLM, finite predictions
    and cost scale, a cost weight that changes something, a calibrated lambda that met its budget on
    validation, routing overhead within budget. A degenerate model (one poisoned cost can make every
    LLM but one look free) fails here with its reason, even as the first model."""
    problems = []
    missing = [llm.name for llm in config.enabled_llms if llm.name not in router.llms_]
    if missing:
        problems.append(f"no predictors for enabled LLM(s): {', '.join(missing)}")
    curve = report.mixllm
    if not report.predictions_finite:
        problems.append("NaN or infinite predictions on the holdout")
    scale = router.cost_scale_usd_
    if not (np.isfinite(scale) and scale > 0):
        problems.append(f"the cost scale is {scale!r} USD; it must be a positive finite number (check the costs in "
                        "the training data, or set decision.cost_scale_usd)")
    distinct = {(round(p.mean_cost_usd, 12), round(p.mean_quality, 12)) for p in curve.points}
    if len(router.enabled_llms_) > 1 and len(distinct) < 2:
        problems.append("every lambda gives the same routing on the holdout (one operating point): the cost "
                        "weight changes nothing, so the predicted costs or qualities are degenerate")
    if config.decision.lambda_ is None and not report.calibration.met:
        problems.append(f"no lambda met the {report.calibration.target} target {report.calibration.value:g} on "
                        f"validation (the closest, lambda={report.calibration.lambda_:g}, is at the edge of the "
                        "path); serve with an explicit decision.lambda or change evaluation.cost_budget_share")
    if curve.ms_per_query > config.gate.max_overhead_ms:
        problems.append(f"routing overhead {curve.ms_per_query:.1f} ms/query exceeds gate.max_overhead_ms "
                        f"({config.gate.max_overhead_ms})")
    return problems


def gate(config: MixLLMConfig, candidate: float, champion: float | None, problems: Sequence[str]) -> GateVerdict:
    """Promote when the sanity checks pass and the candidate is not worse than the champion by more
    than the tolerance (the first model only needs the sanity checks)."""
    name = config.gate.objective
    reasons = list(problems)
    if problems:
        return GateVerdict(False, tuple(reasons), name, candidate, champion)
    if champion is None:
        return GateVerdict(True, ("first model: sanity checks pass",), name, candidate, None)
    if not np.isfinite(candidate):
        return GateVerdict(False, (f"{name} is not finite",), name, candidate, champion)
    delta = candidate - champion
    if delta < -config.gate.tolerance:
        reasons.append(f"{name} {candidate:.4f} is {-delta:.4f} below the champion's {champion:.4f} "
                       f"(tolerance {config.gate.tolerance})")
        return GateVerdict(False, tuple(reasons), name, candidate, champion)
    reasons.append(f"{name} {candidate:.4f} vs champion {champion:.4f} (tolerance {config.gate.tolerance})")
    return GateVerdict(True, tuple(reasons), name, candidate, champion)


# ---------------------------------------------------------------------------------- registration


@dataclass
class Registration:
    version: int
    promoted: bool
    verdict: GateVerdict
    champion_before: int | None
    run_id: str

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(asdict(self))


def register_candidate(config: MixLLMConfig, router_dir: Path, report: EvaluationReport, split: SplitData,
                       *, run_name: str, extra_tags: dict[str, str] | None = None,
                       artifacts: Sequence[Path] = ()) -> Registration:
    """Compare with the champion on the same holdout, log and register, then promote or mark challenger."""
    from mixllm.registry import Registry, git_commit

    registry = Registry(config)
    router = MixLLMRouter.load(router_dir, progress=False)
    champion_before = registry.alias_version("champion")
    champion_value = None
    if champion_before is not None:
        champion_router, _ = registry.load_router(champion_before)
        champion_router.cache_dir = Workspace.of(config).cache  # keyed by encoder weights: never stale
        champion_report = evaluate_router(config, champion_router, split, baselines=[], name="champion")
        champion_value = objective(champion_report, config)
        report.metrics["champion.objective"] = champion_value
    verdict = gate(config, objective(report, config), champion_value, sanity_problems(config, router, report))
    tags = {
        "mixllm.data_hash": split.fingerprint,
        "mixllm.git_commit": git_commit(config.root),
        "mixllm.gate": verdict.summary()[:4900],
        "mixllm.objective": f"{verdict.objective}={verdict.candidate:.6f}",
        **(extra_tags or {}),
    }
    params = config.to_flat_dict()
    metrics = {**report.metrics, "gate.promoted": float(verdict.promote)}
    with tempfile.TemporaryDirectory(prefix="mixllm-register-") as scratch:  # MLflow copies what it logs
        run_id, version_number = registry.log_candidate(
            _with_calibrated_lambda(router_dir, report.calibration.lambda_, Path(scratch)), params=params,
            metrics=metrics, artifacts=list(artifacts), tags=tags, run_name=run_name,
            input_example=query_frame(split.holdout)["query"].head(2).str.slice(0, 300).tolist(),
        )
    if verdict.promote:
        registry.promote(version_number, verdict.summary())
    else:
        registry.mark_challenger(version_number)
        logger.warning("version %d not promoted: %s", version_number, verdict.summary())
    return Registration(version_number, verdict.promote, verdict, champion_before, run_id)


def _with_calibrated_lambda(router_dir: Path, lambda_: float, scratch: Path) -> Path:
    """A copy of the router folder (in `scratch`) that carries the lambda calibrated for the budget
    (the router uses it when decision.lambda is null). A copy: the folder may be a DVC output."""
    target = scratch / "router"
    shutil.copytree(router_dir, target)
    manifest_path = target / "router.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["calibrated_lambda"] = float(lambda_)
    manifest_path.write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
    return target


def stage_register(config: MixLLMConfig, split: SplitData | None = None) -> Registration:
    """Register router/ with the evaluation in the work folder (DVC's last stage)."""
    split = split or load_split(config)
    workspace = Workspace.of(config)
    router = MixLLMRouter.load(workspace.router, progress=False)
    router.cache_dir = workspace.cache
    report = evaluate_router(config, router, split, baselines=[])
    registration = register_candidate(
        config, workspace.router, report, split, run_name="training",
        artifacts=[workspace.plot, workspace.table, workspace.curve, workspace.tags, workspace.metrics],
    )
    _write_atomic(workspace.registration, json.dumps(registration.to_dict(), indent=2))
    return registration


# ------------------------------------------------------------------------------------- training


@dataclass
class TrainingOutcome:
    registration: Registration | None
    report: EvaluationReport
    workspace: Workspace

    def summary(self, config: MixLLMConfig) -> str:
        lines = ["", format_table(self.report.table(config)), "", "MixLLM on the holdout: " + self.report.headline()]
        lines += self.report.uncertainty_lines()
        if self.registration is not None:
            registration = self.registration
            lines.append(f"registered {config.mlflow.registered_model_name} version {registration.version}: "
                         f"{registration.verdict.summary()}")
        lines.append(f"Pareto plot: {self.workspace.plot}")
        lines.append(f"table: {self.workspace.table}   metrics: {self.workspace.metrics}")
        return "\n".join(lines)


def run_training(config: MixLLMConfig, *, progress: bool | None = None, register: bool = True,
                 baselines: Sequence[str] | None = None) -> TrainingOutcome:
    """The main job in one process: split, tags, encoder, predictors, evaluate, register.

    Stages whose inputs did not change since the last run (same stage key, output present) are
    reused from the work folder: re-running with unchanged data and params re-embeds nothing.
    """
    workspace = Workspace.of(config)
    if "split" in completed_stages(config):
        logger.info("stage split: inputs unchanged, reusing %s", workspace.split)
    else:
        stage_split(config)
        record_stage(config, "split")
    split = load_split(config)
    train_router(config, split, progress)
    router_dir, replay = stage_replay(config, progress)
    report = stage_evaluate(config, split, progress, baselines=baselines, router_dir=router_dir)
    record_stage(config, "evaluate")
    registration = None
    if register:
        registration = register_candidate(
            config, router_dir, report, split, run_name="training", extra_tags=replay.tags(),
            artifacts=[workspace.plot, workspace.table, workspace.curve, workspace.tags, workspace.metrics],
        )
        _write_atomic(workspace.registration, json.dumps(registration.to_dict(), indent=2))
    return TrainingOutcome(registration, report, workspace)


# ------------------------------------------------------------------------------------ continual


@dataclass
class ContinualOutcome:
    feedback_rows: int
    watermark_before: int
    watermark_after: int
    pool_changes: list[str]
    registration: Registration | None

    def summary(self) -> str:
        if self.registration is None:
            return f"no new feedback past watermark {self.watermark_before}: nothing registered"
        return (f"{self.feedback_rows} feedback rows ({self.watermark_before} -> {self.watermark_after}); "
                f"pool changes: {', '.join(self.pool_changes) or 'none'}; version {self.registration.version}: "
                f"{self.registration.verdict.summary()}")


def screen_feedback(rows: pd.DataFrame, pool: Sequence[str],
                    limits: PlausibilityConfig | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """The feedback rows a router can learn from, and how many were set aside per reason.

    The service validates what it stores, but the store is also written by other clients (and
    older versions); one bad row must not fail every continual run from now on. Set-aside rows
    stay in the store, counted in the log."""
    limits = limits or PlausibilityConfig()
    quality = pd.to_numeric(rows["quality"], errors="coerce")
    cost = pd.to_numeric(rows["cost_usd"], errors="coerce")
    checks = {
        "LLM no longer in the pool": ~rows["llm"].isin(list(pool)),
        "blank query": ~rows["query"].map(lambda q: isinstance(q, str) and bool(q.strip())),
        "quality not a number in 0..1": ~quality.between(0.0, 1.0),
        "cost negative or infinite": rows["cost_usd"].notna() & ~(cost.between(0.0, np.inf, inclusive="left")),
        "cost past data.limits.max_cost_usd": cost > limits.max_cost_usd,
    }
    bad = pd.Series(False, index=rows.index)
    skipped = {}
    for reason, failing in checks.items():
        failing = failing & ~bad  # each row counted once, under its first reason
        if failing.any():
            skipped[reason] = int(failing.sum())
        bad |= failing
    usable = rows[~bad].assign(quality=quality[~bad], cost_usd=cost[~bad])  # unknown cost: NaN, not None
    return usable, skipped


@dataclass
class Replay:
    """What a retrain re-learned from the feedback store."""

    rows: int = 0
    last_feedback_id: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def tags(self) -> dict[str, str]:
        if not self.rows:
            return {}
        return {"mixllm.replayed_feedback": f"{self.rows} rows (ids up to {self.last_feedback_id})"}


def consumed_feedback(config: MixLLMConfig) -> pd.DataFrame:
    """Feedback the continual flow has learned from (ids up to its watermark): what a retrain replays.
    Rows past the watermark are left to the next continual run, so no row is learned twice."""
    from mixllm.store import InteractionLog

    url = config.sqlalchemy_url(config.service.feedback_store_url)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        return pd.DataFrame()  # no service has run here: nothing to replay (and no file to create)
    store = InteractionLog(url)
    try:
        watermark = store.watermark()
        rows = store.feedback_since(0) if watermark else pd.DataFrame()
    finally:
        store.dispose()
    return rows[rows["feedback_id"] <= watermark] if len(rows) else rows


def stage_replay(config: MixLLMConfig, progress: bool | None = None) -> tuple[Path, Replay]:
    """router/ plus the consumed feedback, learned again with partial_fit (bandit updates of the
    chosen LLMs only), saved to replayed/router; router/ itself when there is nothing to replay.

    router/ stays the pure offline fit, so its stage cache never holds feedback (a second retrain
    would otherwise learn the same rows twice)."""
    workspace = Workspace.of(config)
    if not config.pipeline.replay_feedback:
        return workspace.router, Replay()
    rows = consumed_feedback(config)
    if rows.empty:
        return workspace.router, Replay()
    router = MixLLMRouter.load(workspace.router, progress=progress)
    router.cache_dir = workspace.cache
    learned, skipped = learn_from_feedback(router, rows, config.data.limits)
    replay = Replay(learned, int(rows["feedback_id"].max()), skipped)
    if not replay.rows:
        return workspace.router, replay
    logger.info("replayed %d feedback rows (ids up to %d) onto the retrained router", replay.rows,
                replay.last_feedback_id)
    workspace.replayed.parent.mkdir(parents=True, exist_ok=True)
    return _replace_dir(workspace.replayed, router.save), replay


def learn_from_feedback(router: MixLLMRouter, feedback_rows: pd.DataFrame,
                        limits: PlausibilityConfig) -> tuple[int, dict[str, int]]:
    """partial_fit the screened rows (each updates only its own LLM); rows learned, and set aside per reason."""
    usable, skipped = screen_feedback(feedback_rows, router.llms_, limits)
    for reason, count in skipped.items():
        logger.warning("%d feedback rows set aside (%s); they stay in the store and are not learned from",
                       count, reason)
    if len(usable):
        router.partial_fit(usable[["query", "llm", "quality", "cost_usd"]
                                  + [c for c in ("input_tokens", "output_tokens") if c in usable]])
    return len(usable), skipped


def continual_update(config: MixLLMConfig, router: MixLLMRouter, feedback_rows: pd.DataFrame) -> list[str]:
    """Apply the catalogue's pool changes, then the bandit feedback (each row updates only its LLM)."""
    changes = router.apply_catalogue(config.llms)
    learn_from_feedback(router, feedback_rows, config.data.limits)
    return changes


def read_new_feedback(config: MixLLMConfig) -> tuple[pd.DataFrame, int]:
    """Feedback rows past the watermark (joined to their decisions), and the watermark itself."""
    from mixllm.store import InteractionLog

    url = config.sqlalchemy_url(config.service.feedback_store_url)
    store = InteractionLog(url)
    try:
        before = store.watermark()
        rows = store.feedback_since(before)
    finally:
        store.dispose()
    settle_s = config.pipeline.feedback_settle_s
    if settle_s is None:
        settle_s = 0.0 if url.startswith("sqlite") else 30.0
    return settled_prefix(rows, settle_s), before


def settled_prefix(rows: pd.DataFrame, settle_s: float, now: Any = None) -> pd.DataFrame:
    """The rows (in id order) up to the first one younger than `settle_s`: the watermark then never
    passes an id whose row may still be committing."""
    if rows.empty or settle_s <= 0:
        return rows
    created = pd.to_datetime(rows["created_at"], utc=True)  # SQLite gives naive UTC; PostgreSQL aware
    cutoff = pd.Timestamp.now(tz="UTC") if now is None else pd.Timestamp(now)
    young = (created > cutoff - pd.Timedelta(seconds=settle_s)).to_numpy()
    return rows.iloc[: int(np.argmax(young)) if young.any() else len(rows)]


def update_champion(config: MixLLMConfig, rows: pd.DataFrame) -> tuple[Path, int, list[str]]:
    """Load the champion, apply pool changes and the feedback, save it to the work folder."""
    from mixllm.registry import Registry

    router, champion_version = Registry(config).load_router("champion")
    changes = continual_update(config, router, rows)
    target = Workspace.of(config).root / "continual" / "router"
    _replace_dir(target, router.save)
    logger.info("champion v%d updated with %d feedback rows; pool changes: %s", champion_version, len(rows),
                ", ".join(changes) or "none")
    return target, champion_version, changes


def register_update(config: MixLLMConfig, router_dir: Path, champion_version: int, rows: pd.DataFrame,
                    watermark_before: int) -> Registration:
    """Evaluate the updated router on the holdout and register it through the gate."""
    split = load_split(config)
    router = MixLLMRouter.load(router_dir, progress=False)
    router.cache_dir = Workspace.of(config).cache  # same encoder as the champion: embeddings are reused
    report = evaluate_router(config, router, split, baselines=[])
    return register_candidate(
        config, router_dir, report, split, run_name="continual",
        extra_tags={"mixllm.parent_version": str(champion_version), "mixllm.feedback_rows": str(len(rows)),
                    "mixllm.feedback_ids": f"{watermark_before + 1}-{int(rows['feedback_id'].max())}"},
    )


def advance_watermark(config: MixLLMConfig, value: int) -> None:
    from mixllm.store import InteractionLog

    store = InteractionLog(config.sqlalchemy_url(config.service.feedback_store_url))
    try:
        store.set_watermark(value)
    finally:
        store.dispose()


def run_continual(config: MixLLMConfig) -> ContinualOutcome:
    """Read feedback past the watermark, partial_fit the champion, validate, register, gate; advance
    the watermark only after all of that succeeded (a failed run re-reads the same rows next time)."""
    rows, before = read_new_feedback(config)
    if len(rows) < config.pipeline.min_feedback_rows:
        logger.info("continual: %d new feedback rows (< %d): nothing to do", len(rows), config.pipeline.min_feedback_rows)
        return ContinualOutcome(len(rows), before, before, [], None)
    router_dir, champion_version, changes = update_champion(config, rows)
    registration = register_update(config, router_dir, champion_version, rows, before)
    after = int(rows["feedback_id"].max())
    advance_watermark(config, after)
    return ContinualOutcome(len(rows), before, after, changes, registration)


def ablation_config(config: MixLLMConfig, **overrides: Any) -> MixLLMConfig:
    """A copy of the config with dotted overrides (e.g. {"embedding.fine_tune.enabled": False})."""
    raw = config.model_dump(mode="json", by_alias=True, exclude={"root"})
    return config_from_dict(raw, source="ablation", root=config.root,
                            overrides={k.replace("__", "."): v for k, v in overrides.items()})


def interactions_fingerprint(config: MixLLMConfig) -> str:
    """Hash of the stored interactions (part files are content-named): cheap, for cache keys."""
    return stable_hash([p.name for p in InteractionStore(config.path(config.data.store_dir)).parts()])


STAGES = ("split", "tags", "encoder", "predictors", "evaluate")


def stage_keys(config: MixLLMConfig) -> dict[str, str]:
    """A key per training stage from exactly the data and settings it depends on (and its inputs' keys).

    Equal keys mean equal outputs, so an orchestrator may skip the stage (Prefect's cache_key_fn,
    `mixllm train`'s reuse of the work folder). The same dependencies are declared in dvc.yaml.
    """
    section = lambda *names: [config.model_dump(mode="json", by_alias=True, exclude={"root"})[n] for n in names]  # noqa: E731
    keys: dict[str, str] = {}
    keys["split"] = stable_hash("split", interactions_fingerprint(config), section("split"))
    keys["tags"] = stable_hash("tags", keys["split"], section("tags"), section("domains")[0]["labels"],
                               section("domains")[0]["min_queries"], config.embedding.model_path,
                               config.embedding.max_seq_length, config.features.use_domains,
                               config.embedding.fine_tune.enabled)
    keys["encoder"] = stable_hash("encoder", keys["tags"], section("embedding"))
    keys["predictors"] = stable_hash("predictors", keys["encoder"],
                                     section("features", "domains", "predictors", "decision", "llms"))
    keys["evaluate"] = stable_hash("evaluate", keys["predictors"], section("evaluation"))
    return keys


def _stage_outputs(workspace: Workspace) -> dict[str, Path]:
    return {"split": workspace.split, "tags": workspace.tags, "encoder": workspace.encoder,
            "predictors": workspace.router, "evaluate": workspace.metrics}


def completed_stages(config: MixLLMConfig) -> set[str]:
    """Stages whose recorded key equals the current one and whose output exists."""
    workspace = Workspace.of(config)
    path = workspace.root / "stage_keys.json"
    recorded = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    current = stage_keys(config)
    outputs = _stage_outputs(workspace)
    return {s for s in STAGES if recorded.get(s) == current[s] and outputs[s].exists()}


def record_stage(config: MixLLMConfig, stage: str) -> None:
    workspace = Workspace.of(config)
    path = workspace.root / "stage_keys.json"
    recorded = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    recorded[stage] = stage_keys(config)[stage]
    _write_atomic(path, json.dumps(recorded, indent=1, sort_keys=True))
