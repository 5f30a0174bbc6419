"""`mixllm registry` (list, promote, rollback) and `mixllm ui` (the MLflow UI)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mixllm.cli.common import run, state

registry_app = typer.Typer(help="Browse and move the MLflow registry's champion.", no_args_is_help=True)


@registry_app.command("list")
@run
def registry_list() -> None:
    """Every registered version with its aliases, key metrics and gate verdict."""
    from mixllm.io.registry import Registry

    config = state.config()
    versions = Registry(config).versions()
    if not versions:
        typer.echo(f"{config.mlflow.registered_model_name}: no versions yet; run `mixllm train`")
        return
    typer.echo(f"{config.mlflow.registered_model_name} ({config.mlflow_tracking_uri})")
    for v in versions:
        aliases = ",".join(v.aliases) or "-"
        aiq = v.metrics.get("aiq")
        q = v.metrics.get("calibrated_quality_pct")
        c = v.metrics.get("calibrated_cost_pct")
        figures = f"aiq={aiq:.4f} quality={q:.2f}% cost={c:.2f}%" if None not in (aiq, q, c) else ""
        typer.echo(f"  v{v.version:<3d} {aliases:20s} {v.created}  {figures}")
        gate_line = v.tags.get("mixllm.gate")
        if gate_line:
            typer.echo(f"        gate: {gate_line}")
        for key in ("mixllm.promoted", "mixllm.rolled_back"):
            if key in v.tags:
                typer.echo(f"        {key.split('.')[1]}: {v.tags[key]}")


@registry_app.command("promote")
@run
def registry_promote(version_number: Annotated[int, typer.Argument(help="The version to make champion.")]) -> None:
    """Make a version the champion by hand (bypasses the gate; recorded on the version)."""
    from mixllm.io.registry import Registry

    Registry(state.config()).promote(version_number, "promoted by hand (mixllm registry promote)")
    typer.echo(f"champion is now version {version_number}")


@registry_app.command("rollback")
@run
def registry_rollback() -> None:
    """Move `champion` back to the previous champion (repeatable; undo with `registry promote`)."""
    from mixllm.io.registry import Registry

    before, after = Registry(state.config()).rollback()
    typer.echo(f"champion rolled back: version {before} -> version {after}")
    typer.echo("a running service picks it up within service.poll_interval_s, or at once with POST /admin/reload")


@run
def ui_command(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
) -> None:
    """Open the MLflow UI on 127.0.0.1 to browse runs and the model registry (Ctrl-C stops it)."""
    import subprocess

    config = state.config()
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", config.mlflow_tracking_uri,
               "--default-artifact-root", config.mlflow_artifact_location, "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    typer.echo(f"MLflow UI on http://127.0.0.1:{port} (models: http://127.0.0.1:{port}/#/models)")
    raise typer.Exit(subprocess.call(command))
