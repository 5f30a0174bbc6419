"""Starting the real BentoML service for a test: `bentoml serve` on a loopback port, in its own
process group (stopped by its pid with mixllm.cli.processes.stop)."""

import os
import subprocess
import sys
from pathlib import Path

from mixllm.cli.processes import start
from synthetic import PRICE_PER_1K


def serve(root: Path, port: int, log_name: str = "serve.log", extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """The service of the project in `root` (its params.yaml) on 127.0.0.1:`port`, logging to `root`/`log_name`."""
    # A BENTOML_HOME per server: a server that stops clears the Prometheus files in its home, and a
    # replica sharing the first server's home would wipe that server's metrics.
    env = {**os.environ, "MIXLLM_PARAMS": str(root / "params.yaml"),
           "BENTOML_HOME": str(root / f"bentoml-{Path(log_name).stem}"),
           "BENTOML_DO_NOT_TRACK": "true", **(extra_env or {})}
    command = [sys.executable, "-m", "bentoml", "serve", "mixllm.service.app:MixLLMService",
               "--host", "127.0.0.1", "--port", str(port)]
    return start(command, log_path=root / log_name, env=env, cwd=root)


def llms_behind(upstream_url: str) -> list[dict]:
    """The synthetic LLMs (params.yaml's `llms`), each with an upstream at `upstream_url` whose key
    is in STUB_KEY: the proxy calls them there (a stub), and spends a key, so it wants a token."""
    # 3 s per attempt: a busy moment of the test machine must not make a healthy stub look down.
    return [{"name": name, "input_usd_per_1k": price, "output_usd_per_1k": price,
             "latency": {"per_call_s": 0.5, "concurrency": 2},
             "upstream": {"base_url": upstream_url, "model": f"upstream-{name}", "api_key_env": "STUB_KEY",
                          "timeout_s": 3}}
            for name, price in PRICE_PER_1K.items()]
