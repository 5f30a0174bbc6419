import gzip
import json
import os

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixllm.core.errors import DataError, DataUnavailableError
from mixllm.io.data import TrainingStore, fetch_routerbench, ingest
from mixllm.io.readers import read_log
from mixllm.io.validation import validate_interactions

LLMS = ["cheap-chat", "coder", "strong"]


def _reasons(result):
    return dict(zip(result.quarantined["query_id"].astype(str) + "/" + result.quarantined["llm"].astype(str),
                    result.quarantined["reasons"]))


def test_clean_full_information_log_is_accepted_whole(synthetic_log):
    result = validate_interactions(synthetic_log, LLMS)
    assert len(result.accepted) == len(synthetic_log) == 180
    assert result.quarantined.empty
    assert result.accepted["feedback"].eq("refined").all(), "feedback kind defaults to refined"


def test_bandit_log_with_one_llm_per_query_is_accepted(synthetic_log):
    bandit = synthetic_log.groupby("query_id").sample(n=1, random_state=0)
    bandit = bandit.assign(feedback="binary", timestamp="2026-11-01T10:00:00Z")
    result = validate_interactions(bandit, LLMS)
    assert len(result.accepted) == 60 and result.quarantined.empty
    assert str(result.accepted["timestamp"].dtype).startswith("datetime64")


def _planted(base: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    frame = base.copy()
    frame["query"] = frame["query"].astype(object)
    frame["quality"] = frame["quality"].astype(object)
    frame["cost_usd"] = frame["cost_usd"].astype(object)
    frame.loc[0, "query"] = "   "
    frame.loc[4, "quality"] = 1.7
    frame.loc[8, "cost_usd"] = -0.01
    frame.loc[10, "quality"] = np.nan
    frame.loc[13, "llm"] = "gpt-99"
    duplicate = frame.iloc[[20]]
    frame = pd.concat([frame, duplicate], ignore_index=True)
    expected = {
        f"{base.loc[0, 'query_id']}/{base.loc[0, 'llm']}": "empty_query",
        f"{base.loc[4, 'query_id']}/{base.loc[4, 'llm']}": "quality_out_of_range",
        f"{base.loc[8, 'query_id']}/{base.loc[8, 'llm']}": "negative_cost",
        f"{base.loc[10, 'query_id']}/{base.loc[10, 'llm']}": "missing_value",
        f"{base.loc[13, 'query_id']}/gpt-99": "unknown_llm",
        f"{base.loc[20, 'query_id']}/{base.loc[20, 'llm']}": "duplicate_row",
    }
    return frame, expected


def test_planted_bad_rows_are_exactly_the_quarantined_ones(synthetic_log):
    frame, expected = _planted(synthetic_log)
    result = validate_interactions(frame, LLMS)
    assert _reasons(result) == expected
    assert len(result.accepted) == len(frame) - len(expected)
    assert result.reason_counts() == {reason: 1 for reason in expected.values()}
    assert result.quarantined["detail"].str.len().gt(0).all(), "every quarantined row says why"


def test_ingest_writes_quarantine_file_and_report(config, synthetic_log, tmp_path):
    frame, expected = _planted(synthetic_log)
    path = tmp_path / "planted.csv"
    frame.to_csv(path, index=False)
    report = ingest(path, config)
    assert report.rows_read == len(frame)
    assert report.quarantined == len(expected)
    assert report.accepted == len(frame) - len(expected)
    assert report.reasons == {reason: 1 for reason in expected.values()}
    lines = [json.loads(line) for line in open(report.quarantine_path, encoding="utf-8")]
    assert sorted(line["reasons"] for line in lines) == sorted(expected.values())
    assert all(line["_origin"].startswith("planted.csv:") for line in lines), "each row points back to its source line"


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("query_id", None, "missing_value"),
        ("query_id", "", "empty_query_id"),
        ("query", "\u200b\u200b \ufeff", "empty_query"),  # invisible characters only
        ("query", "x" * 5000, "query_too_long"),
        ("quality", "very good", "bad_type"),
        ("quality", -0.1, "quality_out_of_range"),
        ("cost_usd", float("inf"), "cost_not_finite"),
        ("latency_s", -2.0, "negative_latency"),
        ("output_tokens", -5, "negative_tokens"),
        ("feedback", "stars", "unknown_feedback_kind"),
        ("timestamp", "yesterday-ish", "bad_timestamp"),
        ("llm", "", "empty_llm"),
        ("query", None, "missing_value"),
        # Finite but absurd: one such value would dominate every mean it enters (data.limits).
        ("cost_usd", 1e308, "cost_implausible"),
        ("latency_s", 1e300, "latency_implausible"),
        ("latency_s", float("inf"), "latency_implausible"),
        ("input_tokens", 1e12, "tokens_implausible"),
    ],
)
def test_each_reason(synthetic_log, column, value, reason):
    frame = synthetic_log.head(6).copy().astype({column: object}) if column in synthetic_log else synthetic_log.head(6).copy()
    frame.loc[2, column] = value
    result = validate_interactions(frame, LLMS, max_query_chars=4000)
    assert len(result.quarantined) == 1 and result.quarantined["reasons"][0].split(";")[0] == reason
    assert len(result.accepted) == 5


def test_the_plausibility_limits_come_from_the_config(config, synthetic_log, tmp_path):
    frame = synthetic_log.head(4).copy()
    frame.loc[1, "cost_usd"] = 5.0  # plausible under the default limit (100 USD per call)
    path = tmp_path / "pricey.csv"
    frame.to_csv(path, index=False)
    strict = config.model_copy(update={"data": config.data.model_copy(
        update={"limits": config.data.limits.model_copy(update={"max_cost_usd": 1.0})})})
    assert ingest(path, strict).reasons == {"cost_implausible": 1}
    assert ingest(path, config).reasons == {}, "the default limit lets the same row in"


def test_binary_feedback_needs_zero_or_one(synthetic_log):
    frame = synthetic_log.head(3).assign(feedback="binary")
    frame.loc[1, "quality"] = 0.5
    result = validate_interactions(frame, LLMS)
    assert result.quarantined["reasons"].tolist() == ["binary_quality_not_0_or_1"]


def test_conflicting_duplicates_are_all_held(synthetic_log):
    frame = pd.concat([synthetic_log.head(3), synthetic_log.head(1).assign(quality=0.5)], ignore_index=True)
    result = validate_interactions(frame, LLMS)
    assert result.quarantined["reasons"].tolist() == ["conflicting_duplicate", "conflicting_duplicate"]
    assert len(result.accepted) == 2


def test_non_utf8_csv_row_is_quarantined_and_others_kept(config, synthetic_log, tmp_path):
    path = tmp_path / "latin1.csv"
    synthetic_log.head(5).assign(query="placeholder").to_csv(path, index=False)
    data = path.read_bytes().replace(b"placeholder", b"caf\xe9 latin-1", 1)
    path.write_bytes(data)
    report = ingest(path, config)
    assert report.reasons == {"non_utf8_text": 1} and report.accepted == 4


def test_jsonl_reader_quarantines_bad_lines(config, synthetic_log, tmp_path):
    path = tmp_path / "log.jsonl"
    lines = [json.dumps(r) for r in synthetic_log.head(4).to_dict(orient="records")]
    content = "\n".join(lines).encode() + b"\n{not json\n" + b'"a string"\n' + b'{"query": "\xff"}\n\n'
    path.write_bytes(content)
    report = ingest(path, config)
    assert report.accepted == 4
    assert report.reasons == {"malformed_record": 2, "non_utf8_text": 1}
    assert report.rows_read == 7, "blank lines are not rows; every other line is counted"


@pytest.mark.parametrize("fmt", ["csv", "csv.gz", "jsonl", "parquet"])
def test_long_readers_round_trip(config, synthetic_log, tmp_path, fmt):
    path = tmp_path / f"log.{fmt}"
    if fmt == "csv":
        synthetic_log.to_csv(path, index=False)
    elif fmt == "csv.gz":
        synthetic_log.to_csv(path, index=False, compression="gzip")
    elif fmt == "jsonl":
        synthetic_log.to_json(path, orient="records", lines=True)
    else:
        synthetic_log.to_parquet(path, index=False)
    report = ingest(path, config)
    assert (report.accepted, report.quarantined, report.queries, report.llms) == (180, 0, 60, 3)
    stored = TrainingStore(config.path(config.data.store_dir)).read()
    merged = stored.merge(synthetic_log, on=["query_id", "llm"], suffixes=("", "_in"))
    assert len(merged) == 180
    assert (merged["query"] == merged["query_in"]).all() and np.allclose(merged["cost_usd"], merged["cost_usd_in"])


def _wide(log: pd.DataFrame) -> pd.DataFrame:
    """The synthetic log in RouterBench's wide layout (prompt as a list repr)."""
    rows = []
    for query_id, group in log.groupby("query_id", sort=False):
        row = {"sample_id": query_id, "prompt": repr([group["query"].iloc[0]]), "eval_name": group["source"].iloc[0]}
        for r in group.itertuples():
            row[r.llm] = r.quality
            row[f"{r.llm}|total_cost"] = r.cost_usd
            row[f"{r.llm}|model_response"] = repr([f"answer of {r.llm}"])
        row["oracle_model_to_route_to"] = "strong"
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("fmt", ["csv", "pkl"])
def test_routerbench_wide_reader(config, synthetic_log, tmp_path, fmt):
    wide = _wide(synthetic_log)
    path = tmp_path / f"bench_test.{fmt}"
    wide.to_csv(path) if fmt == "csv" else wide.to_pickle(path)
    raw = read_log(path)
    assert raw.format == "routerbench-wide" and len(raw.frame) == 180
    assert raw.frame["query"].iloc[0] == synthetic_log["query"].iloc[0], "the list repr is parsed back to text"
    assert raw.frame["response"].iloc[0].startswith("answer of")
    assert set(raw.frame["split"]) == {"test"}, "the file name's split is kept"
    report = ingest(path, config)
    assert report.accepted == 180 and report.quarantined == 0


def test_routerbench_split_prompt_rows_are_merged_and_missing_cells_counted(config, synthetic_log, tmp_path):
    wide = _wide(synthetic_log.head(6))  # 2 queries x 3 LLMs
    first = wide.iloc[0].copy()
    solo = first.copy()
    for llm in ("cheap-chat", "coder"):
        solo[llm] = np.nan
    first["strong"] = np.nan
    solo["prompt"] = repr([synthetic_log["query"].iloc[0] * 2])
    frame = pd.DataFrame([first, wide.iloc[1], solo])
    raw = read_log(_save(frame, tmp_path / "wide.csv"))
    assert raw.merged_prompt_ids == [synthetic_log["query_id"].iloc[0]]
    assert raw.missing_cells == 3
    assert len(raw.frame) == 6
    merged = raw.frame[raw.frame["query_id"] == synthetic_log["query_id"].iloc[0]]
    assert merged["query"].nunique() == 1 and merged["query"].iloc[0] == synthetic_log["query"].iloc[0]
    report = ingest(tmp_path / "wide.csv", config)
    assert report.merged_prompts == 1 and report.accepted == 6


def test_routerbench_overlapping_split_rows_are_conflicts(synthetic_log, tmp_path):
    wide = _wide(synthetic_log.head(3))
    twin = wide.iloc[0].copy()
    twin["strong"] = 1.0 - twin["strong"]
    raw = read_log(_save(pd.DataFrame([wide.iloc[0], twin]), tmp_path / "wide.csv"))
    assert len(raw.frame) == 0
    assert [r["reasons"] for r in raw.rejected] == ["conflicting_duplicate"] * 6


def _save(frame, path):
    frame.to_csv(path, index=False)
    return path


def test_reingest_is_idempotent_and_conflicts_are_held(config, synthetic_log, tmp_path):
    path = tmp_path / "log.csv"
    synthetic_log.to_csv(path, index=False)
    first = ingest(path, config)
    second = ingest(path, config)
    assert (first.accepted, second.accepted, second.already_stored) == (180, 0, 180)
    store = TrainingStore(config.path(config.data.store_dir))
    assert len(store.read()) == 180 and len(store.parts()) == 1
    changed = synthetic_log.head(2).assign(quality=0.25)
    changed.to_csv(tmp_path / "changed.csv", index=False)
    third = ingest(tmp_path / "changed.csv", config)
    assert third.reasons == {"conflicts_with_store": 2} and len(store.read()) == 180


def test_an_import_removes_what_stopped_imports_left_half_written_and_nothing_else(config, synthetic_log, tmp_path):
    """A kill mid-write leaves a temporary part (never read, a whole batch's size on disk): the next
    import removes it, but not a write still under way in a running process or on another machine."""
    import subprocess
    import sys

    from mixllm.io.scratch_folders import host_tag

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # a process that has ended
    other_host = "h00000000" if host_tag() != "h00000000" else "h11111111"
    store_dir = config.path(config.data.store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    abandoned = store_dir / f"part-aaaa.parquet.{host_tag()}-{dead_pid}-writing.tmp"
    running = store_dir / f"part-bbbb.parquet.{host_tag()}-{os.getppid()}-writing.tmp"
    elsewhere = store_dir / f"part-cccc.parquet.{other_host}-{dead_pid}-writing.tmp"
    for tmp in (abandoned, running, elsewhere):
        tmp.write_bytes(b"half a parquet file")
    path = tmp_path / "log.csv"
    synthetic_log.to_csv(path, index=False)
    assert ingest(path, config).accepted == 180
    assert not abandoned.exists() and running.exists() and elsewhere.exists()
    assert len(TrainingStore(store_dir).read()) == 180, "the temporary parts are never read"


def test_missing_required_column_is_a_clear_error(synthetic_log, tmp_path):
    with pytest.raises(DataError, match="no column.*cost_usd"):
        validate_interactions(synthetic_log.drop(columns=["cost_usd"]), LLMS)
    with pytest.raises(DataError, match="unsupported file type"):
        read_log(_save(synthetic_log, tmp_path / "log.txt"))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", b"", "is empty"),
        ("truncated.csv.gz", None, "truncated or not what its name says"),
        ("fake.csv.gz", b"query_id,query\n1,hi\n", "truncated or not what its name says"),  # not gzip at all
        ("semicolons.csv", b"query_id;query;llm;quality;cost_usd\n1;hi;a;1;0.1\n", "with semicolons"),
        ("broken.parquet", b"PAR1 this is not parquet", "cannot read"),
        ("random.pkl", bytes(range(256)) * 4, "as a pickled DataFrame"),
        ("binary.jsonl", bytes(range(256)) * 4, "no line of .* is a JSON record"),
        ("csv-named.jsonl", b"query_id,query\n1,hi\n", "no line of .* is a JSON record"),
    ],
)
def test_an_unreadable_file_is_refused_in_one_line_and_stores_nothing(config, synthetic_log, tmp_path, name,
                                                                       content, message):
    path = tmp_path / name
    if content is None:  # a real gzip cut in half
        path.write_bytes(gzip.compress(synthetic_log.to_csv(index=False).encode())[:200])
    else:
        path.write_bytes(content)
    store = TrainingStore(config.path(config.data.store_dir))
    before = len(store.read()) if store.parts() else 0
    with pytest.raises(DataError, match=message) as caught:
        ingest(path, config)
    assert "\n" not in str(caught.value), "one line, no traceback"
    assert (len(store.read()) if store.parts() else 0) == before


def test_fetch_offline_without_copy_says_how_to_supply_one(config, monkeypatch):
    monkeypatch.delenv("MIXLLM_ROUTERBENCH", raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # nothing listens: the download fails fast
    with pytest.raises(DataUnavailableError, match="MIXLLM_ROUTERBENCH"):
        fetch_routerbench(config, timeout_s=2)


def test_fetch_uses_the_local_copy(config, tmp_path, monkeypatch):
    copy = tmp_path / "rb.pkl"
    copy.write_bytes(b"")
    monkeypatch.setenv("MIXLLM_ROUTERBENCH", str(copy))
    assert fetch_routerbench(config) == copy
    monkeypatch.setenv("MIXLLM_ROUTERBENCH", str(tmp_path / "nope.pkl"))
    with pytest.raises(DataUnavailableError, match="does not exist"):
        fetch_routerbench(config)


# ------------------------------------------------------------------------------ the real subset


def _routerbench_config(tmp_path):
    from mixllm.config import load_config
    from pathlib import Path

    params = tmp_path / "params.yaml"
    params.write_text((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    return load_config(params)


@pytest.mark.slow
def test_shared_subset_long_csv(shared_subset, tmp_path):
    report = ingest(shared_subset / "routerbench_subset_long.csv.gz", _routerbench_config(tmp_path))
    assert (report.accepted, report.queries, report.llms, report.quarantined) == (34_804, 3_164, 11, 0)


@pytest.mark.slow
def test_shared_subset_wide_originals(shared_subset, tmp_path):
    config = _routerbench_config(tmp_path)
    report = ingest(shared_subset / "original", config)
    assert (report.accepted, report.queries, report.llms, report.quarantined) == (34_804, 3_164, 11, 0)
    assert report.merged_prompts == 14, "RouterBench's 14 split ARC prompts are merged, and counted"
    assert report.missing_cells == 14 * 11, "each merged pair leaves 11 empty model cells"
    long = pd.read_csv(shared_subset / "routerbench_subset_long.csv.gz")
    stored = TrainingStore(config.path(config.data.store_dir)).read()
    both = stored.merge(long, on=["query_id", "llm"], suffixes=("", "_long"))
    assert len(both) == 34_804
    assert (both["query"] == both["query_long"]).all(), "same merge rule as the published long file"
    assert (both["quality"] == both["quality_long"]).all()


# ------------------------------------------------------------------------------ property-based

# Every reason validate_interactions documents (its docstring); a new one must be added here on purpose.
KNOWN_REASONS = {
    "missing_value", "bad_type", "non_utf8_text", "empty_query", "empty_query_id", "query_too_long", "empty_llm",
    "unknown_llm", "quality_out_of_range", "binary_quality_not_0_or_1", "negative_cost", "cost_not_finite",
    "cost_implausible", "negative_latency", "latency_implausible", "negative_tokens", "tokens_implausible",
    "unknown_feedback_kind", "bad_timestamp", "duplicate_row", "conflicting_duplicate",
}
_value = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6), st.integers(-3, 3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {
                "query_id": st.one_of(st.sampled_from(["q1", "q2", "q3", ""]), st.none()),
                "query": st.one_of(st.text(max_size=8), st.none()),
                "llm": st.sampled_from(LLMS + ["other", ""]),
                "quality": _value,
                "cost_usd": _value,
                "latency_s": _value,
                "feedback": st.sampled_from([None, "refined", "binary", "weird"]),
            }
        ),
        max_size=25,
    )
)
def test_validator_accounts_for_every_row(rows):
    frame = pd.DataFrame(rows, columns=["query_id", "query", "llm", "quality", "cost_usd", "latency_s", "feedback"])
    result = validate_interactions(frame, LLMS)
    assert len(result.accepted) + len(result.quarantined) == len(frame)
    for reasons in result.quarantined["reasons"]:
        named = reasons.split(";")
        assert named and set(named) <= KNOWN_REASONS, f"every quarantined row names documented reasons: {reasons!r}"
    accepted = result.accepted
    assert accepted["quality"].between(0, 1).all()
    assert accepted["llm"].isin(LLMS).all()
    assert (accepted["query_id"].str.len() > 0).all() and (accepted["query"].str.strip().str.len() > 0).all()
    assert (np.isfinite(accepted["cost_usd"]) & (accepted["cost_usd"] >= 0)).all()
    assert (accepted["feedback"].isna() | accepted["feedback"].isin(["refined", "binary"])).all()
    assert not accepted.duplicated(["query_id", "llm"]).any()
