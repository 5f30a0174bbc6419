"""The training job: one table of stages drives `mixllm train`, the DVC stages, the Prefect tasks
and the cache keys."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixllm.config import MixLLMConfig, config_from_dict
from mixllm.core.embeddings import INFERENCE_SETTINGS, QueryEncoder
from mixllm.core.errors import MixLLMError
from mixllm.core.router import MixLLMRouter
from mixllm.evaluation.baselines import query_frame
from mixllm.evaluation.results import format_table, to_jsonable
from mixllm.io.workspace import (
    SplitData,
    Workspace,
    interactions_fingerprint,
    load_split,
    replace_dir,
    stable_hash,
    write_atomic,
    write_split,
)
from mixllm.jobs.continual import stage_replay
from mixllm.jobs.gate import Registration, register_candidate
from mixllm.jobs.backend_choice import choose_backend
from mixllm.jobs.report import EvaluationReport, evaluate_router, write_evaluation

logger = logging.getLogger(__name__)


# -------------------------------------------------------------------------------- the stages


def stage_split(config: MixLLMConfig, split: SplitData | None = None, progress: bool | None = None) -> Path:
    """Assign every stored query to train / validation / holdout (split.parquet)."""
    return write_split(config)



def stage_tags(config: MixLLMConfig, split: SplitData | None = None, progress: bool | None = None) -> Path:
    """Each training query's domain: its task label, or its tag cluster (tags.json: labels and the report)."""
    split = split or load_split(config)
    router = MixLLMRouter(config, progress=progress)
    frame = query_frame(split.train)
    sources = frame["source"].tolist() if "source" in frame else None
    labels, report = router.fit_domains(frame["query"].tolist(), sources)
    workspace = Workspace.of(config)
    payload = {"domains": dict(zip(frame["query_id"].astype(str), map(str, labels))), "report": report,
               "timings": getattr(router, "timings_", {})}
    write_atomic(workspace.tags, json.dumps(to_jsonable(payload), indent=1))
    return workspace.tags


def read_tags(config: MixLLMConfig) -> tuple[dict[str, str], dict[str, Any]]:
    path = Workspace.of(config).tags
    if not path.is_file():
        raise MixLLMError(f"{path} is missing; run the tags stage first (`mixllm pipeline tags` or `dvc repro tags`)")
    payload = json.loads(path.read_text(encoding="utf-8"))
    return {k: str(v) for k, v in payload["domains"].items()}, payload["report"]


def stage_encoder(config: MixLLMConfig, split: SplitData | None = None, progress: bool | None = None) -> Path:
    """Fine-tune (or just load) the encoder on the training queries' domains; saved as a ST folder
    with its ONNX export beside the weights."""
    split = split or load_split(config)
    domains, _ = read_tags(config)
    frame = query_frame(split.train)
    labels = frame["query_id"].astype(str).map(lambda q: domains.get(q, "")).tolist()
    # The transformer alone: the predictors stage derives the backend and the other inference settings.
    encoder = MixLLMRouter(ablation_config(config, **{"embedding.backend": "torch"}), progress=progress).fit_encoder(
        frame["query"].tolist(), labels)
    return replace_dir(Workspace.of(config).encoder, with_onnx_export(encoder).save)


def with_onnx_export(encoder: QueryEncoder) -> QueryEncoder:
    """The fine-tuned encoder with its weights exported to ONNX once, here, whatever the backend: the
    predictors stage then loads the graph instead of the transformer, so its onnx backends (and a
    `dvc exp run` that changes no weight) neither import torch nor export again. The export depends
    on the weights alone, so this stage's inputs stay what changes the weights. A model the exporter
    cannot take is saved without the graph, and the predictors stage runs it on torch (said there)."""
    try:
        return encoder.with_settings(backend="onnx", quantize="none")
    except Exception as error:  # noqa: BLE001 - any exporter failure: the weights are still good
        logger.info("the encoder was not exported to ONNX (%s: %s); it is saved as the transformer alone",
                    type(error).__name__, error)
        return encoder


def stage_predictors(config: MixLLMConfig, split: SplitData | None = None, progress: bool | None = None) -> Path:
    """Fit the featurizer and the per-LLM predictors; router/ is the complete, loadable router."""
    split = split or load_split(config)
    workspace = Workspace.of(config)
    domains, report = read_tags(config)
    fine_tuned = QueryEncoder.load(workspace.encoder)
    fine_tuned.progress = progress
    embedding = config.embedding
    # The encoder stage made the weights; how they are run comes from this config (so changing it
    # never re-fine-tunes).
    inference = {name: getattr(embedding, name) for name in INFERENCE_SETTINGS if name not in ("backend", "quantize")}
    candidates = (embedding.auto_candidates() if embedding.backend == "auto"
                  else {embedding.backend: {"backend": embedding.backend, "quantize": embedding.quantize}})
    routers = {}
    derived: dict[str, QueryEncoder] = {}  # an onnx-int8 candidate quantises the onnx one's graph, not a new export
    for name, settings in candidates.items():
        source = derived.get(settings["backend"], fine_tuned)
        try:
            encoder = source.with_settings(**settings, **inference)
        except Exception as error:  # noqa: BLE001 - any exporter failure; auto falls back to torch, said in the log
            if embedding.backend != "auto" or settings["backend"] != "onnx":
                raise
            logger.warning("the ONNX export of the encoder failed (%s: %s); %s runs on torch",
                           type(error).__name__, error, name)
            name = name.replace("onnx", "torch", 1)
            encoder = fine_tuned.with_settings(**{**settings, "backend": "torch"}, **inference)
        derived.setdefault(encoder.backend, encoder)
        router = MixLLMRouter(config, cache_dir=workspace.cache, progress=progress)
        routers[name] = router.fit(split.train, domains=domains, encoder=encoder, tag_report=report)
    if len(routers) > 1:
        choice = choose_backend(config, routers, split)
        router = routers[choice["chosen"]]
        router.backend_choice_ = choice
    return replace_dir(workspace.router, router.save)


def stage_evaluate(config: MixLLMConfig, split: SplitData | None = None, progress: bool | None = None,
                   baselines: Sequence[str] | None = None, router_dir: Path | None = None) -> EvaluationReport:
    """Evaluate router/ (or `router_dir`) on the holdout; write metrics.json (the summary),
    metrics_detail.json, curve.csv, table.md and pareto.png."""
    split = split or load_split(config)
    workspace = Workspace.of(config)
    router = MixLLMRouter.load(router_dir or workspace.router, progress=progress)
    router.cache_dir = workspace.cache
    report = evaluate_router(config, router, split, baselines=baselines)
    write_evaluation(config, report, workspace)
    return report


def stage_register(config: MixLLMConfig, split: SplitData | None = None) -> Registration:
    """Register router/ with the evaluation in the work folder (DVC's last stage)."""
    split = split or load_split(config)
    workspace = Workspace.of(config)
    router = MixLLMRouter.load(workspace.router, progress=False)
    router.cache_dir = workspace.cache
    report = evaluate_router(config, router, split, baselines=[])
    return register_training_run(config, workspace.router, report, split, unreplayed_feedback_tags(config))


def unreplayed_feedback_tags(config: MixLLMConfig) -> dict[str, str]:
    """The tags of a version `dvc repro` registers: it reproduces from tracked data only, so it
    replays no feedback (mixllm train does); the version says what it left out, and the log says
    how to include it."""
    from mixllm.jobs.continual import consumed_feedback

    try:
        consumed = len(consumed_feedback(config)) if config.pipeline.replay_feedback else 0
    except Exception as error:  # noqa: BLE001 - the decision log is not the stage's input: say so, go on
        logger.warning("the decision log could not be read (%s: %s); the version's tags do not say what feedback it "
                       "lacks", type(error).__name__, error)
        return {}
    if not consumed:
        return {}
    logger.warning("this version does not learn the %d feedback rows the continual flow has consumed (dvc repro "
                   "reproduces from tracked data only); `mixllm train` replays them", consumed)
    return {"mixllm.replayed_feedback": f"0 of {consumed} consumed rows (dvc repro: tracked data only)"}


# ------------------------------------------------------------------------------------- training


def register_training_run(config: MixLLMConfig, router_dir: Path, report: EvaluationReport, split: SplitData,
                          tags: dict[str, str]) -> Registration:
    """Register a trained router with its holdout evaluation through the gate, the work folder's
    reports logged beside it, and write registration.json: the one way `mixllm train`, dvc repro's
    register stage and the Prefect training flow register (they differ only in the router they pass,
    replayed or not, and the tags that say so)."""
    workspace = Workspace.of(config)
    artifacts = [workspace.plot, workspace.table, workspace.curve, workspace.tags, workspace.metrics,
                 workspace.metrics_detail]
    registration = register_candidate(config, router_dir, report, split, run_name="training", extra_tags=tags,
                                      artifacts=artifacts)
    write_atomic(workspace.registration, json.dumps(registration.to_dict(), indent=2))
    return registration


@dataclass
class TrainingOutcome:
    registration: Registration | None
    report: EvaluationReport
    workspace: Workspace

    def summary(self, config: MixLLMConfig) -> str:
        lines = ["", format_table(self.report.table(config)), "", "MixLLM on the holdout: " + self.report.headline()]
        lines += self.report.uncertainty_lines()
        if self.registration is not None:
            registration = self.registration
            lines.append(f"registered {config.mlflow.registered_model_name} version {registration.version}: "
                         f"{registration.verdict.summary()}")
        lines.append(f"Pareto plot: {self.workspace.plot}")
        lines.append(f"table: {self.workspace.table}   metrics: {self.workspace.metrics}")
        return "\n".join(lines)


def run_training(config: MixLLMConfig, *, progress: bool | None = None, register: bool = True,
                 baselines: Sequence[str] | None = None, extra_tags: dict[str, str] | None = None) -> TrainingOutcome:
    """The main job in one process: split, tags, encoder, predictors, evaluate, register.

    Stages whose inputs did not change since the last run (same stage key, output present) are
    reused from the work folder: re-running with unchanged data and params re-embeds nothing.
    """
    workspace = Workspace.of(config)
    run_stages(config, ["split"])
    split = load_split(config)
    run_stages(config, ROUTER_STAGES, split, progress)  # router/ on disk: evaluation and registration load it
    router_dir, replay = stage_replay(config, progress)
    report = stage_evaluate(config, split, progress, baselines=baselines, router_dir=router_dir)
    record_stage(config, "evaluate")
    registration = None
    if register:
        registration = register_training_run(config, router_dir, report, split, {**replay.tags(), **(extra_tags or {})})
    return TrainingOutcome(registration, report, workspace)


def ablation_config(config: MixLLMConfig, **overrides: Any) -> MixLLMConfig:
    """A copy of the config with dotted overrides (e.g. {"embedding.fine_tune.enabled": False})."""
    raw = config.model_dump(mode="json", by_alias=True, exclude={"root"})
    return config_from_dict(raw, source="ablation", root=config.root,
                            overrides={k.replace("__", "."): v for k, v in overrides.items()})


# ---------------------------------------------------------------------------- the stage table


@dataclass(frozen=True)
class Stage:
    """One cached training stage: what it runs, what it reads and writes, which settings it depends on.

    `reads`: earlier stages whose outputs it reads ("interactions": the training store).
    `outputs`: the Workspace paths it writes; the first one present marks the stage as done.
    `params`: the dotted settings it depends on (a section name means the whole section).
    """

    name: str
    run: Callable[..., Any]  # run(config, split=None, progress=None)
    description: str
    reads: tuple[str, ...]
    outputs: tuple[str, ...]
    params: tuple[str, ...]

    @property
    def command(self) -> str:
        return f"mixllm pipeline {self.name}"


STAGES: tuple[Stage, ...] = (
    Stage("split", stage_split, "split the stored queries into train, validation and holdout",
          reads=("interactions",), outputs=("split",), params=("split",)),
    Stage("tags", stage_tags, "find each training query's domain (its task label, or its tag cluster)",
          reads=("interactions", "split"), outputs=("tags",),
          params=("tags", "domains.labels", "domains.min_queries", "embedding.model_path",
                  "embedding.max_seq_length", "embedding.truncation_side", "features.use_domains",
                  "embedding.fine_tune.enabled")),
    # The encoder stage depends on what changes the fine-tuned weights only; the inference settings
    # (embeddings.INFERENCE_SETTINGS) and the backend choice belong to the predictors stage.
    Stage("encoder", stage_encoder, "fine-tune the encoder on same-domain triplets",
          reads=("interactions", "split", "tags"), outputs=("encoder",),
          params=("embedding.model_path", "embedding.truncation_side", "embedding.fine_tune")),
    Stage("predictors", stage_predictors, "fit every LLM's quality and cost predictors (the complete router)",
          reads=("interactions", "split", "tags", "encoder"), outputs=("router",),
          # (the bootstrap settings: embedding.backend auto compares the backends' validation AIQ,
          # which no budget or quality target changes)
          params=(*(f"embedding.{name}" for name in INFERENCE_SETTINGS), "embedding.auto_backends",
                  "embedding.max_aiq_loss", "embedding.backend_timing_rounds", "embedding.backend_timing_queries",
                  "features",
                  "domains", "predictors", "decision", "llms", "evaluation.bootstrap_resamples",
                  "evaluation.confidence_level", "evaluation.seed")),
    Stage("evaluate", stage_evaluate, "evaluate the router and the baselines on the holdout",
          reads=("interactions", "split", "predictors"),
          outputs=("metrics", "metrics_detail", "table", "curve", "plot"),
          params=("evaluation",)),
)
STAGE = {stage.name: stage for stage in STAGES}
# The stages that make router/ (split comes first, evaluate reads the result).
ROUTER_STAGES = ("tags", "encoder", "predictors")


def _setting(dump: dict[str, Any], dotted: str) -> Any:
    value: Any = dump
    for part in dotted.split("."):
        value = value[part]
    return value


def stage_keys(config: MixLLMConfig) -> dict[str, str]:
    """A key per stage from exactly the data and settings it depends on and the keys of the stages it
    reads (so a change flows downstream). Equal keys mean equal outputs, so an orchestrator may skip
    the stage: `mixllm train`'s reuse of the work folder, the Prefect tasks' cache_key_fn. dvc.yaml
    declares the same dependencies (tests/test_dvc.py checks it against this table)."""
    dump = config.model_dump(mode="json", by_alias=True, exclude={"root"})
    keys: dict[str, str] = {}
    for stage in STAGES:
        upstream = [interactions_fingerprint(config) if name == "interactions" else keys[name] for name in stage.reads]
        keys[stage.name] = stable_hash(stage.name, upstream, {p: _setting(dump, p) for p in stage.params})
    return keys


def stage_output(workspace: Workspace, stage: str) -> Path:
    """The output whose presence marks `stage` as done."""
    return getattr(workspace, STAGE[stage].outputs[0])


def completed_stages(config: MixLLMConfig) -> set[str]:
    """Stages whose recorded key equals the current one and whose output exists."""
    workspace = Workspace.of(config)
    path = workspace.root / "stage_keys.json"
    recorded = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    current = stage_keys(config)
    return {s.name for s in STAGES if recorded.get(s.name) == current[s.name] and stage_output(workspace, s.name).exists()}


def record_stage(config: MixLLMConfig, stage: str) -> None:
    workspace = Workspace.of(config)
    path = workspace.root / "stage_keys.json"
    recorded = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    recorded[stage] = stage_keys(config)[stage]
    write_atomic(path, json.dumps(recorded, indent=1, sort_keys=True))


def run_stage(config: MixLLMConfig, name: str, split: SplitData | None = None, progress: bool | None = None) -> Any:
    """Run one stage and record its key, so any runner (`mixllm train`, `mixllm pipeline`, DVC, the
    Prefect tasks) reuses what another made. Returns the stage's result (its output path, or the
    evaluation report)."""
    result = STAGE[name].run(config, split, progress)
    record_stage(config, name)
    return result


def run_stages(config: MixLLMConfig, names: Sequence[str], split: SplitData | None = None,
               progress: bool | None = None) -> None:
    """Run the named stages in order, each only when its inputs changed since it last ran in the
    work folder (or its output is gone); once one runs, every later one runs too."""
    done = completed_stages(config)
    for name in names:
        if name in done:
            logger.info("stage %s: inputs unchanged, reusing its output", name)
            continue
        run_stage(config, name, split, progress)
        done = set()


def train_router(config: MixLLMConfig, split: SplitData, progress: bool | None = None) -> MixLLMRouter:
    """The stages that make router/ (tags -> encoder -> predictors) through the work folder."""
    run_stages(config, ROUTER_STAGES, split, progress)
    return MixLLMRouter.load(Workspace.of(config).router, progress=progress)


def reuse_stage_outputs(source: MixLLMConfig, target: MixLLMConfig) -> list[str]:
    """Copy the outputs of every leading stage whose key is the same under both configs (for
    ablations that share tags or the encoder with a trained run); returns the stages copied."""
    source_keys, target_keys = stage_keys(source), stage_keys(target)
    source_space, target_space = Workspace.of(source), Workspace.of(target)
    copied = []
    for stage in STAGES:
        if source_keys[stage.name] != target_keys[stage.name] or not stage_output(source_space, stage.name).exists():
            break
        for output in stage.outputs:
            origin, copy = getattr(source_space, output), getattr(target_space, output)
            if origin.is_dir():
                shutil.copytree(origin, copy, dirs_exist_ok=True)
            elif origin.exists():
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, copy)
        record_stage(target, stage.name)
        copied.append(stage.name)
    return copied


def dvc_stage(config: MixLLMConfig, stage: Stage) -> dict[str, Any]:
    """What dvc.yaml must declare for `stage`: its command, the files it reads, its settings and the
    files it writes (paths relative to the project root)."""
    workspace = Workspace.of(config)
    relative = lambda path: Path(path).relative_to(config.root).as_posix()  # noqa: E731
    deps = []
    for name in stage.reads:
        if name == "interactions":
            deps.append(relative(config.path(config.data.store_dir)))
        else:
            deps.extend(relative(getattr(workspace, output)) for output in STAGE[name].outputs[:1])
    return {"cmd": stage.command, "deps": deps, "params": list(stage.params),
            "outs": [relative(getattr(workspace, output)) for output in stage.outputs]}
