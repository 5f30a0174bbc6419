"""Contrastive fine-tuning of the query encoder on domains (MixLLM's tag-enhanced encoder): which
(anchor, positive, negative) triplets to train on, and the training itself."""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np


def mine_domain_triplets(
    domains: np.ndarray, max_triplets: int, random_state: int
) -> list[tuple[int, int, int]]:
    """(anchor, positive, negative) query indices: anchor and positive share a domain, negative does not.

    Domains with a single query cannot give a positive; queries without a domain (-1) are skipped.
    Domains are drawn in turn so that small domains are not drowned by large ones.
    """
    rng = np.random.default_rng(random_state)
    domains = np.asarray(domains)
    members = {d: np.flatnonzero(domains == d) for d in np.unique(domains) if d >= 0}
    usable = [d for d, idx in members.items() if len(idx) >= 2]
    if len(usable) == 0 or len(members) < 2:
        return []
    labelled = np.flatnonzero(domains >= 0)
    triplets: list[tuple[int, int, int]] = []
    attempts = 0
    while len(triplets) < max_triplets and attempts < max_triplets * 4:
        attempts += 1
        domain = usable[attempts % len(usable)]
        anchor, positive = rng.choice(members[domain], size=2, replace=False)
        others = labelled[domains[labelled] != domain]
        negative = rng.choice(others)
        triplets.append((int(anchor), int(positive), int(negative)))
    return triplets


def fine_tune_on_triplets(model: Any, queries: list[str], triplets: list[tuple[int, int, int]], *, epochs: int,
                          batch_size: int, learning_rate: float, warmup_ratio: float, train_max_seq_length: int,
                          max_seq_length: int, random_state: int, progress: bool) -> None:
    """Train a SentenceTransformer in place on (anchor, positive, negative) query triplets with
    MultipleNegativesRankingLoss, on the CPU, reproducibly (seeded), at `train_max_seq_length` tokens;
    it is left in eval mode at `max_seq_length`, the length it embeds at."""
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )

    torch.manual_seed(random_state)
    dataset = Dataset.from_dict(
        {
            "anchor": [queries[a] for a, _, _ in triplets],
            "positive": [queries[p] for _, p, _ in triplets],
            "negative": [queries[n] for _, _, n in triplets],
        }
    )
    model.max_seq_length = train_max_seq_length
    with tempfile.TemporaryDirectory(prefix="mixllm-ft-") as output_dir:
        args = SentenceTransformerTrainingArguments(
            output_dir=output_dir,
            num_train_epochs=epochs,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            warmup_steps=warmup_ratio,  # a float is a ratio in Transformers 5
            seed=random_state,
            data_seed=random_state,
            save_strategy="no",
            report_to=[],
            logging_strategy="no",
            disable_tqdm=not progress,
            use_cpu=True,
            dataloader_num_workers=0,
        )
        trainer = SentenceTransformerTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            loss=losses.MultipleNegativesRankingLoss(model),
        )
        trainer.train()
    model.eval()
    model.max_seq_length = max_seq_length
