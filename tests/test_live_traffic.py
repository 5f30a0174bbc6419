"""The service's live view of load, and the screening of stored feedback before learning from it."""

import math

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from mixllm.jobs.continual import screen_feedback
from mixllm.service.live_traffic import LiveTraffic


def test_only_measured_latency_feeds_the_average():
    load = LiveTraffic(max_age_s=60)
    load.start("a", "gpt")
    load.finish("a")  # a thumbs-up minutes later says nothing about latency
    assert load.snapshot().observed_latency_s == {}
    load.start("b", "gpt")
    load.finish("b", latency_s=2.0)
    load.start("c", "gpt")
    load.finish("c", latency_s=math.inf)
    load.observe_latency("gpt", float("nan"))
    assert load.snapshot().observed_latency_s == {"gpt": 2.0}
    assert load.snapshot().in_flight == {}


def test_one_absurd_latency_cannot_pin_an_llm():
    load = LiveTraffic(max_age_s=60, window=5)
    for latency in (1.0, 1.2, 0.9):
        load.observe_latency("gpt", latency)
    load.observe_latency("gpt", 1e300)  # finite, so no validity check stops it here
    assert load.snapshot().observed_latency_s["gpt"] == pytest.approx(1.1), "a median, not a mean"
    for _ in range(5):  # the window forgets it entirely
        load.observe_latency("gpt", 2.0)
    assert load.snapshot().observed_latency_s["gpt"] == 2.0


def test_one_client_cannot_steer_an_llms_latency_with_its_reports():
    """A tenant that pairs /route with /feedback can report any plausible latency for the LLM its
    decisions chose. Its reports hold at most `max_client_share` of that LLM's window (a new one
    replaces its own oldest), so however many it sends, the median stays among honest values."""
    load = LiveTraffic(max_age_s=60, window=21, max_client_share=0.25)
    for _ in range(21):
        load.finish("", latency_s=1.0, llm="gpt")  # the proxy's own measurements
    for _ in range(500):
        load.observe_latency("gpt", 600.0, client="tenant:mallory")
    assert load.snapshot().observed_latency_s["gpt"] == 1.0
    assert sum(1 for _, client in load._latencies["gpt"] if client == "tenant:mallory") == 5
    for _ in range(5):  # another client's reports are its own
        load.observe_latency("gpt", 2.0, client="tenant:alice")
    assert sum(1 for _, client in load._latencies["gpt"] if client == "tenant:alice") == 5
    assert load.snapshot().observed_latency_s["gpt"] == 1.0


def test_unreported_calls_expire_after_their_own_lifetime():
    load = LiveTraffic(max_age_s=60)
    load.start("quick", "small", expires_after_s=0.0)
    load.start("slow", "big", expires_after_s=30)
    load.start("capped", "big", expires_after_s=10_000)
    assert load.snapshot().in_flight == {"big": 2}, "the expired call no longer counts"
    assert load._open["capped"][1] - load._open["slow"][1] == pytest.approx(30, abs=1), "capped at max_age_s"


def test_screen_feedback_sets_aside_each_bad_row_with_its_reason():
    rows = pd.DataFrame({
        "feedback_id": range(1, 8),
        "query": ["fine", "   ", "fine", "fine", "fine", "unpriced", "\u200b\u200b "],  # zero-width spaces: blank too
        "llm": ["a", "a", "gone", "a", "a", "a", "a"],
        "quality": [1.0, 1.0, 1.0, 1.7, 0.5, 0.0, 1.0],
        "cost_usd": [0.1, 0.1, 0.1, 0.1, np.inf, None, 0.1],
    })
    usable, skipped = screen_feedback(rows, ["a"])
    assert usable["feedback_id"].tolist() == [1, 6]
    assert np.isnan(usable["cost_usd"].iloc[1]), "an unknown cost stays unknown"
    assert skipped == {"LLM no longer in the pool": 1, "blank query": 2, "quality not a number in 0..1": 1,
                       "cost negative or infinite": 1}
    assert len(usable) + sum(skipped.values()) == len(rows), "every row is either used or counted"


def test_request_schemas_reject_blank_text_and_non_finite_numbers():
    from mixllm.service.api_models import FeedbackRequest, RouteRequest, last_user_text

    for body in ({"query": "   "}, {"query": "hi", "lambda": float("nan")}, {"query": "hi", "max_cost": float("inf")}):
        with pytest.raises(ValidationError):
            RouteRequest.model_validate(body)
    for body in ({"query": "q", "llm": "a", "quality": 0.5, "cost_usd": float("inf")},
                 {"query": "q", "llm": "a", "quality": 0.5, "latency_s": float("inf")},
                 {"query": "  ", "llm": "a", "quality": 0.5}):
        with pytest.raises(ValidationError):
            FeedbackRequest.model_validate(body)
    from mixllm.service.api_models import ChatMessage

    parts = [{"type": "text", "text": 5}, {"type": "text", "text": "real"}, {"type": "image_url"}]
    assert last_user_text([ChatMessage(role="user", content=parts)]) == "real"


def test_continual_reads_only_settled_feedback_in_id_order():
    from mixllm.jobs.continual import settled_prefix

    now = pd.Timestamp("2026-01-01 12:00:00", tz="UTC")
    rows = pd.DataFrame({"feedback_id": [1, 2, 3, 4],
                         "created_at": [now - pd.Timedelta(seconds=s) for s in (90, 60, 5, 120)]})
    assert settled_prefix(rows, 30, now)["feedback_id"].tolist() == [1, 2], "stops at the first young row"
    assert settled_prefix(rows, 0, now)["feedback_id"].tolist() == [1, 2, 3, 4]
    naive = rows.assign(created_at=[t.tz_localize(None) for t in rows["created_at"]])  # as SQLite returns them
    assert settled_prefix(naive, 30, now)["feedback_id"].tolist() == [1, 2]


def test_a_feedbacks_latency_reporter_is_its_tenant_else_its_address_unless_it_holds_the_admin_token(monkeypatch):
    """Without an admin token /feedback is open to anyone: an anonymous caller's reports are capped
    per address (they were uncapped, like the operator's, and a few dozen pinned an LLM's median)."""
    from types import SimpleNamespace

    from mixllm.service.access import TENANT_HEADER, reporting_client

    def request(**headers):
        return SimpleNamespace(headers=headers, client=SimpleNamespace(host="203.0.113.7"))

    monkeypatch.delenv("TEST_ADMIN_TOKEN", raising=False)
    assert reporting_client(request(), "TEST_ADMIN_TOKEN") == "address:203.0.113.7"
    assert reporting_client(request(**{TENANT_HEADER.decode(): "acme"}), "TEST_ADMIN_TOKEN") == "tenant:acme"
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "secret")  # then only the admin token reaches /feedback untenanted
    assert reporting_client(request(), "TEST_ADMIN_TOKEN") is None
    load = LiveTraffic(max_age_s=60, window=21, max_client_share=0.25)
    for _ in range(21):
        load.finish("", latency_s=1.0, llm="gpt")
    for _ in range(100):
        load.observe_latency("gpt", 3600.0, client=reporting_client(SimpleNamespace(
            headers={}, client=SimpleNamespace(host="203.0.113.7")), "UNSET_TOKEN_ENV"))
    assert load.snapshot().observed_latency_s["gpt"] == 1.0
