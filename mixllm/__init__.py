"""mixllm: route each query to the LLM with the best quality for its cost and latency."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mixllm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
