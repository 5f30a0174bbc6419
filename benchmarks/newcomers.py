"""Where a newcomer's regret comes from, and what other priors would do (a script, not a test).

    python benchmarks/newcomers.py [--datasets routerbench_subset,llmrouter_dc] [--work DIR]
                                   [--variants optimistic,true_means] [--explorations 0,1]

Per log: MixLLM as benchmarks/quality.py trains it (same project and stage cache with the same
--work), lambda calibrated on validation for the budget, and the pool-change replay of
benchmarks/replays.py (the log's datasets.yaml plan: newcomers join with a prior only) on the
**validation** part (or, to check a choice after the fact, `--part holdout`), in three stream orders. Reported per variant and exploration weight: regret
per query against the router that had the full pool all along (mean and per order), each
newcomer's traffic share (the full pool's), and the quality over the window as % of the reference.

Variants of the newcomer's start (only `optimistic` is the library's; the others are experiments
applied to the router after add_llm):
- optimistic: add_llm as shipped (predictors.quality.newcomer_prior).
- true_means: the newcomer's per-domain prior set to its real per-domain mean from the training
  part (it reads answers a newcomer has not given): how far a perfect per-domain prior gets.
- dearest_break_even=M: break_even=M for a newcomer dearer than every trained LLM (which the
  optimistic prior never lets win), optimistic for the others.
- break_even=M: per domain, the quality at which the newcomer's score (q - lambda x cost / scale)
  equals the best pool LLM's there, plus M (each LLM's cost: its mean on the training part; the
  newcomer's: add_llm's cost prior), so it is tried in every domain where it could pay.
- Any variant +level=P: the head's level (its bias and domain-membership coefficients) gets prior
  precision P instead of the empirical-Bayes one, so the per-domain level learns from fewer answers;
  +domains=P: the domain-membership coefficients only (the bias, which every domain shares, keeps
  the empirical-Bayes precision, so failures in one domain do not pull the others down). Since
  predictors.quality.newcomer_domain_answers (100) this is what add_llm does; +domains=ridge gives
  the domain block the empirical-Bayes precision too, as add_llm did before; +anchors=P: the
  resemblance block (how each trained LLM's prediction departs from the newcomer's prior) gets
  precision P, so a few answers can tell which trained LLMs the newcomer behaves like; +tier=S:
  the head's prior mean on the query-level inputs is S x the trained heads averaged with the
  price_tier weights (a priori the newcomer departs from its domain level as LLMs of its price do).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import benchmark_logging, chosen_logs, log_arguments, trained_on_log  # noqa: E402
from replays import pool_change, stream_of  # noqa: E402

from mixllm.core.online_learning import OnlineLearningMixin  # noqa: E402
from mixllm.evaluation.baselines import MixLLMAdapter  # noqa: E402
from mixllm.jobs.report import calibrate_on_validation, holdout_context, reference_llm, validation_context  # noqa: E402

logger = logging.getLogger("benchmarks.newcomers")
ORDERS = {"validation": (1, 2, 3), "holdout": (0, 1, 2)}  # stream seeds; the leaderboard's are 1 and 0


def dearest(router: Any, llm: str) -> bool:
    """Whether `llm` costs more (input + output price) than every trained LLM: the one newcomer the
    optimistic prior (the best pool LLM that costs no more) prices out of every argmax."""
    def price(name: str) -> float:
        return router.catalogue_[name]["input_usd_per_1k"] + router.catalogue_[name]["output_usd_per_1k"]

    pool = [m for m in router.domain_model_.llms_ if m != llm and m not in router.anchors_]
    return bool(pool) and price(llm) > max(price(m) for m in pool)


def start_variant(router: Any, llm: str, variant: str, lambda_: float, true_means: dict[str, np.ndarray]) -> None:
    """Change a just-added newcomer's start as `variant` says (see the module docstring)."""
    rule, *options = variant.split("+")
    settings = dict(option.split("=") for option in options)
    domains = router.domain_model_
    j = domains.llms_.index(llm)
    if rule == "true_means":
        domains.table_[:, j] = true_means[llm]
    elif rule.startswith("break_even=") or (rule.startswith("dearest_break_even=") and dearest(router, llm)):
        margin = float(rule.split("=")[1])
        pool = [m for m in domains.llms_ if m != llm and m not in router.anchors_]
        columns = [domains.llms_.index(m) for m in pool]
        pool_cost = np.array([router.cost_models_[m].prior_cost_usd for m in pool])
        best_score = (domains.table_[:, columns] - lambda_ * pool_cost / router.cost_scale_usd_).max(axis=1)
        own_cost = lambda_ * router.cost_models_[llm].prior_cost_usd / router.cost_scale_usd_
        domains.table_[:, j] = np.clip(best_score + own_cost + margin, 0.0, 1.0)
    elif rule != "optimistic" and not rule.startswith("dearest_break_even="):
        raise SystemExit(f"unknown variant {variant!r}: optimistic, true_means or break_even=M, each with +level=P")
    for option, with_bias in (("level", True), ("domains", False)):
        if option in settings:
            head = router.quality_models_[llm].model_
            size = head.A_.shape[0]
            # The head's input ends with the domain block; the bias comes last.
            level = np.arange(size - 1 - len(domains.classes_), size if with_bias else size - 1)
            value = settings[option]  # a precision, or "ridge": the head's own (empirical Bayes)
            head.A_[level, level] = router.quality_models_[llm].ridge if value == "ridge" else float(value)
            head.A_inv_ = np.linalg.inv(head.A_)
    if "anchors" in settings and llm in router.anchors_:
        head = router.quality_models_[llm].model_
        block = np.arange(len(router.anchors_[llm]["llms"]))  # the resemblance block opens the head's input
        head.A_[block, block] = float(settings["anchors"])
        head.A_inv_ = np.linalg.inv(head.A_)
    if "tier" in settings:
        tier_prior_mean(router, llm, float(settings["tier"]))


def tier_prior_mean(router: Any, llm: str, scale: float) -> None:
    """The newcomer head's prior mean on the query-level inputs: `scale` x the trained LLMs' heads
    averaged with weights by closeness in log price (the price_tier rule's), so a priori the
    newcomer departs from its domain level on each query the way LLMs of its price do (the
    domain block and the bias keep mean 0: the per-domain prior sets the level)."""
    from mixllm.core.online_learning import price_closeness_weights

    def price(name: str) -> float:
        return router.catalogue_[name]["input_usd_per_1k"] + router.catalogue_[name]["output_usd_per_1k"]

    trained = [m for m in router.quality_models_ if m != llm and m not in router.anchors_
               and router.quality_models_[m].kind == "bayesian_linear"]
    weights = price_closeness_weights(np.array([price(m) for m in trained]), price(llm))
    base = router.n_base_features_
    mean_coef = sum(w * router.quality_models_[m].model_.coef_[:base] for w, m in zip(weights, trained))
    head = router.quality_models_[llm].model_
    n_anchors = len(router.anchors_.get(llm, {}).get("llms", []))
    theta0 = np.zeros(head.A_.shape[0])
    theta0[n_anchors:n_anchors + base] = scale * mean_coef
    head.b_ = head.A_ @ theta0
    head.coef_ = theta0.copy()


def run_dataset(name: str, entry: Any, data_path: Path, work: Path, variants: list[str],
                explorations: list[float], part: str = "validation") -> dict[str, Any]:
    config, split, router = trained_on_log(name, entry, data_path, work)
    plan = entry.pool_change
    if plan is None or not plan.join:
        raise SystemExit(f"{name} has no pool_change plan in benchmarks/datasets.yaml")
    reference_name = reference_llm(config, split.train)
    lambda_ = calibrate_on_validation(config, MixLLMAdapter(router), split, router.enabled_llms_, reference_name,
                                      "cost_share", config.evaluation.cost_budget_share).lambda_
    if part == "holdout":  # the after-the-fact check: the leaderboard's plan on the holdout
        queries, outcomes, reference = holdout_context(config, split, router.enabled_llms_)
    else:  # where choices are made: the plan scaled to the smaller part, as the leaderboard's tuning does
        queries, outcomes, reference = validation_context(config, split, router.enabled_llms_, reference_name)
        plan = plan.model_copy(update={"join_at": min(plan.join_at, len(queries) // 4),
                                       "leave_at": min(plan.leave_at, len(queries) // 2)})
    prices = {llm.name: (llm.input_usd_per_1k, llm.output_usd_per_1k) for llm in config.llms}
    true_means = {llm: router.domain_model_.table_[:, router.domain_model_.llms_.index(llm)].copy()
                  for llm in plan.join}
    streams = []
    for seed in ORDERS[part]:
        stream, stream_outcomes = stream_of(queries, outcomes, np.random.default_rng(seed).permutation(len(queries)))
        streams.append((stream, stream_outcomes, router.features(stream["query"].tolist())))
    shipped_add_llm = OnlineLearningMixin.add_llm
    rows = []
    try:
        for variant in variants:
            def add_llm(self, llm, *args, **kwargs):  # the shipped add_llm, then the variant's start
                shipped_add_llm(self, llm, *args, **kwargs)
                start_variant(self, llm, variant, lambda_, true_means)
                return self

            OnlineLearningMixin.add_llm = add_llm
            for exploration in explorations:
                runs = [pool_change(router, stream, stream_outcomes, lambda_, exploration, plan, prices, features,
                                    reference) for stream, stream_outcomes, features in streams]
                row = {"variant": variant, "exploration": exploration,
                       "regret_per_query": float(np.mean([r["regret_per_query"] for r in runs])),
                       "regret_by_order": [r["regret_per_query"] for r in runs],
                       "quality_pct": float(np.mean([r["per_llm"][plan.join[0]].quality_online_pct for r in runs])),
                       "quality_full_pool_pct": float(np.mean([r["per_llm"][plan.join[0]].quality_full_pool_pct
                                                               for r in runs])),
                       "share": {llm: float(np.mean([r["per_llm"][llm].share_online for r in runs])) for llm in plan.join},
                       "share_full_pool": {llm: float(np.mean([r["per_llm"][llm].share_full_pool for r in runs]))
                                           for llm in plan.join}}
                logger.info("%s %s, exploration %g: regret %.4f", name, variant, exploration, row["regret_per_query"])
                rows.append(row)
    finally:
        OnlineLearningMixin.add_llm = shipped_add_llm
    return {"part": part, "lambda": lambda_, "plan": plan.model_dump(), "queries": len(queries), "rows": rows}


def markdown(name: str, result: dict[str, Any]) -> str:
    joiners = result["plan"]["join"]
    lines = [f"**{name}** ({result['part']}, {result['queries']} queries; {', '.join(joiners)} join at query "
             f"{result['plan']['join_at']}; lambda {result['lambda']:.4f}):", "",
             "| newcomer start | exploration | regret per query (orders) | "
             + " | ".join(f"{llm} share (full pool)" for llm in joiners) + " | quality % (full pool) |",
             "|---|---|---|" + "---|" * len(joiners) + "---|"]
    for row in result["rows"]:
        orders = ", ".join(f"{r:.4f}" for r in row["regret_by_order"])
        shares = " | ".join(f"{row['share'][llm]:.3f} ({row['share_full_pool'][llm]:.3f})" for llm in joiners)
        lines.append(f"| {row['variant']} | {row['exploration']:g} | {row['regret_per_query']:.4f} ({orders}) | {shares} "
                     f"| {row['quality_pct']:.2f} ({row['quality_full_pool_pct']:.2f}) |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    log_arguments(parser, "newcomers.json")
    parser.add_argument("--variants", default="optimistic,true_means,break_even=0,break_even=0.02,break_even=0.05",
                        help="Comma-separated newcomer starts (see the module docstring).")
    parser.add_argument("--explorations", default="0", help="Comma-separated exploration weights.")
    parser.add_argument("--part", choices=("validation", "holdout"), default="validation",
                        help="Where to replay: validation (where choices are made) or the holdout (only to "
                             "check a choice after the fact).")
    args = parser.parse_args()
    benchmark_logging()
    bench, names, work = chosen_logs(args, "mixllm-newcomers-")
    variants = [v.strip() for v in args.variants.split(",")]
    explorations = [float(x) for x in args.explorations.split(",")]
    results = {}
    for name in names:
        entry = bench.datasets[name]
        results[name] = run_dataset(name, entry, bench.data_path(entry), work, variants, explorations, args.part)
        print(markdown(name, results[name]) + "\n", flush=True)
    args.json.write_text(json.dumps({"when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                                     "command": "python benchmarks/newcomers.py " + " ".join(sys.argv[1:]),
                                     "datasets": results}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
