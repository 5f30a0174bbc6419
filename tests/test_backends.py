"""Encoder backends: the static (model2vec) and ONNX encoders, and training's choice between backends."""

from __future__ import annotations

import numpy as np
import pytest

from mixllm.core.embeddings import QueryEncoder
from mixllm.core.errors import ModelFormatError
from mixllm.core.router import MixLLMRouter
from mixllm.io.workspace import SplitData
from mixllm.jobs.backend_choice import backend_loss_bounds, choose_backend
from synthetic import make_log, small_config

QUERIES = ["What is 12 plus 30?", "Write a python function to reverse a string.", "When did Rome fall?"]


@pytest.fixture(scope="module")
def static_encoder():
    return QueryEncoder(fine_tune=False, max_seq_length=8, backend="static", static_dims=64).fit(QUERIES)


def test_static_encoder_embeds_unit_vectors_of_its_dimension(static_encoder):
    vectors = static_encoder.transform(QUERIES + [""])
    assert vectors.shape == (4, 64) and static_encoder.dim_ == 64
    np.testing.assert_allclose(np.linalg.norm(vectors[:3], axis=1), 1.0, rtol=1e-5)
    assert not vectors[3].any()  # no tokens: the zero vector, not NaN
    # Related queries sit closer than unrelated ones.
    code = static_encoder.transform(["Write a python function to sort a list."])[0]
    assert code @ vectors[1] > code @ vectors[2]


def test_static_encoder_keeps_the_end_of_a_long_query_when_truncating_left(static_encoder):
    prefix = "Answer the question below carefully, showing each step of the reasoning you use. " * 3
    a, b = prefix + "Who built the pyramids?", prefix + "Write python code to parse JSON."
    left = static_encoder.transform([a, b])
    assert left[0] @ left[1] < 0.95  # the questions differ, and only they are kept
    right = QueryEncoder(**{**static_encoder.get_params(), "truncation_side": "right"})
    right.model_, right.dim_, right.fine_tuned_, right.n_triplets_ = static_encoder.model_, 64, False, 0
    right.static_, right.fingerprint_ = static_encoder.static_, "right"
    same = right.transform([a, b])
    assert same[0] @ same[1] == pytest.approx(1.0, abs=1e-5)  # both cut to the shared prefix


def _mean_of_kept_tokens(encoder, query):
    """The static vector by definition: tokenise the whole query, keep the window, average."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(encoder.static_.tokenizer.to_str())
    tokenizer.no_truncation()
    ids = [i for i in tokenizer.encode(query, add_special_tokens=False).ids if i != encoder.static_.unk_token_id]
    ids = ids[-encoder.max_seq_length:] if encoder.truncation_side == "left" else ids[:encoder.max_seq_length]
    vector = encoder.static_.embedding[ids].astype(np.float32).mean(axis=0)
    return vector / np.linalg.norm(vector)


@pytest.mark.parametrize("side", ["left", "right"])
def test_cutting_a_long_query_before_tokenising_keeps_exactly_the_same_tokens(static_encoder, side):
    encoder = QueryEncoder(**{**static_encoder.get_params(), "truncation_side": side})
    encoder.model_, encoder.dim_, encoder.fine_tuned_, encoder.n_triplets_ = static_encoder.model_, 64, False, 0
    encoder.static_, encoder.fingerprint_ = static_encoder.static_, side
    long_queries = [
        "Q: what is the capital of France?\nA: Paris.\n\n" * 20 + "Q: who wrote Hamlet?\nA:",
        "word " * 200 + "x" * 150 + " tail end",  # a 150-character word: BERT reads it as unknown
        "a\t" * 40 + "zzzzzzzzzz " * 3,  # few tokens per character near the cut
        " " * 400 + "only three words",  # the cut holds fewer tokens than the window: whole query
        "one two three " * 250 + " " * 400 + "the end",  # ... and the whole query is over 512 tokens
        "Überprüfung der Daten,\r\nbitte! " * 30,
    ]
    assert all(len(query) > encoder.max_seq_length * 8 for query in long_queries)  # each one is cut
    vectors = encoder.transform(long_queries)
    for query, vector in zip(long_queries, vectors):
        np.testing.assert_allclose(vector, _mean_of_kept_tokens(encoder, query), rtol=1e-6, atol=1e-7)


def test_the_static_encoder_reads_the_end_of_a_query_longer_than_512_tokens(static_encoder):
    # model2vec's tokenizer stops at 512 tokens: the end of a longer query was never read.
    prefix = "Question: name a prime number. Answer: seven. " * 80  # ~800 tokens
    a, b = prefix + "Who built the pyramids?", prefix + "Write python code to parse JSON."
    vectors = static_encoder.transform([a, b])
    assert vectors[0] @ vectors[1] < 0.95


def test_static_encoder_round_trips_without_loading_the_transformer(static_encoder, tmp_path):
    static_encoder.save(tmp_path / "encoder")
    loaded = QueryEncoder.load(tmp_path / "encoder")
    assert loaded._model is None  # routing needs only the static vectors
    np.testing.assert_array_equal(loaded.transform(QUERIES), static_encoder.transform(QUERIES))
    assert loaded.fingerprint_ == static_encoder.fingerprint_
    assert loaded.model_ is not None and loaded._model is not None  # the transformer loads on demand
    torch_encoder = static_encoder.with_settings(backend="torch")
    assert torch_encoder.transform(QUERIES).shape == (3, 384)
    assert torch_encoder.fingerprint_ != static_encoder.fingerprint_  # caches never mix backends


def test_an_encoder_saved_with_unknown_settings_is_refused_with_advice(static_encoder, tmp_path):
    import json

    static_encoder.save(tmp_path / "encoder")
    meta_path = tmp_path / "encoder" / "mixllm_encoder.json"
    meta = json.loads(meta_path.read_text())
    meta["params"]["warp_drive"] = True
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match="warp_drive.*upgrade, or retrain"):
        QueryEncoder.load(tmp_path / "encoder")
    meta["params"].pop("warp_drive")
    meta["params"]["max_pairs"] = meta["params"].pop("max_triplets")  # the setting's old name still loads
    meta_path.write_text(json.dumps(meta))
    assert QueryEncoder.load(tmp_path / "encoder").max_triplets == static_encoder.max_triplets


def test_a_faster_backend_that_wins_validation_by_noise_does_not_pass_for_free():
    rng = np.random.default_rng(0)
    slow = 0.96 + 0.004 * rng.standard_normal(1000)
    # Ahead by 0.002 on average but with a spread that makes a loss of 0.01 plausible.
    lucky = slow + 0.002 + 0.008 * rng.standard_normal(1000)
    # Ahead by 0.002 and never far behind: a confident tie.
    steady = slow + 0.002 + 0.0005 * rng.standard_normal(1000)
    speed = {"torch": 25.0, "static": 1.0}
    lucky_bounds = backend_loss_bounds({"torch": slow, "static": lucky}, speed, 0.95)
    steady_bounds = backend_loss_bounds({"torch": slow, "static": steady}, speed, 0.95)
    assert lucky_bounds["torch"] == steady_bounds["torch"] == 0.0  # the slowest loses nothing by definition
    assert lucky_bounds["static"] > 0.003 and steady_bounds["static"] < 0.0
    # With a third, middle backend the fastest must stay close to both slower ones.
    middle = slow - 0.02
    bounds = backend_loss_bounds({"torch": slow, "onnx": middle, "static": steady},
                                 {"torch": 25.0, "onnx": 10.0, "static": 1.0}, 0.95)
    assert bounds["onnx"] > 0.015 and bounds["static"] < 0.0


def test_backend_speeds_are_the_fastest_of_interleaved_rounds_so_a_busy_moment_does_not_pick():
    """The speed that ranks the backends is each one's fastest of several rounds, taken in turn:
    a single timing let a moment of load on the machine (another job, a test beside it) decide
    which backend a router serves (a leaderboard run picked fp32 over int8 that way)."""
    from mixllm.jobs.backend_choice import backend_speeds

    class Clock:
        now = 0.0

        def __call__(self):
            return self.now

    clock = Clock()

    class Router:
        def __init__(self, ms_per_query, busy_calls=()):
            self.ms_per_query, self.busy_calls, self.calls = ms_per_query, set(busy_calls), 0

        def route(self, texts):
            self.calls += 1
            slowdown = 5.0 if self.calls in self.busy_calls else 1.0  # the machine was busy for this call
            clock.now += slowdown * self.ms_per_query * len(texts) / 1000

    # int8 is faster, but its first timed pass (call 2: call 1 is the warm-up) ran while the machine was busy.
    routers = {"onnx": Router(30.0), "onnx-int8": Router(20.0, busy_calls={2})}
    speeds = backend_speeds(routers, ["a query"] * 40, rounds=3, sample=32, clock=clock)
    assert speeds == {"onnx": pytest.approx(30.0), "onnx-int8": pytest.approx(20.0)}
    single = backend_speeds({"onnx": Router(30.0), "onnx-int8": Router(20.0, busy_calls={2})}, ["a query"] * 40,
                            rounds=1, sample=32, clock=clock)
    assert single["onnx-int8"] > single["onnx"], "one round is at the mercy of the moment"


@pytest.mark.slow
def test_choose_backend_takes_the_faster_one_only_within_the_allowed_loss(static_encoder):
    config = small_config(embedding__max_aiq_loss=0.003, evaluation__bootstrap_resamples=200)
    train, validation = make_log(n_queries=150, seed=11), make_log(n_queries=90, seed=12)
    split = SplitData(train, validation, make_log(n_queries=30, seed=13))
    good = MixLLMRouter(config, progress=False).fit(train)
    # The static router learns from outcomes shuffled across queries: no signal, a planted loss.
    shuffled = train.copy()
    shuffled["quality"] = np.random.default_rng(0).permutation(shuffled["quality"].to_numpy())
    static = MixLLMRouter(config, progress=False)
    static.fit(shuffled, encoder=static_encoder)  # the module's (one distillation is ~8 s)
    choice = choose_backend(config, {"torch": good, "static": static}, split)
    figures = choice["candidates"]
    assert choice["best"] == "torch" and choice["chosen"] == "torch"
    assert figures["static"]["aiq_loss_bound"] > 0.003
    assert figures["static"]["ms_per_query"] < figures["torch"]["ms_per_query"]
    # Allow any loss and the faster backend wins.
    lenient = small_config(embedding__max_aiq_loss=10.0, evaluation__bootstrap_resamples=200)
    assert choose_backend(lenient, {"torch": good, "static": static}, split)["chosen"] == "static"


@pytest.mark.slow
def test_training_with_backend_auto_records_its_choice_for_mlflow_and_model(tmp_path, monkeypatch, caplog):
    from mixllm.config import load_config
    from mixllm.io.data import ingest
    from mixllm.io.workspace import Workspace, load_split
    from mixllm.jobs.training import run_stages
    from synthetic import write_params

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, embedding={"max_seq_length": 32, "backend": "auto", "static_dims": 64,
                                      "fine_tune": {"enabled": False}},
                 evaluation={"bootstrap_resamples": 200})
    config = load_config(tmp_path / "params.yaml")
    make_log(n_queries=150, seed=4).to_csv(tmp_path / "log.csv", index=False)
    ingest(tmp_path / "log.csv", config)
    run_stages(config, ["split", "tags", "encoder", "predictors"], progress=False)
    router = MixLLMRouter.load(Workspace.of(config).router)
    choice = router.describe()["encoder"]["backend_choice"]
    assert set(choice["candidates"]) == {"onnx", "onnx-int8", "static"}  # the transformer runs as ONNX, fp32 and int8
    served = config.embedding.auto_candidates()[choice["chosen"]]
    assert {"backend": router.encoder_.backend, "quantize": router.encoder_.quantize} == served
    assert router.describe()["encoder"]["backend"] == served["backend"]
    eligible = [name for name, c in choice["candidates"].items() if c["aiq_loss_bound"] <= 0.003]
    assert choice["chosen"] == min(eligible, key=lambda name: choice["candidates"][name]["ms_per_query"])
    from mixllm.jobs.report import evaluate_router

    metrics = evaluate_router(config, router, load_split(config), baselines=[], bootstrap=False).metrics
    assert metrics["backend.static.validation_aiq"] == pytest.approx(choice["candidates"]["static"]["validation_aiq"])

    # Where the export fails (an architecture the exporter cannot trace, say), the encoder stage saves
    # the weights alone, and auto runs the transformer on torch instead and says so (the transformer's
    # candidates only: the static one does not change, and distilling it again would take ~8 s).
    import mixllm.core.encoder_backends
    from mixllm.jobs.training import ablation_config, stage_encoder, stage_predictors

    def broken_export(model):
        raise RuntimeError("cannot trace this model")

    monkeypatch.setattr(mixllm.core.encoder_backends, "export_onnx", broken_export)
    stage_encoder(config, progress=False)
    assert not (Workspace.of(config).encoder / "onnx").exists()
    transformer_only = ablation_config(config, **{"embedding.auto_backends": ["onnx", "onnx-int8"]})
    with caplog.at_level("WARNING", logger="mixllm.jobs.training"):
        stage_predictors(transformer_only, progress=False)
    assert "ONNX export of the encoder failed (RuntimeError: cannot trace this model)" in caplog.text
    fallback = MixLLMRouter.load(Workspace.of(config).router).describe()["encoder"]["backend_choice"]
    assert set(fallback["candidates"]) == {"torch", "torch-int8"}
    assert fallback["candidates"]["torch"]["validation_aiq"] == pytest.approx(
        choice["candidates"]["onnx"]["validation_aiq"], abs=1e-3)  # the same transformer, run by torch


# Inputs where a tokenizer run outside transformers could part from it: whitespace at the ends, accents
# and CJK (normalised and split by BERT's tokenizer), a control character, nothing, and a text far past
# the window (kept from its end: truncation_side left).
AWKWARD = ["  padded with spaces  ", "Ünïcödé façade — naïve café", "中文的问题是什么", "tab\tand\x0bvertical", "",
           "count " * 300 + "the end?"]


def test_the_onnx_backend_embeds_as_the_transformer_does_and_loads_without_torch(static_encoder, tmp_path):
    import subprocess
    import sys

    transformer = static_encoder.with_settings(backend="torch", max_seq_length=16)
    exported = transformer.with_settings(backend="onnx")
    np.testing.assert_allclose(exported.transform(AWKWARD), transformer.transform(AWKWARD), atol=1e-5)
    assert exported.fingerprint_ != transformer.fingerprint_  # caches never mix backends
    # Exported again after the transformer has run, the graph and its tokenizer are the same:
    # cached embeddings stay valid (transformers keeps its last call's padding in its tokenizer).
    transformer.transform(AWKWARD)
    assert transformer.with_settings(backend="onnx").fingerprint_ == exported.fingerprint_
    # Another window reuses the graph (no second export) and cuts where the transformer cuts.
    wider = exported.with_settings(max_seq_length=64, batch_size=2)
    assert wider.onnx_.graph is exported.onnx_.graph
    np.testing.assert_allclose(wider.transform(AWKWARD), transformer.with_settings(max_seq_length=64).transform(AWKWARD),
                               atol=1e-5)
    exported.save(tmp_path / "encoder")
    check = ("import sys, numpy as np; from mixllm.core.embeddings import QueryEncoder; "
             f"e = QueryEncoder.load({str(tmp_path / 'encoder')!r}); v = e.transform({AWKWARD!r}); "
             f"np.save({str(tmp_path / 'v.npy')!r}, v); print(e.fingerprint_, "
             "sorted(m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == exported.fingerprint_ and out[1:] == ["[]"], out  # nothing heavy imported to route
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), exported.transform(AWKWARD))
    # Copies (simulate_online deep-copies its router) and pickles embed as the original does.
    import copy
    import pickle

    for duplicate in (copy.deepcopy(exported), pickle.loads(pickle.dumps(exported))):
        np.testing.assert_array_equal(duplicate.transform(AWKWARD), exported.transform(AWKWARD))


@pytest.fixture(scope="module")
def onnx_encoder(static_encoder):
    """The transformer exported once for the module's onnx tests (an export takes seconds)."""
    return static_encoder.with_settings(backend="onnx", max_seq_length=64)


def test_the_onnx_encoder_batches_queries_of_similar_length_and_returns_them_in_order(onnx_encoder):
    from mixllm.core.encoder_backends import OnnxEncoder

    shared = onnx_encoder.onnx_
    encoder = OnnxEncoder(shared.graph, shared.tokenizer_json, shared.input_names, 64, "left")  # its own session
    long_text, short_text = "count " * 100 + "the end?", "Hi?"
    texts = [long_text, short_text, long_text + " again", short_text + "!"]
    widths, run = [], encoder.session.run

    def recording_run(outputs, feeds):
        widths.append(feeds["input_ids"].shape[1])
        return run(outputs, feeds)

    encoder.session = type("Recording", (), {"run": staticmethod(recording_run)})()
    together = encoder.encode(texts, batch_size=2)
    # The two short queries share a batch, padded to a few tokens instead of the long ones' 64.
    assert sorted(widths) == [widths[0], 64] and widths[0] < 10, widths
    alone = np.vstack([encoder.encode([text], batch_size=2) for text in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)  # each row is its own text's vector

def test_auto_backends_name_each_candidates_encoder_settings():
    from pydantic import ValidationError

    from mixllm.config.learning import EmbeddingConfig

    assert EmbeddingConfig().auto_candidates() == {"onnx": {"backend": "onnx", "quantize": "none"},
                                                   "onnx-int8": {"backend": "onnx", "quantize": "int8"},
                                                   "static": {"backend": "static", "quantize": "none"}}
    # quantize int8 asks for int8 transformers: the fp32 candidate becomes its int8 variant, once.
    assert EmbeddingConfig(quantize="int8", auto_backends=["torch", "onnx", "onnx-int8", "static"]).auto_candidates() == {
        "torch-int8": {"backend": "torch", "quantize": "int8"}, "onnx-int8": {"backend": "onnx", "quantize": "int8"},
        "static": {"backend": "static", "quantize": "none"}}
    with pytest.raises(ValidationError, match="lists onnx more than once"):
        EmbeddingConfig(auto_backends=["onnx", "static", "onnx"])
    with pytest.raises(ValidationError, match="auto_backends"):
        EmbeddingConfig(auto_backends=["onnx", "openvino"])


@pytest.mark.slow
def test_int8_onnx_quantises_the_exported_graph_and_stays_close_to_fp32(onnx_encoder, tmp_path):
    fp32 = onnx_encoder
    int8 = fp32.with_settings(quantize="int8")
    assert int8.onnx_.graph is not fp32.onnx_.graph, "another graph, not the fp32 one with another name"
    assert len(int8.onnx_.graph) < 0.8 * len(fp32.onnx_.graph), "the MatMul weights are stored in int8"
    texts = QUERIES + AWKWARD[:-2] + ["Prove that the square root of two is irrational.",
                                      "Write a SQL query that lists the ten largest orders."]
    a, b = fp32.transform(texts), int8.transform(texts)
    cosine = (a * b).sum(axis=1)
    assert not np.allclose(a, b, atol=1e-4), "int8 really runs"
    assert cosine.min() > 0.9, cosine
    # The nearest neighbours are kept: int8 moves each query less than the queries lie apart.
    np.testing.assert_array_equal(np.argsort(-(b @ b.T), axis=1)[:, 1], np.argsort(-(a @ a.T), axis=1)[:, 1])
    assert len({fp32.fingerprint_, int8.fingerprint_}) == 2, "cached fp32 embeddings are never served as int8"
    int8.save(tmp_path / "encoder")
    loaded = QueryEncoder.load(tmp_path / "encoder")
    assert (loaded.backend, loaded.quantize, loaded.fingerprint_) == ("onnx", "int8", int8.fingerprint_)
    np.testing.assert_array_equal(loaded.transform(texts), b)
    back = loaded.with_settings(quantize="none")  # re-exported from the saved transformer
    np.testing.assert_allclose(back.transform(texts), a, atol=1e-5)


def test_inference_settings_change_how_the_weights_run_never_the_weights(static_encoder):
    transformer = static_encoder.with_settings(backend="torch")
    one_by_one = transformer.with_settings(batch_size=1)
    np.testing.assert_allclose(one_by_one.transform(QUERIES), transformer.transform(QUERIES), atol=1e-5)
    assert one_by_one.fingerprint_ == transformer.fingerprint_, "the batch size changes no embedding: caches stay valid"
    longer = transformer.with_settings(max_seq_length=16)
    assert (transformer.model_.max_seq_length, longer.model_.max_seq_length) == (8, 16), "a copy, not the shared model"
    assert longer.fingerprint_ != transformer.fingerprint_
    again = static_encoder.with_settings(batch_size=4)
    assert again.static_ is static_encoder.static_, "the same static vectors, not a second distillation"
    np.testing.assert_array_equal(again.transform(QUERIES), static_encoder.transform(QUERIES))
    with pytest.raises(ValueError, match="fine-tuned weights"):
        transformer.with_settings(epochs=3)
    with pytest.raises(ValueError, match="not QueryEncoder settings"):
        transformer.with_settings(batchsize=3)


def test_changing_an_inference_setting_keeps_the_fine_tuned_encoder_and_refits_the_router():
    from mixllm.jobs.training import stage_keys

    base = stage_keys(small_config())
    # (embedding.max_seq_length is one too, but the tags read up to 128 of its tokens, so it reaches the
    # encoder through them)
    for setting, value in (("batch_size", 4), ("backend", "static"), ("quantize", "int8"), ("static_dims", 32),
                           ("max_aiq_loss", 0.01), ("backend_timing_rounds", 1), ("backend_timing_queries", 8)):
        keys = stage_keys(small_config(**{f"embedding__{setting}": value}))
        assert keys["encoder"] == base["encoder"], f"embedding.{setting} re-fine-tunes the encoder"
        assert keys["predictors"] != base["predictors"], f"embedding.{setting} does not reach the router"
    retrained = stage_keys(small_config(embedding__fine_tune={"enabled": True, "epochs": 2}))
    assert retrained["encoder"] != base["encoder"]
    assert stage_keys(small_config(embedding__truncation_side="right"))["encoder"] != base["encoder"]
