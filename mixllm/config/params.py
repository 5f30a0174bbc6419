"""MixLLMConfig, the whole of params.yaml, and how it is found, read, overridden and explained when
it is wrong."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from mixllm.config.base import PARAMS_ENV, PARAMS_FILENAME, ROUTERBENCH_ENV, StrictModel, _named_uniquely
from mixllm.config.learning import (DataConfig, DecisionConfig, DomainsConfig, EmbeddingConfig, EvaluationConfig,
                                    FeaturesConfig, LLMConfig, PredictorsConfig, SplitConfig, TagsConfig)
from mixllm.config.operations import (BudgetsConfig, DriftConfig, GateConfig, MLflowConfig, PipelineConfig,
                                      ServiceConfig, SessionConfig)
from mixllm.core.errors import ConfigError


class MixLLMConfig(StrictModel):
    """Everything mixllm reads from params.yaml."""

    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    llms: tuple[LLMConfig, ...] = ()
    embedding: EmbeddingConfig = EmbeddingConfig()
    tags: TagsConfig = TagsConfig()
    domains: DomainsConfig = DomainsConfig()
    features: FeaturesConfig = FeaturesConfig()
    predictors: PredictorsConfig = PredictorsConfig()
    decision: DecisionConfig = DecisionConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    gate: GateConfig = GateConfig()
    mlflow: MLflowConfig = MLflowConfig()
    pipeline: PipelineConfig = PipelineConfig()
    service: ServiceConfig = ServiceConfig()
    budgets: BudgetsConfig = BudgetsConfig()
    session: SessionConfig = SessionConfig()
    drift: DriftConfig = DriftConfig()
    # Folder every relative path above is resolved against: the folder holding params.yaml.
    root: Path = Field(default=Path("."), exclude=True)

    @field_validator("llms")
    @classmethod
    def _llm_names_unique(cls, llms: tuple[LLMConfig, ...]) -> tuple[LLMConfig, ...]:
        return _named_uniquely(llms, "LLM")

    @model_validator(mode="after")
    def _reference_llm_in_catalogue(self) -> MixLLMConfig:
        ref = self.evaluation.reference_llm
        if ref is not None and self.llms and ref not in self.llm_names:
            raise ValueError(
                f"evaluation.reference_llm '{ref}' is not in llms; choose one of {', '.join(self.llm_names)}"
            )
        return self

    @model_validator(mode="after")
    def _tenant_llms_in_catalogue(self) -> MixLLMConfig:
        for index, tenant in enumerate(self.budgets.tenants):
            unknown = [name for name in tenant.allowed_llms or () if self.llms and name not in self.llm_names]
            if unknown:
                raise ValueError(f"budgets.tenants.{index}.allowed_llms of tenant '{tenant.name}' names "
                                 f"{', '.join(unknown)}, not in llms; choose from {', '.join(self.llm_names)}")
        return self

    @property
    def llm_names(self) -> list[str]:
        return [llm.name for llm in self.llms]

    @property
    def enabled_llms(self) -> list[LLMConfig]:
        return [llm for llm in self.llms if llm.enabled]

    def llm(self, name: str) -> LLMConfig:
        for llm in self.llms:
            if llm.name == name:
                return llm
        raise ConfigError(f"unknown LLM '{name}'; params.yaml llms lists: {', '.join(self.llm_names)}")

    def path(self, value: Path | str) -> Path:
        """Resolve a configured path against the project root (the folder of params.yaml)."""
        value = Path(value)
        return value if value.is_absolute() else (self.root / value)

    def routerbench_path(self) -> Path | None:
        """The local RouterBench copy: $MIXLLM_ROUTERBENCH first, then data.routerbench_path."""
        from_env = os.environ.get(ROUTERBENCH_ENV)
        if from_env:
            return Path(from_env).expanduser()
        if self.data.routerbench_path is not None:
            return self.path(self.data.routerbench_path)
        return None

    def sqlalchemy_url(self, url: str) -> str:
        """Make a relative `sqlite:///path` URL absolute against the project root."""
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
            return prefix + str(self.path(url[len(prefix):]).resolve())
        return url

    @property
    def mlflow_tracking_uri(self) -> str:
        return self.sqlalchemy_url(self.mlflow.tracking_uri)

    @property
    def mlflow_artifact_location(self) -> str:
        location = self.mlflow.artifact_location
        if "://" in location:
            return location
        return self.path(location).resolve().as_uri()

    def to_flat_dict(self) -> dict[str, Any]:
        """`section.key` -> value, for logging every parameter to MLflow."""
        flat: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, inner in value.items():
                    walk(f"{prefix}.{key}" if prefix else str(key), inner)
            elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                for index, inner in enumerate(value):
                    name = inner.get("name", index)
                    walk(f"{prefix}.{name}", inner)
            else:
                flat[prefix] = value

        walk("", self.model_dump(mode="json", by_alias=True))
        return flat


def find_params_file(start: Path | None = None) -> Path:
    """params.yaml from $MIXLLM_PARAMS, else the first one found walking up from `start` (or cwd)."""
    from_env = os.environ.get(PARAMS_ENV)
    if from_env:
        path = Path(from_env).expanduser()
        if not path.is_file():
            raise ConfigError(f"{PARAMS_ENV}={from_env} does not name a file; point it at a params.yaml")
        return path
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / PARAMS_FILENAME
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"no {PARAMS_FILENAME} in {here} or any parent folder; run mixllm from the project folder, "
        f"pass --params PATH, or set {PARAMS_ENV}"
    )


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key (check its spelling against the documented keys)")
        elif not item["loc"]:  # a check across sections names its keys in the message itself
            lines.append(f"  - {item['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  - {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def _apply_override(raw: dict[str, Any], dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted_key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(
    raw: dict[str, Any] | None,
    *,
    source: str = "<dict>",
    root: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> MixLLMConfig:
    """Validate a raw mapping (as read from YAML) into the typed config."""
    raw = dict(raw or {})
    for key, value in (overrides or {}).items():
        _apply_override(raw, key, value)
    if "root" in raw:
        raise ConfigError(f"invalid configuration in {source}: 'root' is set by mixllm, not in the file")
    try:
        config = MixLLMConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None
    return config.model_copy(update={"root": (root or Path.cwd()).resolve()})


def load_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> MixLLMConfig:
    """Read and validate params.yaml; relative paths in it resolve against its folder.

    `overrides` maps dotted keys to values (`{"decision.lambda": 0.5}`), as `--set` does on the CLI.
    """
    params_path = Path(path) if path is not None else find_params_file()
    if not params_path.is_file():
        raise ConfigError(f"config file {params_path} does not exist; pass the path of a params.yaml")
    try:
        raw = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{params_path} is not valid YAML: {error}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{params_path} must hold a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(
        raw, source=str(params_path), root=params_path.resolve().parent, overrides=overrides
    )


def parse_override(text: str) -> tuple[str, Any]:
    """`decision.lambda=0.5` -> ("decision.lambda", 0.5); the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. decision.lambda=0.5)")
    return key.strip(), yaml.safe_load(value)
