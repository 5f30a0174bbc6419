"""Budgets that pace spend (pure maths, no I/O): calendar periods, where a tenant's spend stands
against its budget line, and the controller that turns that into a multiplier on lambda.

A tenant with a day budget B that has spent S when a share f of the day is gone is at pace
S / (B x f): above 1 it spends faster than the budget allows, below 1 slower. The pacer raises the
effective lambda (cheaper LLMs) while the pace is above 1 and lowers it (better LLMs) while it is
below, a proportional-integral controller in log lambda, so traffic moves to cheaper LLMs before
the money runs out instead of hitting a wall at the end of the period.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from mixllm.config import PacingConfig

PERIODS = ("hour", "day", "month")


def period_bounds(period: str, now: datetime) -> tuple[datetime, datetime]:
    """The UTC calendar period holding `now`: [start, end)."""
    now = now.astimezone(timezone.utc)
    if period == "hour":
        start = now.replace(minute=0, second=0, microsecond=0)
        return start, start + timedelta(hours=1)
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    if period == "month":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        return start, end
    raise ValueError(f"unknown budget period '{period}'; use one of {', '.join(PERIODS)}")


@dataclass(frozen=True)
class BudgetStanding:
    """One budget of one tenant at one moment."""

    period: str
    budget_usd: float
    spent_usd: float
    starts_at: datetime
    resets_at: datetime
    elapsed_share: float  # of the period gone, 0..1
    line_usd: float  # what the budget allows by now (never below warmup_share x budget)

    @property
    def pace(self) -> float:
        return self.spent_usd / self.line_usd

    @property
    def exhausted(self) -> bool:
        return self.spent_usd >= self.budget_usd

    def to_dict(self) -> dict[str, object]:
        return {"period": self.period, "budget_usd": self.budget_usd, "spent_usd": self.spent_usd,
                "remaining_usd": max(self.budget_usd - self.spent_usd, 0.0), "elapsed_share": self.elapsed_share,
                "pace": self.pace, "exhausted": self.exhausted, "starts_at": self.starts_at.isoformat(),
                "resets_at": self.resets_at.isoformat()}


def standings(budgets_usd: Mapping[str, float], spent_usd: Mapping[str, float], now: datetime,
              warmup_share: float) -> list[BudgetStanding]:
    """Each budget's standing; `spent_usd` maps a period to the spend since its start."""
    out = []
    for period in PERIODS:
        if period not in budgets_usd:
            continue
        start, end = period_bounds(period, now)
        share = (now - start) / (end - start)
        budget = float(budgets_usd[period])
        out.append(BudgetStanding(period, budget, float(spent_usd.get(period, 0.0)), start, end, share,
                                  budget * max(share, warmup_share)))
    return out


def binding(standing: list[BudgetStanding]) -> BudgetStanding | None:
    """The budget that limits: an exhausted one first (the one that resets last), else the one
    furthest ahead of its line."""
    exhausted = [s for s in standing if s.exhausted]
    if exhausted:
        return max(exhausted, key=lambda s: s.resets_at)
    return max(standing, key=lambda s: s.pace, default=None)


class BudgetPacer:
    """Per tenant, the multiplier on lambda that keeps spend on its budget line (see the module
    docstring). Thread-safe; its integral state lives in memory (a restarted service starts from
    the proportional part, which reads the recorded spend, so it is never blind)."""

    def __init__(self, settings: PacingConfig):
        self.settings = settings
        self._integral: dict[str, tuple[float, datetime, str]] = {}  # tenant -> (value, when, period)
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self._integral.clear()

    def factor(self, tenant: str, standing: list[BudgetStanding], now: datetime) -> float:
        """The multiplier on lambda for this tenant's next decision (1 without budgets)."""
        limit = binding(standing)
        if limit is None:
            return 1.0
        settings = self.settings
        bound = math.log(settings.max_lambda_factor)
        error = min(limit.pace, 10.0) - 1.0  # beyond 10x the line, more error adds nothing but windup
        with self._lock:
            value, then, period = self._integral.get(tenant, (0.0, now, limit.period))
            if period != limit.period or then < limit.starts_at:  # a new period, or another budget binds
                value, then = 0.0, max(then, limit.starts_at)
            length = (limit.resets_at - limit.starts_at).total_seconds()
            step = max((now - then).total_seconds(), 0.0) / length
            value = min(max(value + settings.integral_gain * error * step, -bound), bound)  # no windup
            self._integral[tenant] = (value, now, limit.period)
        u = settings.proportional_gain * error + value
        return math.exp(min(max(u, -bound), bound))

    def effective_lambda(self, lambda_: float, factor: float) -> float:
        """The lambda a paced tenant routes with (lambda 0 cannot be scaled: it starts from min_lambda)."""
        return max(lambda_, self.settings.min_lambda) * factor
