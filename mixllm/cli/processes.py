"""Local helper processes on 127.0.0.1: start, wait until healthy, stop by process id."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from mixllm.core.errors import MixLLMError

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_http(url: str, timeout_s: float, process: subprocess.Popen | None = None, expect: int = 200,
              interval: float = 0.3) -> None:
    """Poll `url` until it answers `expect`; fail early if `process` dies."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise MixLLMError(f"process {process.pid} exited with code {process.returncode} before {url} was up")
        try:
            response = httpx.get(url, timeout=2.0)
            if response.status_code == expect:
                return
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as error:
            last = type(error).__name__
        time.sleep(interval)
    raise MixLLMError(f"{url} did not answer {expect} within {timeout_s:.0f}s (last: {last})")


def stop(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """Stop a process we started (and its group) by its pid: SIGTERM, then SIGKILL."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def start(command: Sequence[str], *, log_path: Path | None = None, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    """Start `command` in its own process group (so `stop` takes its children too)."""
    output = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - owned by the process
    return subprocess.Popen(list(command), stdout=output, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=True)


@contextlib.contextmanager
def local_prefect_server(port: int = 4200, startup_timeout_s: float = 90.0) -> Iterator[str]:
    """PREFECT_API_URL if set; else a `prefect server` on 127.0.0.1:port for the duration of the block."""
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        yield configured
        return
    if port_in_use(port):
        raise MixLLMError(f"port {port} is taken; pass --port, or set PREFECT_API_URL to the server already there")
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect"))
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": ""}
    process = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                    log_path=home / "mixllm-prefect-server.log", env=env)
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{api_url}/health", startup_timeout_s, process)
        logger.info("Prefect server up at %s (pid %d)", api_url, process.pid)
        yield api_url
    finally:
        stop(process)
