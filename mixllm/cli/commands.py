"""The `mixllm` command line: a thin shell over the library (no logic of its own)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from mixllm.cli.common import run, state
from mixllm.config import parse_override

app = typer.Typer(
    help=(
        "mixllm routes each query to the LLM with the best predicted quality for its cost and latency, "
        "and keeps learning from feedback. Configuration comes from params.yaml (found in the current "
        "folder or a parent; override with --params or MIXLLM_PARAMS)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

logger = logging.getLogger("mixllm.cli")


@app.callback()
def main(
    params: Annotated[
        Optional[Path], typer.Option("--params", "-p", help="params.yaml to read (default: found from the current folder).")
    ] = None,
    set_: Annotated[
        Optional[list[str]],
        typer.Option("--set", "-S", help="Override one key for this command, e.g. -S decision.lambda=0.5 (repeatable)."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    state.params = params
    state.overrides = dict(parse_override(item) for item in (set_ or []))


# ------------------------------------------------------------------------------------- training


def _progress() -> bool | None:
    return None  # progress bars when stderr is a terminal


@app.command("train")
@run
def train(
    register: Annotated[bool, typer.Option("--register/--no-register", help="Register the result in MLflow (gated promotion).")] = True,
    baselines: Annotated[
        Optional[str], typer.Option(help="Comma-separated baselines to compare with (default: evaluation.baselines; '' for none).")
    ] = None,
    ingest_first: Annotated[bool, typer.Option("--ingest/--no-ingest", help="First ingest $MIXLLM_ROUTERBENCH and data/inbox.")] = True,
) -> None:
    """The main job: ingest, split, tag, fine-tune, fit predictors, evaluate against baselines, register.

    Ends with the results table, MixLLM's headline on the holdout and the path of the Pareto plot.
    Unchanged stages are reused from the work folder (data/pipeline).
    """
    from mixllm.io.data import ingest_pending
    from mixllm.jobs.training import run_training

    config = state.config()
    if ingest_first:
        for report in ingest_pending(config):
            typer.echo(report.summary())
    chosen = None if baselines is None else [b for b in baselines.split(",") if b]
    outcome = run_training(config, progress=_progress(), register=register, baselines=chosen)
    typer.echo(outcome.summary(config))


pipeline_app = typer.Typer(help="The training stages one by one (what dvc.yaml runs).", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")


def _stage_command(name: str, description: str, outputs: str):  # noqa: ANN202 - builds one typer command
    def command() -> None:
        from mixllm.jobs.training import run_stage

        config = state.config()
        result = run_stage(config, name, progress=_progress())  # `mixllm train` then reuses what DVC made
        if name == "evaluate":
            from mixllm.evaluation.results import format_table

            typer.echo(format_table(result.table(config)))
            typer.echo("MixLLM: " + result.headline())
        else:
            typer.echo(result)

    command.__name__ = f"pipeline_{name}"
    command.__doc__ = f"{description[0].upper()}{description[1:]} ({outputs})."
    pipeline_app.command(name)(run(command))


def _add_stage_commands() -> None:
    """One command per stage of the training table (mixllm.jobs.training.STAGES), as dvc.yaml runs them."""
    from mixllm.config import PipelineConfig
    from mixllm.io.workspace import Workspace
    from mixllm.jobs.training import STAGES

    workspace = Workspace(Path(PipelineConfig().work_dir))  # relative: the paths as the help shows them
    for stage in STAGES:
        _stage_command(stage.name, stage.description, ", ".join(getattr(workspace, o).as_posix() for o in stage.outputs))


_add_stage_commands()


@pipeline_app.command("register")
@run
def pipeline_register() -> None:
    """Register the router in MLflow; it becomes champion only if it passes the gate."""
    from mixllm.jobs.training import stage_register

    registration = stage_register(state.config())
    typer.echo(f"version {registration.version}: {registration.verdict.summary()}")


@app.command("continual")
@run
def continual_once() -> None:
    """Learn once from feedback logged since the last run, then check the traffic for drift and
    retrain on it (what the hourly deployment does)."""
    from mixllm.jobs.continual import run_continual

    outcome = run_continual(state.config())
    typer.echo(outcome.summary())
    watched = outcome.drift or {"drift": None, "retrained": None}
    report = watched["drift"]
    if report is None:
        typer.echo("drift: not checked (drift.enabled off, or no champion or decision log yet)")
    else:
        typer.echo(f"drift over the last {report['queries']} decisions: "
                   + ("; ".join(report["reasons"]) if report["reasons"] else "none found"))
    if watched["retrained"]:
        typer.echo(f"retrained on drift: version {watched['retrained']['version']}")


@app.command("flow")
@run
def flow_run(
    name: Annotated[str, typer.Argument(help="training or continual")],
) -> None:
    """Run a Prefect flow once, now, on the task runner from params.yaml (visible in the Prefect UI)."""
    _refuse_overrides("flow")
    params = str(state.params.resolve()) if state.params else None
    if name == "training":
        from mixllm.flows.training import run as run_training_flow

        result = run_training_flow(params)
        typer.echo(result.get("headline", ""))
        if result.get("registration"):
            typer.echo(f"version {result['registration']['version']}: {result['registration']['verdict']}")
    elif name == "continual":
        from mixllm.flows.continual import continual

        typer.echo(json.dumps(continual(params_path=params), default=str, indent=1))
    else:
        raise typer.BadParameter(f"unknown flow '{name}'; choose training or continual")


@app.command("deploy")
@run
def deploy(
    port: Annotated[int, typer.Option(help="Port of the Prefect server started when PREFECT_API_URL is not set.")] = 4200,
) -> None:
    """Create the scheduled deployments (continual hourly, training nightly) and serve them until Ctrl-C.

    Uses the Prefect server in PREFECT_API_URL; without one, starts `prefect server` on 127.0.0.1 and
    stops it on exit. Watch runs at the server's UI (http://127.0.0.1:PORT).
    """
    import os

    from mixllm.flows.deploy import serve
    from mixllm.cli.processes import local_prefect_server

    _refuse_overrides("deploy")
    config = state.config()
    params = str((state.params or config.root / "params.yaml").resolve())
    if config.pipeline.work_pool:
        from mixllm.flows.deploy import deploy_to_work_pool

        if not os.environ.get("PREFECT_API_URL"):
            raise typer.BadParameter("pipeline.work_pool needs a Prefect server: set PREFECT_API_URL")
        created = deploy_to_work_pool(params, config.pipeline.work_pool, config.root)
        typer.echo(f"registered {', '.join(created)} on work pool '{config.pipeline.work_pool}'; "
                   f"start workers with: prefect worker start --pool {config.pipeline.work_pool}")
        return
    with local_prefect_server(port) as api_url:
        os.environ["PREFECT_API_URL"] = api_url
        typer.echo(f"serving deployments training/nightly ({config.pipeline.training_cron}) and "
                   f"continual/hourly ({config.pipeline.continual_cron}); Prefect API {api_url}; Ctrl-C stops")
        serve(params)


# ------------------------------------------------------------------------------------ using it


@app.command("route")
@run
def route(
    queries: Annotated[list[str], typer.Argument(help="One or more queries to route.")],
    lambda_: Annotated[Optional[float], typer.Option("--lambda", help="Cost weight (default: decision.lambda, or the model's calibrated one).")] = None,
    model: Annotated[str, typer.Option(help="Registry alias or version, or a router folder.")] = "champion",
    task: Annotated[Optional[str], typer.Option(help="The queries' task label (e.g. a benchmark name), when known; "
                                                     "one the router was trained on places them in that domain.")] = None,
) -> None:
    """Route queries with the champion (or another version / folder) and show why."""
    router = _load_router(model)
    if state.overrides:  # e.g. -S decision.latency_tolerance_s=2: applied to the loaded model's settings
        from mixllm.jobs.training import ablation_config

        router.config = ablation_config(router.config, **state.overrides)
    tasks = [task] * len(queries) if task else None
    for query, decision in zip(queries, router.route(queries, lambda_=lambda_, tasks=tasks)):
        typer.echo(f"{decision.llm}  <- {query[:70]!r}  (lambda={decision.lambda_:g})")
        for note in decision.notes:
            typer.echo(f"   note: {note}")
        for c in sorted(decision.candidates, key=lambda c: -c.score):
            typer.echo(f"   {c.llm:40s} q={c.quality:.3f} c=${c.cost_usd:.6f} sigma={c.uncertainty:.3f} "
                       f"penalty={c.penalty:.3f} score={c.score:.4f}")


def _refuse_overrides(command: str) -> None:
    """Flows read params.yaml in every task (and scheduled runs long after this command), so a
    one-off -S cannot reach them; say so rather than ignore it."""
    if state.overrides:
        raise typer.BadParameter(f"-S does not apply to `mixllm {command}`: Prefect runs read params.yaml itself. "
                                 "Edit params.yaml (or pass --params OTHER.yaml), or use `mixllm -S ... train`")


def _load_router(model: str):  # noqa: ANN202
    from mixllm.core.router import MixLLMRouter

    path = Path(model)
    if path.is_dir():
        return MixLLMRouter.load(path, progress=False)
    from mixllm.io.registry import Registry

    router, version_number = Registry(state.config()).load_router(model)
    logger.info("loaded version %d", version_number)
    return router


@app.command("calibrate")
@run
def calibrate(
    cost_share: Annotated[Optional[float], typer.Option(help="Target: at most this share of the reference LLM's cost (e.g. 0.25).")] = None,
    budget_usd_per_1k: Annotated[Optional[float], typer.Option(help="Target: at most this many dollars per 1,000 queries.")] = None,
    quality_share: Annotated[Optional[float], typer.Option(help="Target: at least this share of the reference's quality (e.g. 0.97).")] = None,
    model: Annotated[str, typer.Option(help="Registry alias or version, or a router folder.")] = "champion",
) -> None:
    """Find the lambda that meets a budget or quality target on validation; report it on the holdout."""
    from mixllm.io.workspace import load_split
    from mixllm.jobs.report import calibrate_router, reference_llm

    targets = {k: v for k, v in {"cost_share": cost_share, "budget_usd_per_1k": budget_usd_per_1k,
                                 "quality_share": quality_share}.items() if v is not None}
    if len(targets) != 1:
        raise typer.BadParameter("give exactly one of --cost-share, --budget-usd-per-1k, --quality-share")
    (target, value), = targets.items()
    config = state.config()
    split = load_split(config)
    result, on_holdout = calibrate_router(config, _load_router(model), split, target, value)
    reference = reference_llm(config, split.train)
    status = "met" if result.met else "NOT met (closest lambda shown)"
    typer.echo(f"target {target}={value}: {status} on validation with lambda={result.lambda_:g}")
    for name, point in (("validation", result.validation), ("holdout", on_holdout)):
        typer.echo(f"  {name:10s}: {100 * point.quality_share:.2f}% of {reference}'s quality at "
                   f"{100 * point.cost_share:.2f}% of its cost (${point.mean_cost_usd * 1000:.4f} per 1k queries)")
    typer.echo(f"use it: -S decision.lambda={result.lambda_:g}, or send \"lambda\": {result.lambda_:g} to /route")


tags_app = typer.Typer(help="Inspect query tags and their domains.", no_args_is_help=True)
app.add_typer(tags_app, name="tags")


@tags_app.command("show")
@run
def tags_show(
    model: Annotated[Optional[str], typer.Option(help="Show the domains of a registry alias/version or router folder instead.")] = None,
) -> None:
    """The domains: the log's task labels, or the tag domains (name = their most central tags, size,
    example tags, and example queries' tags)."""
    from mixllm.jobs.training import read_tags

    if model:
        report = _load_router(model).tag_report_
    else:
        _, report = read_tags(state.config())
    if not report.get("enabled", True):
        typer.echo("tags are disabled in this configuration (no domains, no fine-tuning)")
        return
    counts = report.get("domain_counts", [])
    if report.get("method") == "source":
        typer.echo("domains are the task labels (source) of the training log; no tagging was needed")
        for domain, queries in zip(report.get("domains", []), counts):
            typer.echo(f"domain {domain['domain']:2d}  {domain['name']}  ({queries} queries)")
        return
    for domain in report.get("domains", []):
        queries = counts[domain["domain"]] if domain["domain"] < len(counts) else 0
        typer.echo(f"domain {domain['domain']:2d}  {domain['name']}  ({domain['tags']} tags, {queries} queries)")
        typer.echo(f"           e.g. {', '.join(domain['examples'])}")
    for example in report.get("example_tags", [])[:5]:
        typer.echo(f"\n{example['query'][:100]!r}\n   tags: {', '.join(t for t, _ in example['tags'])}")


@app.command("config")
@run
def config_show(
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole resolved configuration as JSON.")] = False,
) -> None:
    """Check params.yaml and print the resolved configuration (with defaults filled in)."""
    config = state.config()
    if as_json:
        typer.echo(json.dumps(config.model_dump(mode="json", by_alias=True), indent=2))
        return
    for key, value in config.to_flat_dict().items():
        typer.echo(f"{key} = {value}")


from mixllm.cli.data import data_app  # noqa: E402 - registered on `app` here
from mixllm.cli.evidence import decision_command, evaluate_on_feedback_command  # noqa: E402
from mixllm.cli.registry import registry_app, ui_command  # noqa: E402
from mixllm.cli.tenants import budgets_show, keys_app, report_show  # noqa: E402

app.add_typer(data_app, name="data")
app.add_typer(registry_app, name="registry")
app.command("ui")(ui_command)
app.add_typer(keys_app, name="keys")
app.command("budgets")(budgets_show)
app.command("report")(report_show)
app.command("evaluate")(evaluate_on_feedback_command)
app.command("decision")(decision_command)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
