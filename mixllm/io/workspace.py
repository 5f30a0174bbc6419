"""The work folder: where each training stage writes its outputs (one layout, which dvc.yaml
names too), content hashes for cache keys, atomic writes, and the split of the stored
interactions into train / validation / holdout."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mixllm.config import MixLLMConfig
from mixllm.io.data import TrainingStore, load_interactions
from mixllm.io.splitting import split_queries

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workspace:
    """Where each step's outputs live (one folder; dvc.yaml names the same paths)."""

    root: Path

    @classmethod
    def of(cls, config: MixLLMConfig) -> Workspace:
        return cls(config.path(config.pipeline.work_dir))

    split = property(lambda self: self.root / "split.parquet")
    tags = property(lambda self: self.root / "tags.json")
    encoder = property(lambda self: self.root / "encoder")
    router = property(lambda self: self.root / "router")
    metrics = property(lambda self: self.root / "metrics.json")  # the summary dvc metrics show/diff read
    metrics_detail = property(lambda self: self.root / "metrics_detail.json")  # every figure (MLflow logs them all)
    curve = property(lambda self: self.root / "curve.csv")
    table = property(lambda self: self.root / "table.md")
    plot = property(lambda self: self.root / "pareto.png")
    evaluation = property(lambda self: self.root / "evaluation.json")
    registration = property(lambda self: self.root / "registration.json")
    replayed = property(lambda self: self.root / "replayed" / "router")
    cache = property(lambda self: self.root / "cache")


def stable_hash(*parts: Any) -> str:
    digest = hashlib.blake2b(digest_size=12)
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def data_hash(frame: pd.DataFrame) -> str:
    """Content hash of an interaction set (order-independent)."""
    hashes = frame["row_hash"] if "row_hash" in frame else pd.util.hash_pandas_object(frame, index=False).astype(str)
    return stable_hash(sorted(hashes.astype(str).tolist()))


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def replace_dir(target: Path, write: Any) -> Path:
    """Write a folder next to `target`, then swap it in: a failed step never leaves half a folder."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.replace(target)
    return target


# ---------------------------------------------------------------------------------------- split


@dataclass
class SplitData:
    train: pd.DataFrame
    validation: pd.DataFrame
    holdout: pd.DataFrame

    @property
    def fingerprint(self) -> str:
        return stable_hash(data_hash(self.train), data_hash(self.validation), data_hash(self.holdout))


def write_split(config: MixLLMConfig) -> Path:
    """Assign every stored query to train / validation / holdout (split.parquet: query_id, part)."""
    log = load_interactions(config)
    parts = split_queries(log, config.split)
    workspace = Workspace.of(config)
    workspace.root.mkdir(parents=True, exist_ok=True)
    frame = parts.rename("part").rename_axis("query_id").reset_index()
    frame.to_parquet(workspace.split, index=False)
    counts = frame["part"].value_counts().to_dict()
    logger.info("split %d queries: %s", len(frame), counts)
    return workspace.split


def load_split(config: MixLLMConfig) -> SplitData:
    """The stored interactions divided by split.parquet (made on demand when missing)."""
    workspace = Workspace.of(config)
    if not workspace.split.is_file():
        write_split(config)
    log = load_interactions(config)
    parts = pd.read_parquet(workspace.split).set_index("query_id")["part"]
    part = log["query_id"].astype(str).map(parts)
    unassigned = int(part.isna().sum())
    if unassigned:
        logger.warning("%d interactions of queries newer than split.parquet go to train; re-run the split stage", unassigned)
        part = part.fillna("train")
    log = log.assign(part=part.to_numpy())
    return SplitData(*(log[log["part"] == name].reset_index(drop=True) for name in ("train", "validation", "holdout")))

def interactions_fingerprint(config: MixLLMConfig) -> str:
    """Hash of the stored interactions (part files are content-named): cheap, for cache keys."""
    return stable_hash([p.name for p in TrainingStore(config.path(config.data.store_dir)).parts()])
