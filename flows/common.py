"""What every flow shares: config loading, the task runner choice, and logging into Prefect."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mixllm.config import MixLLMConfig, load_config


def config_for(params_path: str | None) -> MixLLMConfig:
    return load_config(Path(params_path) if params_path else None)


def task_runner(config: MixLLMConfig) -> Any:
    """Threads on one machine (default), or a local Dask cluster (`pipeline.task_runner: dask`).

    On a real cluster, point DaskTaskRunner at its scheduler (address=...) instead; see the README.
    """
    if config.pipeline.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        logging.getLogger("distributed").setLevel(logging.WARNING)
        return DaskTaskRunner(cluster_kwargs={"n_workers": config.pipeline.dask_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=2)


def library_logs_to_prefect() -> None:
    """Library loggers (mixllm.*) at INFO, so their records reach the Prefect run logs."""
    logging.getLogger("mixllm").setLevel(logging.INFO)
