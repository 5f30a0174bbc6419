"""The leaderboard section of benchmarks/RESULTS.md, written from benchmarks/quality.json by
benchmarks/quality.py: the summary, each log's table, paired differences, the budget, the levers
and the replays (online learning, latency, pool change, task-mix shift)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from mixllm.evaluation.bootstrap import Interval

LEADERBOARD_START = "<!-- leaderboard:start (written by benchmarks/quality.py; do not edit by hand) -->"
LEADERBOARD_END = "<!-- leaderboard:end -->"


def pct(interval: Interval, digits: int = 2) -> str:
    return interval.format(digits)


def revive(value: Any) -> Any:
    """JSON back to the objects the report prints (intervals)."""
    if isinstance(value, dict):
        if set(value) == {"estimate", "low", "high", "reached"}:
            return Interval(*(float("nan") if value[k] is None else value[k]
                              for k in ("estimate", "low", "high", "reached")))
        return {k: revive(v) for k, v in value.items()}
    if isinstance(value, list):
        return [revive(v) for v in value]
    return value


def leaderboard(results: dict[str, dict[str, Any]]) -> str:
    lines = [LEADERBOARD_START, ""]
    for name, result in results.items():
        lines.append(f"- {name}: measured {result['when']} on {result['machine']} in "
                     f"{result['timings']['total_s'] / 60:.1f} minutes by `{result['command']}`")
    lines.append("")
    summary = ["| log | holdout queries | MixLLM AIQ | best text-only baseline | MixLLM − it (95% CI) | "
               "MixLLM + task label − per_source (95% CI) | calibrated cost ÷ budget |", "|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        table = {row["router"]: row for row in result["table"]}
        comparisons = result["comparisons"]
        best = comparisons.get("mixllm - best text-only baseline", {})
        task = comparisons.get("mixllm + task label - per_source", {})
        summary.append(
            f"| {name} | {result['split']['holdout']} | {table['mixllm']['aiq'].format(4)} | "
            f"{best.get('against', '–')} {table[best['against']]['aiq'].format(4) if best else ''} | "
            f"{best['aiq'].format(4) if best else '–'} | {task['aiq'].format(4) if task else '–'} | "
            f"{result['budget']['holdout_cost_over_budget']:.3f} |")
    lines += ["### Summary", ""] + summary + [""]
    for name, result in results.items():
        reference = result["reference"]
        lines += [f"### {name}", "", result["description"], "",
                  f"Holdout {result['split']['holdout']} queries (train {result['split']['train']}, validation "
                  f"{result['split']['validation']}); reference {reference['llm']} (mean quality "
                  f"{reference['mean_quality']:.4f}, ${reference['mean_cost_usd']:.6f} per query). Intervals: 95% "
                  "bootstrap over holdout queries; – = not reached.", ""]
        choice = result.get("backend_choice")
        if choice:
            figures = "; ".join(f"{backend}: validation AIQ {c['validation_aiq']:.4f}, {c['ms_per_query']:.1f} ms/query, "
                                f"AIQ loss bound {c['aiq_loss_bound']:.4f}" for backend, c in choice["candidates"].items())
            lines += [f"Encoder backend chosen on validation (embedding.backend auto, max loss "
                      f"{choice['max_aiq_loss']}): **{choice['chosen']}** ({figures}).", ""]
        lines += ["| router | sees | AIQ | quality at budget % | least cost % for 97.25% | least cost % for 100% | ms/query |",
                  "|---|---|---|---|---|---|---|"]
        for row in result["table"]:
            lines.append(f"| {row['router']} | {row['sees']} | {row['aiq'].format(4)} | "
                         f"{pct(row['quality_at_budget_pct'])} | {pct(row['least_cost_for_target_pct'])} | "
                         f"{pct(row['least_cost_for_reference_pct'])} | "
                         f"{'–' if row['ms_per_query'] is None or not np.isfinite(row['ms_per_query']) else format(row['ms_per_query'], '.1f')} |")
        lines += ["", "Paired differences (same resamples):", "", "| difference | AIQ (95% CI) | quality at budget, points (95% CI) |",
                  "|---|---|---|"]
        for label, comparison in result["comparisons"].items():
            at_budget = comparison.get("quality_at_budget_pct")
            lines.append(f"| {label.replace('best text-only baseline', comparison['against'] + ' (the best text-only baseline)')} | "
                         f"{comparison['aiq'].format(4)} | {at_budget.format(2) if at_budget else '–'} |")
        budget = result["budget"]
        lines += ["", f"Budget {budget['budget_pct']:.2f}% of the reference's cost: lambda {budget['lambda']:.4g} "
                  f"calibrated on validation with {100 * budget['confidence']:.0f}% confidence "
                  f"(validation bound {budget['validation_cost_bound_pct']:.2f}%). Holdout: quality "
                  f"{budget['holdout_quality_pct'].format(2)}%, cost {budget['holdout_cost_pct'].format(2)}%, "
                  f"**realised ÷ budget {budget['holdout_cost_over_budget']:.3f}**. Without the bound (validation "
                  f"mean ≤ budget): cost {budget['plain_mean_calibration']['holdout_cost_pct']:.2f}%, realised ÷ "
                  f"budget {budget['plain_mean_calibration']['holdout_cost_over_budget']:.3f}.", ""]
        if result["ablations"]:
            lines += ["Levers (one change each to the default, same holdout):", "",
                      "| variant | AIQ (95% CI) | variant − default mixllm (95% CI) |", "|---|---|---|"]
            for label, ablation in result["ablations"].items():
                lines.append(f"| {label} | {ablation['aiq'].format(4)} | {ablation['minus_mixllm'].format(4)} |")
            lines.append("")
        lines += simulation_lines(result.get("simulations") or {})
        lines += [f"![{name}](pareto_{name}.png)", ""]
    lines.append(LEADERBOARD_END)
    return "\n".join(lines)


def simulation_lines(simulations: dict[str, Any]) -> list[str]:
    """The replays of one log as markdown: online learning, latency, pool change, task-mix shift."""
    lines: list[str] = []
    if "online" in simulations:
        lines += ["Online learning (holdout streamed in a seeded order at the calibrated lambda; the router sees only "
                  "the chosen LLM's outcome):", "", "| run | quality % | cost % |", "|---|---|---|"]
        lines += [f"| {run} | {v['quality_pct']:.2f} | {v['cost_pct']:.2f} |" for run, v in simulations["online"].items()]
        lines.append("")
    if "latency" in simulations:
        latency = simulations["latency"]
        lines += [f"Latency-aware routing ({latency['arrival_rate_per_s']:g} queries/s, Poisson; latency profiles from "
                  f"params.yaml, which are assumptions; the LLM whose queue grows without the penalty: "
                  f"{latency['overloaded_llm']}):", "",
                  "| penalty | quality % | cost % | its share | its p50 wait s | its p95 wait s | max p95 wait s |",
                  "|---|---|---|---|---|---|---|"]
        for run, v in latency["runs"].items():
            lines.append(f"| {run} | {v['quality_pct']:.2f} | {v['cost_pct']:.2f} | {v['overloaded_share']:.3f} | "
                         f"{v['overloaded_p50_wait_s']:.2f} | {v['overloaded_p95_wait_s']:.2f} | {v['max_p95_wait_s']:.2f} |")
        lines.append("")
    if "pool_change" in simulations:
        pool = simulations["pool_change"]
        plan = pool["plan"]
        tuning = ", ".join(f"{float(a):g}: {r:.4f}" for a, r in pool["validation_regret_by_exploration"].items())
        lines += [f"Pool change: {', '.join(plan['join'])} join at query {plan['join_at']} with a prior only; "
                  f"{', '.join(plan['leave']) or 'none'} leave at {plan['leave_at']}. Compared over the {plan['window']} "
                  "queries after the join with a router that had every LLM from the start (both learn online with the "
                  f"same settings). Exploration weight chosen on a validation stream by regret per query ({tuning}): "
                  f"**{pool['chosen_exploration']:g}**.", "",
                  "| run | newcomer | its share (full pool) | quality % (full pool) | cost % (full pool) | "
                  "queries until its share stays within 5 points | regret per query |", "|---|---|---|---|---|---|---|"]
        for run, key in (("chosen exploration", "holdout"), ("no exploration", "holdout_without_exploration")):
            for llm, a in pool[key]["per_llm"].items():
                converge = a["queries_to_converge"]
                lines.append(f"| {run} | {llm} | {a['share_online']:.3f} ({a['share_full_pool']:.3f}) | "
                             f"{a['quality_online_pct']:.2f} ({a['quality_full_pool_pct']:.2f}) | "
                             f"{a['cost_online_pct']:.2f} ({a['cost_full_pool_pct']:.2f}) | "
                             f"{'not within the window' if converge is None else converge} | {a['regret_per_query']:.4f} |")
        lines.append("")
    if "mix_shift" in simulations:
        shift = simulations["mix_shift"]
        lines += [f"Task-mix shift: the holdout streamed with {', '.join(shift['first_half_tasks'])} first, then "
                  f"{', '.join(shift['second_half_tasks'])}.", "",
                  "| router | quality % first part | cost % first part | quality % second part | cost % second part |",
                  "|---|---|---|---|---|"]
        for run in ("static", "online"):
            v = shift[run]
            lines.append(f"| {run} | {v['first']['quality_pct']:.2f} | {v['first']['cost_pct']:.2f} | "
                         f"{v['second']['quality_pct']:.2f} | {v['second']['cost_pct']:.2f} |")
        lines += ["", f"Online minus static, score (quality - lambda x cost / scale) per query in the second part: "
                      f"{shift['online_minus_static_score_second_half']:+.4f}.", ""]
    return lines


def write_leaderboard(path: Path, section: str) -> None:
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n\n"
    pattern = re.compile(re.escape(LEADERBOARD_START) + ".*?" + re.escape(LEADERBOARD_END), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")
