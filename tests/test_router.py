"""The router's behaviour on small data the tests make (3 LLMs with planted skills)."""

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pandas as pd
import pytest

from mixllm.core.decision import LoadSnapshot, decide, expected_latency_s, latency_penalty
from mixllm.core.embeddings import QueryEncoder, load_sentence_transformer
from mixllm.core.errors import ModelFormatError, RoutingError
from mixllm.core.features import QueryFeaturizer, length_features
from mixllm.core.fine_tuning import mine_domain_triplets
from mixllm.core.predictors import CostPredictor, QualityPredictor, departures
from mixllm.core.router import MixLLMRouter
from mixllm.core.router_format import FORMAT_VERSION
from mixllm.core.tags import KeyBERTTagger, LLMTagger, TagClusterer, parse_tag_list
from synthetic import PRICE_PER_1K, SKILL, TOPICS, small_config

LLMS = sorted(PRICE_PER_1K)
CODE = "Write a python function that reverses a list of numbers."
MATH = "What is 45 plus 17?"
HISTORY = "Who was the first emperor of Rome?"


@pytest.fixture(scope="session")
def base_model():
    return load_sentence_transformer(None, 32)


# ------------------------------------------------------------------------------ tags and domains


@pytest.mark.slow
def test_tagger_is_deterministic(train_log, base_model):
    queries = train_log.drop_duplicates("query_id")["query"].tolist()[:30]
    first = KeyBERTTagger(top_k=3, min_df=2).fit(queries, base_model).transform(queries, base_model)
    second = KeyBERTTagger(top_k=3, min_df=2).fit(queries, base_model).transform(queries, base_model)
    assert first == second
    assert all(len(tags) <= 3 for tags in first)
    assert sum(bool(tags) for tags in first) >= 0.8 * len(first), "most queries get tags"
    assert all(isinstance(tag, str) and 0 <= score <= 1 for tags in first for tag, score in tags)


def test_domains_have_readable_names(fitted):
    domains = fitted.tag_report_["domains"]
    assert len(domains) == 3
    for domain in domains:
        assert domain["name"] and all(part.strip() for part in domain["name"].split(","))
    assert sum(fitted.tag_report_["domain_counts"]) > 0


def test_clusterer_separates_planted_topics(base_model):
    tags = [[("python function", 1.0)], [("binary search", 0.8)], [("roman emperor", 1.0)], [("byzantine empire", 0.9)]]
    clusterer = TagClusterer(n_clusters=2, random_state=0).fit(tags, lambda t: base_model.encode(t, normalize_embeddings=True))
    dominant = clusterer.dominant_domains(tags)
    assert dominant[0] == dominant[1] and dominant[2] == dominant[3] and dominant[0] != dominant[2]
    assert clusterer.dominant_domains([[("never seen", 1.0)]]).tolist() == [-1]


@pytest.mark.slow
def test_fine_tuning_pulls_same_domain_queries_together(train_log):
    frame = train_log.drop_duplicates("query_id")
    queries = frame["query"].tolist()
    domains = frame["source"].map({"math": 0, "code": 1, "history": 2}).to_numpy()
    base = QueryEncoder(max_seq_length=32, fine_tune=False, progress=False).fit(queries)
    tuned = QueryEncoder(max_seq_length=32, fine_tune=True, max_triplets=96, train_batch_size=16, epochs=1,
                         learning_rate=1e-4, progress=False).fit(queries, domains)
    assert tuned.fine_tuned_ and tuned.n_triplets_ == 96

    def same_domain_cosine(encoder):
        vectors = encoder.transform(queries)
        similarity = vectors @ vectors.T
        same = (domains[:, None] == domains[None, :]) & ~np.eye(len(queries), dtype=bool)
        return similarity[same].mean() - similarity[~same].mean()

    assert same_domain_cosine(tuned) > same_domain_cosine(base), "contrastive fine-tuning must separate domains more"


def test_triplets_respect_domains():
    domains = np.array([0, 0, 1, 1, 2, -1])
    for a, p, n in mine_domain_triplets(domains, 50, 0):
        assert domains[a] == domains[p] and domains[n] != domains[a] and -1 not in (domains[a], domains[n])
    assert mine_domain_triplets(np.array([0, 1, 2]), 10, 0) == [], "no domain has two queries: no pairs"


# ---------------------------------------------------------------------------------- predictors


@pytest.mark.parametrize("kind", ["bayesian_linear", "random_forest", "knn", "mlp", "gradient_boosting"])
def test_quality_predictor_beats_the_mean_on_planted_signal(kind):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 8))
    y = 1 / (1 + np.exp(-2 * X[:, 0] + X[:, 1]))
    model = QualityPredictor(kind=kind, ridge=1.0).fit(X[:400], y[:400])
    predicted, sigma = model.predict(X[400:], return_std=True)
    assert ((predicted - y[400:]) ** 2).mean() < 0.5 * ((y[:400].mean() - y[400:]) ** 2).mean()
    assert predicted.min() >= 0 and predicted.max() <= 1 and (sigma >= 0).all()


def test_cost_predictor_beats_the_mean_with_and_without_tokens():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(500, 4))
    chars = rng.integers(50, 3000, size=500).astype(float)
    out_tokens = np.maximum(5, 100 + 60 * X[:, 0])
    in_tokens = chars / 4
    cost = (in_tokens * 0.01 + out_tokens * 0.03) / 1000
    for tokens in (False, True):
        model = CostPredictor(input_usd_per_1k=0.01, output_usd_per_1k=0.03, cost_scale_usd=1e-3)
        args = (in_tokens[:400], out_tokens[:400]) if tokens else ()
        model.fit(np.column_stack([X, np.log(chars)])[:400], cost[:400], chars[:400], *args)
        assert model.uses_tokens_ is tokens
        predicted = model.predict(np.column_stack([X, np.log(chars)])[400:], chars[400:])
        assert ((predicted - cost[400:]) ** 2).mean() < 0.5 * ((cost[:400].mean() - cost[400:]) ** 2).mean()


def test_bayesian_partial_fit_equals_batch_fit():
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(50, 5)), rng.random(50)
    batch = QualityPredictor().fit(X, y)
    incremental = QualityPredictor().fit(X[:10], y[:10])
    for i in range(10, 50):
        incremental.partial_fit(X[i:i + 1], y[i:i + 1])
    np.testing.assert_allclose(incremental.predict(X, return_std=True), batch.predict(X, return_std=True), atol=1e-8)


# ------------------------------------------------------------------------------------ decisions


def test_lambda_zero_picks_best_quality_and_huge_lambda_the_cheapest(fitted):
    queries = [CODE, MATH, HISTORY]
    for decision in fitted.route(queries, lambda_=0.0):
        best = max(decision.candidates, key=lambda c: c.quality)
        assert decision.llm == best.llm
    for decision in fitted.route(queries, lambda_=1e6):
        cheapest = min(decision.candidates, key=lambda c: c.cost_usd)
        assert decision.llm == cheapest.llm == "cheap-chat"


def test_planted_skills_are_learned(fitted):
    predictions = fitted.predict([CODE, MATH, HISTORY])
    quality = pd.DataFrame(predictions.quality, columns=predictions.llms, index=["code", "math", "history"])
    assert quality.loc["code", "coder"] > quality.loc["code", "cheap-chat"]
    assert quality.loc["math", "strong"] > quality.loc["math", "cheap-chat"]
    assert quality.loc["history", "cheap-chat"] > quality.loc["history", "coder"]


def test_the_features_are_the_routers_embeddings_then_its_domain_memberships(fitted):
    """What benchmarks and baselines read through the public methods is what the heads see."""
    queries = [CODE, MATH, HISTORY]
    X = fitted.features(queries)
    base = fitted.featurizer_.transform(queries, fitted.embed(queries))
    assert fitted.embed(queries).shape == (3, fitted.encoder_.dim_)
    np.testing.assert_allclose(fitted.join_domain_proba(base, fitted.domain_proba(X)), X)
    with pytest.raises(RoutingError, match="list of strings"):
        fitted.embed(CODE)


def test_decision_explains_itself(fitted):
    decision = fitted.route([CODE], lambda_=0.5)[0]
    row = decision.to_dict()
    assert row["llm"] in LLMS and row["lambda"] == 0.5
    assert {c["llm"] for c in row["candidates"]} == set(LLMS)
    chosen = next(c for c in decision.candidates if c.llm == decision.llm)
    assert chosen.score == max(c.score for c in decision.candidates)
    for c in decision.candidates:
        expected = c.quality - 0.5 * c.cost_usd / fitted.cost_scale_usd_ - c.penalty
        assert c.score == pytest.approx(expected)


def test_latency_backlog_moves_traffic_off_an_llm(fitted):
    queries = [MATH, "Compute 12 times 9.", "Solve for x: x + 4 = 20."] * 5
    calm = [d.llm for d in fitted.route(queries, lambda_=0.0)]
    favourite = max(set(calm), key=calm.count)
    busy = LoadSnapshot(in_flight={favourite: 40})
    loaded = [d.llm for d in fitted.route(queries, lambda_=0.0, load=busy)]
    assert loaded.count(favourite) < calm.count(favourite)
    penalties = [c.penalty for d in fitted.route(queries[:1], lambda_=0.0, load=busy) for c in d.candidates if c.llm == favourite]
    assert penalties[0] > 0


def test_latency_penalty_shape():
    assert latency_penalty(np.array([0.5, 2.0]), 2.0, 1.0, 1.0).tolist() == [0.0, 0.0]
    small, large = latency_penalty(np.array([3.0, 6.0]), 2.0, 1.0, 1.0)
    assert 0 < small < large and large > 10 * small, "grows exponentially past the tolerance"
    from mixllm.config import LatencyProfile

    profile = LatencyProfile(per_call_s=1.0, concurrency=2)
    assert expected_latency_s(profile, np.array([0.0]), 0)[0] == 1.0
    assert expected_latency_s(profile, np.array([0.0]), 5)[0] == pytest.approx(1.0 + 4 * 0.5)


def test_decide_breaks_ties_by_cost():
    choice, _ = decide(np.array([[0.8, 0.8]]), np.array([[2.0, 1.0]]), np.zeros((1, 2)), np.zeros((1, 2)),
                       lambda_=0.0, exploration=0.0, cost_scale_usd=1.0)
    assert choice.tolist() == [1]


def test_constraints_filter_and_relax(fitted):
    capped = fitted.route([MATH], lambda_=0.0, max_cost_usd=1e-5)[0]
    assert capped.llm == "cheap-chat" and not capped.relaxed
    impossible = fitted.route([MATH], lambda_=0.0, max_cost_usd=1e-12)[0]
    assert impossible.relaxed == ("max_cost",)
    only = fitted.route([MATH], candidates=["coder"])[0]
    assert only.llm == "coder" and [c.llm for c in only.candidates] == ["coder"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"queries": [""]}, "query 0 is empty"),
        ({"queries": "a string"}, "list of strings"),
        ({"queries": []}, "no queries"),
        ({"queries": [3]}, "must be text"),
        ({"candidates": ["gpt-9"]}, "unknown or disabled LLM.*gpt-9.*choose from"),
        ({"lambda_": -1.0}, "lambda must be a finite number >= 0"),
        ({"lambda_": "high"}, "lambda must be a number"),
        ({"exploration": float("nan")}, "exploration"),
    ],
)
def test_malformed_requests_say_what_is_wrong(fitted, kwargs, message):
    queries = kwargs.pop("queries", [MATH])
    with pytest.raises(RoutingError, match=message):
        fitted.route(queries, **kwargs)


# ---------------------------------------------------------------------------------- continual


def test_partial_fit_touches_only_the_llm_that_got_feedback(fitted):
    router = copy.deepcopy(fitted)
    before = router.predict([CODE, MATH, HISTORY])
    feedback = pd.DataFrame({"query": [CODE] * 5, "llm": ["coder"] * 5, "quality": [0.0] * 5, "cost_usd": [1e-4] * 5})
    router.partial_fit(feedback)
    after = router.predict([CODE, MATH, HISTORY])
    j = after.llms.index("coder")
    assert after.quality[0, j] < before.quality[0, j], "negative feedback lowers the coder's predicted quality"
    for k, llm in enumerate(after.llms):
        if llm != "coder":
            assert np.array_equal(after.quality[:, k], before.quality[:, k]), f"{llm} changed"
            assert np.array_equal(after.uncertainty[:, k], before.uncertainty[:, k])
            assert np.array_equal(after.cost_usd[:, k], before.cost_usd[:, k])
    with pytest.raises(RoutingError, match="add them with add_llm"):
        router.partial_fit(feedback.assign(llm="stranger"))


def test_fit_resets_what_feedback_training_and_an_earlier_fit_left_behind(fitted, train_log):
    """scikit-learn's contract: fit starts afresh. A router refitted after feedback, a backend choice
    and a fit with precomputed domains keeps none of them."""
    router = copy.deepcopy(fitted)
    router.partial_fit(pd.DataFrame({"query": [CODE], "llm": ["coder"], "quality": [0.0], "cost_usd": [1e-4]}))
    router.backend_choice_ = {"chosen": "static"}
    domains = {str(q): "" for q in train_log["query_id"].unique()}
    router.fit(train_log, domains=domains, encoder=fitted.encoder_, tag_report={"enabled": True, "from": "stage"})
    assert router.n_feedback_ == 0 and router.backend_choice_ is None
    assert router.tag_report_ == {"enabled": True, "from": "stage"}, "the report of the domains it was given"
    router.fit(train_log, domains=domains, encoder=fitted.encoder_)
    assert router.tag_report_ == {"enabled": True, "precomputed": True}, "not the earlier fit's report"


def test_heads_trained_on_the_same_queries_share_one_posterior_and_feedback_unshares_it(fitted, tmp_path):
    # The heads share A^-1 so routing computes a query's uncertainty once (VarianceMemo); the
    # figures must be what each head computes alone, and feedback must give an LLM its own again.
    def posterior_owners(router):
        return {id(router.quality_models_[llm].model_.A_inv_) for llm in router.llms_}

    queries = [CODE, MATH, HISTORY]
    assert len(posterior_owners(fitted)) == 1, "every LLM answered every training query"
    X = fitted.features(queries)
    shared = fitted.predict_from_features(X, np.array([len(q) for q in queries]))
    alone = copy.deepcopy(fitted)
    for llm in alone.llms_:  # each head with a private copy, predicting without a memo
        model = alone.quality_models_[llm].model_
        model.A_inv_ = np.array(model.A_inv_)
    assert len(posterior_owners(alone)) == len(alone.llms_)
    unshared = alone.predict_from_features(X, np.array([len(q) for q in queries]))
    assert np.array_equal(shared.uncertainty, unshared.uncertainty) and np.array_equal(shared.quality, unshared.quality)
    fitted.save(tmp_path / "router")
    assert len(posterior_owners(MixLLMRouter.load(tmp_path / "router", progress=False))) == 1, "one copy after loading"

    router = copy.deepcopy(fitted)
    router.partial_fit(pd.DataFrame({"query": [MATH], "llm": ["coder"], "quality": [1.0], "cost_usd": [1e-4]}))
    owners = {llm: id(router.quality_models_[llm].model_.A_inv_) for llm in router.llms_}
    assert sum(owner == owners["coder"] for owner in owners.values()) == 1, "the coder has its own posterior now"
    assert len(set(owners.values())) == 2, "the others still share theirs"
    after = router.predict([MATH])
    j = after.llms.index("coder")
    assert after.uncertainty[0, j] < fitted.predict([MATH]).uncertainty[0, j], "its answer made it surer there"


def test_add_llm_gets_explored_and_remove_llm_stops_routing(fitted):
    router = _with_newcomer_ridge(copy.deepcopy(fitted), 1.0)  # a weak prior: a large uncertainty
    router.add_llm("newcomer", 0.001, 0.001, prior_quality=0.5)
    queries = [CODE, MATH, HISTORY]
    explored = [d.llm for d in router.route(queries, lambda_=0.0, exploration=5.0)]
    greedy = [d.llm for d in router.route(queries, lambda_=0.0, exploration=0.0)]
    assert explored.count("newcomer") == 3, "its prior uncertainty dwarfs the trained LLMs'"
    assert "newcomer" not in greedy
    newcomer_sigma = [c.uncertainty for c in router.route([CODE])[0].candidates if c.llm == "newcomer"][0]
    trained_sigma = [c.uncertainty for c in router.route([CODE])[0].candidates if c.llm == "coder"][0]
    assert newcomer_sigma > 3 * trained_sigma
    router.remove_llm("strong")
    assert all(d.llm != "strong" for d in router.route(queries * 3, lambda_=0.0))
    assert "strong" not in [c.llm for c in router.route([CODE])[0].candidates]
    with pytest.raises(RoutingError, match="not in the pool"):
        router.remove_llm("strong")
    with pytest.raises(RoutingError, match="already in the pool"):
        router.add_llm("coder", 0.1, 0.1)


def test_apply_catalogue_adds_disables_and_reprices(fitted):
    router = copy.deepcopy(fitted)
    config = small_config()
    catalogue = [llm.model_copy(update={"enabled": llm.name != "coder"}) for llm in config.llms]
    from mixllm.config import LLMConfig

    catalogue.append(LLMConfig(name="fresh", input_usd_per_1k=0.002, output_usd_per_1k=0.002))
    changes = router.apply_catalogue(catalogue)
    assert sorted(changes) == ["added fresh", "disabled coder"]
    assert "coder" not in router.enabled_llms_ and "fresh" in router.enabled_llms_
    assert router.apply_catalogue(catalogue) == [], "applying the same catalogue twice changes nothing"


# -------------------------------------------------------------------------------- persistence


def test_save_load_routes_identically(fitted, tmp_path):
    fitted.save(tmp_path / "router")
    loaded = MixLLMRouter.load(tmp_path / "router", progress=False)
    queries = [CODE, MATH, HISTORY, "Which empire built the great wall?"]
    for lam in (0.0, 0.3, 10.0):
        assert [d.to_dict() for d in fitted.route(queries, lambda_=lam)] == [d.to_dict() for d in loaded.route(queries, lambda_=lam)]
    manifest = json.loads((tmp_path / "router/router.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and set(manifest["catalogue"]) == set(LLMS)
    X = fitted.features(queries)
    assert np.array_equal(loaded.difficulty(X), fitted.difficulty(X)) and fitted.difficulty_model_ is not None
    assert not list((tmp_path / "router").rglob("*.pkl")), "plain formats only"


def test_load_rejects_incomplete_or_foreign_folders(fitted, tmp_path):
    with pytest.raises(ModelFormatError, match="router.json is missing"):
        MixLLMRouter.load(tmp_path)
    folder = fitted.save(tmp_path / "r")
    manifest = json.loads((folder / "router.json").read_text())
    (folder / "router.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ModelFormatError, match="format 99"):
        MixLLMRouter.load(folder)
    (folder / "router.json").write_text(json.dumps(manifest))
    next((folder / "predictors").glob("*.npz")).unlink()
    with pytest.raises(ModelFormatError, match="is missing"):
        MixLLMRouter.load(folder)


def test_a_loaded_router_checks_its_encoder_against_the_vectors_saved_with_it(fitted, tmp_path, caplog):
    """A router keeps its encoder's vectors for fixed probe sentences from where it was saved; loaded
    elsewhere, it embeds them again and says how far apart they are (here: the same machine, so equal;
    planted: vectors another machine's arithmetic moved, which an update saved elsewhere keeps)."""
    from mixllm.core.encoder_check import PROBES_FILE, PROBE_SENTENCES

    assert fitted.check_encoder() is None, "a router fitted here has nothing saved to compare with"
    folder = fitted.save(tmp_path / "router")
    loaded = MixLLMRouter.load(folder, progress=False)
    same = loaded.check_encoder()
    assert same["probes"] == len(PROBE_SENTENCES) and same["same_encoder"]
    assert same["min_cosine"] >= 0.99999 and same["max_abs_diff"] < 1e-4
    assert loaded.describe()["encoder"]["check"] == same
    # Another machine's vectors: each moved a little off the saved direction.
    with np.load(folder / PROBES_FILE) as data:
        vectors, fingerprint, sentences = data["vectors"], data["fingerprint"], data["sentences"]
    noise = np.random.default_rng(0).normal(scale=0.05, size=vectors.shape).astype(np.float32)
    moved = (vectors + noise) / np.linalg.norm(vectors + noise, axis=1, keepdims=True)
    np.savez(folder / PROBES_FILE, vectors=moved, fingerprint=fingerprint, sentences=sentences)
    elsewhere = MixLLMRouter.load(folder, progress=False).check_encoder()
    expected = float(np.min(np.sum(moved * vectors, axis=1)))
    assert elsewhere["min_cosine"] == pytest.approx(expected, abs=1e-4) and elsewhere["min_cosine"] < 0.999
    # The service says so when it loads such a model (and serves it all the same).
    from types import SimpleNamespace

    from mixllm.service.model_lifecycle import ModelLifecycle

    with caplog.at_level("INFO", logger="bentoml.mixllm"):
        ModelLifecycle._check_encoder(SimpleNamespace(config=fitted.config), MixLLMRouter.load(folder), 7)
        ModelLifecycle._check_encoder(SimpleNamespace(config=fitted.config), loaded, 8)
    assert "version 7: the encoder embeds differently here than where the model was saved" in caplog.text
    assert "version 8: the encoder embeds as where it was saved (lowest cosine" in caplog.text
    # A router updated and saved again (continual learning) keeps the training machine's vectors.
    resaved = MixLLMRouter.load(folder, progress=False).save(tmp_path / "updated")
    with np.load(resaved / PROBES_FILE) as data:
        np.testing.assert_array_equal(data["vectors"], moved)
    # Vectors of other probe sentences (a later mixllm's) or an unreadable file: nothing to compare,
    # and the router loads as before; so does one saved before the check.
    np.savez(folder / PROBES_FILE, vectors=vectors, fingerprint=fingerprint, sentences=np.array("other"))
    assert MixLLMRouter.load(folder, progress=False).check_encoder() is None
    (folder / PROBES_FILE).write_bytes(b"not an npz file")
    assert MixLLMRouter.load(folder, progress=False).check_encoder() is None
    (folder / PROBES_FILE).unlink()
    assert MixLLMRouter.load(folder, progress=False).check_encoder() is None


# -------------------------------------------------------------------------------- LLM tagger


class _StubLLM(BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self):  # noqa: N802 - http.server API
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        query = body["messages"][0]["content"].split("Query:")[-1]
        tags = ["coding", "python"] if "python" in query else ["history"]
        payload = json.dumps({"choices": [{"message": {"content": json.dumps(tags)}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_llm_tagger_against_a_local_stub_with_cache(tmp_path):
    server = HTTPServer(("127.0.0.1", 0), _StubLLM)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        tagger = LLMTagger(base_url=url, cache_dir=tmp_path / "cache", top_k=3).fit([])
        tags = tagger.transform([CODE, HISTORY])
        assert tags == [[("coding", 1.0), ("python", 1.0)], [("history", 1.0)]]
        calls = _StubLLM.calls
        again = LLMTagger(base_url=url, cache_dir=tmp_path / "cache", top_k=3).fit([]).transform([CODE, HISTORY])
        assert again == tags and _StubLLM.calls == calls, "the second run is served from the on-disk cache"
    finally:
        server.shutdown()


def test_parse_tag_list_accepts_loose_answers():
    assert parse_tag_list('Sure! ["Math", "Algebra"]') == ["math", "algebra"]
    assert parse_tag_list("math, algebra\n- geometry") == ["math", "algebra", "geometry"]


def test_feedback_without_a_cost_teaches_quality_only(fitted):
    router = copy.deepcopy(fitted)
    before = router.predict([CODE, MATH])
    j = before.llms.index("coder")
    unpriced = pd.DataFrame({"query": [CODE] * 5, "llm": ["coder"] * 5, "quality": [0.0] * 5,
                             "cost_usd": [np.nan] * 5})
    router.partial_fit(unpriced)
    after = router.predict([CODE, MATH])
    assert after.quality[0, j] < before.quality[0, j], "the quality model learned"
    assert np.array_equal(after.cost_usd[:, j], before.cost_usd[:, j]), "an unknown cost is not learned as $0"
    with pytest.raises(RoutingError, match="non-finite"):
        router.partial_fit(unpriced.assign(cost_usd=np.inf))
    with pytest.raises(RoutingError, match="non-finite"):
        router.partial_fit(unpriced.assign(quality=np.nan, cost_usd=0.001))


def test_a_calibrated_lambda_of_zero_is_kept(fitted):
    router = copy.deepcopy(fitted)
    router.config = router.config.model_copy(
        update={"decision": router.config.decision.model_copy(update={"lambda_": None})})
    router.calibrated_lambda_ = 0.0
    assert router.default_lambda == 0.0
    del router.calibrated_lambda_
    assert router.default_lambda == 1.0, "nothing calibrated and nothing configured: 1"


@pytest.mark.slow
def test_int8_encoder_is_close_to_fp32_and_round_trips(tmp_path):
    queries = [CODE, MATH, HISTORY, "Translate 'good morning' into French."]
    exact = QueryEncoder(max_seq_length=32, fine_tune=False).fit(queries)
    int8 = QueryEncoder(max_seq_length=32, fine_tune=False, quantize="int8").fit(queries)
    a, b = exact.transform(queries), int8.transform(queries)
    cosine = (a * b).sum(axis=1)
    assert not np.array_equal(a, b), "int8 really runs"
    assert cosine.min() > 0.85, cosine
    assert exact.fingerprint_ != int8.fingerprint_, "cached fp32 embeddings are never served as int8"
    int8.save(tmp_path / "encoder")
    loaded = QueryEncoder.load(tmp_path / "encoder")
    assert loaded.quantize == "int8" and np.allclose(loaded.transform(queries), b, atol=1e-5)


# ------------------------------------------------------------------- task labels and newcomers


def test_a_task_label_places_the_query_in_its_domain(fitted):
    assert fitted.tasks_ == ["code", "history", "math"], "the log's sources are the domains"
    ambiguous = "Tell me about it."
    as_history = fitted.route([ambiguous], lambda_=0.5, tasks=["history"])[0]
    as_code = fitted.route([ambiguous], lambda_=0.5, tasks=["code"])[0]
    assert as_history.llm == "cheap-chat" and as_code.llm == "coder", "the planted skills of each domain decide"
    assert not as_history.notes
    unknown = fitted.route([ambiguous], lambda_=0.5, tasks=["poetry"])[0]
    assert unknown.notes and "poetry" in unknown.notes[0] and "code, history, math" in unknown.notes[0]
    assert unknown.llm == fitted.route([ambiguous], lambda_=0.5)[0].llm, "an unknown task is routed by the text"
    with pytest.raises(RoutingError, match="one .or None. per query"):
        fitted.route([CODE, MATH], tasks=["code"])


def test_an_optimistic_newcomer_starts_as_the_best_llm_at_its_price(fitted):
    router = copy.deepcopy(fitted)
    router.add_llm("rival", PRICE_PER_1K["coder"], PRICE_PER_1K["coder"])
    table = router.domain_model_.table_
    columns = {llm: router.domain_model_.llms_.index(llm) for llm in ("cheap-chat", "coder", "rival")}
    best_affordable = np.maximum(table[:, columns["cheap-chat"]], table[:, columns["coder"]])
    assert np.allclose(table[:, columns["rival"]], best_affordable), "never below what its price already buys"
    assert set(router.anchors_["rival"]["llms"]) == {"cheap-chat", "coder", "strong"}
    # Priced the way the log's costs were made: at the coder's list price, about the coder's dollars.
    rival_cost, coder_cost = router.cost_models_["rival"].prior_cost_usd, router.cost_models_["coder"].prior_cost_usd
    assert rival_cost == pytest.approx(coder_cost, rel=0.25)


def test_a_newcomer_dearer_than_every_llm_starts_at_break_even_and_takes_its_share(fitted):
    """Planted: 'strong' (right 90-95% of the time everywhere, 10x the coder's price) leaves the pool and
    joins again with a prior only. Optimistic alone, it would be the coder's 0.5 in math at ten times
    the cost: never chosen, though the full pool sends it every math query at this lambda. At
    break-even it is tried, its answers confirm it, and it takes about the full pool's share."""
    from mixllm.evaluation.baselines import query_frame
    from mixllm.evaluation.evaluate import Outcomes
    from mixllm.evaluation.simulate import PoolEvent, simulate_online
    from synthetic import make_log

    stream = make_log(90, seed=5)
    queries = query_frame(stream)
    outcomes = Outcomes.from_log(stream, queries["query_id"], fitted.llms_)
    math = stream.drop_duplicates("query_id").set_index("query_id").loc[queries["query_id"], "source"].eq("math").to_numpy()
    lambda_, price = 0.3, PRICE_PER_1K["strong"]
    full = np.array(simulate_online(fitted, queries, outcomes, lambda_=lambda_).choices) == "strong"
    assert full[math].mean() > 0.9, "the planted setting: the full pool sends math to strong"

    unknown = copy.deepcopy(fitted)  # no lambda known (none configured, none calibrated): optimistic
    unknown.remove_llm("strong")
    unknown.add_llm("strong", price, price)
    table, column = unknown.domain_model_.table_, unknown.domain_model_.llms_.index("strong")
    pool = [unknown.domain_model_.llms_.index(llm) for llm in ("cheap-chat", "coder")]
    assert np.allclose(table[:, column], table[:, pool].max(axis=1)), "the best pool LLM's quality"
    stuck = np.array(simulate_online(unknown, queries, outcomes, lambda_=lambda_).choices) == "strong"
    assert not stuck.any(), "priced out of every argmax: never tried"

    rejoined = copy.deepcopy(fitted)
    rejoined.remove_llm("strong")
    events = [PoolEvent(0, "add", "strong", (price, price))]  # simulate_online tells add_llm its lambda
    tried = np.array(simulate_online(rejoined, queries, outcomes, lambda_=lambda_, events=events).choices) == "strong"
    assert tried[math].mean() > 0.7, "tried where it pays, and kept there by its answers"
    assert abs(tried.mean() - full.mean()) < 0.1, "about the full pool's share"
    assert tried[~math].mean() < 0.3, "not where the cheaper LLMs do as well"
    with pytest.raises(RoutingError, match=r"lambda_ must be a (finite )?number >= 0"):
        copy.deepcopy(rejoined).add_llm("premium", price, price, lambda_=-1.0)


def test_a_newcomers_prior_cost_prices_input_and_output_tokens_apart(fitted):
    router = copy.deepcopy(fitted)
    # A pool whose typical query is 400 input and 50 output tokens, priced at different
    # input:output ratios (as real catalogues are): each LLM's logged dollars follow from them.
    prices = {"cheap-chat": (0.0005, 0.0015), "coder": (0.002, 0.002), "strong": (0.01, 0.03)}
    for llm, (input_price, output_price) in prices.items():
        router.catalogue_[llm].update(input_usd_per_1k=input_price, output_usd_per_1k=output_price)
        router.cost_models_[llm].prior_cost_usd = 0.4 * input_price + 0.05 * output_price
    router.add_llm("long-answers", 0.001, 0.02)  # output 20x dearer than input
    expected = 0.4 * 0.001 + 0.05 * 0.02
    assert router.cost_models_["long-answers"].prior_cost_usd == pytest.approx(expected, rel=0.02)
    # The test tells the rules apart: one price per LLM (input + output) says about twice as much.
    per_summed_price = np.median([(0.4 * i + 0.05 * o) / (i + o) for i, o in prices.values()]) * 0.021
    assert per_summed_price > 1.8 * expected


def test_a_newcomer_keeps_its_resemblance_anchors_through_pool_changes_and_saving(fitted, tmp_path):
    from mixllm.core.router import MixLLMRouter
    from synthetic import make_log

    router = copy.deepcopy(fitted)
    router.add_llm("twin", PRICE_PER_1K["coder"], PRICE_PER_1K["coder"])
    answered = make_log(n_queries=60, seed=5).query("llm == 'coder'").head(20).assign(llm="twin")
    router.partial_fit(answered)
    queries = [CODE, MATH, HISTORY]
    before = router.predict(queries)
    # The anchors are a frozen copy: an anchor leaving the pool does not change the newcomer.
    router.remove_llm("coder")
    after = router.predict(queries)
    j_before, j_after = before.llms.index("twin"), after.llms.index("twin")
    assert np.allclose(before.quality[:, j_before], after.quality[:, j_after])
    router.save(tmp_path / "router")
    loaded = MixLLMRouter.load(tmp_path / "router", progress=False)
    assert loaded.anchors_["twin"]["llms"] == ["cheap-chat", "coder", "strong"]
    assert np.array_equal(loaded.predict(queries).quality, after.quality)
    loaded.partial_fit(answered.head(3))  # and it keeps learning after a reload
    assert loaded.quality_models_["twin"].n_samples_seen_ == 23


def _with_newcomer_ridge(router, ridge):
    from mixllm.jobs.training import ablation_config

    router.config = ablation_config(router.config, predictors__quality__new_llm_prior_ridge=ridge)
    return router


def test_a_newcomers_prior_is_as_large_as_the_trained_heads_are(fitted):
    """Empirical Bayes (new_llm_prior_ridge null): the prior precision is the trained heads' residual
    variance over their mean squared coefficient, never weaker than their own ridge."""
    trained = fitted.llms_
    coef = np.vstack([fitted.quality_models_[llm].model_.coef_[:-1] for llm in trained])
    variance = np.mean([fitted.residual_variance_[llm] for llm in trained])
    assert 0 < variance < 0.25, "0/1-like outcomes: a residual variance below a coin's"
    router = copy.deepcopy(fitted)
    router.add_llm("rival", PRICE_PER_1K["coder"], PRICE_PER_1K["coder"])
    assert router.quality_models_["rival"].ridge == pytest.approx(max(variance / np.mean(coef**2), fitted.ridge_))
    assert router.quality_models_["rival"].ridge > 10 * fitted.ridge_, "heads are small next to their GCV ridge"


def test_one_wrong_answer_does_not_silence_a_newcomer(fitted):
    """A newcomer's head starts from the pool's empirical-Bayes prior (new_llm_prior_ridge null): its
    first wrong answer lowers its predictions a little, and it stays a candidate. Under a weak prior
    the head fits that one answer almost exactly, and since different queries' features are alike,
    its predicted quality falls for every query: it would never be tried again."""
    queries = [CODE, MATH, HISTORY]
    wrong = pd.DataFrame({"query": [CODE], "llm": ["rival"], "quality": [0.0], "cost_usd": [0.001]})
    drops = {}
    for ridge in (fitted.config.predictors.quality.new_llm_prior_ridge, 1.0):
        router = _with_newcomer_ridge(copy.deepcopy(fitted), ridge)
        router.add_llm("rival", PRICE_PER_1K["coder"], PRICE_PER_1K["coder"])
        j = router.llms_.index("rival")
        before = router.predict(queries).quality[:, j]
        router.partial_fit(wrong)
        drops[ridge] = before - router.predict(queries).quality[:, j]
    default, weak = drops[fitted.config.predictors.quality.new_llm_prior_ridge], drops[1.0]
    assert np.all(default >= 0) and default.max() < 0.1, "one answer is one answer"
    assert weak[0] > 0.5 and weak[1:].max() > 0.2, "the weak prior's collapse, also on a query it never answered"


def test_a_newcomer_the_prices_underrate_learns_its_level_in_that_domain(fitted):
    """Planted: a newcomer at the cheap LLM's price (so its prior is the cheap LLM's: 0.15 in math)
    that answers every math query right. With newcomer_domain_answers N its math level moves about
    n / (n + N) of the way after n answers there; the domain block takes the signal, so its code
    predictions move less than under the empirical-Bayes head alone, whose shared inputs carry it
    everywhere (on this log that head learns 0.48 in math and 0.36 in code; N = 20: 0.66 and 0.19)."""
    from mixllm.jobs.training import ablation_config
    from synthetic import make_log

    assert fitted.config.predictors.quality.newcomer_domain_answers is not None, "on by default"
    shown = make_log(n_queries=120, seed=3).query("llm == 'coder' and source == 'math'").head(40)
    shown = shown.assign(llm="rival", quality=1.0)
    rises, before = {}, {}
    for answers in (20.0, None):
        router = copy.deepcopy(fitted)
        router.config = ablation_config(router.config, predictors__quality__newcomer_domain_answers=answers)
        router.add_llm("rival", PRICE_PER_1K["cheap-chat"], PRICE_PER_1K["cheap-chat"])
        j = router.llms_.index("rival")
        before[answers] = router.predict([MATH, CODE]).quality[:, j]
        router.partial_fit(shown)
        rises[answers] = router.predict([MATH, CODE]).quality[:, j] - before[answers]
    gap = 1.0 - before[20.0][0]
    assert rises[20.0][0] >= 0.8 * len(shown) / (len(shown) + 20.0) * gap, "the math level moved as promised"
    assert rises[20.0][0] > 1.2 * rises[None][0], "the empirical-Bayes head alone learns it more slowly"
    assert rises[20.0][1] < 0.7 * rises[None][1], "and spreads it to code, where the newcomer was not shown"
    selective = rises[20.0][0] / rises[20.0][1]
    assert selective > 2 * rises[None][0] / rises[None][1], "the lesson stays in the domain it was shown in"


# ------------------------------------------------------------------------- shared difficulty


def _log_with_planted_difficulty(n_queries: int, seed: int) -> pd.DataFrame:
    """Every LLM's topic skill, and in every topic a hard kind of query that all LLMs get right
    three times less often: a difficulty the LLMs share, which no topic lookup can see."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, (topic, skills) in enumerate([(t, {llm: SKILL[llm][t] for llm in SKILL}) for t in TOPICS] * n_queries):
        if i >= n_queries:
            break
        hard = bool(rng.random() < 0.5)
        template = TOPICS[topic][rng.integers(len(TOPICS[topic]))].format(
            a=rng.integers(2, 99), b=rng.integers(2, 99), c=rng.integers(100, 999))
        query = template + (HARD_SUFFIX if hard else "")
        for llm, skill in skills.items():
            rows.append({"query_id": f"{topic}-{i}", "query": query, "llm": llm, "source": topic,
                         "quality": float(rng.random() < skill * (0.3 if hard else 1.0)),
                         "cost_usd": PRICE_PER_1K[llm] * 0.02})
    return pd.DataFrame(rows)


HARD_SUFFIX = " Give a rigorous proof, handle every edge case and cite primary sources."


def test_departures_ignore_what_every_llm_shares():
    rng = np.random.default_rng(0)
    residual = rng.normal(size=(50, 4))
    shifted = residual + rng.normal(size=(50, 1)) * 10  # a per-query shift common to every LLM
    assert np.allclose(departures(shifted), departures(residual))
    assert np.allclose(np.nansum(departures(residual), axis=1), 0.0)
    residual[0, 1:] = np.nan  # one LLM answered: nothing to compare it with
    residual[1, 2] = np.nan  # three did: their departures from their own mean
    result = departures(residual)
    assert np.isnan(result[0]).all()
    assert np.allclose(result[1, [0, 1, 3]], residual[1, [0, 1, 3]] - residual[1, [0, 1, 3]].mean())


def test_the_shared_difficulty_head_finds_a_difficulty_no_topic_shows_and_newcomers_inherit_it():
    log = _log_with_planted_difficulty(240, seed=3)
    easy = ["What is 12 plus 30?", "Write a python function to reverse a string of length 9.",
            "When did the Roman Republic fall?"]
    hard = [query + HARD_SUFFIX for query in easy]
    gaps = {}
    for shared in (True, False):
        config = small_config(predictors__quality={"ridge": None, "shared_difficulty": shared})
        router = MixLLMRouter(config, progress=False).fit(log)
        if shared:
            X_easy, X_hard = router.features(easy), router.features(hard)
            # Planted: hard queries are answered right 0.3x as often: 0.37-0.49 less, by topic.
            found = router.difficulty(X_easy) - router.difficulty(X_hard)
            assert found.min() > 0.1 and found.mean() > 0.25, found
        else:
            assert router.difficulty_model_ is None
        router.add_llm("rival", PRICE_PER_1K["coder"], PRICE_PER_1K["coder"])
        j = router.llms_.index("rival")
        gaps[shared] = router.predict(easy).quality[:, j] - router.predict(hard).quality[:, j]
    # A newcomer has no answers yet: only the shared head can tell it that hard queries are hard.
    assert gaps[True].min() > 0.1 and gaps[True].mean() > 0.2, gaps
    assert np.abs(gaps[False]).max() < 0.05, gaps


def test_the_featurizers_tfidf_block_is_sklearns_tfidf_projected_on_the_svd_components():
    from sklearn.feature_extraction.text import TfidfVectorizer

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "python", "code", "sum", "river", "bank", "loan"]
    train = [" ".join(rng.choice(words, size=rng.integers(3, 30))) for _ in range(60)]
    featurizer = QueryFeaturizer(svd_components=5, tfidf_min_df=2).fit(train, rng.normal(size=(60, 4)))
    # Repeated terms (sublinear tf), bigrams, unknown words only (no TF-IDF at all), mixed case.
    queries = ["alpha alpha alpha beta code", "Python CODE sum; river-bank loan", "zeta eta theta", "", train[3]]
    embeddings = rng.normal(size=(len(queries), 4))
    reference = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, vocabulary=featurizer.tfidf_vocabulary_)
    reference.idf_ = featurizer.tfidf_idf_
    tfidf = np.asarray(reference.transform(queries) @ featurizer.svd_components_.T)
    raw = np.hstack([embeddings, length_features(queries), tfidf])
    expected = (raw - featurizer.mean_) / featurizer.scale_ / np.sqrt(featurizer.n_features_out_)
    assert np.abs(tfidf[0]).sum() > 0 and not tfidf[2].any()  # the check compares real numbers
    np.testing.assert_allclose(featurizer.transform(queries, embeddings), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ngram_max", [1, 2, 3])
def test_the_featurizers_own_tokenizer_gives_sklearns_terms(ngram_max):
    """Routing tokenizes without scikit-learn; its terms must be the ones TF-IDF was fitted on."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from mixllm.core.features import word_ngrams

    texts = ["Python CODE sum; river-bank loan", "a I x_y 3.14 2+2=4", "Ünïcödé FAÇADE naïve café", "中文的问题 是什么",
             "tab\tand\x0bvertical\nnew line", "", "one", "it's don't e-mail co-op", "  spaced   out  ", "ΣΊΣΥΦΟΣ Straße"]
    analyzer = TfidfVectorizer(ngram_range=(1, ngram_max)).build_analyzer()
    for text in texts:
        assert word_ngrams(text, ngram_max) == analyzer(text), text


def test_estimators_keep_sklearns_parameter_protocol_without_importing_it():
    from sklearn.base import clone

    predictor = QualityPredictor(kind="bayesian_linear", ridge=7.0)
    assert predictor.get_params()["ridge"] == 7.0 and "ridge=7.0" in repr(predictor)
    copy_ = clone(predictor)
    assert copy_ is not predictor and copy_.get_params() == predictor.get_params()
    assert predictor.set_params(ridge=3.0) is predictor and predictor.ridge == 3.0
    with pytest.raises(ValueError, match="has no parameter 'ridg'"):
        predictor.set_params(ridg=1.0)


def test_a_service_start_loads_routes_and_logs_without_importing_scikit_learn_scipy_or_pandas(train_log, tmp_path):
    """What a service start does (open the decision log, the tenant ledger and the sessions, load
    the router, route, log the decision) imports none of them: importing scikit-learn (and
    scipy.stats with it) took 1.2-1.8 s of a served model's start, pandas 0.6 s."""
    import subprocess
    import sys

    router = MixLLMRouter(small_config(embedding__backend="static", embedding__static_dims=32),
                          progress=False).fit(train_log)
    router.save(tmp_path / "router")
    queries = [CODE, MATH, HISTORY]
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    check = ("import json, sys; from mixllm.core.router import MixLLMRouter; from mixllm.io.store import InteractionLog; "
             "from mixllm.io.ledger import TenantLedger; from mixllm.io.sessions import SessionLog; "
             f"store = InteractionLog({url!r}); TenantLedger(store); SessionLog(store, ttl_s=60); "
             f"router = MixLLMRouter.load({str(tmp_path / 'router')!r}, progress=False); "
             f"decisions = router.route({queries!r}); "
             "store.log_decisions([{'query': 'q', 'llm': d.llm, 'model_version': 1, 'lambda_': d.lambda_, "
             "'candidates': [], 'propensity': 1.0} for d in decisions]); "
             "print(json.dumps([d.llm for d in decisions])); "
             "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'scipy', 'torch', 'pandas'})))")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout.splitlines()
    assert json.loads(out[-2]) == [d.llm for d in router.route(queries)]
    assert json.loads(out[-1]) == []


def _plain_and_doubled_featurizers(seed: int):
    """Training texts and embeddings, with featurizers fitted on them at TF-IDF weight 1 and 2."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "python", "code", "sum", "river"]
    train = [" ".join(rng.choice(words, size=rng.integers(3, 20))) for _ in range(40)]
    embeddings = rng.normal(size=(40, 3))
    plain = QueryFeaturizer(svd_components=4).fit(train, embeddings)
    doubled = QueryFeaturizer(svd_components=4, tfidf_weight=2.0).fit(train, embeddings)
    return train, embeddings, plain, doubled


def test_the_tfidf_weight_scales_the_standardised_tfidf_block_and_nothing_else():
    train, embeddings, plain, doubled = _plain_and_doubled_featurizers(1)
    a, b = plain.transform(train, embeddings), doubled.transform(train, embeddings)
    np.testing.assert_allclose(b[:, -4:], 2.0 * a[:, -4:])  # (standardising used to cancel the weight)
    np.testing.assert_allclose(b[:, :-4], a[:, :-4])
    assert np.abs(a[:, -4:]).sum() > 0


def test_a_featurizer_saved_when_the_tfidf_weight_cancelled_out_loads_as_it_was_trained(tmp_path):
    train, embeddings, plain, doubled = _plain_and_doubled_featurizers(2)
    doubled.save(tmp_path / "new")
    np.testing.assert_allclose(QueryFeaturizer.load(tmp_path / "new").transform(train, embeddings),
                               doubled.transform(train, embeddings))
    doubled.save(tmp_path / "old")
    meta_path = tmp_path / "old" / "featurizer.json"
    meta = json.loads(meta_path.read_text())
    del meta["tfidf_weight_applied"]  # as saved before the weight took effect
    meta_path.write_text(json.dumps(meta))
    old = QueryFeaturizer.load(tmp_path / "old")
    assert old.tfidf_weight == 1.0
    np.testing.assert_allclose(old.transform(train, embeddings), plain.transform(train, embeddings))
