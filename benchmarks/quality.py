"""Quality-cost benchmark on the shared RouterBench subset (a script, not a test).

    MIXLLM_ROUTERBENCH=../shared/data/routerbench_subset/routerbench_subset_long.csv.gz \
        python benchmarks/quality.py [--plot benchmarks/pareto.png] [--json benchmarks/quality.json]

Trains MixLLM on the train part of RouterDC's split (validation carved from it), measures it and
every baseline on the test part (the holdout) against gpt-4-1106-preview, then runs the MixLLM
ablations, the online (bandit feedback) simulation with pool changes, and the latency-aware
simulation. Prints markdown tables; writes the Pareto plot and a JSON of every figure.
Nothing is tuned on the holdout: lambda is calibrated on validation.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixllm.baselines import query_frame  # noqa: E402
from mixllm.config import load_config  # noqa: E402
from mixllm.data import ingest  # noqa: E402
from mixllm.evaluate import Outcomes, format_table, pareto_plot, results_table, to_jsonable  # noqa: E402
from mixllm.pipeline import (  # noqa: E402
    Workspace,
    ablation_config,
    evaluate_router,
    flat_metrics,
    holdout_context,
    load_split,
    record_stage,
    reuse_stage_outputs,
    stage_split,
    train_router,
)
from mixllm.simulate import PoolEvent, oracle_stream, output_tokens_from_log, simulate_latency, simulate_online  # noqa: E402

logger = logging.getLogger("benchmarks.quality")


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def train_variant(base: "MixLLMConfig", name: str, **overrides):  # noqa: F821
    """Train one MixLLM variant in its own work folder, reusing the base run's stages whose inputs
    it shares (split, tags, encoder) and its embedding cache."""
    config = load_config(base.root / "params.yaml", overrides={"pipeline.work_dir": f"data/work-{name}", **overrides})
    workspace = Workspace.of(config)
    workspace.root.mkdir(parents=True, exist_ok=True)
    if not workspace.cache.exists():
        workspace.cache.symlink_to(Workspace.of(base).cache, target_is_directory=True)
    reused = reuse_stage_outputs(base, config)
    logger.info("%s reuses %s", name, ", ".join(reused) or "nothing")
    split = load_split(config)
    started = time.perf_counter()
    router = train_router(config, split, progress=False)
    router.cache_dir = workspace.cache
    return config, split, router, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks/pareto.png")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/quality.json")
    parser.add_argument("--work", type=Path, default=None, help="Work folder (default: a temporary one).")
    parser.add_argument("--arrival-rate", type=float, default=12.0, help="Queries per second in the latency simulation.")
    parser.add_argument("--quick", action="store_true", help="Skip the ablations (for a smoke run).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("sentence_transformers", "mlflow", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    source = os.environ.get("MIXLLM_ROUTERBENCH")
    if not source:
        print("set MIXLLM_ROUTERBENCH to the RouterBench subset (routerbench_subset_long.csv.gz)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="mixllm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")
    config = load_config(work / "params.yaml")
    report = ingest(source, config)
    print(f"data: {report.accepted} interactions, {report.queries} queries, {report.llms} LLMs from {source}")
    stage_split(config)
    record_stage(config, "split")
    split = load_split(config)
    print(f"split (RouterDC's, validation carved from train): {split.train['query_id'].nunique()} train, "
          f"{split.validation['query_id'].nunique()} validation, {split.holdout['query_id'].nunique()} holdout queries")
    timings: dict[str, float] = {}

    # ----------------------------------------------------------------------------- MixLLM + baselines
    t = time.perf_counter()
    router = train_router(config, split, progress=False)
    timings["train_mixllm_s"] = time.perf_counter() - t
    router.cache_dir = Workspace.of(config).cache
    t = time.perf_counter()
    full = evaluate_router(config, router, split, name="mixllm")
    timings["evaluate_with_baselines_s"] = time.perf_counter() - t
    curves = list(full.curves)

    # The router reloads from disk and routes the holdout exactly as trained.
    from mixllm.router import MixLLMRouter

    holdout_texts = query_frame(split.holdout)["query"].tolist()
    reloaded = MixLLMRouter.load(Workspace.of(config).router, progress=False)
    reloaded.cache_dir = router.cache_dir
    identical = ([d.to_dict() for d in router.route(holdout_texts)] == [d.to_dict() for d in reloaded.route(holdout_texts)])
    print(f"reload check: the router loaded from disk routes all {len(holdout_texts)} holdout queries identically: {identical}")

    # ------------------------------------------------------------------------------------- ablations
    ablations = {}
    if not args.quick:
        variants = {
            "mixllm (no fine-tuning)": ("no-ft", {"embedding.fine_tune.enabled": False}),
            "mixllm (no tags)": ("no-tags", {"embedding.fine_tune.enabled": False, "features.use_domains": False}),
            "mixllm (+tf-idf)": ("tfidf", {"features.tfidf.enabled": True}),
            "mixllm (ridge 1)": ("ridge1", {"predictors.quality.ridge": 1.0}),
            "mixllm (max_seq_length 128)": ("seq128", {"embedding.max_seq_length": 128}),
            "mixllm (max_seq_length 64)": ("seq64", {"embedding.max_seq_length": 64}),
            "mixllm (int8 encoder)": ("int8", {"embedding.quantize": "int8"}),
        }
        for name, (slug, overrides) in variants.items():
            t = time.perf_counter()
            variant_config, variant_split, variant_router, train_s = train_variant(config, slug, **overrides)
            report_variant = evaluate_router(variant_config, variant_router, variant_split, baselines=[], name=name)
            curves.append(report_variant.mixllm)
            ablations[name] = {"overrides": overrides, "train_s": train_s, "wall_s": time.perf_counter() - t}
    table = results_table(curves, full.reference, config.evaluation.cost_budget_share,
                          config.evaluation.quality_target_share)
    pareto_plot(curves, full.reference, full.single_llms, args.plot,
                title="RouterBench subset, RouterDC test split: quality vs cost (ref. gpt-4-1106-preview)",
                budget_share=config.evaluation.cost_budget_share, quality_share=config.evaluation.quality_target_share)

    # ------------------------------------------------------------------------------- online learning
    t = time.perf_counter()
    holdout_queries, outcomes, reference = holdout_context(config, split, router.enabled_llms_)
    order = np.random.default_rng(0).permutation(len(holdout_queries))
    stream = holdout_queries.iloc[order].reset_index(drop=True)
    stream_outcomes = Outcomes([outcomes.query_ids[i] for i in order], outcomes.llms, outcomes.quality[order],
                               outcomes.cost_usd[order])
    features = router.features(stream["query"].tolist())
    lam = full.calibration.lambda_
    online_rows = []

    def record(result, label):
        online_rows.append({"run": label, "quality_pct": 100 * result.mean_quality / reference.mean_quality,
                            "cost_pct": 100 * result.mean_cost_usd / reference.mean_cost_usd})
        return result

    offline = record(simulate_online(router, stream, stream_outcomes, lambda_=lam, update=False, features=features),
                     "offline router (no updates)")
    for feedback in ("refined", "binary"):
        for alpha in (0.0, 0.1):
            record(simulate_online(router, stream, stream_outcomes, lambda_=lam, exploration=alpha, feedback=feedback,
                                   features=features), f"online, {feedback} feedback, exploration {alpha}")
    record(oracle_stream(stream_outcomes), "oracle")
    # Pool changes: gpt-4 and Yi start outside the pool and join at step 300; claude-v1 leaves at 600.
    pool_router = copy.deepcopy(router)
    joining = ["gpt-4-1106-preview", "zero-one-ai/Yi-34B-Chat"]
    for llm in joining:
        pool_router.remove_llm(llm)
    prices = {llm.name: (llm.input_usd_per_1k, llm.output_usd_per_1k) for llm in config.llms}
    events = [PoolEvent(300, "add", llm, prices[llm]) for llm in joining] + [PoolEvent(600, "remove", "claude-v1")]
    pools = {}
    for alpha in (0.1, 0.5):
        pools[alpha] = simulate_online(pool_router, stream, stream_outcomes, lambda_=lam, exploration=alpha,
                                       events=events, features=features, window=100, name="pool changes")
        record(pools[alpha], f"online, pool changes, exploration {alpha}")
    pool_windows = {alpha: result.windows() for alpha, result in pools.items()}
    offline_windows = offline.windows()
    timings["online_s"] = time.perf_counter() - t

    # ------------------------------------------------------------------------------ latency-aware
    t = time.perf_counter()
    tokens = output_tokens_from_log(split.holdout, holdout_queries["query_id"], router.enabled_llms_)
    holdout_features = router.features(holdout_queries["query"].tolist())
    latency = {}
    for penalty in (False, True):
        latency[penalty] = simulate_latency(router, holdout_queries, outcomes, tokens, arrival_rate_per_s=args.arrival_rate,
                                            lambda_=lam, penalty=penalty, features=holdout_features, seed=0)
    timings["latency_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started

    # ----------------------------------------------------------------------------------------- print
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n## Quality vs cost on the holdout ({stamp}; {machine()})\n")
    print(f"reference: {reference.llm} (mean quality {reference.mean_quality:.4f}, mean cost ${reference.mean_cost_usd:.6f}); "
          f"budget {100 * config.evaluation.cost_budget_share:.2f}% of its cost; target {100 * config.evaluation.quality_target_share:.2f}% "
          "of its quality\n")
    print(format_table(table))
    print(f"\nMixLLM at the lambda calibrated on validation for the budget: {full.headline()}")
    print("\n## Online learning (bandit feedback, holdout streamed in a fixed random order, "
          f"lambda {lam:g})\n")
    print(pd.DataFrame(online_rows).to_markdown(index=False, floatfmt=".2f"))
    print("\nPool changes: per window of 100 queries, the share routed to the LLMs that join (gpt-4 and Yi, at "
          "query 300) and leave (claude-v1, at 600), and quality, online vs the offline router with the full pool\n")
    offline_share = offline_windows.reindex(columns=["share:gpt-4-1106-preview", "share:zero-one-ai/Yi-34B-Chat"], fill_value=0)
    shares = pd.DataFrame({"queries": [f"{a}-{b}" for a, b in zip(offline_windows["start"], offline_windows["stop"])]})
    for alpha, windows in pool_windows.items():
        windows = windows.reindex(columns=[*windows.columns, "share:gpt-4-1106-preview", "share:zero-one-ai/Yi-34B-Chat",
                                           "share:claude-v1"], fill_value=0).loc[:, lambda f: ~f.columns.duplicated()]
        shares[f"gpt-4 (a={alpha})"] = windows["share:gpt-4-1106-preview"]
        shares[f"Yi (a={alpha})"] = windows["share:zero-one-ai/Yi-34B-Chat"]
        shares[f"claude-v1 (a={alpha})"] = windows["share:claude-v1"]
        shares[f"quality % (a={alpha})"] = 100 * windows["mean_quality"] / reference.mean_quality
    shares["gpt-4 (offline)"] = offline_share["share:gpt-4-1106-preview"].to_numpy()
    shares["Yi (offline)"] = offline_share["share:zero-one-ai/Yi-34B-Chat"].to_numpy()
    shares["quality % (offline)"] = 100 * offline_windows["mean_quality"] / reference.mean_quality
    print(shares.to_markdown(index=False, floatfmt=".2f"))
    print(f"\n## Latency-aware routing ({args.arrival_rate:g} queries/s, Poisson; profiles from params.yaml)\n")
    lat_rows = []
    overloaded = latency[False].table().set_index("llm")["p95_wait_s"].idxmax()  # without the penalty
    for penalty, result in latency.items():
        table_l = result.table().set_index("llm")
        lat_rows.append({"latency penalty": "on" if penalty else "off",
                         "quality_pct": 100 * result.mean_quality / reference.mean_quality,
                         "cost_pct": 100 * result.mean_cost_usd / reference.mean_cost_usd,
                         "overloaded LLM": overloaded, "its share": result.traffic.get(overloaded, 0.0),
                         "its p50 wait s": float(table_l.loc[overloaded, "p50_wait_s"]),
                         "its p95 wait s": float(table_l.loc[overloaded, "p95_wait_s"]),
                         "max p95 wait s (any LLM)": float(table_l["p95_wait_s"].max())})
    print(pd.DataFrame(lat_rows).to_markdown(index=False, floatfmt=".3f"))
    merged = latency[False].table().merge(latency[True].table(), on="llm", how="outer", suffixes=(" off", " on")).fillna(0)
    print("\nper LLM:\n")
    print(merged.to_markdown(index=False, floatfmt=".3f"))
    print(f"\ntimings: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(to_jsonable({
        "when": stamp, "machine": machine(), "source": source, "timings": timings,
        "table": table.to_dict(orient="records"), "headline": full.headline(), "calibration": full.calibration,
        "metrics": flat_metrics(full, config), "online": online_rows, "pool_windows": shares.to_dict(orient="records"),
        "latency": lat_rows, "ablations": ablations,
    }), indent=1))
    print(f"\nPareto plot: {args.plot}\nfigures: {args.json}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
