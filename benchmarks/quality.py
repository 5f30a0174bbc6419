"""Quality-cost benchmark: every router on every routing log in benchmarks/datasets.yaml (a script, not a test).

    python benchmarks/quality.py [--datasets routerbench_subset,llmrouter_dc] [--work DIR] [--quick]

One protocol for every log. The log is ingested (validated, quarantined) into a fresh project,
split by query with same-text queries grouped (a given train/test split is honoured; test
questions repeating a train question leave the holdout), MixLLM is trained on the train part,
every baseline too, lambda is calibrated on the validation part, and everything is measured on
the holdout with an exact lambda sweep. Confidence intervals: percentile bootstrap over holdout
queries, the same resamples for every router (so differences are paired). Then, per log: the
levers as ablation rows, the budget, online learning, a pool change and a task-mix shift.

Writes benchmarks/quality.json (every figure), benchmarks/pareto_<log>.png, and the leaderboard
section of benchmarks/RESULTS.md (between its leaderboard markers). Nothing is tuned on a
holdout: the exploration weight for newcomers is chosen on the validation part.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixllm.config import MixLLMConfig, load_config  # noqa: E402
from mixllm.evaluation.baselines import MixLLMAdapter, query_frame  # noqa: E402
from mixllm.evaluation.bootstrap import (  # noqa: E402
    BOOTSTRAP_METRICS,
    Interval,
    at_lambda_bootstrap,
    bootstrap_metrics,
    bootstrap_weights,
)
from mixllm.evaluation.evaluate import Outcomes, RouterCurve, measure_router, routing_overhead_ms  # noqa: E402
from mixllm.evaluation.results import pareto_plot, results_table, to_jsonable  # noqa: E402
from mixllm.io.benchmark_config import DatasetConfig, load_benchmark_config  # noqa: E402
from mixllm.io.data import TrainingStore, ingest  # noqa: E402
from leaderboard import leaderboard, revive, write_leaderboard  # noqa: E402  (benchmarks/leaderboard.py)
from replays import simulate  # noqa: E402  (benchmarks/replays.py)
from mixllm.core.router import MixLLMRouter  # noqa: E402
from mixllm.io.workspace import SplitData, Workspace, load_split  # noqa: E402
from mixllm.jobs.report import (  # noqa: E402
    calibrate_on_validation,
    evaluate_router,
    holdout_context,
    reference_columns,
)
from mixllm.jobs.training import reuse_stage_outputs, run_stages, train_router  # noqa: E402

logger = logging.getLogger("benchmarks.quality")


# The levers, each one change to the default (params.yaml), measured on the same holdout.
ABLATIONS = {
    "mixllm (tag domains, as the paper)": ("tag-domains", {"domains.labels": "tags"}),
    "mixllm (no domain prior)": ("no-prior", {"features.use_domains": False}),
    "mixllm (no fine-tuning)": ("no-ft", {"embedding.fine_tune.enabled": False}),
    "mixllm (no TF-IDF)": ("no-tfidf", {"features.tfidf.enabled": False}),
    "mixllm (ridge fixed at 10, no GCV)": ("ridge10", {"predictors.quality.ridge": 10.0}),
    "mixllm (no shared difficulty head)": ("no-difficulty", {"predictors.quality.shared_difficulty": False}),
    # The backend levers name their quantisation too: the other levers inherit the one MixLLM chose.
    "mixllm (static encoder, model2vec)": ("static", {"embedding.backend": "static", "embedding.quantize": "none"}),
    "mixllm (torch encoder)": ("torch", {"embedding.backend": "torch", "embedding.quantize": "none"}),
    "mixllm (onnx fp32 encoder)": ("onnx", {"embedding.backend": "onnx", "embedding.quantize": "none"}),
    "mixllm (onnx int8 encoder)": ("onnx-int8", {"embedding.backend": "onnx", "embedding.quantize": "int8"}),
}
LEVERS = [slug for slug, _ in ABLATIONS.values()]
TEXT_ONLY = ("knn", "mlp", "tfidf_logistic")  # learned baselines that, like MixLLM, see only the query text


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


# ------------------------------------------------------------------------------------ projects


def make_project(name: str, entry: DatasetConfig, folder: Path) -> MixLLMConfig:
    """A project folder whose params.yaml is the repository's with this log's catalogue, reference and split."""
    folder.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    if entry.llms is not None:
        params["llms"] = [llm.model_dump(mode="json", exclude_defaults=True) for llm in entry.llms]
    params["evaluation"]["reference_llm"] = entry.reference_llm
    params["split"]["column"] = entry.split_column
    text = yaml.safe_dump(params, sort_keys=False)
    path = folder / "params.yaml"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return load_config(path)


def variant_config(base: MixLLMConfig, slug: str, overrides: dict[str, Any]) -> MixLLMConfig:
    """The same project with some settings changed and its own work folder; stages whose inputs it
    shares with the base run (split, domains, encoder) are copied, and the embedding cache is shared."""
    config = load_config(base.root / "params.yaml", overrides={"pipeline.work_dir": f"data/work-{slug}", **overrides})
    workspace = Workspace.of(config)
    workspace.root.mkdir(parents=True, exist_ok=True)
    if not workspace.cache.exists():
        workspace.cache.symlink_to(Workspace.of(base).cache.resolve(), target_is_directory=True)
    reused = reuse_stage_outputs(base, config)
    logger.info("%s reuses %s", slug, ", ".join(reused) or "nothing")
    return config


def benchmark_logging() -> None:
    """INFO logs with the time, without the libraries' chatter (the sibling scripts use it too)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("sentence_transformers", "mlflow", "httpx", "urllib3", "mixllm.io.data", "mixllm.io.readers",
                  "mixllm.io.validation"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_arguments(parser: argparse.ArgumentParser, json_name: str) -> None:
    """The options every sibling script takes: which logs, the work folder (this script's cache)
    and where the figures go."""
    parser.add_argument("--datasets", default=None, help="Comma-separated names from benchmarks/datasets.yaml (default: all).")
    parser.add_argument("--work", type=Path, default=None, help="Work folder (shares benchmarks/quality.py's cache).")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / json_name, help="Where the figures go.")


def chosen_logs(args: argparse.Namespace, prefix: str) -> tuple[Any, list[str], Path]:
    """(the benchmark config, the logs asked for, the work folder); an unknown name stops with a message."""
    bench = load_benchmark_config(ROOT / "benchmarks/datasets.yaml")
    names = list(bench.datasets) if not args.datasets else [n.strip() for n in args.datasets.split(",")]
    unknown = [n for n in names if n not in bench.datasets]
    if unknown:
        raise SystemExit(f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(bench.datasets)}")
    return bench, names, args.work or Path(tempfile.mkdtemp(prefix=prefix))


def trained_on_log(name: str, entry: DatasetConfig, data_path: Path, work: Path) -> tuple[MixLLMConfig, SplitData, MixLLMRouter]:
    """The log's project under `work` (ingested once), its split, and MixLLM trained on it (stages
    cached in the project: the sibling scripts reuse this script's --work)."""
    config = make_project(name, entry, work / name)
    if not TrainingStore(config.path(config.data.store_dir)).parts():
        ingest(data_path, config)
    run_stages(config, ["split"])
    split = load_split(config)
    return config, split, trained(config, split)[0]


def trained(config: MixLLMConfig, split: SplitData) -> tuple[MixLLMRouter, float]:
    started = time.perf_counter()
    router = train_router(config, split, progress=False)
    router.cache_dir = Workspace.of(config).cache
    return router, time.perf_counter() - started


# ---------------------------------------------------------------------------------- statistics


class Resamples:
    """Bootstrap replicates of every curve on one holdout, all on the same resampled queries."""

    def __init__(self, outcomes: Outcomes, reference_quality: np.ndarray, reference_cost: np.ndarray,
                 config: MixLLMConfig, n_boot: int):
        self.outcomes = outcomes
        self.reference_quality = reference_quality
        self.reference_cost = reference_cost
        self.evaluation = config.evaluation
        self.weights = bootstrap_weights(len(outcomes.query_ids), n_boot, config.evaluation.seed)
        self.replicates: dict[str, dict[str, np.ndarray]] = {}
        self.estimates: dict[str, dict[str, float]] = {}

    def add(self, curve: RouterCurve, estimates: dict[str, Any]) -> None:
        self.replicates[curve.name] = bootstrap_metrics(curve, self.outcomes, self.reference_quality,
                                                        self.reference_cost, self.weights,
                                                        self.evaluation.cost_budget_share,
                                                        self.evaluation.quality_target_share)
        self.estimates[curve.name] = {m: _float(estimates.get(m)) for m in BOOTSTRAP_METRICS}

    def interval(self, name: str, metric: str) -> Interval:
        return Interval.of(self.estimates[name][metric], self.replicates[name][metric],
                           self.evaluation.confidence_level)

    def difference(self, a: str, b: str, metric: str = "aiq") -> Interval:
        estimate = self.estimates[a][metric] - self.estimates[b][metric]
        return Interval.of(estimate, self.replicates[a][metric] - self.replicates[b][metric],
                           self.evaluation.confidence_level)


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)


# ------------------------------------------------------------------------------------ per log


def run_dataset(name: str, entry: DatasetConfig, data_path: Path, work: Path, *, quick: bool,
                n_boot: int, plot_dir: Path, levers: Sequence[str] | None = None) -> dict[str, Any]:
    """Every router on one log. The lever rows are `levers` (ABLATIONS' slugs; None: all of them,
    or none when `quick`); `quick` also skips the simulations."""
    started = time.perf_counter()
    config = make_project(name, entry, work / name)
    store = TrainingStore(config.path(config.data.store_dir))
    if not store.parts():
        report = ingest(data_path, config)
        logger.info("%s: %d interactions accepted, %d quarantined %s", name, report.accepted, report.quarantined,
                    report.reasons)
    run_stages(config, ["split"])
    split = load_split(config)
    counts = {part: int(frame["query_id"].nunique()) for part, frame in
              (("train", split.train), ("validation", split.validation), ("holdout", split.holdout))}
    logger.info("%s: split %s", name, counts)
    timings: dict[str, float] = {}

    router, timings["train_s"] = trained(config, split)
    t = time.perf_counter()
    report = evaluate_router(config, router, split, bootstrap=False)
    timings["evaluate_with_baselines_s"] = time.perf_counter() - t
    evaluation = config.evaluation
    holdout_queries, outcomes, reference = holdout_context(config, split, router.enabled_llms_)
    reference_quality, reference_cost = reference_columns(split.holdout, holdout_queries["query_id"], outcomes,
                                                          reference.llm)
    curves = list(report.curves)
    task_curve = measure_router("mixllm + task label", MixLLMAdapter(router, with_task=True), holdout_queries,
                                outcomes, reference, report.mixllm.ms_per_query)
    curves.insert(1, task_curve)

    ablations: dict[str, Any] = {}
    if levers is None:
        levers = [] if quick else LEVERS
    # One change per lever: the encoder backend and its quantisation stay the ones MixLLM's row chose
    # on validation (unless the lever is the backend), or the variant's own choice would change two things.
    chosen = {"embedding.backend": router.encoder_.backend, "embedding.quantize": router.encoder_.quantize}
    for label, (slug, overrides) in ABLATIONS.items():
        if slug in levers and {**chosen, **overrides} == chosen:
            logger.info("%s: lever %s is MixLLM's own row (the backend it chose); skipped", name, slug)
        elif slug in levers:
            t = time.perf_counter()
            variant = variant_config(config, slug, {**chosen, **overrides})
            variant_router, train_s = trained(variant, load_split(variant))
            # ms/query end to end with the embedding cache off (as MixLLM's own row).
            curve = measure_router(label, MixLLMAdapter(variant_router), holdout_queries, outcomes, reference,
                                   ms_per_query=routing_overhead_ms(variant_router, holdout_queries["query"].tolist()))
            curves.append(curve)
            ablations[label] = {"overrides": overrides, "train_s": train_s, "wall_s": time.perf_counter() - t}

    table = results_table(curves, reference, evaluation.cost_budget_share, evaluation.quality_target_share)
    estimates = table.set_index("router").to_dict(orient="index")
    resamples = Resamples(outcomes, reference_quality, reference_cost, config, n_boot)
    for curve in curves:
        resamples.add(curve, estimates[curve.name])
    calibrated = at_lambda_bootstrap(report.mixllm.path, report.calibration.lambda_, outcomes, reference_quality,
                                     reference_cost, resamples.weights)
    budget_pct = 100 * evaluation.cost_budget_share

    rows = []
    for curve in curves:
        row = {"router": curve.name, "sees": _sees(curve.name)}
        for metric in BOOTSTRAP_METRICS:
            row[metric] = resamples.interval(curve.name, metric)
        row["ms_per_query"] = curve.ms_per_query
        rows.append(row)
    text_baselines = [c.name for c in curves if c.name in TEXT_ONLY]
    best_text = max(text_baselines, key=lambda n: resamples.estimates[n]["aiq"]) if text_baselines else None
    comparisons = {}
    if best_text:
        comparisons["mixllm - best text-only baseline"] = {"against": best_text,
                                                           "aiq": resamples.difference("mixllm", best_text),
                                                           "quality_at_budget_pct": resamples.difference(
                                                               "mixllm", best_text, "quality_at_budget_pct")}
        for other in text_baselines:
            if other != best_text:
                comparisons[f"mixllm - {other}"] = {"against": other, "aiq": resamples.difference("mixllm", other)}
    if "per_source" in resamples.estimates:
        comparisons["mixllm + task label - per_source"] = {
            "against": "per_source", "aiq": resamples.difference("mixllm + task label", "per_source"),
            "quality_at_budget_pct": resamples.difference("mixllm + task label", "per_source", "quality_at_budget_pct")}
        comparisons["mixllm (text only) - per_source"] = {"against": "per_source",
                                                          "aiq": resamples.difference("mixllm", "per_source")}
    for label in ablations:
        ablations[label]["aiq"] = resamples.interval(label, "aiq")
        ablations[label]["minus_mixllm"] = resamples.difference(label, "mixllm")
    budget = {
        "lambda": report.calibration.lambda_,
        "met_on_validation": report.calibration.met,
        "confidence": report.calibration.confidence,
        "validation_cost_bound_pct": None if report.calibration.cost_bound is None else 100 * report.calibration.cost_bound,
        "validation_cost_pct": 100 * report.calibration.validation.cost_share,
        "validation_quality_pct": 100 * report.calibration.validation.quality_share,
        "holdout_quality_pct": Interval.of(100 * report.holdout_at_calibrated.quality_share, calibrated["quality_pct"]),
        "holdout_cost_pct": Interval.of(100 * report.holdout_at_calibrated.cost_share, calibrated["cost_pct"]),
        "holdout_cost_over_budget": report.holdout_at_calibrated.cost_share / evaluation.cost_budget_share,
        "budget_pct": budget_pct,
    }
    budget["plain_mean_calibration"] = plain_budget(config, router, split, outcomes, reference)
    pareto_plot(curves, reference, report.single_llms, plot_dir / f"pareto_{name}.png",
                title=f"{name}: holdout quality vs cost (reference {reference.llm})",
                budget_share=evaluation.cost_budget_share, quality_share=evaluation.quality_target_share)

    simulations: dict[str, Any] = {}
    if not quick:
        t = time.perf_counter()
        simulations = simulate(config, entry, router, split, report.calibration.lambda_)
        timings["simulations_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started
    return {
        "name": name, "description": entry.description, "source": str(entry.path), "split": counts,
        "reference": {"llm": reference.llm, "mean_quality": reference.mean_quality,
                      "mean_cost_usd": reference.mean_cost_usd},
        "domains": router.describe()["domains"], "quality_ridge": router.ridge_,
        "table": rows, "comparisons": comparisons, "ablations": ablations, "budget": budget,
        "simulations": simulations, "timings": timings, "router_timings": router.timings_,
        "predictor_scores": report.predictor_scores,
        "backend_choice": getattr(router, "backend_choice_", None),
    }


def _sees(name: str) -> str:
    if name == "oracle":
        return "holdout outcomes"
    if name in ("per_source", "mixllm + task label"):
        return "text + task label"
    if name in ("random", "cheapest", "best_single"):
        return "nothing"
    return "text"


def plain_budget(config: MixLLMConfig, router: MixLLMRouter, split: SplitData, outcomes: Outcomes,
                 reference: Any) -> dict[str, float]:
    """The budget without the confidence bound (validation mean <= budget), for comparison."""
    from mixllm.config import config_from_dict
    from mixllm.evaluation.evaluate import sweep

    raw = config.model_dump(mode="json", by_alias=True, exclude={"root"})
    plain = config_from_dict(raw, root=config.root, overrides={"evaluation.budget_confidence": 0.5})
    adapter = MixLLMAdapter(router)
    calibration = calibrate_on_validation(plain, adapter, split, router.enabled_llms_, reference.llm, "cost_share",
                                          config.evaluation.cost_budget_share)
    holdout_queries = query_frame(split.holdout)
    point = sweep(adapter.predict(holdout_queries), outcomes, reference, [calibration.lambda_], router.cost_scale_usd_)[0]
    return {"lambda": calibration.lambda_, "holdout_cost_pct": 100 * point.cost_share,
            "holdout_quality_pct": 100 * point.quality_share,
            "holdout_cost_over_budget": point.cost_share / config.evaluation.cost_budget_share}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=None, help="Comma-separated names from benchmarks/datasets.yaml (default: all).")
    parser.add_argument("--config", type=Path, default=ROOT / "benchmarks/datasets.yaml")
    parser.add_argument("--work", type=Path, default=None, help="Work folder, kept between runs (default: a temporary one).")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/quality.json")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/RESULTS.md",
                        help="Markdown file whose leaderboard section is rewritten.")
    parser.add_argument("--resamples", type=int, default=None, help="Bootstrap resamples (default: params.yaml).")
    parser.add_argument("--quick", action="store_true", help="Skip the levers and the simulations (a smoke run).")
    parser.add_argument("--levers", default=None,
                        help="Comma-separated lever rows to run (default: all, or none with --quick): "
                        + ", ".join(LEVERS))
    args = parser.parse_args()
    benchmark_logging()
    bench = load_benchmark_config(args.config)
    names = list(bench.datasets) if not args.datasets else [n.strip() for n in args.datasets.split(",")]
    unknown = [n for n in names if n not in bench.datasets]
    if unknown:
        print(f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(bench.datasets)}", file=sys.stderr)
        return 2
    missing = [n for n in names if not bench.data_path(bench.datasets[n]).is_file()]
    if missing:
        print("missing data: " + "; ".join(f"{n}: {bench.data_path(bench.datasets[n])}" for n in missing)
              + ". Set MIXLLM_SHARED_DATA to the folder holding the shared logs.", file=sys.stderr)
        return 2
    levers = None if args.levers is None else [slug.strip() for slug in args.levers.split(",") if slug.strip()]
    unknown = sorted(set(levers or []) - set(LEVERS))
    if unknown:
        print(f"unknown lever(s) {', '.join(unknown)}; choose from {', '.join(LEVERS)}", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="mixllm-bench-"))
    command = "python benchmarks/quality.py" + (f" --datasets {args.datasets}" if args.datasets else "") + (
        " --quick" if args.quick else "") + (f" --levers {args.levers}" if args.levers is not None else "")
    stored = json.loads(args.json.read_text(encoding="utf-8")) if args.json.is_file() else {}
    stored = stored if isinstance(stored.get("datasets"), dict) else {"datasets": {}}
    for name in names:
        entry = bench.datasets[name]
        logger.info("=== %s", name)
        n_boot = args.resamples if args.resamples is not None else load_config(ROOT / "params.yaml").evaluation.bootstrap_resamples
        result = run_dataset(name, entry, bench.data_path(entry), work, quick=args.quick, n_boot=n_boot,
                             plot_dir=ROOT / "benchmarks", levers=levers)
        result.update({"when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
                       "command": command})
        stored["datasets"][name] = to_jsonable(result)
        args.json.write_text(json.dumps(stored, indent=1), encoding="utf-8")  # a crash later keeps this log's figures
    # The leaderboard shows every log of datasets.yaml measured so far: a partial run updates its own.
    measured = {name: revive(stored["datasets"][name]) for name in bench.datasets if name in stored["datasets"]}
    section = leaderboard(measured)
    print(section)
    write_leaderboard(args.results, section)
    print(f"\nfigures: {args.json}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
