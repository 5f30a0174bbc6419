"""Where MixLLM's gap to the oracle lies: in its cost predictions or its quality predictions, and
how well any router ranks the prompts of one task (a script, not a test).

    python benchmarks/gap.py [--datasets routerbench_subset] [--work DIR]

Per log: MixLLM as benchmarks/quality.py trains it (same project and stage cache with the same
--work) and the TF-IDF logistic baseline, on the validation part and on the holdout:
- MixLLM's AIQ and quality at the budget as it is, with each query's true cost in place of the
  predicted one, with each LLM's mean training cost instead (no per-query cost at all), and with
  the true quality in place of the predicted one: which side of q - lambda * c holds the gap;
- inside each task (the log's `source`), how well each router's predicted quality ranks the
  prompts for each LLM: the AUC on 0/1 outcomes (0.5 is chance), its median, least and most over
  the LLMs. Tasks with graded outcomes, or where an LLM got every prompt right (or wrong), are left
  out of that LLM's figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import benchmark_logging, chosen_logs, log_arguments, trained_on_log  # noqa: E402

from mixllm.core.decision import Predictions  # noqa: E402
from mixllm.evaluation.baselines import MixLLMAdapter, make_baseline  # noqa: E402
from mixllm.evaluation.evaluate import RouterCurve, exact_sweep  # noqa: E402
from mixllm.jobs.report import holdout_context, reference_llm, validation_context  # noqa: E402


def within_task_auc(predicted: np.ndarray, outcomes: Any, sources: np.ndarray) -> dict[str, dict[str, float]]:
    """Per task: the AUC of `predicted` quality against 0/1 outcomes, median / least / most over LLMs."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for source in np.unique(sources):
        rows = sources == source
        aucs = [roc_auc_score(outcomes.quality[rows, j], predicted[rows, j]) for j in range(predicted.shape[1])
                if set(np.unique(outcomes.quality[rows, j])) == {0.0, 1.0}]
        if aucs:
            out[str(source)] = {"queries": int(rows.sum()), "median": float(np.median(aucs)),
                                "least": float(min(aucs)), "most": float(max(aucs)), "llms": len(aucs)}
    return out


def run_dataset(name: str, entry: Any, data_path: Path, work: Path) -> dict[str, Any]:
    config, split, router = trained_on_log(name, entry, data_path, work)
    tfidf = make_baseline("tfidf_logistic").fit(split.train)
    budget, target = config.evaluation.cost_budget_share, config.evaluation.quality_target_share
    result: dict[str, Any] = {}
    contexts = {"validation": validation_context(config, split, router.enabled_llms_, reference_llm(config, split.train)),
                "holdout": holdout_context(config, split, router.enabled_llms_)}
    for part, (queries, outcomes, reference) in contexts.items():
        predicted = MixLLMAdapter(router).predict(queries)
        train_cost = np.array([split.train.loc[split.train["llm"] == llm, "cost_usd"].mean() for llm in predicted.llms])
        variants = {
            "as is": predicted,
            "true cost": Predictions(predicted.llms, predicted.quality, predicted.uncertainty, outcomes.cost_usd,
                                     predicted.output_tokens),
            "mean cost per LLM": Predictions(predicted.llms, predicted.quality, predicted.uncertainty,
                                             np.tile(train_cost, (len(queries), 1)), predicted.output_tokens),
            "true quality": Predictions(predicted.llms, outcomes.quality, predicted.uncertainty, predicted.cost_usd,
                                        predicted.output_tokens),
        }
        curves = {}
        for variant, predictions in variants.items():
            points, _ = exact_sweep(predictions, outcomes, reference, router.cost_scale_usd_)
            row = RouterCurve(variant, points, 0.0).summary(reference, budget, target)
            curves[variant] = {"aiq": row["aiq"], "quality_at_budget_pct": row["quality_at_budget_pct"]}
        priced = (predicted.cost_usd > 0) & (outcomes.cost_usd > 0)  # a free call has no log error
        log_error = np.abs(np.log(np.where(priced, predicted.cost_usd, 1.0)) - np.log(np.where(priced, outcomes.cost_usd, 1.0)))
        cost_error = np.nanmean(np.where(priced, log_error, np.nan), axis=0)
        sources = queries["source"].to_numpy() if "source" in queries else np.full(len(queries), "all")
        tfidf_quality = tfidf.predict(queries).quality
        result[part] = {"queries": len(queries), "curves": curves,
                        "cost_log_error": dict(zip(predicted.llms, map(float, cost_error))),
                        "within_task_auc": {"mixllm": within_task_auc(predicted.quality, outcomes, sources),
                                            "tfidf_logistic": within_task_auc(tfidf_quality, outcomes, sources)}}
    return result


def print_dataset(name: str, result: dict[str, Any]) -> None:
    for part, figures in result.items():
        print(f"\n{name}, {part} ({figures['queries']} queries)")
        for variant, row in figures["curves"].items():
            print(f"  {variant:18s} AIQ {row['aiq']:.4f}   quality at the budget {row['quality_at_budget_pct']:.2f}%")
        errors = figures["cost_log_error"].values()
        print(f"  predicted cost: mean |log error| per LLM {min(errors):.3f}-{max(errors):.3f}")
        for router, tasks in figures["within_task_auc"].items():
            text = ", ".join(f"{task} {t['median']:.3f} [{t['least']:.3f}, {t['most']:.3f}]" for task, t in tasks.items())
            print(f"  within-task AUC, {router}: {text or 'no task with 0/1 outcomes'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    log_arguments(parser, "gap.json")
    args = parser.parse_args()
    benchmark_logging()
    bench, names, work = chosen_logs(args, "mixllm-gap-")
    results = {}
    for name in names:
        entry = bench.datasets[name]
        results[name] = run_dataset(name, entry, bench.data_path(entry), work)
        print_dataset(name, results[name])
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
