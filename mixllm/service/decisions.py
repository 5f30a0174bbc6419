"""Routing decisions for /route and /route_batch: one encoder pass per batch, retries answered
from the stored decision, every decision logged before it is answered. A mixin of the service class.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi.responses import JSONResponse

from mixllm.service.api_models import (
    RouteRequest,
    RouteResponse,
    candidate_scores,
    decision_details,
    error,
    stored_response,
)
from mixllm.service.model_lifecycle import LoadedModel


class RouteDecisions:
    """Needs from the service: store, load, metrics, shadow and `_current` (ModelLifecycle)."""

    def _route_many(self, model: LoadedModel, items: list[RouteRequest], atomic: bool = False) -> list[Any]:
        """Route items in one encoder pass; returns a RouteResponse or a JSONResponse error per item.

        A retried request_id gets its stored decision back (routing again could choose another
        LLM under a different load). With `atomic`, one invalid item means nothing is logged."""
        from mixllm.core.errors import RoutingError, StoreBusyError

        results: list[Any] = [None] * len(items)
        valid = []
        try:
            earlier = [self.store.decision_by_request(item.request_id) if item.request_id else None for item in items]
        except StoreBusyError as exc:  # the log cannot say whether these are retries: route none of them
            return [error(503, None, str(exc), {"Retry-After": "1"}) for _ in items]
        for i, (item, stored) in enumerate(zip(items, earlier)):
            if stored is not None and stored["query"] != item.query:
                results[i] = error(409, "request_id", f"request_id {item.request_id!r} was already used for another "
                                   "query; a retry must repeat the same query, a new query needs a new request_id")
            elif stored is not None:
                results[i] = stored_response(stored)
            else:
                valid.append(i)
        if not valid:
            return results
        router = model.router
        predictions = router.predict([items[i].query for i in valid], tasks=[items[i].task for i in valid])
        snapshot = self.load.snapshot()
        # Items with the same settings are decided in one call (the usual batch has one setting):
        # deciding them one by one cost a batch as much as predicting it.
        groups: dict[tuple, list[int]] = {}
        for row, i in enumerate(valid):
            item = items[i]
            settings = (item.lambda_, item.exploration, None if item.candidates is None else tuple(item.candidates),
                        item.max_cost, item.min_quality)
            groups.setdefault(settings, []).append(row)
        decided: dict[int, Any] = {}
        for rows in groups.values():
            first = items[valid[rows[0]]]
            try:
                decisions = router.route([items[valid[row]].query for row in rows], lambda_=first.lambda_,
                                         exploration=first.exploration, candidates=first.candidates,
                                         max_cost_usd=first.max_cost, min_quality=first.min_quality, load=snapshot,
                                         predictions=predictions.subset(np.asarray(rows)),
                                         tasks=[items[valid[row]].task for row in rows])
            except RoutingError as exc:  # the settings are wrong, so for every item that shares them
                for row in rows:
                    results[valid[row]] = error(400, exc.field, str(exc))
                continue
            decided.update(zip(rows, decisions))
        records = [(valid[row], items[valid[row]], _with_service_notes(decided[row], items[valid[row]]))
                   for row in range(len(valid)) if row in decided]
        if atomic and any(isinstance(result, JSONResponse) for result in results):
            return results
        try:
            decision_ids = self._log_decisions(model, records)
        except StoreBusyError as exc:  # nothing was logged: each caller gets a quick 503, not a hang
            for i, _, _ in records:
                results[i] = error(503, None, str(exc), {"Retry-After": "1"})
            return results
        # A decision is not a call: counting it as in flight let anyone steer everyone's traffic off
        # an LLM with one big anonymous batch. Only calls the proxy makes count (see _forward).
        for (i, item, decision), decision_id in zip(records, decision_ids):
            if decision_id is None:  # a concurrent call took this request_id between our check and our write
                try:
                    stored = self.store.decision_by_request(item.request_id)
                except StoreBusyError as exc:
                    results[i] = error(503, None, str(exc), {"Retry-After": "1"})
                    continue
                results[i] = (stored_response(stored) if stored["query"] == item.query else error(
                    409, "request_id", f"request_id {item.request_id!r} was just used for another query by a "
                    "concurrent call; a new query needs a new request_id"))
                continue
            self.metrics.decisions.labels(llm=decision.llm).inc()
            if self.shadow is not None:
                self.shadow.offer(decision_id, item.query, decision.llm)
            results[i] = RouteResponse(llm=decision.llm, decision_id=decision_id, model_version=model.version,
                                       lambda_=decision.lambda_, relaxed=list(decision.relaxed),
                                       candidates=candidate_scores(decision), notes=list(decision.notes))
        return results

    def _route_pass(self, items: list[RouteRequest]) -> list[Any]:
        """One encoder pass for the /route calls that arrived together (see RequestCoalescer)."""
        self.metrics.route_pass_size.observe(len(items))
        return self._route_many(self._current(bentoml_api=True), items)

    def _stored_query(self, request_id: str) -> str | None:
        stored = self.store.decision_by_request(request_id)
        return None if stored is None else stored["query"]

    def _log_decisions(self, model: LoadedModel, records: list[tuple[int, RouteRequest, Any]]) -> list[str | None]:
        """The decision ids in order; None where a request_id turned out to be taken already."""
        ids = []
        plain = [(item, d) for _, item, d in records if not item.request_id]
        if plain:  # one transaction for the batch
            ids_plain = iter(self.store.log_decisions([
                {"query": item.query, "llm": d.llm, "model_version": model.version, "lambda_": d.lambda_,
                 "candidates": decision_details(d), "propensity": d.propensity} for item, d in plain]))
        for _, item, decision in records:
            if item.request_id:
                decision_id, created = self.store.record_decision(
                    item.query, decision.llm, model_version=model.version, lambda_=decision.lambda_,
                    request_id=item.request_id, candidates=decision_details(decision), propensity=decision.propensity)
                ids.append(decision_id if created else None)
            else:
                ids.append(next(ids_plain))
        return ids


def _with_service_notes(decision: Any, item: Any) -> Any:
    """The router's decision, with the service's notes on its candidates (logged, and answered)."""
    if not item._service_notes:
        return decision
    import dataclasses

    return dataclasses.replace(decision, notes=(*decision.notes, *item._service_notes))
