"""The drift job: measure the champion's recent traffic against its training data (mixllm.evaluation.drift)
and, past the thresholds, retrain (`mixllm continual`, the continual flow). A drift retrain waits
for drift.window new decisions after the last one, so a drift the data cannot fix does not
retrain every hour."""

from __future__ import annotations

import logging
from typing import Any

from mixllm.config import MixLLMConfig
from mixllm.evaluation.drift import DriftReport, measure_drift

logger = logging.getLogger(__name__)
WATERMARK = "drift_retrain"  # decisions logged when the last drift retrain started


def _store(config: MixLLMConfig) -> Any:
    from mixllm.io.store import existing_log

    return existing_log(config.sqlalchemy_url(config.service.feedback_store_url))


def check_drift(config: MixLLMConfig, router: Any = None) -> DriftReport | None:
    """The champion's drift report on the last drift.window decisions; None when drift monitoring is
    off, or there is no champion or no decision log yet."""
    from mixllm.io.registry import Registry

    if not config.drift.enabled:
        return None
    store = _store(config)
    if store is None:
        return None
    try:
        if router is None:
            if Registry(config).alias_version("champion") is None:
                return None
            router, _ = Registry(config).load_router("champion")
        window = config.drift.window
        return measure_drift(router, store.recent_queries(window), store.decisions_with_feedback(limit=window),
                             config.drift)
    finally:
        store.dispose()


def watch_drift(config: MixLLMConfig) -> dict[str, Any]:
    """Check drift; on drift (and drift.retrain), run the training job, tagged with why."""
    from mixllm.jobs.training import run_training

    report = check_drift(config)
    out: dict[str, Any] = {"drift": report.to_dict() if report else None, "retrained": None}
    if report is None or not report.drifted:
        return out
    store = _store(config)
    try:
        decisions, last = store.count("decisions"), store.watermark(WATERMARK)
        if not config.drift.retrain or (last and decisions - last < config.drift.window):
            logger.warning("drift (%s); no retrain: %s", "; ".join(report.reasons),
                           "drift.retrain is off" if not config.drift.retrain else
                           f"only {decisions - last} decisions since the last drift retrain (drift.window "
                           f"{config.drift.window})")
            return out
        logger.warning("drift: %s; retraining", "; ".join(report.reasons))
        outcome = run_training(config, progress=False,
                               extra_tags={"mixllm.trigger": ("drift: " + "; ".join(report.reasons))[:4900]})
        store.set_watermark(decisions, WATERMARK)  # after the retrain: a failed one is tried again next run
    finally:
        store.dispose()
    out["retrained"] = outcome.registration.to_dict() if outcome.registration else None
    return out
