"""Exceptions that say what is wrong, the value seen, and how to fix it."""

from __future__ import annotations


class MixLLMError(Exception):
    """Base class: every error mixllm raises on purpose derives from it. `field` names the request
    field at fault when there is one, so an HTTP error can name it without parsing the message."""

    def __init__(self, message: str = "", field: str | None = None):
        super().__init__(message)
        self.field = field


class ConfigError(MixLLMError, ValueError):
    """params.yaml (or an override) is missing, malformed, or holds a bad value."""


class DataError(MixLLMError, ValueError):
    """Input data cannot be read or has the wrong shape."""


class DataUnavailableError(MixLLMError, FileNotFoundError):
    """The data a command needs is not on this machine and cannot be downloaded."""


class NotFittedError(MixLLMError, AttributeError):
    """An estimator was used before `fit`."""


class RoutingError(MixLLMError, ValueError):
    """A routing request cannot be honoured (bad query, unknown LLM, bad override)."""


class ModelFormatError(MixLLMError, ValueError):
    """A saved router folder is incomplete or written by an incompatible mixllm version."""


class RegistryError(MixLLMError, RuntimeError):
    """The MLflow registry is missing what was asked for (no champion, unknown version)."""


class StoreBusyError(MixLLMError, RuntimeError):
    """The decision log did not take a read or write: another writer holds its lock past the busy
    timeout, or the database is down or out of connections. Retry shortly (the service: 503)."""
