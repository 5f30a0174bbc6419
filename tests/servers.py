"""Starting the real BentoML service for a test: `bentoml serve` on a loopback port, in its own
process group (stopped by its pid with mixllm.cli.processes.stop)."""

import os
import subprocess
import sys
from pathlib import Path

from mixllm.cli.processes import start


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
