"""The served model's life in the service: loading the registry's alias in the background (or, on a
restart, the local copy of the version served last, then the registry's answer: served_copy.py),
swapping a new version in atomically (requests in flight finish on the model they started with),
polling the alias, applying params.yaml's enabled flags, answering 503 while nothing is loaded, and
stopping the worker when its serving process is gone. A mixin of the service class."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from mixllm.service.api_models import ROUTABLE, error

logger = logging.getLogger("bentoml.mixllm")  # bentoml serve shows "bentoml.*" loggers


@dataclass(frozen=True)
class LoadedModel:
    """What requests read: swapped as a whole, so a request never sees half a reload."""

    router: Any
    version: int
    source: str = "registry"  # or "local copy": a restart's version until the registry has answered


class ModelLifecycle:
    """Needs from the class it is mixed into: config, registry, served_copy (None when
    service.warm_start is off), metrics, model (None until loaded), loading_reason, _reload_lock,
    _stop, and _load_shadow (the shadow's own loading)."""

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

    def _load_then_poll(self, version: int | None) -> None:
        """The start's loading, then the alias polling (after it, so a poll never races the start's
        loading with a load of its own). A start that serves its local copy asks the registry until
        it answers, even with polling off."""
        self._load_all(version)
        wait = 1.0
        while self.config.service.poll_interval_s <= 0 and self.model is not None and self.model.source != "registry":
            if self._stop.wait(wait):
                return
            wait = min(wait * 2, 60.0)
            self._ask_registry()
        if self.config.service.poll_interval_s > 0:
            self._poll()

    def _load_all(self, version: int | None) -> None:
        """The start's loading, in the background: `version` from the registry; or, with None (a
        served copy exists), that copy first, then whatever the registry's alias names now."""
        try:
            if version is None and self._serve_copy():
                self._ask_registry()
            else:
                self._reload(version)
        except Exception as exc:
            self.loading_reason = f"loading failed ({type(exc).__name__}: {exc}); see the service log"
            logger.exception("loading the served model failed; polling the registry will try again")
            return
        self._load_shadow()

    def _ask_registry(self) -> None:
        """While the local copy serves: load what the alias names now (or confirm the copy)."""
        try:
            self._reload()
        except Exception as exc:  # noqa: BLE001 - the copy serves on; the registry is asked again
            logger.warning("serving the local copy of version %d; the registry did not confirm it (%s: %s); "
                           "asking again", self.model.version, type(exc).__name__, exc)

    def _serve_copy(self) -> bool:
        """Serve the local copy of the version served last, if there is one of this alias that loads
        and answers its warm-up query; else the start waits for the registry."""
        if self.served_copy is None:
            return False
        started = time.perf_counter()
        copied = self.served_copy.load()
        if copied is None:
            return False
        router, number = copied
        with self._reload_lock:
            if self.model is not None:  # a reload (/admin/reload) came first: it is the newer answer
                return True
            try:
                self._swap_in(router, number, "local copy")
            except Exception as exc:  # noqa: BLE001 - e.g. params.yaml now disables its every LLM
                logger.warning("the local copy of version %d does not route (%s: %s); starting from the registry",
                               number, type(exc).__name__, exc)
                return False
        logger.info("serving %s version %d from its local copy (loaded in %.1fs); asking the registry whether "
                    "'%s' moved", self.config.mlflow.registered_model_name, number, time.perf_counter() - started,
                    self.config.service.model_alias)
        return True

    def _reload(self, version: int | None = None) -> int:
        """Load `version` (default: what the alias points at now) and swap it in atomically."""
        with self._reload_lock:
            alias = self.config.service.model_alias
            target = version or self.registry.alias_version(alias)
            if target is None:
                raise RuntimeError(f"the registry has no '{alias}' version")
            identity = self.registry.version_identity(target) if self.served_copy is not None else None
            if self.model is not None and self.model.version == target:
                if self.model.source == "registry":
                    return target
                if identity == self.served_copy.identity():
                    self.model = LoadedModel(self.model.router, target)
                    logger.info("the registry confirms '%s' is version %d, the one served", alias, target)
                    return target
                logger.warning("the local copy of version %d came from another MLflow run than the registry's "
                               "version %d (the registry was rebuilt?): loading the registry's", target, target)
            started = time.perf_counter()
            staged: list[Any] = []
            router, number = self.registry.load_router(target, keep=lambda folder, _: staged.append(self._stage(folder)))
            try:
                self._swap_in(router, number, "registry")
            except BaseException:
                for copy in staged:
                    if copy is not None:
                        self.served_copy.discard(copy)
                raise
            self._commit_copy(staged[0] if staged else None, number, identity)
            logger.info("serving %s version %d (loaded in %.1fs)", self.config.mlflow.registered_model_name, number,
                        time.perf_counter() - started)
            return number

    def _stage(self, folder: Any) -> Any:
        """A staged copy of a version being loaded, or None (warm start off, or no room)."""
        if self.served_copy is None:
            return None
        try:
            return self.served_copy.stage(folder)
        except OSError as exc:  # a full disk costs the next start its head start, not this load
            logger.warning("could not keep a local copy (%s); the next start will wait for the registry", exc)
            return None

    def _commit_copy(self, staged: Any, version: int, identity: str | None) -> None:
        """The staged copy becomes the served copy, now that its version serves."""
        if staged is None:
            return
        try:
            self.served_copy.commit(staged, version, identity)
        except OSError as exc:
            self.served_copy.discard(staged)
            logger.warning("could not keep a local copy of version %d (%s); the next start will wait for the "
                           "registry", version, exc)

    def _swap_in(self, router: Any, number: int, source: str) -> None:
        """Prepare a loaded router and make it the one requests read (under _reload_lock)."""
        # params.yaml's enabled flags apply to every model served (and /admin/reload re-reads
        # them); adding and removing LLMs is the continual flow's job, so the served model
        # stays the registered one.
        router.apply_enabled_flags(self.config.llms)
        router.route(["warm-up query"])  # first-call costs are paid here, not by a request
        # Off the start's path (~30 ms of encoder time with the int8 transformer at 256 tokens).
        threading.Thread(target=self._check_encoder, args=(router, number), name="encoder-check", daemon=True).start()
        self.model = LoadedModel(router, number, source)
        ROUTABLE.enabled, ROUTABLE.known = tuple(router.enabled_llms_), tuple(router.llms_)
        self.loading_reason = ""
        self.metrics.model_version.set(number)

    def _check_encoder(self, router: Any, number: int) -> None:
        """Does the encoder embed here as where the model was saved? Logged, and shown by GET /model
        (`encoder.check`: null until done, and for a model saved without the probe vectors); never a
        reason to refuse the model, which may still route well."""
        try:
            check = router.check_encoder()
            if check is None:
                return
            cosine, floor = check["min_cosine"], self.config.service.encoder_check_min_cosine
            if cosine is None or cosine < floor:
                logger.warning("version %d: the encoder embeds differently here than where the model was saved "
                               "(lowest cosine over %d probe sentences %s, below service.encoder_check_min_cosine %s"
                               "%s): its heads were fitted to the other embeddings; retrain on this machine, or serve "
                               "a backend that computes the same here (embedding.backend onnx or torch, not int8)",
                               number, check["probes"], cosine, floor,
                               "" if check.get("same_encoder", True) else "; the saved vectors are of another encoder")
            else:
                logger.info("version %d: the encoder embeds as where it was saved (lowest cosine %s over %d probe "
                            "sentences)", number, cosine, check["probes"])
        except Exception as exc:  # noqa: BLE001 - a check must not cost the service its model
            logger.warning("version %d: the encoder check failed (%s: %s); serving it anyway", number,
                           type(exc).__name__, exc)

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
        alias_missing = False  # said once per outage: a line every interval buried the log
        while not self._stop.wait(interval):
            try:
                current = self.registry.alias_version(self.config.service.model_alias)
                serving_copy = self.model is not None and self.model.source != "registry"
                if current is None and serving_copy and not alias_missing:
                    logger.error("the registry has no '%s' version: serving the local copy of version %d until "
                                 "one is promoted", self.config.service.model_alias, self.model.version)
                alias_missing = current is None and serving_copy
                if current is not None and (self.model is None or current != self.model.version
                                            or self.model.source != "registry"):
                    if self.model is None or current != self.model.version:
                        logger.info("registry alias moved to version %s: reloading", current)
                    self._reload()  # reads the alias again under the lock: never an older answer
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

    def _why_unavailable(self) -> str:
        """What a 503 raised through BentoML (/route_batch's) meant: the model still loading, or
        else the decision log refusing the batch's decisions (or BentoML's own batching overloaded)."""
        if self.model is None:
            return f"not ready: {self.loading_reason}; retry in a few seconds"
        return ("the decision log is busy (another writer holds its lock) or unreachable, or the service is "
                "overloaded; nothing was logged, retry shortly")

    def _not_ready_reason(self) -> str | None:
        return None if self.model is not None else f"not ready: {self.loading_reason}; retry in a few seconds"

    def _not_ready(self) -> JSONResponse | None:
        reason = self._not_ready_reason()
        return None if reason is None else error(503, None, reason, {"Retry-After": "2"})
