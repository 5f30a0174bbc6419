"""The saved router's folder (format 2): router.json (config, catalogue, what the estimators were
fitted with), encoder/ (a sentence-transformers folder or static vectors), featurizer/,
domains.npz, predictors/<llm>.npz, drift.npz (a sample of the training queries' features; optional),
encoder_probes.npz (the encoder's vectors for fixed probe sentences where it was saved; optional).
Plain formats only: no pickle, so a model from the registry cannot run code when it is loaded.
The registry's copy carries the calibrated lambda (`copy_with_calibrated_lambda`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from mixllm import __version__
from mixllm.config import config_from_dict
from mixllm.core.bayesian_linear import BayesianLinearRegressor
from mixllm.core.domains import DomainModel
from mixllm.core.embeddings import QueryEncoder
from mixllm.core.encoder_check import load_probes, save_probes
from mixllm.core.errors import ModelFormatError
from mixllm.core.features import QueryFeaturizer
from mixllm.core.predictors import CostPredictor, QualityPredictor, share_posteriors
from mixllm.core.router import MixLLMRouter

FORMAT_VERSION = 2  # 2: domain prior (domains.npz), residual quality heads, log-cost models


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "__", name)


def copy_with_calibrated_lambda(folder: Path | str, lambda_: float, target: Path | str) -> Path:
    """A copy of a saved router (at `target`) that carries the lambda calibrated for the budget,
    used when decision.lambda is null. A copy: `folder` may be a DVC output, never edited."""
    import shutil

    target = Path(target)
    shutil.copytree(folder, target)
    manifest_path = target / "router.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["calibrated_lambda"] = float(lambda_)
    manifest_path.write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
    return target


def save_router(router: MixLLMRouter, folder: Path | str) -> Path:
    """A self-describing folder: router.json (config, catalogue, versions), encoder/, featurizer/,
    predictors/*.npz. Plain formats only: no pickle."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    router.encoder_.save(folder / "encoder")
    save_probes(folder, router.encoder_, getattr(router, "encoder_probes_", None))
    router.featurizer_.save(folder / "featurizer")
    domain_meta, domain_arrays = router.domain_model_.state()
    np.savez(folder / "domains.npz", **domain_arrays)
    if getattr(router, "drift_reference_", None) is not None:
        np.savez(folder / "drift.npz", features=router.drift_reference_)
    difficulty = router.difficulty_model_
    if difficulty is not None:
        np.savez(folder / "difficulty.npz", **difficulty.state())
    predictors_dir = folder / "predictors"
    predictors_dir.mkdir(exist_ok=True)
    files = {}
    for llm in router.llms_:
        quality = router.quality_models_[llm]
        arrays = {f"cost.{k}": v for k, v in router.cost_models_[llm].state().items()}
        if quality.kind == "bayesian_linear":
            arrays.update({f"quality.{k}": v for k, v in quality.model_.state().items()})
        else:  # refit at load from the data it saw: deterministic, and no pickle
            arrays.update({"quality.X_seen": quality.X_seen_, "quality.y_seen": quality.y_seen_})
        if llm in router.anchors_:
            arrays.update({"anchor.table": router.anchors_[llm]["table"], "anchor.coef": router.anchors_[llm]["coef"]})
        files[llm] = f"{_safe_name(llm)}.npz"
        np.savez(predictors_dir / files[llm], **arrays)
    manifest = {
        "format_version": FORMAT_VERSION,
        "mixllm_version": __version__,
        "trained_at": router.trained_at_,
        "config": router._config.model_dump(mode="json", by_alias=True),
        "catalogue": router.catalogue_,
        "predictor_files": files,
        "quality_params": {llm: router.quality_models_[llm].get_params() for llm in router.llms_},
        "cost_params": {llm: router.cost_models_[llm].get_params() for llm in router.llms_},
        "cost_scale_usd": router.cost_scale_usd_,
        "calibrated_lambda": getattr(router, "calibrated_lambda_", None),
        "domains": domain_meta,
        "anchors": {llm: {"llms": a["llms"], "weight": a["weight"]} for llm, a in router.anchors_.items()},
        "domain_weight": router.domain_weight_,
        "n_base_features": router.n_base_features_,
        "ridge": router.ridge_,
        "difficulty": None if difficulty is None else difficulty.get_params(),
        "mean_quality": router.mean_quality_,
        "mean_query_chars": router.mean_query_chars_,
        "typical_output_tokens": router.typical_output_tokens_,
        "residual_variance": router.residual_variance_,
        "n_features": router.n_features_in_,
        "n_training_queries": router.n_training_queries_,
        "n_feedback": getattr(router, "n_feedback_", 0),
        "timings": getattr(router, "timings_", {}),
        "tags": router.tag_report_,
        "backend_choice": getattr(router, "backend_choice_", None),
    }
    (folder / "router.json").write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
    return folder


def load_router(folder: Path | str, *, progress: bool | None = None) -> MixLLMRouter:
    folder = Path(folder)
    manifest_path = folder / "router.json"
    if not manifest_path.is_file():
        raise ModelFormatError(f"{folder} is not a saved mixllm router: router.json is missing")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(
            f"{folder} was saved by mixllm {manifest.get('mixllm_version')} in format "
            f"{manifest.get('format_version')}; this mixllm ({__version__}) reads format {FORMAT_VERSION}. "
            "Retrain with `mixllm train` or install the mixllm version that saved it"
        )
    router = MixLLMRouter(config=config_from_dict(manifest["config"], source=str(manifest_path)), progress=progress)
    router.encoder_ = QueryEncoder.load(folder / "encoder")
    router.encoder_.progress = progress
    router.encoder_probes_ = load_probes(folder)  # optional: routers saved before the check have none
    router.featurizer_ = QueryFeaturizer.load(folder / "featurizer")
    if not (folder / "domains.npz").is_file():
        raise ModelFormatError(f"{folder} is incomplete: domains.npz is missing")
    with np.load(folder / "domains.npz") as data:
        router.domain_model_ = DomainModel.from_state(manifest["domains"], {k: data[k] for k in data.files})
    router.drift_reference_ = None  # optional: models saved before drift monitoring have none
    if (folder / "drift.npz").is_file():
        with np.load(folder / "drift.npz") as data:
            router.drift_reference_ = data["features"]
    # Optional: routers saved before the shared difficulty head (or without it) have none.
    router.difficulty_model_ = None
    if manifest.get("difficulty") is not None:
        if not (folder / "difficulty.npz").is_file():
            raise ModelFormatError(f"{folder} is incomplete: difficulty.npz is missing")
        with np.load(folder / "difficulty.npz") as data:
            router.difficulty_model_ = BayesianLinearRegressor.from_state(manifest["difficulty"],
                                                                          {k: data[k] for k in data.files})
    router.domain_weight_ = float(manifest["domain_weight"])
    router.n_base_features_ = int(manifest["n_base_features"])
    router.ridge_ = float(manifest["ridge"])
    router.catalogue_ = manifest["catalogue"]
    router.cost_scale_usd_ = float(manifest["cost_scale_usd"])
    if manifest.get("calibrated_lambda") is not None:
        router.calibrated_lambda_ = float(manifest["calibrated_lambda"])
    router.mean_quality_ = float(manifest["mean_quality"])
    router.mean_query_chars_ = float(manifest["mean_query_chars"])
    router.typical_output_tokens_ = {k: float(v) for k, v in manifest["typical_output_tokens"].items()}
    # Saved since newcomers' priors are scaled by it. An older save has none, and its saved config
    # fixes predictors.quality.new_llm_prior_ridge (then 1): retraining gives it the empirical prior.
    router.residual_variance_ = {k: float(v) for k, v in manifest.get("residual_variance", {}).items()}
    router.n_features_in_ = int(manifest["n_features"])
    router.n_training_queries_ = int(manifest["n_training_queries"])
    router.n_feedback_ = int(manifest.get("n_feedback", 0))
    router.trained_at_ = manifest["trained_at"]
    router.timings_ = manifest.get("timings", {})
    router.tag_report_ = manifest.get("tags", {})
    if manifest.get("backend_choice"):
        router.backend_choice_ = manifest["backend_choice"]
    router.clusterer_ = None
    router.quality_models_, router.cost_models_ = {}, {}
    router.anchors_ = {}
    for llm, filename in manifest["predictor_files"].items():
        path = folder / "predictors" / filename
        if not path.is_file():
            raise ModelFormatError(f"{folder} is incomplete: predictors/{filename} for {llm} is missing")
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        if llm in manifest.get("anchors", {}):
            router.anchors_[llm] = {**manifest["anchors"][llm], "table": arrays["anchor.table"],
                                    "coef": arrays["anchor.coef"]}
        quality_params = manifest["quality_params"][llm]
        quality = QualityPredictor(**quality_params)
        quality_state = {k[len("quality."):]: v for k, v in arrays.items() if k.startswith("quality.")}
        if quality.kind == "bayesian_linear":
            quality.model_ = BayesianLinearRegressor.from_state(
                {"ridge": quality.ridge, "prior_mean": quality.prior_mean, "noise_scale": quality.noise_scale},
                quality_state,
            )
            quality.n_features_in_ = quality.model_.n_features_in_
        else:
            quality.fit(quality_state["X_seen"], quality_state["y_seen"])
        router.quality_models_[llm] = quality
        router.cost_models_[llm] = CostPredictor.from_state(
            manifest["cost_params"][llm], {k[len("cost."):]: v for k, v in arrays.items() if k.startswith("cost.")}
        )
    share_posteriors(router.quality_models_.values())  # saved one copy per LLM; one is routed with
    return router
