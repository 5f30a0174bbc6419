"""Scheduled deployments of both flows, served by this process (`mixllm deploy`).

`continual` runs on pipeline.continual_cron (hourly by default) and `training` on
pipeline.training_cron (nightly). `serve` keeps running and executes scheduled runs; the
schedules stay active when it stops (pause_on_shutdown=False), so runs queue up until it is back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mixllm.flows.common import config_for
from mixllm.flows.continual import continual
from mixllm.flows.training import training

TRAINING_DEPLOYMENT = "training/nightly"
CONTINUAL_DEPLOYMENT = "continual/hourly"


def deployments(params_path: str | None) -> list[Any]:
    config = config_for(params_path)
    parameters = {"params_path": params_path}
    return [
        training.to_deployment(name="nightly", cron=config.pipeline.training_cron, parameters=parameters,
                               tags=["mixllm"], description="Full retrain from the training store"),
        continual.to_deployment(name="hourly", cron=config.pipeline.continual_cron, parameters=parameters,
                                tags=["mixllm"], description="partial_fit of the champion on new feedback"),
    ]


def serve(params_path: str | None) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(params_path), pause_on_shutdown=False)


def deploy_to_work_pool(params_path: str, work_pool: str, project_root: Path) -> list[str]:
    """Register both deployments on a Prefect work pool (workers run them; nothing served here).

    The flows' code is read from `project_root` by the workers, so it must be on a path (or, with
    a git URL instead, a repository) the workers can reach.
    """
    from mixllm.flows.continual import continual as continual_flow  # noqa: F401 - entrypoints below
    from prefect import flow

    config = config_for(params_path)
    created = []
    for entrypoint, name, cron in (("mixllm/flows/training.py:training", "nightly", config.pipeline.training_cron),
                                   ("mixllm/flows/continual.py:continual", "hourly", config.pipeline.continual_cron)):
        remote = flow.from_source(source=str(project_root), entrypoint=entrypoint)
        remote.deploy(name=name, work_pool_name=work_pool, cron=cron, parameters={"params_path": params_path},
                      tags=["mixllm"], build=False, push=False)
        created.append(f"{entrypoint.split(':')[1]}/{name}")
    return created
