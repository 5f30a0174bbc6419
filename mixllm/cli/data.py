"""`mixllm data`: import, fetch and inspect interaction logs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mixllm.cli.common import run, state

data_app = typer.Typer(help="Import, fetch and inspect interaction logs.", no_args_is_help=True)


@data_app.command("import")
@run
def data_import(
    path: Annotated[Path, typer.Argument(help="A log file (.csv, .csv.gz, .jsonl, .parquet, RouterBench .pkl) or a folder of them.")],
    report: Annotated[Optional[Path], typer.Option(help="Also write the ingest report (JSON) here.")] = None,
) -> None:
    """Validate a log and add its good rows to the store; bad rows go to quarantine with reasons."""
    from mixllm.io.data import ingest

    config = state.config()
    result = ingest(path, config)
    typer.echo(result.summary())
    result.write(report or config.path(config.data.reports_dir) / "ingest.json")


@data_app.command("fetch")
@run
def data_fetch(
    dataset: Annotated[str, typer.Argument(help="Dataset to fetch: routerbench.")] = "routerbench",
    report: Annotated[Optional[Path], typer.Option(help="Also write the ingest report (JSON) here.")] = None,
) -> None:
    """Get RouterBench ($MIXLLM_ROUTERBENCH if set, else download) and import it."""
    from mixllm.io.data import fetch_routerbench, ingest

    if dataset != "routerbench":
        raise typer.BadParameter(f"unknown dataset '{dataset}'; choose routerbench")
    config = state.config()
    path = fetch_routerbench(config)
    typer.echo(f"RouterBench copy: {path}")
    result = ingest(path, config)
    typer.echo(result.summary())
    result.write(report or config.path(config.data.reports_dir) / "ingest.json")


@data_app.command("show")
@run
def data_show() -> None:
    """Per-LLM counts, mean quality and cost of the stored interactions, and the split."""
    from mixllm.io.data import load_interactions
    from mixllm.io.splitting import describe_split, with_split

    config = state.config()
    frame = with_split(load_interactions(config), config.split)
    summary = frame.groupby("llm").agg(
        rows=("query_id", "size"), mean_quality=("quality", "mean"), mean_cost_usd=("cost_usd", "mean")
    )
    typer.echo(f"{len(frame)} interactions, {frame['query_id'].nunique()} queries, {frame['llm'].nunique()} LLMs\n")
    typer.echo(summary.sort_values("mean_cost_usd").to_string(float_format=lambda v: f"{v:.6f}"))
    typer.echo("\nqueries per part and source:")
    typer.echo(describe_split(frame).to_string())
