"""`mixllm evaluate --on-feedback VERSION`: a registered version judged on production evidence."""

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
