"""The served model's life in the service: loading the registry's alias in the background, swapping
a new version in atomically (requests in flight finish on the model they started with), polling the
alias, applying params.yaml's enabled flags, answering 503 while nothing is loaded, and stopping the
worker when its serving process is gone. A mixin of the service class."""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from mixllm.api_models import ROUTABLE, error

logger = logging.getLogger("bentoml.mixllm")  # bentoml serve shows "bentoml.*" loggers


@dataclass(frozen=True)
class LoadedModel:
    """What requests read: swapped as a whole, so a request never sees half a reload."""

    router: Any
    version: int


class ModelLifecycle:
    """Needs from the class it is mixed into: config, registry, metrics, model (None until loaded),
    loading_reason, _reload_lock, _stop, and _load_shadow (the shadow's own loading)."""

    def _exit_when_parent_dies(self, parent_pid: int) -> None:
        """`bentoml serve` runs this service in a worker process that inherits the listening socket.
        If the serving process is killed (kill -9, the OOM killer), the worker would live on as an
        orphan, still answering and holding the port, so a restart could not bind it. When the
        parent is gone (the worker is re-parented) the worker stops itself: SIGTERM, the graceful
        way, then a hard exit if that did not end it within 10 s."""
        while not self._stop.wait(1.0):
            if os.getppid() != parent_pid:
                logger.error("the serving process (pid %d) is gone; worker %d exits so the port is freed and a "
                             "restart can bind it", parent_pid, os.getpid())
                os.kill(os.getpid(), signal.SIGTERM)
                if not self._stop.wait(10.0):
                    os._exit(1)
                return

    def _load_all(self, version: int) -> None:
        self._reload(version)
        self._load_shadow()

    def _reload(self, version: int | None = None) -> int:
        """Load `version` (default: what the alias points at now) and swap it in atomically."""
        with self._reload_lock:
            alias = self.config.service.model_alias
            target = version or self.registry.alias_version(alias)
            if target is None:
                raise RuntimeError(f"the registry has no '{alias}' version")
            if self.model is not None and self.model.version == target:
                return target
            started = time.perf_counter()
            router, number = self.registry.load_router(target)
            # params.yaml's enabled flags apply to every model served (and /admin/reload re-reads
            # them); adding and removing LLMs is the continual flow's job, so the served model
            # stays the registered one.
            router.apply_enabled_flags(self.config.llms)
            router.route(["warm-up query"])  # first-call costs are paid here, not by a request
            self.model = LoadedModel(router, number)
            ROUTABLE.enabled, ROUTABLE.known = tuple(router.enabled_llms_), tuple(router.llms_)
            self.loading_reason = ""
            self.metrics.model_version.set(number)
            logger.info("serving %s version %d (loaded in %.1fs)", self.config.mlflow.registered_model_name, number,
                        time.perf_counter() - started)
            return number

    def _reload_enabled_flags(self) -> list[str]:
        """Re-read params.yaml and apply its llms[].enabled to the served model at once (an upstream
        outage: set enabled: false there, then POST /admin/reload). Other settings need a restart."""
        from mixllm.config import load_config

        fresh = load_config()
        with self._reload_lock:
            model = self._current()
            changes = model.router.apply_enabled_flags(fresh.llms)
            ROUTABLE.enabled, ROUTABLE.known = tuple(model.router.enabled_llms_), tuple(model.router.llms_)
            self.config = self.config.model_copy(update={"llms": fresh.llms})
        if changes:
            logger.info("params.yaml's enabled flags applied to version %d: %s", model.version, ", ".join(changes))
        return changes

    def _poll(self) -> None:
        interval = self.config.service.poll_interval_s
        while not self._stop.wait(interval):
            try:
                current = self.registry.alias_version(self.config.service.model_alias)
                if current is not None and (self.model is None or current != self.model.version):
                    logger.info("registry alias moved to version %s: reloading", current)
                    self._reload(current)
                self._load_shadow()
            except Exception as exc:  # noqa: BLE001 - polling must survive a registry hiccup
                logger.warning("registry poll failed (%s: %s); will retry", type(exc).__name__, exc)

    def _current(self, *, bentoml_api: bool = False) -> LoadedModel:
        """The served model, or a 503 while none is loaded. BentoML's own endpoints answer 500 for
        starlette's HTTPException, so they get BentoML's ServiceUnavailable (a 503, whose text
        BentoML replaces with a generic one; /route answers its own 503 first, see _not_ready)."""
        model = self.model
        if model is None:
            if bentoml_api:
                from bentoml.exceptions import ServiceUnavailable

                raise ServiceUnavailable(f"not ready: {self.loading_reason}; retry in a few seconds")
            raise HTTPException(status_code=503, detail=f"not ready: {self.loading_reason}")
        return model

    def _not_ready(self) -> JSONResponse | None:
        if self.model is not None:
            return None
        return error(503, None, f"not ready: {self.loading_reason}; retry in a few seconds", {"Retry-After": "2"})
