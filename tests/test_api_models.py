"""The HTTP models against the library's decision: one candidate schema, and a logged decision
answers a retried request_id exactly as the live one did."""

import dataclasses
import json
import math

from mixllm.core.decision import CandidateScore, Decision
from mixllm.service.api_models import Candidate, candidate_scores, decision_details, stored_response


def _decision() -> Decision:
    chosen = CandidateScore("small", 0.7, 0.001, 0.05, 0.0, 0.69, True, 1.0)
    dear = CandidateScore("large", 0.9, 0.02, 0.03, 0.0, 0.5, True, 0.0)
    blocked = CandidateScore("down", 0.8, 0.002, 0.04, 0.0, -math.inf, False, 0.0)
    return Decision(llm="small", lambda_=10.0, exploration=0.0, candidates=(chosen, dear, blocked), relaxed=("latency",),
                    notes=("a note",))


def test_the_response_candidate_has_the_decision_fields():
    assert set(Candidate.model_fields) == {field.name for field in dataclasses.fields(CandidateScore)}


def test_a_logged_decision_is_answered_as_the_live_one():
    decision = _decision()
    live = candidate_scores(decision)
    assert live[2].score is None, "an ineligible LLM's -inf score is sent as null (JSON has no infinity)"
    stored = {"llm": "small", "decision_id": "d1", "model_version": 3, "lambda_": 10.0,
              "candidates": json.dumps(decision_details(decision), default=str)}
    again = stored_response(stored)
    assert again.candidates == live
    assert again.relaxed == ["latency"] and again.notes == ["a note"]


def test_decisions_logged_before_propensities_get_the_argmax_probability():
    old = [{k: v for k, v in dataclasses.asdict(c).items() if k != "probability"} for c in _decision().candidates]
    old[2]["score"] = None
    stored = {"llm": "small", "decision_id": "d1", "model_version": 1, "lambda_": None, "candidates": json.dumps(old)}
    probabilities = [c.probability for c in stored_response(stored).candidates]
    assert probabilities == [1.0, 0.0, 0.0]


def test_the_logged_candidates_are_exactly_the_decision_fields():
    """decision_details reads a candidate's __dict__ (fast); a slotted or extended dataclass would break that."""
    decision = _decision()
    assert decision_details(decision)["candidates"] == [dataclasses.asdict(c) for c in decision.candidates]
