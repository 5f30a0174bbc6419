"""Production evidence: `mixllm evaluate --on-feedback VERSION` (a registered version judged on the
logged decisions) and `mixllm decision ID` (one decision's story)."""

from __future__ import annotations

from typing import Annotated

import typer

from mixllm.cli.common import run, state


@run
def evaluate_on_feedback_command(
    on_feedback: Annotated[str, typer.Option("--on-feedback", help="The version (number or alias) to judge.")],
    against: Annotated[str, typer.Option(help="The version it is compared with (its lambda and cost scale "
                                               "make the score).")] = "champion",
) -> None:
    """Off-policy estimates (IPS, self-normalised IPS, doubly robust, with bootstrap intervals) of a
    registered version's mean quality, cost and score on the decisions the service logged with
    feedback, beside the version it is compared with. Decisions logged by a stochastic policy
    (decision.policy) make the estimates unbiased; under the argmax policy only the decisions both
    versions agree on carry weight, and DR leans on the model."""
    from mixllm.jobs.policy_evaluation import versions_on_feedback

    config = state.config()
    judged = versions_on_feedback(config, on_feedback, against)
    if not judged["logged"]:
        typer.echo(f"no logged decisions with feedback in {config.service.feedback_store_url}; the service logs "
                   "them (POST /route, then POST /feedback with the decision_id)")
        return
    level = f"{100 * config.evaluation.confidence_level:g}%"
    typer.echo(f"{judged['logged']} logged decisions with feedback; score = quality - {judged['lambda']:.4g} x cost / "
               f"${judged['cost_scale_usd']:.4g} (version {judged['against']}'s lambda and scale); {level} intervals")
    for version, result in ((judged["version"], judged["estimates"]), (judged["against"], judged["baseline"])):
        if not result["n"]:
            typer.echo(f"version {version}: no logged decision names an LLM it serves and the policy chose "
                       f"({result['not_policy_choice']} answered by another LLM than the policy chose)")
            continue
        typer.echo(f"version {version}: {result['n']} decisions usable ({result['unknown_llm']} name LLMs it does not "
                   f"serve, {result['not_policy_choice']} answered by another LLM than the policy chose), agrees with {100 * result['agreement']:.1f}% of the logged choices, effective sample "
                   f"size {result['score']['effective_sample_size']:.0f}")
        for name in ("ips", "snips", "dr"):
            typer.echo(f"  {name:5s}  quality {result['quality'][name].format()}  cost ${result['cost_usd'][name].format(6)}"
                       f"  score {result['score'][name].format()}")
    versus = judged["estimates"].get("versus_baseline")
    if versus:  # paired: the same decisions and resamples, one reward model for both versions' DR
        typer.echo(f"version {judged['version']} minus version {judged['against']}, paired:")
        for name in ("ips", "snips", "dr"):
            typer.echo(f"  {name:5s}  quality {versus['quality'][name].format()}  cost ${versus['cost_usd'][name].format(6)}"
                       f"  score {versus['score'][name].format()}")


@run
def decision_command(decision_id: Annotated[str, typer.Argument(help="The id /route or the proxy returned "
                                                                     "(x-mixllm-decision-id).")]) -> None:
    """One logged decision: the query, the LLM the policy chose and the one that answered, its
    probability, each candidate's predicted quality, cost and score (while kept), every upstream call
    the proxy made for it, and its feedback."""
    from mixllm.core.errors import DataError
    from mixllm.io.attempts import AttemptLog
    from mixllm.io.store import existing_log
    from mixllm.io.store_schema import logged_decision_details

    config = state.config()
    store = existing_log(config.sqlalchemy_url(config.service.feedback_store_url))
    decision = store.decision(decision_id) if store is not None else None
    if decision is None:
        raise DataError(f"no decision '{decision_id}' in {config.service.feedback_store_url} (decisions without "
                        "feedback are kept service.decision_retention_days)")
    chosen = decision.get("chosen_llm") or decision["llm"]
    answered = f"; answered by {decision['llm']}" if decision["llm"] != chosen else ""
    typer.echo(f"decision {decision_id} at {decision['created_at']}: version {decision['model_version']}, lambda "
               f"{decision['lambda_']}, chose {chosen} (probability {decision['propensity']}){answered}")
    typer.echo(f"  query: {decision['query'][:200]!r}{' ...' if len(decision['query']) > 200 else ''}")
    if decision["cost_usd"] is not None or decision["latency_s"] is not None:
        typer.echo(f"  call: ${decision['cost_usd']} in {decision['latency_s']} s")
    details = logged_decision_details(decision["candidates"])
    if not decision["candidates"]:
        typer.echo("  candidates: not kept (older than service.decision_detail_days)")
    for c in sorted(details["candidates"], key=lambda c: -float(c.get("score", float("-inf")))):
        typer.echo(f"  candidate {c.get('llm', '?'):28s} quality {c.get('quality', float('nan')):.3f}  cost "
                   f"${c.get('cost_usd', float('nan')):.6f}  score {c.get('score', float('nan')):.4f}  probability "
                   f"{c.get('probability', 0.0):.3f}{'' if c.get('eligible', True) else '  (not eligible)'}")
    for note in details["notes"]:
        typer.echo(f"  note: {note}")
    for call in AttemptLog(store).of_decision(decision_id):
        status = f" HTTP {call['status_code']}" if call["status_code"] is not None else ""
        typer.echo(f"  upstream call {call['attempt']}: {call['llm']} {call['outcome']}{status} in {call['latency_s']:.3f} s")
    rows = store.feedback_of(decision_id)
    for row in rows:
        typer.echo(f"  feedback: quality {row['quality']} ({row['kind']}) at {row['created_at']}")
    if not rows:
        typer.echo("  feedback: none yet")
    store.dispose()
