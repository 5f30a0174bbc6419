"""The one home of the outcome pivot: evaluation reads one outcome per (query, LLM), training the mean."""

import numpy as np
import pandas as pd

from mixllm.core.units import outcome_tables


def _log() -> pd.DataFrame:
    return pd.DataFrame({"query_id": ["b", "b", "a", "a", "c"], "llm": ["x", "x", "x", "y", "y"],
                         "quality": [1.0, 0.0, 0.5, 0.2, 0.9], "cost_usd": [0.1, 0.3, 0.2, 0.4, 0.5]})


def test_a_repeated_pair_counts_once_for_evaluation_and_by_its_mean_for_training():
    first_quality, first_cost = outcome_tables(_log(), ["x", "y"], ["a", "b", "c"])
    mean_quality, mean_cost = outcome_tables(_log(), ["x", "y"], ["a", "b", "c"], repeats="mean")
    assert first_quality.loc["b", "x"] == 1.0 and first_cost.loc["b", "x"] == 0.1
    assert mean_quality.loc["b", "x"] == 0.5 and np.isclose(mean_cost.loc["b", "x"], 0.2)
    assert np.isnan(mean_quality.loc["c", "x"]), "a pair never logged stays missing"
    assert list(mean_quality.index) == ["a", "b", "c"] and list(mean_quality.columns) == ["x", "y"]
