"""Proof of savings: the summary of the proxy's calls, per tenant and model version."""

import numpy as np
import pandas as pd
import pytest

from mixllm.config import config_from_dict
from mixllm.evaluation.savings import DIRECT, NO_TENANT, charts, dashboard_html, reference_llm, usage_summary


def _calls():
    return pd.DataFrame({
        "tenant": ["a", "a", "a", None],
        "llm": ["cheap", "cheap", "dear", "dear"],
        "cost_usd": [0.001, 0.002, 0.010, 0.020],
        "estimated": [False, True, False, False],
        "decision_id": ["d1", "d2", "d3", None],
        "model_version": [1, 1, 2, np.nan],
        "reference_cost_usd": [0.010, 0.020, 0.010, 0.020],
        "router_ms": [36_000.0, 0.0, 0.0, np.nan],  # 10 ms-hours... 36 s of routing: $0.001 at $0.1/h
        "attempts": [1, 2, 1, 1],
        "created_at": pd.to_datetime(["2026-01-01 10:00", "2026-01-01 11:00", "2026-01-02 09:00", "2026-01-02 10:00"]),
        "feedback_quality": [1.0, np.nan, 0.5, np.nan],
    })


def test_spend_reference_and_savings_net_of_the_router_per_tenant_and_version():
    summary = usage_summary(_calls(), usd_per_router_hour=0.1, reference_llm="dear")
    overall = summary["overall"]
    assert overall["calls"] == 4 and overall["failovers"] == 1
    assert overall["spend_usd"] == pytest.approx(0.033) and overall["reference_cost_usd"] == pytest.approx(0.060)
    assert overall["router_compute_usd"] == pytest.approx(0.001)
    assert overall["net_savings_usd"] == pytest.approx(0.060 - 0.033 - 0.001)
    assert overall["traffic_share"] == {"cheap": 0.5, "dear": 0.5}
    assert overall["mean_feedback_quality"] == pytest.approx(0.75) and overall["feedback_count"] == 2
    groups = {(g["tenant"], g["model_version"]): g for g in summary["by_tenant_and_version"]}
    assert set(groups) == {("a", "v1"), ("a", "v2"), (NO_TENANT, DIRECT)}
    assert groups[("a", "v1")]["estimated_spend_usd"] == pytest.approx(0.002)
    assert groups[("a", "v1")]["net_savings_usd"] == pytest.approx(0.030 - 0.003 - 0.001)
    assert groups[(NO_TENANT, DIRECT)]["net_savings_usd"] == pytest.approx(0.0), "the reference itself saves nothing"


def test_the_page_shows_the_figures_and_draws_its_charts_inline():
    calls = _calls()
    summary = usage_summary(calls, 0.1, "dear")
    svgs = charts(calls, summary)
    assert set(svgs) == {"traffic", "spend", "cumulative", "quality"} and all(s.startswith("<svg") for s in svgs.values())
    page = dashboard_html(summary, svgs)
    assert '<tr data-tenant="a" data-version="v1">' in page and 'data-field="net_savings_usd">$0.026000<' in page
    import re

    assert "<script" not in page and "<link" not in page, "nothing loaded from elsewhere"
    assert not re.findall(r'(?:src|href)="(?!#)', page), "only references inside the page"
    assert "No answered calls yet" in dashboard_html(usage_summary(calls.iloc[:0], 0.1, "dear"), {})


def test_the_reference_is_the_configured_one_else_the_dearest_llm():
    llms = [{"name": "a", "input_usd_per_1k": 1, "output_usd_per_1k": 2},
            {"name": "b", "input_usd_per_1k": 5, "output_usd_per_1k": 1}]
    assert reference_llm(config_from_dict({"llms": llms})) == "b"
    assert reference_llm(config_from_dict({"llms": llms, "evaluation": {"reference_llm": "a"}})) == "a"
