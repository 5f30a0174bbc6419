"""What every section of the configuration shares: frozen models that refuse unknown keys."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

PARAMS_FILENAME = "params.yaml"
PARAMS_ENV = "MIXLLM_PARAMS"
ROUTERBENCH_ENV = "MIXLLM_ROUTERBENCH"


def _named_uniquely(items: tuple[Any, ...], what: str) -> tuple[Any, ...]:
    """`items` (each with a name) unchanged, or a ValueError naming the repeated names."""
    names = [item.name for item in items]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{what} names must be unique; repeated: {', '.join(duplicates)}")
    return items


class StrictModel(BaseModel):
    """Frozen, no unknown keys; fields may be given by name or by alias (e.g. `lambda`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @classmethod
    def default_for(cls, field: str) -> Any:
        """A setting's default, for a class the service builds from this config: its own keyword
        defaults read it here, so the config stays the settings' one home."""
        return cls.model_fields[field].default
