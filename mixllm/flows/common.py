"""What every flow shares: config loading, the task runner choice, and logging into Prefect."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mixllm.config import MixLLMConfig, load_config
from mixllm.core.errors import ConfigError


def config_for(params_path: str | None) -> MixLLMConfig:
    return load_config(Path(params_path) if params_path else None)


def task_runner(config: MixLLMConfig) -> Any:
    """Threads on one machine (default), or a local Dask cluster (`pipeline.task_runner: dask`).

    On a real cluster, point DaskTaskRunner at its scheduler (address=...) instead; see the README.
    """
    pipeline = config.pipeline
    if pipeline.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        logging.getLogger("distributed").setLevel(logging.WARNING)
        if pipeline.dask_address:
            return DaskTaskRunner(address=pipeline.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": pipeline.dask_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    if pipeline.task_runner == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise ConfigError("pipeline.task_runner is 'ray' but prefect-ray is not installed: pip install prefect-ray") from None
        return RayTaskRunner(address=pipeline.ray_address) if pipeline.ray_address else RayTaskRunner()
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=2)


def library_logs_to_prefect() -> None:
    """Library loggers (mixllm.*) at INFO, so their records reach the Prefect run logs."""
    logging.getLogger("mixllm").setLevel(logging.INFO)
