"""Scheduled deployments of both flows, served by this process (`mixllm deploy`).

`continual` runs on pipeline.continual_cron (hourly by default) and `training` on
pipeline.training_cron (nightly). `serve` keeps running and executes scheduled runs; the
schedules stay active when it stops (pause_on_shutdown=False), so runs queue up until it is back.
"""

from __future__ import annotations

from typing import Any

from flows.common import config_for
from flows.continual import continual
from flows.training import training

TRAINING_DEPLOYMENT = "training/nightly"
CONTINUAL_DEPLOYMENT = "continual/hourly"


def deployments(params_path: str | None) -> list[Any]:
    config = config_for(params_path)
    parameters = {"params_path": params_path}
    return [
        training.to_deployment(name="nightly", cron=config.pipeline.training_cron, parameters=parameters,
                               tags=["mixllm"], description="Full retrain from the interaction store"),
        continual.to_deployment(name="hourly", cron=config.pipeline.continual_cron, parameters=parameters,
                                tags=["mixllm"], description="partial_fit of the champion on new feedback"),
    ]


def serve(params_path: str | None) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(params_path), pause_on_shutdown=False)
