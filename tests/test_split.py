import pandas as pd
import pytest

from mixllm.config import SplitConfig
from mixllm.data import split_queries, with_split
from synthetic import make_log


@pytest.fixture
def log():
    return make_log(n_queries=300, seed=1)


def test_no_query_in_two_parts_and_every_row_assigned(log):
    split = with_split(log, SplitConfig(validation_fraction=0.2, holdout_fraction=0.25, seed=1))
    assert split["part"].notna().all()
    assert split.groupby("query_id")["part"].nunique().max() == 1


def test_stratification_holds_per_source(log):
    parts = split_queries(log, SplitConfig(validation_fraction=0.2, holdout_fraction=0.25, seed=1, stratify_by="source"))
    per_source = log.drop_duplicates("query_id").set_index("query_id")["source"]
    table = pd.crosstab(per_source.loc[parts.index], parts)
    for source, row in table.iterrows():
        total = row.sum()
        assert row["holdout"] == round(0.25 * total), source
        assert row["validation"] == round(0.2 * (total - row["holdout"])), source


def test_same_seed_same_split_other_seed_differs(log):
    config = SplitConfig(seed=5)
    first = split_queries(log, config)
    again = split_queries(log.sample(frac=1.0, random_state=3), config)
    assert first.sort_index().equals(again.sort_index()), "row order does not matter"
    other = split_queries(log, SplitConfig(seed=6))
    assert not first.equals(other)


def test_split_column_in_data_is_honoured(log):
    ids = log["query_id"].unique()
    given = {q: ("test" if i % 4 == 0 else "train") for i, q in enumerate(ids)}
    from mixllm.data import validate_interactions

    with_col = validate_interactions(log.assign(split=log["query_id"].map(given))).accepted
    parts = split_queries(with_col, SplitConfig(column="split", validation_fraction=0.2))
    held = set(parts[parts == "holdout"].index)
    assert held == {q for q, s in given.items() if s == "test"}
    assert (parts == "validation").sum() > 0
    ignored = split_queries(with_col, SplitConfig(column=None, holdout_fraction=0.5))
    assert set(ignored[ignored == "holdout"].index) != held
