"""Off-policy evaluation checked in simulation on the shared logs (a script, not a test).

    python benchmarks/off_policy.py [--datasets ...] [--work DIR] [--replications 100]

Each log's holdout has every LLM's real outcome for every query (full information), so a policy's
true value on those queries is known. The router trained as in benchmarks/quality.py (same --work
cache) logs the holdout with a stochastic policy (decision.policy softmax, its temperature, at
several exploration budgets), at the lambda calibrated on validation for evaluation.cost_budget_share.
From each such log, IPS, SNIPS and DR estimate two other policies (the same router, argmax, at half
and at twice that lambda: one that spends more, one that spends less); the truth is their mean
quality and cost on the same queries. Over replications of the logging draws: each estimator's bias,
its RMSE, and how often its 95% interval holds the truth; and what exploring cost the logging policy
(its expected quality and cost against the argmax's). Writes benchmarks/off_policy.json and prints
Markdown.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import benchmark_logging, chosen_logs, log_arguments, trained_on_log  # noqa: E402

from mixllm.core.decision import action_probabilities, decide  # noqa: E402
from mixllm.evaluation.baselines import MixLLMAdapter  # noqa: E402
from mixllm.evaluation.off_policy import ESTIMATORS, LoggedBandit, off_policy_estimates  # noqa: E402
from mixllm.jobs.report import calibrate_on_validation, holdout_context  # noqa: E402

logger = logging.getLogger("benchmarks.off_policy")
SHARES = (0.05, 0.1, 0.2, 0.4)
COST_RATIOS = (2.0, 100.0)  # decision.exploration_budget.max_cost_ratio: the default, and (almost) no cap


def run_dataset(name, entry, data_path, work, replications, resamples):
    config, split, router = trained_on_log(name, entry, data_path, work)
    queries, outcomes, reference = holdout_context(config, split, router.enabled_llms_)
    lambda_ = calibrate_on_validation(config, MixLLMAdapter(router), split, router.enabled_llms_, reference.llm,
                                      "cost_share", config.evaluation.cost_budget_share).lambda_
    predictions = router.predict(queries["query"].tolist())
    column = [outcomes.llms.index(llm) for llm in predictions.llms]
    quality, cost = outcomes.quality[:, column], outcomes.cost_usd[:, column]
    n, m = quality.shape
    rows = np.arange(n)
    zeros = np.zeros_like(quality)
    reference_quality = float(outcomes.quality[:, outcomes.llms.index(reference.llm)].mean())

    def policy(lam):
        best, score = decide(predictions.quality, predictions.cost_usd, predictions.uncertainty, zeros, lambda_=lam,
                             exploration=0.0, cost_scale_usd=router.cost_scale_usd_)
        return best, score

    best, score = policy(lambda_)
    targets = {f"argmax at lambda x {factor:g}": np.eye(m)[policy(lambda_ * factor)[0]] for factor in (0.5, 2.0)}
    decision = config.decision
    out = {"lambda": lambda_, "n": n, "shares": {}}
    for share, ratio in [(share, ratio) for ratio in COST_RATIOS for share in SHARES]:
        logging_p = action_probabilities(score, predictions.cost_usd, best, policy="softmax",
                                         temperature=decision.temperature, epsilon=decision.epsilon,
                                         top_k=decision.top_k, max_leave_share=share, max_cost_ratio=ratio)
        entry_out = {"left_argmax": float(1 - logging_p[rows, best].mean()), "max_cost_ratio": ratio,
                     "quality_pct": 100 * float((logging_p * quality).sum(axis=1).mean()) / reference_quality,
                     "argmax_quality_pct": 100 * float(quality[rows, best].mean()) / reference_quality,
                     "cost_ratio": float((logging_p * cost).sum(axis=1).mean() / cost[rows, best].mean()),
                     "targets": {}}
        for target_name, target in targets.items():
            truth = {"quality": float((target * quality).sum(axis=1).mean()), "cost": float((target * cost).sum(axis=1).mean())}
            # Queries where the target takes an LLM the logging policy never explores: no estimator
            # sees them but through its model (DR) or its normalisation (SNIPS).
            unsupported = float(((target > 0) & (logging_p == 0)).any(axis=1).mean())
            stats = {k: {e: [] for e in ESTIMATORS} for k in truth}
            hits = {k: {e: 0 for e in ESTIMATORS} for k in truth}
            widths = {k: {e: [] for e in ESTIMATORS} for k in truth}
            for r in range(replications):
                draw = np.random.default_rng(1000 + r)
                actions = np.minimum((logging_p.cumsum(axis=1) < draw.random(n)[:, None]).sum(axis=1), m - 1)
                for kind, observed, predicted in (("quality", quality, predictions.quality),
                                                  ("cost", cost, predictions.cost_usd)):
                    result = off_policy_estimates(LoggedBandit(actions, logging_p[rows, actions], observed[rows, actions],
                                                               target, predicted), resamples=resamples, seed=r)
                    for e in ESTIMATORS:
                        interval = result[e]
                        stats[kind][e].append(interval.estimate - truth[kind])
                        hits[kind][e] += interval.low <= truth[kind] <= interval.high
                        widths[kind][e].append(interval.high - interval.low)
            entry_out["targets"][target_name] = {"unsupported": unsupported, **{
                kind: {e: {"bias": float(np.mean(stats[kind][e])), "rmse": float(np.sqrt(np.mean(np.square(stats[kind][e])))),
                           "coverage": hits[kind][e] / replications, "width": float(np.mean(widths[kind][e])),
                           "truth": truth[kind]} for e in ESTIMATORS} for kind in truth}}
            logger.info("%s share %.2f cost ratio %g %s: quality coverage %s", name, share, ratio, target_name,
                        {e: hits["quality"][e] / replications for e in ESTIMATORS})
        out["shares"][f"{share:g} (cost ratio {ratio:g})"] = entry_out
    return out


def markdown(name, result):
    lines = [f"#### {name} ({result['n']} holdout queries, logging lambda {result['lambda']:.4f})", "",
             "| exploration budget (max cost ratio) | traffic off the argmax | logging quality % (argmax %) | logging "
             "cost ÷ argmax's | target | its queries without support | estimator | quality: bias, RMSE, 95% coverage "
             "| cost: relative bias, 95% coverage |",
             "|---|---|---|---|---|---|---|---|---|"]
    for share, entry in result["shares"].items():
        for target, kinds in entry["targets"].items():
            for e in ESTIMATORS:
                q, c = kinds["quality"][e], kinds["cost"][e]
                lines.append(f"| {share} | {100 * entry['left_argmax']:.1f}% | {entry['quality_pct']:.2f} "
                             f"({entry['argmax_quality_pct']:.2f}) | {entry['cost_ratio']:.3f} | {target} | "
                             f"{100 * kinds['unsupported']:.1f}% | {e} | "
                             f"{q['bias']:+.4f}, {q['rmse']:.4f}, {100 * q['coverage']:.0f}% | "
                             f"{100 * c['bias'] / c['truth']:+.1f}%, {100 * c['coverage']:.0f}% |")
    return "\n".join(lines)


def results_table(stored) -> str:
    """RESULTS.md's table of the estimators, every budget of a stored run: per log, budget (max cost
    ratio) and target, the share of its queries without support, each estimator's quality bias and
    coverage, and DR's cost bias (relative) and coverage."""
    lines = ["| log | budget (max cost ratio) | target | its queries without support | IPS bias, coverage | "
             "SNIPS bias, coverage | DR bias, coverage | DR cost: relative bias, coverage |",
             "|---|---|---|---|---|---|---|---|"]
    for name, result in stored["datasets"].items():
        for setting, entry in result["shares"].items():
            share, ratio = setting.split(" (cost ratio ")
            for target, kinds in entry["targets"].items():
                quality, cost = kinds["quality"], kinds["cost"]["dr"]
                cells = [f"{quality[e]['bias']:+.4f}, {100 * quality[e]['coverage']:.0f}%" for e in ESTIMATORS]
                lines.append(f"| {name} | {share} ({ratio.rstrip(')')}) | λ × {target.rsplit(' ', 1)[1]} | "
                             f"{100 * kinds['unsupported']:.1f}% | " + " | ".join(cells) +
                             f" | {100 * cost['bias'] / cost['truth']:+.1f}%, {100 * cost['coverage']:.0f}% |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    log_arguments(parser, "off_policy.json")
    parser.add_argument("--replications", type=int, default=100, help="Logging draws per setting.")
    parser.add_argument("--resamples", type=int, default=500, help="Bootstrap resamples per interval.")
    parser.add_argument("--table", action="store_true",
                        help="Print RESULTS.md's table of the estimators from the stored run (--json) and stop.")
    args = parser.parse_args()
    if args.table:
        print(results_table(json.loads(args.json.read_text(encoding="utf-8"))))
        return 0
    benchmark_logging()
    bench, names, work = chosen_logs(args, "mixllm-ope-")
    stored = json.loads(args.json.read_text(encoding="utf-8")) if args.json.is_file() else {"datasets": {}}
    for name in names:
        entry = bench.datasets[name]
        result = run_dataset(name, entry, bench.data_path(entry), work, args.replications, args.resamples)
        print(markdown(name, result) + "\n", flush=True)
        stored["datasets"][name] = {**result, "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                                    "command": "python benchmarks/off_policy.py", "replications": args.replications}
        args.json.write_text(json.dumps(stored, indent=1), encoding="utf-8")  # a crash later keeps this log's figures
    return 0


if __name__ == "__main__":
    sys.exit(main())
