"""What watches the service while it serves: its Prometheus metrics, the drift monitor and the
shadow version (the latter two a mixin of the service class, like ChatProxy and TenantBudgets)."""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger("bentoml.mixllm")  # bentoml serve shows "bentoml.*" loggers
OFF_POLICY_MIN_AGE_S = 5.0  # the shortest time between two off-policy bootstraps for /stats
OFF_POLICY_MAX_AGE_S = 60.0  # the longest /stats shows the same estimates (new decisions change them too)


class ServiceMetrics:
    """Prometheus metrics next to BentoML's own request metrics on /metrics."""

    def __init__(self) -> None:
        import prometheus_client as prom

        self.decisions = prom.Counter("mixllm_decisions_total", "Routing decisions per chosen LLM", ["llm"])
        self.route_latency = prom.Histogram(
            "mixllm_route_seconds", "Time to route (per HTTP call)", ["endpoint"],
            buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12))
        self.feedback = prom.Counter("mixllm_feedback_rows_total", "Feedback rows stored", ["kind"])
        self.model_version = prom.Gauge("mixllm_model_version", "Registry version being served",
                                        multiprocess_mode="max")
        self.in_flight = prom.Gauge("mixllm_in_flight", "Calls in flight per LLM", ["llm"],
                                    multiprocess_mode="livesum")
        self.proxied = prom.Counter("mixllm_proxy_calls_total", "Proxied chat completions", ["llm", "status"])
        self.route_pass_size = prom.Histogram(
            "mixllm_route_pass_queries", "Concurrent /route calls routed in one encoder pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        # The drift monitor (mixllm.evaluation.drift), re-measured every drift.interval_s on the recent decisions.
        self.drift_psi = prom.Gauge("mixllm_drift_domain_psi", "PSI of the recent domain mix against training",
                                    multiprocess_mode="max")
        self.drift_shift = prom.Gauge("mixllm_drift_feature_shift", "Shift of the recent query features' mean, "
                                      "in training SDs", multiprocess_mode="max")
        self.drift_p_value = prom.Gauge("mixllm_drift_feature_shift_p_value", "Permutation p-value of that shift",
                                        multiprocess_mode="min")
        self.drift_gap = prom.Gauge("mixllm_drift_feedback_gap", "Mean feedback quality minus predicted, per LLM",
                                    ["llm"], multiprocess_mode="max")
        self.drift_detected = prom.Gauge("mixllm_drift_detected", "1 when the last drift check found drift",
                                         multiprocess_mode="max")


class ServiceWatchers:
    """Needs from the class it is mixed into: config, registry, store, metrics, model, shadow
    (mixllm.service.shadow.ShadowScorer or None), drift_report, _off_policy_cache and _stop."""

    def _watch_drift(self) -> None:
        """Re-measure drift every drift.interval_s on the recent decisions; export it on /metrics."""
        settings = self.config.drift
        while not self._stop.wait(settings.interval_s):
            model = self.model
            if model is None:
                continue
            # Imported at the first check, not at the start: it brings pandas (0.6 s of a start).
            from mixllm.evaluation.drift import measure_drift

            try:
                report = measure_drift(model.router, self.store.recent_queries(settings.window),
                                       self.store.decisions_with_feedback(limit=settings.window), settings)
            except Exception as exc:  # noqa: BLE001 - monitoring must not take the service down
                logger.warning("drift check failed (%s: %s); will retry", type(exc).__name__, exc)
                continue
            self.drift_report = report
            for gauge, value in ((self.metrics.drift_psi, report.domain_psi), (self.metrics.drift_shift, report.feature_shift),
                                 (self.metrics.drift_p_value, report.feature_shift_p_value)):
                if value is not None:
                    gauge.set(value)
            for llm, gap in report.feedback_gap.items():
                self.metrics.drift_gap.labels(llm=llm).set(gap)
            self.metrics.drift_detected.set(float(report.drifted))
            if report.drifted:
                logger.warning("drift: %s (the continual job retrains on it)", "; ".join(report.reasons))

    def _load_shadow(self) -> None:
        """Load the shadow version (service.shadow.alias) when it exists and changed."""
        if self.shadow is None:
            return
        alias = self.config.service.shadow.alias
        try:
            target = int(alias) if alias.isdigit() else self.registry.alias_version(alias)
            if target is None or target == self.shadow.version:
                if target is None and self.shadow.version is not None:
                    self.shadow.use(None, None)
                return
            router, number = self.registry.load_router(target)
            router.apply_enabled_flags(self.config.llms)
            self.shadow.use(router, number)
            logger.info("shadow routing with version %d (%s) on %.0f%% of the traffic", number, alias,
                        100 * self.shadow.share)
        except Exception as exc:  # noqa: BLE001 - a missing shadow never stops serving
            logger.warning("shadow version '%s' not loaded (%s: %s)", alias, type(exc).__name__, exc)

    def _shadow_stats(self) -> dict[str, Any]:
        """The shadow version's agreement with what was served, and the off-policy estimates of it
        and of the champion on the logged decisions with feedback. Recomputed when the shadow version
        changes, when feedback has arrived since (at most every OFF_POLICY_MIN_AGE_S: it costs a
        bootstrap), and at least every OFF_POLICY_MAX_AGE_S; a fixed minute used to show estimates
        made before the feedback just given."""
        from mixllm.jobs.policy_evaluation import compare_on_feedback
        from mixllm.service.shadow import ShadowLog

        agreement = ShadowLog(self.store).agreement()
        out: dict[str, Any] = {"version": self.shadow.version, "alias": self.config.service.shadow.alias,
                               "share": self.shadow.share, "dropped": self.shadow.dropped,
                               "decisions_before_loaded": self.shadow.before_loaded,
                               "by_version": [{"model_version": int(r.model_version), "decisions": int(r.decisions),
                                               "agreement": r.agreed / r.decisions if r.decisions else None}
                                              for r in agreement.itertuples()]}
        model, shadow = self.model, self.shadow.router
        if model is None or shadow is None:
            return out
        cached, now, feedback_rows = self._off_policy_cache, time.monotonic(), self.store.count("feedback")
        if (cached is None or cached[1] != self.shadow.version or now - cached[0] > OFF_POLICY_MAX_AGE_S
                or (cached[3] != feedback_rows and now - cached[0] > OFF_POLICY_MIN_AGE_S)):
            logged = self.store.decisions_with_feedback(limit=2000)
            results = compare_on_feedback(self.config, shadow, model.router, logged, resamples=200)
            estimates = {}
            for name, result in zip(("shadow", "champion"), results):
                estimates[name] = {"n": result["n"], **({kind: {e: iv.__dict__ for e, iv in result[kind].items()
                                                                if e in ("ips", "snips", "dr")}
                                                         for kind in ("quality", "cost_usd", "score")} if result["n"] else {})}
            if results[0]["n"]:  # paired on the same decisions, as the gate's verdict (on its own window) is
                estimates["shadow_minus_champion"] = {kind: {e: iv.__dict__ for e, iv in by_estimator.items()}
                                                      for kind, by_estimator in results[0]["versus_baseline"].items()}
            self._off_policy_cache = (now, self.shadow.version, estimates, feedback_rows)
        out["off_policy"] = self._off_policy_cache[2]
        return out
