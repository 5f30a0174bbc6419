"""The proxy's tenants: which LLMs a tenant may use, where its spend stands against its budgets,
the lambda that paces it, and the spend records. A mixin of the service class, beside ChatProxy.

Spend fails closed: a record the database does not take is kept (in memory and in a journal on
local disk, so a restart loses none) and retried before the next call, and while it cannot be
written the tenant gets 503s instead of calls nobody accounts for.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from fastapi.responses import JSONResponse

from mixllm.config import TenantConfig
from mixllm.core.budgets import binding
from mixllm.core.errors import StoreBusyError
from mixllm.service.api_models import error
from mixllm.service.access import TENANT_HEADER

logger = logging.getLogger("bentoml.mixllm")


@dataclass
class SpendPlan:
    """What a tenant's chat may do: its candidates, the lambda to route with, and why."""

    tenant: TenantConfig | None
    candidates: list[str]
    lambda_: float | None
    notes: list[str] = field(default_factory=list)


class TenantBudgets:
    """Needs from the class it is mixed into: config, ledger (mixllm.io.ledger.TenantLedger), pacer
    (mixllm.core.budgets.BudgetPacer) and _price (UpstreamCalls'); `_start_spend_records` at start."""

    _unwritten: list[dict[str, Any]]
    _unwritten_lock: threading.Lock

    def _start_spend_records(self) -> None:
        """The records waiting to be written: none, or what a previous run left in the journal."""
        from mixllm.io.spend_journal import SpendJournal

        self._unwritten_lock = threading.Lock()
        self.spend_journal = SpendJournal(self.config.path(self.config.service.spend_journal_path))
        try:
            self._unwritten = self.spend_journal.pending()
        except OSError as exc:  # serve anyway: records the database refuses then wait in memory only
            logger.error("the spend journal %s cannot be read or written (%s): call records the decision log "
                         "refuses will be kept in memory only; fix service.spend_journal_path", self.spend_journal.path,
                         exc)
            self._unwritten = []
        self._journaled = {record["record_id"] for record in self._unwritten}
        if self._unwritten:
            logger.warning("%d call records left in %s by an earlier run: writing them to the decision log",
                           len(self._unwritten), self.spend_journal.path)
            try:
                self._flush_spend()
            except Exception as exc:  # noqa: BLE001 - they stay journaled; budgeted tenants wait meanwhile
                logger.error("the journaled call records are not written yet (%s); retried before each call", exc)

    def _tenant_of_key(self, key: str) -> str | None:
        """The tenant of an active key, if params.yaml still has it. A key whose tenant was taken out of
        budgets.tenants but not revoked would otherwise pass the middleware and then match no tenant,
        which is how the admin token looks: every tenant's figures and an unbudgeted proxy."""
        tenant = self.ledger.tenant_of(key)
        if tenant is not None and self.config.budgets.tenant(tenant) is None:
            logger.warning("refused an API key of tenant %r, which budgets.tenants no longer has (revoke it: "
                           "mixllm keys revoke KEY_ID)", tenant)
            return None
        return tenant

    def _tenant(self, request: Any) -> TenantConfig | None:
        name = request.headers.get(TENANT_HEADER.decode())
        return self.config.budgets.tenant(name) if name else None

    def _standing(self, tenant: TenantConfig, now: datetime) -> list[Any]:
        return self.ledger.standing(tenant, now, self.config.budgets.pacing.warmup_share)

    def _spend_plan(self, tenant: TenantConfig | None, candidates: list[str], lambda_: float | None,
                    default_lambda: float) -> SpendPlan | JSONResponse:
        """The tenant's allowed candidates and paced lambda; a 429 when a budget is spent and the
        tenant's on_exhausted is reject; a 503 when its spend cannot be accounted for."""
        waiting = len(self._unwritten)
        if waiting >= self.config.service.max_unwritten_calls:  # memory is not the ledger: stop spending
            try:
                self._flush_spend()
            except Exception as exc:  # noqa: BLE001 - answered below, nothing dropped
                return error(503, None, f"{waiting} answered calls are waiting to be recorded ({exc}); no call "
                                        "is made until the decision log takes them", {"Retry-After": "5"})
        if tenant is None:
            return SpendPlan(None, candidates, lambda_)
        allowed = [llm for llm in candidates if tenant.allowed_llms is None or llm in tenant.allowed_llms]
        if not allowed:
            return error(403, "model", f"tenant '{tenant.name}' may use none of the reachable LLMs "
                                       f"({', '.join(candidates)}); its allowed_llms: {', '.join(tenant.allowed_llms or [])}")
        if not tenant.budgets_usd:
            return SpendPlan(tenant, allowed, lambda_)
        now = datetime.now(timezone.utc)
        try:
            self._flush_spend()
            standing = self._standing(tenant, now)
        except StoreBusyError as exc:
            return error(503, None, f"the spend of tenant '{tenant.name}' cannot be accounted for ({exc}); no "
                                    "call is made until it can", {"Retry-After": "2"})
        limit = binding(standing)
        if limit is not None and limit.exhausted:
            resets = limit.resets_at.isoformat().replace("+00:00", "Z")
            if tenant.on_exhausted == "reject":
                retry = max(int((limit.resets_at - now).total_seconds()) + 1, 1)
                return error(429, None, f"tenant '{tenant.name}' has spent its {limit.period} budget "
                                        f"(${limit.spent_usd:.4f} of ${limit.budget_usd:.4f}); it resets at {resets}",
                             {"Retry-After": str(retry)})
            cheapest = min(allowed, key=lambda name: self._price(name, 1000, 1000) or float("inf"))
            return SpendPlan(tenant, [cheapest], lambda_, [f"{limit.period} budget spent: cheapest LLM until {resets}"])
        factor = self.pacer.factor(tenant.name, standing, now)
        paced = self.pacer.effective_lambda(default_lambda if lambda_ is None else lambda_, factor)
        note = (f"budget pacing: lambda x{factor:.2f} ({limit.period} budget {100 * limit.spent_usd / limit.budget_usd:.1f}%"
                f" spent, {100 * limit.elapsed_share:.1f}% of the {limit.period} gone)")
        return SpendPlan(tenant, allowed, paced, [note])

    def _record_call(self, tenant: TenantConfig | None, llm: str, cost_usd: float, estimated: bool, *,
                     decision_id: str | None, model_version: int | None, reference_cost_usd: float | None,
                     router_ms: float | None, attempts: int) -> None:
        """Store an answered call (its spend); if the database refuses, keep it for the next attempt
        (never drop it): a budgeted tenant's calls wait (503) until it is written."""
        record = {"tenant": tenant.name if tenant is not None else None, "llm": llm, "cost_usd": float(cost_usd),
                  "estimated": estimated, "decision_id": decision_id, "model_version": model_version,
                  "reference_cost_usd": reference_cost_usd, "router_ms": router_ms, "attempts": attempts,
                  "at": datetime.now(timezone.utc), "record_id": uuid.uuid4().hex}
        with self._unwritten_lock:
            self._unwritten.append(record)
        try:
            self._flush_spend()
        except Exception as exc:  # noqa: BLE001 - kept, retried before the next call
            try:
                self.spend_journal.append(record)
                self._journaled.add(record["record_id"])
                kept = f"kept in {self.spend_journal.path}"
            except OSError as disk:  # memory is all that is left: say so
                kept = f"kept in memory only (the journal refused it: {disk})"
            logger.error("call record (tenant %s, %s) %s, not yet written (%s); %d waiting. Calls of budgeted "
                         "tenants get 503 until it is written", record["tenant"], llm, kept, exc, len(self._unwritten))

    def _write_spend_of(self, decision_id: str) -> None:
        """Write the waiting call records if one of them is this decision's (its record names the LLM
        that answered); raises StoreBusyError if the database refuses. Anything else is logged: the
        record stays waiting, and the feedback is stored all the same."""
        with self._unwritten_lock:
            waiting = any(record["decision_id"] == decision_id for record in self._unwritten)
        if not waiting:
            return
        try:
            self._flush_spend()
        except StoreBusyError:
            raise
        except Exception as exc:  # noqa: BLE001 - the record waits for the next flush; feedback goes on
            logger.warning("call records not written before feedback on decision %s: %s", decision_id, exc)

    def _flush_spend(self) -> None:
        """Write the call records waiting (oldest first), those a previous run left in the journal
        included; raises if the database refuses. Journaled ones leave the journal once written."""
        written: set[str] = set()
        try:
            with self._unwritten_lock:
                while self._unwritten:
                    record = self._unwritten[0]
                    try:
                        self.ledger.record_call(**record)  # a record_id stored already is not stored again
                    except StoreBusyError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - refused for good: set aside, never blocking the rest
                        logger.error("call record %s refused by the decision log (%s: %s); set aside in %s.rejected",
                                     record, type(exc).__name__, exc, self.spend_journal.path)
                        self.spend_journal.reject(record, f"{type(exc).__name__}: {exc}")
                    self._unwritten.pop(0)
                    if record["record_id"] in self._journaled:
                        written.add(record["record_id"])
        finally:
            if written:
                try:
                    self.spend_journal.remove(written)
                    self._journaled -= written
                except OSError as exc:  # written to the database: the journal's copy is replayed once, harmlessly
                    logger.warning("the spend journal keeps %d records already written (%s)", len(written), exc)

    def budget_report(self, tenant: TenantConfig | None) -> dict[str, Any]:
        """GET /budgets: each tenant's standing (only the caller's own for a tenant key)."""
        now = datetime.now(timezone.utc)
        tenants = [tenant] if tenant is not None else list(self.config.budgets.tenants)
        out = []
        for entry in tenants:
            standing = self._standing(entry, now) if entry.budgets_usd else []
            limit = binding(standing)
            factor = self.pacer.factor(entry.name, standing, now) if standing else 1.0
            out.append({"tenant": entry.name, "on_exhausted": entry.on_exhausted,
                        "allowed_llms": list(entry.allowed_llms) if entry.allowed_llms is not None else None,
                        "lambda_factor": factor, "binding": limit.period if limit else None,
                        "budgets": [s.to_dict() for s in standing]})
        return {"tenants": out, "unwritten_spend_records": len(self._unwritten)}

    def usage_report(self, tenant: TenantConfig | None, days: float | None) -> tuple[dict[str, Any], Any]:
        """(the /stats summary, the calls it summarises): a tenant's own calls, or everyone's."""
        from datetime import timedelta

        from mixllm.evaluation.savings import reference_llm, usage_summary

        since = datetime.now(timezone.utc) - timedelta(days=days) if days else None
        calls = self.ledger.calls_frame(since)
        if tenant is not None:
            calls = calls[calls["tenant"] == tenant.name]
        summary = usage_summary(calls, self.config.service.router_usd_per_hour, reference_llm(self.config))
        return summary, calls
