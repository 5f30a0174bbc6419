"""The benchmarks' list of routing logs (benchmarks/datasets.yaml): where each log is, its LLM
catalogue, reference, split and the pool change to simulate. Typed and strict like params.yaml, so a
new dataset is one entry of configuration, not new code."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, model_validator

from mixllm.config import LLMConfig, StrictModel, format_validation_error
from mixllm.core.errors import ConfigError

SHARED_DATA_ENV = "MIXLLM_SHARED_DATA"


class PoolChangeConfig(StrictModel):
    """The pool-change replay of a benchmark: LLMs that join (with a prior only) and leave mid-stream."""

    join: tuple[str, ...] = ()
    leave: tuple[str, ...] = ()
    join_at: int = Field(default=100, ge=0)  # stream position (queries) where the newcomers join
    leave_at: int = Field(default=400, ge=0)
    window: int = Field(default=300, ge=1)  # queries after joining over which share and quality are compared


class DatasetConfig(StrictModel):
    """One routing log of the benchmark: where it is, its LLM catalogue with prices, its reference.

    A new log is one more entry, not new code; everything not given here comes from params.yaml."""

    path: Path  # relative to the shared data folder (benchmarks/datasets.yaml: shared_data)
    reference_llm: str
    llms: tuple[LLMConfig, ...] | None = None  # null: the catalogue in params.yaml
    split_column: str | None = "split"  # a train/test column of the log, honoured when present
    description: str = ""
    pool_change: PoolChangeConfig | None = None

    @model_validator(mode="after")
    def _llms_known(self) -> DatasetConfig:
        names = [llm.name for llm in self.llms or ()]
        if self.llms is not None and self.reference_llm not in names:
            raise ValueError(f"reference_llm '{self.reference_llm}' is not in llms ({', '.join(names)})")
        for llm in (self.pool_change.join + self.pool_change.leave) if self.pool_change else ():
            if self.llms is not None and llm not in names:
                raise ValueError(f"pool_change names '{llm}', which is not in llms ({', '.join(names)})")
        return self


class BenchmarkConfig(StrictModel):
    """benchmarks/datasets.yaml: the shared data folder and the logs in it."""

    shared_data: Path = Path("../shared/data")  # relative to the repository; $MIXLLM_SHARED_DATA overrides
    datasets: dict[str, DatasetConfig]
    root: Path = Field(default=Path("."), exclude=True)

    def data_path(self, dataset: DatasetConfig) -> Path:
        base = Path(os.environ[SHARED_DATA_ENV]).expanduser() if os.environ.get(SHARED_DATA_ENV) else self.shared_data
        base = base if base.is_absolute() else self.root / base
        return base / dataset.path


def load_benchmark_config(path: Path | str) -> BenchmarkConfig:
    """Read and validate a benchmark datasets file; relative paths resolve against the repository."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read {path}: {error}") from None
    try:
        config = BenchmarkConfig.model_validate(raw or {})
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, str(path))) from None
    return config.model_copy(update={"root": path.resolve().parent.parent})
