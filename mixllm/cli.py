"""The `mixllm` command line: a thin shell over the library (no logic of its own)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from mixllm.config import MixLLMConfig, load_config, parse_override
from mixllm.errors import MixLLMError

app = typer.Typer(
    help=(
        "mixllm routes each query to the LLM with the best predicted quality for its cost and latency, "
        "and keeps learning from feedback. Configuration comes from params.yaml (found in the current "
        "folder or a parent; override with --params or MIXLLM_PARAMS)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Import, fetch and inspect interaction logs.", no_args_is_help=True)
app.add_typer(data_app, name="data")

logger = logging.getLogger("mixllm.cli")


class State:
    params: Optional[Path] = None
    overrides: dict[str, object] = {}

    def config(self) -> MixLLMConfig:
        return load_config(self.params, overrides=self.overrides)


state = State()


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


def run(command):  # noqa: ANN001, ANN201 - decorator keeps every command's errors readable
    """Turn mixllm errors into one clear line and exit code 2, instead of a traceback."""
    import functools

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MixLLMError as error:
            typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from None

    return wrapper


# ---------------------------------------------------------------------------------------------- data


@data_app.command("import")
@run
def data_import(
    path: Annotated[Path, typer.Argument(help="A log file (.csv, .csv.gz, .jsonl, .parquet, RouterBench .pkl) or a folder of them.")],
    report: Annotated[Optional[Path], typer.Option(help="Also write the ingest report (JSON) here.")] = None,
) -> None:
    """Validate a log and add its good rows to the store; bad rows go to quarantine with reasons."""
    from mixllm.data import ingest

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
    from mixllm.data import fetch_routerbench, ingest

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
    from mixllm.data import describe_split, load_interactions, with_split

    config = state.config()
    frame = with_split(load_interactions(config), config.split)
    summary = frame.groupby("llm").agg(
        rows=("query_id", "size"), mean_quality=("quality", "mean"), mean_cost_usd=("cost_usd", "mean")
    )
    typer.echo(f"{len(frame)} interactions, {frame['query_id'].nunique()} queries, {frame['llm'].nunique()} LLMs\n")
    typer.echo(summary.sort_values("mean_cost_usd").to_string(float_format=lambda v: f"{v:.6f}"))
    typer.echo("\nqueries per part and source:")
    typer.echo(describe_split(frame).to_string())


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
