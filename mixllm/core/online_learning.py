"""A fitted MixLLMRouter's online life: bandit feedback (`partial_fit`: each row updates only its
LLM's predictors) and pool changes (`add_llm` with an optimistic prior and a head that learns its
answers, `remove_llm`, enabling, a whole catalogue at once), all without a retrain. A mixin of
MixLLMRouter."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mixllm.config import LatencyProfile, LLMConfig
from mixllm.core import estimators
from mixllm.core.errors import RoutingError
from mixllm.core.router_inputs import check_log, check_number, token_columns
from mixllm.core.units import call_cost_usd, tokens_from_chars

if TYPE_CHECKING:
    import pandas as pd

    from mixllm.core.router import MixLLMRouter

logger = logging.getLogger(__name__)


def price_closeness_weights(prices: np.ndarray, price_per_1k: float) -> np.ndarray:
    """Weights over LLMs (summing to 1) by closeness of their price to `price_per_1k` in log price
    (a Gaussian of width 1; unpriced LLMs get none): the price_tier newcomer prior's weights."""
    prices = np.asarray(prices, dtype=float)
    distance = np.log(np.maximum(prices, 1e-12)) - np.log(max(price_per_1k, 1e-12))
    weights = np.exp(-0.5 * distance**2) * (prices > 0)
    return weights / weights.sum() if weights.sum() > 0 else np.full(len(prices), 1 / len(prices))


class OnlineLearningMixin:
    """`partial_fit`, `add_llm`, `remove_llm`, `set_enabled`, `apply_enabled_flags`, `apply_catalogue`."""

    def partial_fit(self, interactions: pd.DataFrame, features: np.ndarray | None = None) -> MixLLMRouter:
        """Learn from bandit feedback: each row updates only its own LLM's predictors.

        `interactions` needs query, llm, quality, cost_usd (NaN when unknown: then only quality
        learns; tokens optional); `features` may hold
        their representation already (one row per interaction) to skip the encoder.
        """
        self._check_fitted()
        # Feedback may come without a cost (a thumbs-up on a /route decision): it teaches quality only.
        frame = check_log(interactions, need_query_id=False, allow_missing_cost=True)
        unknown = sorted(set(frame["llm"]) - set(self.quality_models_))
        if unknown:
            raise RoutingError(f"feedback for unknown LLM(s) {', '.join(unknown)}; add them with add_llm first")
        if features is None:
            tasks = frame["task"].where(frame["task"].notna(), None).tolist() if "task" in frame else None
            X = self.features(frame["query"].tolist(), tasks)
        else:
            X = np.asarray(features, dtype=np.float64)
        if X.shape[0] != len(frame):
            raise RoutingError(f"features has {X.shape[0]} rows for {len(frame)} interactions")
        proba = self.domain_proba(X)
        difficulty = self.difficulty(X)
        for llm, rows in frame.groupby("llm", sort=False):
            positions = frame.index.get_indexer(rows.index)
            prior = self.domain_model_.prior(proba[positions], [llm])[:, 0]
            head_input = self._head_input(llm, X[positions], proba[positions], prior)
            # The shared difficulty head stays as trained: feedback teaches each LLM's own departure.
            self.quality_models_[llm].partial_fit(head_input, rows["quality"].to_numpy(),
                                                  prior=prior + difficulty[positions])
            self.cost_models_[llm].partial_fit(X[positions], rows["cost_usd"].to_numpy(),
                                               rows["query"].str.len().to_numpy(), *token_columns(rows))
        self.n_feedback_ = getattr(self, "n_feedback_", 0) + len(frame)
        return self

    def add_llm(self, name: str, input_usd_per_1k: float, output_usd_per_1k: float, *,
                latency: LatencyProfile | Mapping[str, Any] | None = None, prior_quality: float | None = None,
                enabled: bool = True, lambda_: float | None = None) -> MixLLMRouter:
        """A new candidate with a prior (per domain, optimistic by default) and a head that learns its
        answers online, starting from the pool's idea of how far an LLM strays from its prior
        (`_newcomer_ridge`), so exploration can try it and one answer does not decide it. No retrain.

        `lambda_`: the lambda it will be routed at, which the prior of a newcomer dearer than every
        trained LLM depends on (`_newcomer_prior`); default decision.lambda, else the calibrated one."""
        self._check_fitted()
        if not name or not isinstance(name, str):
            raise RoutingError("add_llm needs a non-empty LLM name")
        if name in self.quality_models_:
            raise RoutingError(f"LLM '{name}' is already in the pool; remove_llm it first to reset it")
        if input_usd_per_1k < 0 or output_usd_per_1k < 0:
            raise RoutingError("prices must be >= 0 USD per 1k tokens")
        profile = latency if isinstance(latency, LatencyProfile) else LatencyProfile(**(latency or {}))
        entry = LLMConfig(name=name, input_usd_per_1k=input_usd_per_1k, output_usd_per_1k=output_usd_per_1k,
                          latency=profile, enabled=enabled)
        if prior_quality is not None and not (isinstance(prior_quality, (int, float)) and 0 <= prior_quality <= 1):
            raise RoutingError(f"prior_quality must be a number in 0..1, got {prior_quality!r}")
        typical_output = float(np.mean(list(self.typical_output_tokens_.values()))) if self.typical_output_tokens_ else 100.0
        prior_cost = self._newcomer_cost(input_usd_per_1k, output_usd_per_1k, typical_output)
        lambda_ = self.known_lambda if lambda_ is None else check_number("lambda_", lambda_)
        per_domain = (np.full(len(self.domain_model_.classes_), float(prior_quality)) if prior_quality is not None
                      else self._newcomer_prior(input_usd_per_1k + output_usd_per_1k, prior_cost, lambda_))
        quality_config = self._config.predictors.quality
        established = [llm for llm in self.llms_ if llm not in self.anchors_
                       and self.quality_models_[llm].kind == "bayesian_linear"]
        if established and quality_config.resemblance_weight > 0:
            columns = [self.domain_model_.llms_.index(llm) for llm in established]
            self.anchors_[name] = {
                "llms": established, "weight": float(quality_config.resemblance_weight),
                "table": self.domain_model_.table_[:, columns].copy(),
                "coef": np.vstack([self.quality_models_[llm].model_.coef_ for llm in established]),
            }
        self.catalogue_[name] = entry.model_dump(mode="json")
        self.domain_model_.add_llm(name, per_domain)
        n_anchors = len(self.anchors_.get(name, {}).get("llms", []))
        head = estimators.newcomer_quality_predictor(self._config, self._newcomer_ridge())
        self.quality_models_[name] = head.start_empty(self.n_features_in_ + n_anchors,
                                                      self._newcomer_precision(head.ridge, n_anchors))
        self.cost_models_[name] = estimators.cost_predictor(
            self._config, entry, self.cost_scale_usd_, prior_cost_usd=prior_cost).start_empty(self.n_features_in_)
        self.typical_output_tokens_[name] = typical_output
        logger.info("added LLM %s (prior quality %.3f on average over domains, prior cost $%.6f)", name,
                    float(np.mean(per_domain)), prior_cost)
        return self

    def _newcomer_ridge(self) -> float:
        """Empirical Bayes: the prior precision that makes a newcomer's head, a priori, as large as the
        trained heads are (their training residual variance over their mean squared coefficient).
        Used when predictors.quality.new_llm_prior_ridge is null."""
        trained = [llm for llm in self.quality_models_ if llm not in self.anchors_
                   and self.quality_models_[llm].kind == "bayesian_linear" and llm in self.residual_variance_]
        if not trained:  # nothing to learn the scale from (or a router saved before it was kept)
            return float(self.ridge_)
        coef = np.vstack([self.quality_models_[llm].model_.coef_[:-1] for llm in trained])  # without the bias
        variance = float(np.mean([self.residual_variance_[llm] for llm in trained]))
        return float(np.clip(variance / max(float(np.mean(coef**2)), 1e-12), self.ridge_, 1e6))

    def _newcomer_precision(self, ridge: float, n_anchors: int) -> np.ndarray | None:
        """The newcomer head's prior precision per coefficient: `ridge` (empirical Bayes) on the
        query-level inputs and the bias, predictors.quality.newcomer_domain_answers on its
        domain-membership coefficients (the head's input ends with the domain block, the bias after it).

        The per-domain prior is a guess from prices (about 0.1 off per domain on the shared logs),
        while the empirical-Bayes precision (1,835 on the RouterBench subset) would need thousands of
        answers to correct it: a newcomer the guess underrates in a domain then stays underrated
        there. A domain coefficient of precision N moves halfway to what the newcomer has shown in
        that domain after N answers there. The bias keeps `ridge`: every domain shares it, and a
        loose bias let failures in one domain silence the newcomer in all (benchmarks/RESULTS.md,
        "where a newcomer's regret comes from")."""
        answers = self._config.predictors.quality.newcomer_domain_answers
        if answers is None:
            return None
        precision = np.full(n_anchors + self.n_features_in_ + 1, float(ridge))
        n_domains = self.n_features_in_ - self.n_base_features_
        precision[-1 - n_domains:-1] = float(answers)
        return precision

    def _newcomer_cost(self, input_usd_per_1k: float, output_usd_per_1k: float, typical_output_tokens: float) -> float:
        """A newcomer's prior dollars per query, priced the way the log's costs were made.

        The pool's typical query is some thousands of input and of output tokens: fitted (non-negative
        least squares on relative error) to what each priced LLM costs on average, then priced at the
        newcomer's input and output prices. Output tokens dearer than input ones are the rule, so one
        price per LLM (input + output) misprices a newcomer whose ratio differs from the pool's: on
        the RouterBench subset it put gpt-4-1106 at $0.0080 a query against the $0.0050 it costs
        (the fit: $0.0046). When the pool's LLMs all share one input:output price ratio the two
        cannot be told apart, and the pool's median dollars per unit of summed price are used; with
        no priced LLM, tokens x prices."""
        pool = [(self.catalogue_[llm]["input_usd_per_1k"], self.catalogue_[llm]["output_usd_per_1k"],
                 model.prior_cost_usd) for llm, model in self.cost_models_.items()
                if llm not in self.anchors_ and model.prior_cost_usd > 0
                and self.catalogue_[llm]["input_usd_per_1k"] + self.catalogue_[llm]["output_usd_per_1k"] > 0]
        if not pool:
            return float(call_cost_usd(tokens_from_chars(self.mean_query_chars_), typical_output_tokens,
                                       input_usd_per_1k, output_usd_per_1k))
        prices, cost = np.array([row[:2] for row in pool]), np.array([row[2] for row in pool])
        share_out = prices[:, 1] / prices.sum(axis=1)
        if np.ptp(share_out) > 0.02:  # at least two input:output ratios: the split is identified
            from scipy.optimize import nnls  # here, not at import: a served router never needs scipy

            thousands_of_tokens, _ = nnls(prices / cost[:, None], np.ones(len(pool)))
            if thousands_of_tokens.any():
                return float(thousands_of_tokens @ [input_usd_per_1k, output_usd_per_1k])
        return float(np.median(cost / prices.sum(axis=1))) * (input_usd_per_1k + output_usd_per_1k)

    def _newcomer_prior(self, price_per_1k: float, prior_cost_usd: float, lambda_: float | None) -> np.ndarray:
        """A newcomer's per-domain prior quality (predictors.quality.newcomer_prior).

        optimistic (default): in each domain, as good as the best pool LLM that costs no more
        (price = input + output per 1k tokens; the cheapest LLMs when none is cheaper). An LLM is
        added because it is expected to compete at its price; the optimism gets it tried, its
        feedback corrects it query by query (its head), and its uncertainty shrinks as it does.
        A newcomer dearer than every pool LLM would then be the best LLM's quality at a higher
        cost, which no argmax picks: it is never tried (GPT-4 joining the RouterBench subset got
        0% of the traffic against the full pool's 14-27%). With a known `lambda_` it starts instead at
        break-even in each domain: the quality at which its score (q - lambda x cost / scale, at
        `prior_cost_usd`) equals the best pool LLM's there (each at its mean training cost), so it
        is tried where it could pay and its answers decide (benchmarks/RESULTS.md, newcomers).
        price_tier: the pool's per-domain means weighted by closeness in log price.
        mean: the pool's per-domain mean."""
        rule = self._config.predictors.quality.newcomer_prior
        table = self.domain_model_.table_
        existing = [llm for llm in self.domain_model_.llms_ if llm in self.catalogue_]
        if not existing:
            return np.full(table.shape[0], self.mean_quality_)
        columns = [self.domain_model_.llms_.index(llm) for llm in existing]
        pool = table[:, columns]
        prices = np.array([self.catalogue_[llm]["input_usd_per_1k"] + self.catalogue_[llm]["output_usd_per_1k"]
                           for llm in existing])
        if rule == "mean":
            return pool.mean(axis=1)
        if rule == "optimistic":
            if lambda_ is not None and price_per_1k > prices.max():
                scale = self.cost_scale_usd_
                pool_cost = np.array([self.cost_models_[llm].prior_cost_usd for llm in existing])
                best_score = (pool - lambda_ * pool_cost / scale).max(axis=1)
                break_even = best_score + lambda_ * prior_cost_usd / scale
                return np.clip(np.maximum(break_even, pool.max(axis=1)), 0.0, 1.0)
            affordable = prices <= price_per_1k * (1 + 1e-9)
            if not affordable.any():
                affordable = prices <= prices.min() * (1 + 1e-9)
            return pool[:, affordable].max(axis=1)
        if price_per_1k <= 0 or (prices <= 0).all():
            return pool.mean(axis=1)
        return pool @ price_closeness_weights(prices, price_per_1k)

    def remove_llm(self, name: str) -> MixLLMRouter:
        """Take an LLM out of the pool; the others are untouched."""
        self._check_fitted()
        if name not in self.quality_models_:
            raise RoutingError(f"LLM '{name}' is not in the pool ({', '.join(self.llms_)})")
        for table in (self.quality_models_, self.cost_models_, self.catalogue_, self.typical_output_tokens_,
                      self.residual_variance_):
            table.pop(name, None)
        self.domain_model_.remove_llm(name)
        self.anchors_.pop(name, None)
        logger.info("removed LLM %s", name)
        return self

    def set_enabled(self, name: str, enabled: bool) -> MixLLMRouter:
        """Keep an LLM's predictors but take it out of (or put it back into) the candidates."""
        self._check_fitted()
        if name not in self.catalogue_:
            raise RoutingError(f"LLM '{name}' is not in the pool ({', '.join(self.llms_)})")
        self.catalogue_[name] = {**self.catalogue_[name], "enabled": bool(enabled)}
        return self

    def apply_enabled_flags(self, llms: Sequence[LLMConfig]) -> list[str]:
        """Only the catalogue's enabled flags, for LLMs already in the pool (what a served model
        takes from params.yaml at once; adding and removing LLMs is apply_catalogue's). Returns
        what changed, one line each."""
        self._check_fitted()
        changes = []
        enabled_now = set(self.enabled_llms_)
        for llm in llms:
            if llm.name in self.catalogue_ and (llm.name in enabled_now) != llm.enabled:
                self.set_enabled(llm.name, llm.enabled)
                changes.append(f"{'enabled' if llm.enabled else 'disabled'} {llm.name}")
        return changes

    def apply_catalogue(self, llms: Sequence[LLMConfig]) -> list[str]:
        """Make the pool match a catalogue: add new LLMs, drop absent ones, update prices, latency and
        enabled flags. Returns what changed, one line each."""
        self._check_fitted()
        changes = []
        wanted = {llm.name: llm for llm in llms}
        for name in list(self.quality_models_):
            if name not in wanted:
                self.remove_llm(name)
                changes.append(f"removed {name}")
        for name, entry in wanted.items():
            if name not in self.quality_models_:
                self.add_llm(name, entry.input_usd_per_1k, entry.output_usd_per_1k, latency=entry.latency,
                             enabled=entry.enabled)
                changes.append(f"added {name}")
                continue
            current = self.catalogue_[name]
            updated = entry.model_dump(mode="json")
            if current != updated:
                if current.get("enabled", True) != entry.enabled:
                    changes.append(f"{'enabled' if entry.enabled else 'disabled'} {name}")
                else:
                    changes.append(f"updated {name}")
                self.catalogue_[name] = updated
                cost_model = self.cost_models_[name]
                cost_model.input_usd_per_1k = entry.input_usd_per_1k
                cost_model.output_usd_per_1k = entry.output_usd_per_1k
        return changes
