"""What every `mixllm` command shares: the configuration it reads, and its error handling."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import typer

from mixllm.config import MixLLMConfig, load_config
from mixllm.core.errors import MixLLMError


class State:
    """The global options (--params, --set) of this invocation."""

    params: Optional[Path] = None
    overrides: dict[str, object] = {}

    def config(self) -> MixLLMConfig:
        return load_config(self.params, overrides=self.overrides)


state = State()


def run(command):  # noqa: ANN001, ANN201 - decorator keeps every command's errors readable
    """Turn mixllm errors into one clear line and exit code 2, instead of a traceback."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MixLLMError as error:
            typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from None

    return wrapper
