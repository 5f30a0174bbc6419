"""Budget pacing replay (a script, not a test): a holdout replayed as one day of traffic under a day
budget, paced by the service's controller (mixllm.core.budgets.BudgetPacer), against a hard cutoff.

    python benchmarks/budget.py [--datasets routerbench_subset,llmrouter_dc] [--work DIR] [--shares 10,20,40]

Per log: MixLLM is trained as in benchmarks/quality.py (same project, same stage cache with the same
--work), the holdout's queries arrive in a seeded order spread evenly over a day, and each routing
decision pays what that LLM really cost on that query. The day budget is a share of what the
reference LLM would have cost on the same queries. Three policies:

The tenant asks for quality first (lambda 0): unpaced, it would spend what the best LLMs cost.

- paced: the pacer's factor x budgets.pacing.min_lambda (lambda 0 cannot be scaled), from the spend
  so far against the budget line; once the budget is spent, the cheapest LLM (on_exhausted: cheapest);
- hard cutoff: lambda 0 until the budget is spent, then the cheapest LLM (which still costs), or
  then refused (a refused query scores 0 and costs nothing);
- fixed lambda: the one calibrated on the validation part for that cost share (needs the traffic
  mix known in advance; what a budget without feedback can do at best).

The pacing gains are params.yaml's (budgets.pacing); a grid of gains is replayed on the validation
part only, to show how sensitive the result is. Nothing is tuned on a holdout.
Writes benchmarks/budget.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import benchmark_logging, chosen_logs, log_arguments, trained_on_log  # noqa: E402

from mixllm.config import PacingConfig, load_config  # noqa: E402
from mixllm.core.budgets import BudgetPacer, standings  # noqa: E402
from mixllm.core.decision import decide  # noqa: E402
from mixllm.evaluation.baselines import MixLLMAdapter  # noqa: E402
from mixllm.jobs.report import calibrate_on_validation, holdout_context, validation_context  # noqa: E402

logger = logging.getLogger("benchmarks.budget")
DAY = datetime(2026, 1, 1, tzinfo=timezone.utc)
GAIN_GRID = ((0.0, 0.0), (1.0, 10.0), (3.0, 30.0), (3.0, 100.0), (10.0, 30.0))


def replay(predictions, cost_scale_usd, outcomes, budget_usd, policy, settings: PacingConfig, lambda_: float,
           seed: int = 0):
    """One day of the queries (the router's `predictions` for them) under a day budget; returns
    (spend, mean quality, decisions per LLM)."""
    n = len(predictions.quality)
    column = [outcomes.llms.index(llm) for llm in predictions.llms]
    quality, cost = outcomes.quality[:, column], outcomes.cost_usd[:, column]
    cheapest = int(np.argmin(np.median(predictions.cost_usd, axis=0)))
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    times = np.sort(rng.uniform(0, 86_400, n))
    pacer, spent, earned = BudgetPacer(settings), 0.0, 0.0
    picks = np.zeros(len(predictions.llms), dtype=int)
    zeros = np.zeros((1, len(predictions.llms)))
    for row, t in zip(order, times):
        now = DAY + timedelta(seconds=float(t))
        if spent >= budget_usd and policy == "refuse":
            continue
        if spent >= budget_usd and policy != "fixed":
            choice = cheapest
        else:
            paced_lambda = lambda_
            if policy == "paced":
                standing = standings({"day": budget_usd}, {"day": spent}, now, settings.warmup_share)
                paced_lambda = pacer.effective_lambda(lambda_, pacer.factor("tenant", standing, now))
            sl = slice(row, row + 1)
            choice = int(decide(predictions.quality[sl], predictions.cost_usd[sl], predictions.uncertainty[sl], zeros,
                                lambda_=paced_lambda, exploration=0.0, cost_scale_usd=cost_scale_usd)[0][0])
        spent += cost[row, choice]
        earned += quality[row, choice]
        picks[choice] += 1
    return spent, earned / n, dict(zip(predictions.llms, picks.tolist()))


def run_dataset(name, entry, data_path, work, shares, settings):
    config, split, router = trained_on_log(name, entry, data_path, work)
    lambda_ = 0.0  # quality first
    out: dict[str, Any] = {"lambda": lambda_, "shares": {}}
    parts = {"validation": validation_context(config, split, router.enabled_llms_),
             "holdout": holdout_context(config, split, router.enabled_llms_)}
    predicted = {part: router.predict(queries["query"].tolist()) for part, (queries, _, _) in parts.items()}
    reference_llm = parts["validation"][2].llm
    for share in shares:
        rows = {}
        fixed = calibrate_on_validation(config, MixLLMAdapter(router), split, router.enabled_llms_, reference_llm,
                                        "cost_share", share).lambda_
        for part, (queries, outcomes, reference) in parts.items():
            ref_column = outcomes.llms.index(reference.llm)
            reference_cost = float(outcomes.cost_usd[:, ref_column].sum())
            reference_quality = float(outcomes.quality[:, ref_column].mean())
            budget = share * reference_cost
            cheapest_share = float(outcomes.cost_usd.mean(axis=0).min() * len(queries) / reference_cost)
            policies = {"paced": ("paced", settings, lambda_), "hard cutoff, then cheapest": ("cutoff", settings, lambda_),
                        "hard cutoff, then refused": ("refuse", settings, lambda_),
                        "fixed lambda (calibrated on validation)": ("fixed", settings, fixed)}
            if part == "validation":
                for kp, ki in GAIN_GRID:
                    policies[f"paced, gains {kp:g}/{ki:g}"] = (
                        "paced", settings.model_copy(update={"proportional_gain": kp, "integral_gain": ki}), lambda_)
            for label, (policy, gains, lam) in policies.items():
                spent, quality, picks = replay(predicted[part], router.cost_scale_usd_, outcomes, budget, policy, gains, lam)
                rows[f"{part}: {label}"] = {"spend_over_budget": spent / budget, "cheapest_llm_cost_share": cheapest_share,
                                            "quality_pct": 100 * quality / reference_quality,
                                            "cost_pct": 100 * spent / reference_cost, "lambda": lam, "picks": picks}
                logger.info("%s %s %.0f%%: %s spend/budget %.3f quality %.2f%%", name, part, 100 * share, label,
                            spent / budget, 100 * quality / reference_quality)
        out["shares"][f"{100 * share:g}"] = rows
    return out


def markdown(name: str, result: dict[str, Any], gains: bool = False) -> str:
    lines = [f"#### {name}", "",
             "| day budget, % of the reference's cost | replay | policy | spend ÷ budget | quality, % of the reference |"
             " the cheapest LLM's cost, % of the reference's |",
             "|---|---|---|---|---|---|"]
    for share, rows in result["shares"].items():
        for label, row in rows.items():
            part, policy = label.split(": ", 1)
            if gains == (", gains " in policy):
                lines.append(f"| {share} | {part} | {policy} | {row['spend_over_budget']:.3f} | {row['quality_pct']:.2f} "
                             f"| {100 * row['cheapest_llm_cost_share']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    log_arguments(parser, "budget.json")
    parser.add_argument("--shares", default="10,20,40", help="Day budgets as %% of the reference's cost.")
    args = parser.parse_args()
    benchmark_logging()
    bench, names, work = chosen_logs(args, "mixllm-budget-")
    settings = load_config(ROOT / "params.yaml").budgets.pacing
    shares = [float(s) / 100 for s in args.shares.split(",")]
    results = {}
    for name in names:
        entry = bench.datasets[name]
        results[name] = run_dataset(name, entry, bench.data_path(entry), work, shares, settings)
        print(markdown(name, results[name]) + "\n\n" + markdown(f"{name}: the pacing gains on validation",
                                                                  results[name], gains=True) + "\n", flush=True)
    args.json.write_text(json.dumps({"when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                                     "command": "python benchmarks/budget.py", "pacing": settings.model_dump(),
                                     "datasets": results}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
