import pandas as pd
import pytest

from mixllm.config import SplitConfig
from mixllm.io.splitting import split_queries, with_split
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
    queries = log.drop_duplicates("query_id").set_index("query_id")
    table = pd.crosstab(queries["source"].loc[parts.index], parts)
    # Whole groups of same-text queries are carved, so a share can overshoot by one group at most.
    largest_group = queries["query"].str.lower().value_counts().max()
    for source, row in table.iterrows():
        total = row.sum()
        assert 0 <= row["holdout"] - round(0.25 * total) < largest_group, source
        assert abs(row["validation"] - round(0.2 * (total - row["holdout"]))) <= largest_group, source


def test_the_same_question_never_sits_in_two_parts():
    log = make_log(n_queries=300, seed=1)
    # Copies of one question under new ids and with other spacing or case, as logs do.
    copies = log[log["query_id"].isin(log["query_id"].unique()[:40])].assign(
        query_id=lambda f: f["query_id"] + "-copy", query=lambda f: "  " + f["query"].str.upper() + " ")
    both = pd.concat([log, copies], ignore_index=True)
    for config in (SplitConfig(seed=3), SplitConfig(seed=4, holdout_fraction=0.5)):
        parts = split_queries(both, config)
        text = both.drop_duplicates("query_id").set_index("query_id")["query"].str.lower().str.split().str.join(" ")
        assert (pd.DataFrame({"text": text.loc[parts.index], "part": parts}).groupby("text")["part"].nunique() == 1).all()
        assert set(parts) == {"train", "validation", "holdout"}


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
    from mixllm.io.validation import validate_interactions

    with_col = validate_interactions(log.assign(split=log["query_id"].map(given))).accepted
    parts = split_queries(with_col, SplitConfig(column="split", validation_fraction=0.2))
    held = set(parts[parts == "holdout"].index)
    text = with_col.drop_duplicates("query_id").set_index("query_id")["query"]
    train_texts = {text[q] for q, s in given.items() if s == "train"}
    repeats = {q for q, s in given.items() if s == "test" and text[q] in train_texts}
    assert repeats, "the synthetic log repeats some questions"
    assert held == {q for q, s in given.items() if s == "test"} - repeats, "test questions seen in train leave the holdout"
    same_text = {q: [o for o in parts.index if text[o] == text[q]] for q in repeats}
    assert all(len({parts[o] for o in group}) == 1 for group in same_text.values()), "a question's copies share a part"
    assert (parts == "validation").sum() > 0
    ignored = split_queries(with_col, SplitConfig(column=None, holdout_fraction=0.5))
    assert set(ignored[ignored == "holdout"].index) != held
