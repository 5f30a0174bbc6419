"""Small seeded interaction logs with a planted signal, made by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

TOPICS = {
    "math": [
        "What is {a} plus {b}?", "Compute {a} times {b}.", "Solve for x: x + {a} = {b}.",
        "What is the square root of {c}?", "Divide {c} by {a} and round the result.",
    ],
    "code": [
        "Write a python function that returns the sum of a list of {a} integers.",
        "Write a python function to reverse a string of length {a}.",
        "Implement binary search in python over a sorted list of {b} numbers.",
        "Write a python function that counts vowels in a string.",
        "Write a python class for a stack with push and pop, capacity {a}.",
    ],
    "history": [
        "Who was the first emperor of Rome after year {a}?", "When did the Roman Republic fall?",
        "Which empire built the great wall around year {b}?", "Who wrote the history of the Peloponnesian war?",
        "What caused the fall of the Byzantine empire in {c}?",
    ],
}
# Probability that each LLM answers a topic correctly: each LLM has a speciality.
SKILL = {
    "cheap-chat": {"math": 0.15, "code": 0.2, "history": 0.9},
    "coder": {"math": 0.5, "code": 0.95, "history": 0.3},
    "strong": {"math": 0.95, "code": 0.9, "history": 0.9},
}
PRICE_PER_1K = {"cheap-chat": 0.0002, "coder": 0.001, "strong": 0.01}


def make_log(n_queries: int = 60, seed: int = 0, llms: tuple[str, ...] = tuple(SKILL)) -> pd.DataFrame:
    """A full-information log: every LLM answered every query; quality is 0/1 with a planted skill."""
    rng = np.random.default_rng(seed)
    topics = list(TOPICS)
    rows = []
    for i in range(n_queries):
        topic = topics[i % len(topics)]
        template = TOPICS[topic][rng.integers(len(TOPICS[topic]))]
        query = template.format(a=rng.integers(2, 99), b=rng.integers(2, 99), c=rng.integers(100, 999))
        query_id = f"{topic}-{i}"
        input_tokens = len(query.split()) * 2
        for llm in llms:
            output_tokens = int(rng.integers(5, 40))
            price = PRICE_PER_1K[llm]
            rows.append(
                {
                    "query_id": query_id,
                    "query": query,
                    "llm": llm,
                    "quality": float(rng.random() < SKILL[llm][topic]),
                    "cost_usd": price * (input_tokens + output_tokens) / 1000,
                    "input_tokens": input_tokens,
                    "output_tokens": output_tokens,
                    "source": topic,
                }
            )
    return pd.DataFrame(rows)


def write_params(root, complete: bool = False, **sections) -> Path:
    """A params.yaml for the synthetic LLMs under `root`, small enough for fast tests."""
    params = {
        "llms": [
            {"name": name, "input_usd_per_1k": price, "output_usd_per_1k": price,
             "latency": {"per_call_s": 0.5, "per_output_token_s": 0.0, "concurrency": 2}}
            for name, price in PRICE_PER_1K.items()
        ],
        "split": {"validation_fraction": 0.2, "holdout_fraction": 0.25, "seed": 3},
        # onnx: the transformer as the shipped "auto" serves it, torch-free where it routes (a service
        # starts seconds sooner); "auto" would also distil a static encoder (~8 s): tests of it ask for it
        "embedding": {"max_seq_length": 32, "batch_size": 32, "backend": "onnx",
                      "fine_tune": {"enabled": False, "max_triplets": 64, "batch_size": 8}},
        "tags": {"n_clusters": 3, "min_df": 1, "top_k": 3},
        "features": {"tfidf": {"svd_components": 16, "min_df": 1}},
    }
    for key, value in sections.items():
        params.setdefault(key, {})
        if isinstance(value, dict) and isinstance(params[key], dict):
            params[key] = {**params[key], **value}
        else:
            params[key] = value
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    if complete:  # every key spelled out, as DVC needs for the params it tracks
        from mixllm.config import load_config

        full = load_config(path).model_dump(mode="json", by_alias=True, exclude={"root"})
        path.write_text(yaml.safe_dump(full, sort_keys=False), encoding="utf-8")
    return path


def small_config(**overrides):
    raw = {
        "llms": [{"name": n, "input_usd_per_1k": p, "output_usd_per_1k": p,
                  "latency": {"per_call_s": 1.0, "per_output_token_s": 0.0, "concurrency": 2}}
                 for n, p in PRICE_PER_1K.items()],
        "embedding": {"max_seq_length": 32, "backend": "torch", "fine_tune": {"enabled": False}},
        "tags": {"n_clusters": 3, "min_df": 2, "top_k": 3},
        "features": {"tfidf": {"svd_components": 16, "min_df": 1}},
        "predictors": {"quality": {"ridge": 5.0}},
        "decision": {"latency_tolerance_s": 2.0, "latency_weight": 1.0, "latency_scale_s": 1.0},
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        raw.setdefault(section, {})[name] = value
    from mixllm.config import config_from_dict

    return config_from_dict(raw)
