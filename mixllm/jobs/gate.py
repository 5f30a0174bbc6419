"""The promotion gate and registration: a new version is registered with its evaluation, and
becomes champion only when it passes the sanity checks and is not worse than the champion."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixllm.config import MixLLMConfig
from mixllm.core.router import MixLLMRouter
from mixllm.evaluation.baselines import query_frame
from mixllm.evaluation.results import to_jsonable
from mixllm.io.scratch_folders import registration_folder
from mixllm.io.workspace import SplitData, Workspace
from mixllm.jobs.report import EvaluationReport, evaluate_router, objective

logger = logging.getLogger(__name__)


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


def production_verdict(config: MixLLMConfig, candidate: MixLLMRouter, champion: MixLLMRouter) -> dict[str, Any]:
    """The gate's second opinion, from production: the doubly-robust off-policy estimate of each
    version's routing score on the decisions the service logged with feedback (the champion's
    lambda and cost scale for both). Passes without an opinion below gate.min_logged_feedback."""
    from mixllm.jobs.policy_evaluation import compare_on_feedback, logged_feedback

    logged = logged_feedback(config)
    needed = config.gate.min_logged_feedback
    if len(logged) < needed:
        return {"promote": True, "metrics": {"production.logged_feedback": float(len(logged))},
                "summary": f"production: {len(logged)} logged decisions with feedback, fewer than "
                           f"gate.min_logged_feedback ({needed}); no off-policy verdict"}
    mine, theirs = compare_on_feedback(config, candidate, champion, logged)
    if not mine["n"] or not theirs["n"]:
        return {"promote": True, "metrics": {"production.logged_feedback": float(len(logged))},
                "summary": "production: no logged decision names an LLM both versions serve; no off-policy verdict"}
    a, b = mine["score"]["dr"], theirs["score"]["dr"]
    # Paired, on the same decisions, with one reward model for both: the verdict is on the
    # difference (its interval says how sure it is; the tolerance, not the interval, decides).
    difference = mine["versus_baseline"]["score"]["dr"]
    tolerance = config.gate.tolerance
    promote = difference.estimate >= -tolerance
    summary = (f"production ({mine['n']} logged decisions with feedback, doubly-robust score): candidate "
               f"{a.format()} vs champion {b.format()}, difference {difference.format()}; "
               + ("not worse" if promote else "worse") + f" beyond the tolerance {tolerance}")
    metrics = {"production.logged_feedback": float(len(logged)), "production.dr_score": a.estimate,
               "production.champion_dr_score": b.estimate, "production.dr_score_difference": difference.estimate,
               "production.dr_score_difference_low": difference.low,
               "production.dr_score_difference_high": difference.high,
               "production.dr_quality": mine["quality"]["dr"].estimate,
               "production.dr_cost_usd": mine["cost_usd"]["dr"].estimate, "production.agreement": mine["agreement"]}
    return {"promote": bool(promote), "summary": summary, "metrics": metrics}


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
    from mixllm.io.registry import Registry, git_commit

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
    production = None
    if champion_before is not None:
        if config.decision.lambda_ is None:  # the candidate as it would serve: at its calibrated lambda
            router.calibrated_lambda_ = float(report.calibration.lambda_)
        production = production_verdict(config, router, champion_router)
        report.metrics.update(production.pop("metrics"))
        if verdict.promote and not production["promote"]:
            verdict = GateVerdict(False, (*verdict.reasons, production["summary"]), verdict.objective,
                                  verdict.candidate, verdict.champion)
    tags = {
        "mixllm.data_hash": split.fingerprint,
        "mixllm.git_commit": git_commit(config.root),
        "mixllm.gate": verdict.summary()[:4900],
        "mixllm.objective": f"{verdict.objective}={verdict.candidate:.6f}",
        **({"mixllm.gate.production": production["summary"][:4900]} if production else {}),
        **(extra_tags or {}),
    }
    params = config.to_flat_dict()
    metrics = {**report.metrics, "gate.promoted": float(verdict.promote)}
    with registration_folder() as scratch:  # MLflow copies what it logs
        run_id, version_number = registry.log_candidate(
            MixLLMRouter.copy_with_calibrated_lambda(router_dir, report.calibration.lambda_, scratch / "router"), params=params,
            metrics=metrics, artifacts=list(artifacts), tags=tags, run_name=run_name,
            input_example=query_frame(split.holdout)["query"].head(2).str.slice(0, 300).tolist(),
        )
    if verdict.promote:
        registry.promote(version_number, verdict.summary())
    else:
        registry.mark_challenger(version_number)
        logger.warning("version %d not promoted: %s", version_number, verdict.summary())
    return Registration(version_number, verdict.promote, verdict, champion_before, run_id)
