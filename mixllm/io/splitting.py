"""The split by query: train / validation / holdout, stratified by task, with same-text queries
kept together (a repeated question never leaks from train into the holdout)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from mixllm.config import SplitConfig
from mixllm.io.readers import file_suffix

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Split


def stable_unit(seed: int, key: str) -> float:
    digest = hashlib.blake2b(f"{seed}:{key}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def normalised_text(text: Any) -> str:
    """The key under which two queries count as the same question: case and spacing ignored."""
    return " ".join(str(text).lower().split())


def _carve(ids: pd.Series, strata: pd.Series, fraction: float, seed: int, groups: pd.Series | None = None) -> set[str]:
    """Take `fraction` of the ids from every stratum, by a seeded hash rank (exact per stratum).

    With `groups`, whole groups are taken (ranked by the group key), so queries sharing a group
    never land on both sides."""
    chosen: set[str] = set()
    if fraction <= 0:
        return chosen
    keys = ids if groups is None else groups
    for _, members in ids.groupby(strata.to_numpy(), sort=True):
        member_keys = keys.loc[members.index]
        ranked = sorted(set(member_keys), key=lambda k: (stable_unit(seed, k), k))
        sizes = member_keys.value_counts()
        target = int(round(fraction * len(members)))
        taken: set[str] = set()
        count = 0
        for key in ranked:
            if count >= target:
                break
            taken.add(key)
            count += int(sizes[key])
        chosen.update(members[member_keys.isin(taken)].tolist())
    return chosen


def split_queries(frame: pd.DataFrame, config: SplitConfig) -> pd.Series:
    """Assign every query_id to train, validation or holdout; all rows of a query share one part.

    Queries with the same normalised text (case and spacing ignored) are one group and share a
    part: a question asked twice must not sit in training and in the holdout (the holdout would
    measure memory). With a split column in the data (config.column) its holdout/test queries
    are the holdout, except those whose text the given train part also holds (moved to train and
    counted in the log), and validation is carved from the rest; otherwise the holdout is carved
    first. Carving is stratified by `config.stratify_by` and seeded, so the same data and seed give
    the same split.
    """
    if frame.empty:
        return pd.Series(dtype=object, name="part")
    per_query = frame.groupby("query_id", sort=True).agg(
        stratum=(config.stratify_by, "first") if config.stratify_by and config.stratify_by in frame else ("query_id", lambda s: "all"),
        given=(config.column, lambda s: _most_held_out(s)) if config.column and config.column in frame else ("query_id", lambda s: None),
        text=("query", "first"),
    )
    ids = pd.Series(per_query.index.astype(str), index=per_query.index)
    strata = per_query["stratum"].fillna("unknown").astype(str)
    groups = per_query["text"].map(normalised_text)
    given = per_query["given"]
    part = pd.Series("train", index=per_query.index, dtype=object, name="part")
    if given.notna().any():
        part[given == "holdout"] = "holdout"
        part[given == "validation"] = "validation"
        seen_outside = set(groups[part != "holdout"])
        leaking = (part == "holdout") & groups.isin(seen_outside)
        if leaking.any():
            logger.warning("%d held-out queries repeat the text of a training query; they join the training part "
                           "so the holdout measures unseen questions", int(leaking.sum()))
            part[leaking] = "train"
        pool = part == "train"
        validation = _carve(ids[pool], strata[pool], config.validation_fraction, config.seed, groups[pool])
    else:
        holdout = _carve(ids, strata, config.holdout_fraction, config.seed, groups)
        part[ids.isin(holdout)] = "holdout"
        pool = part == "train"
        share = config.validation_fraction
        validation = _carve(ids[pool], strata[pool], share, config.seed + 1, groups[pool])
    part[ids.isin(validation) & (part == "train")] = "validation"
    # A text filed under two strata could still straddle parts: its copies follow the one most held out.
    rank = {"train": 0, "validation": 1, "holdout": 2}
    strictest = part.map(rank).groupby(groups.to_numpy()).transform("max")
    return strictest.map({v: k for k, v in rank.items()}).rename("part")


def _most_held_out(values: pd.Series) -> str | None:
    present = set(values.dropna())
    for part in ("holdout", "validation", "train"):
        if part in present:
            return part
    return None


def with_split(frame: pd.DataFrame, config: SplitConfig) -> pd.DataFrame:
    """`frame` with a `part` column (train / validation / holdout) from `split_queries`."""
    parts = split_queries(frame, config)
    return frame.assign(part=frame["query_id"].astype(str).map(parts))


def describe_split(frame: pd.DataFrame) -> pd.DataFrame:
    """Queries per part and stratum, for a person checking the split."""
    queries = frame.drop_duplicates("query_id")
    return queries.groupby(["part", "source"], dropna=False).size().unstack(fill_value=0)


def iter_supported(paths: Iterable[Path]) -> list[Path]:
    return [p for p in paths if file_suffix(p)]
