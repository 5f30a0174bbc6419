"""The router on the real RouterBench subset: trained on the train part, saved, loaded back, it
routes the holdout exactly as before. It runs the transformer as the shipped `auto` serves it on this
log (onnx-int8: the fine-tuned transformer exported and quantised); short encoder inputs keep it fast (24 s
against 28 s on torch); the full settings run in benchmarks/quality.py."""

import json

import pytest

from mixllm.config import load_config
from mixllm.core.router import MixLLMRouter
from mixllm.evaluation.baselines import query_frame
from mixllm.io.data import ingest
from mixllm.io.workspace import load_split

pytestmark = pytest.mark.slow  # real servers, flows or training: `-m "not slow"` skips them


def test_trained_router_reloads_and_routes_the_holdout_identically(shared_subset, tmp_path):
    from pathlib import Path

    params = tmp_path / "params.yaml"
    params.write_text((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    config = load_config(params, overrides={"embedding.max_seq_length": 64, "embedding.fine_tune.max_triplets": 64,
                                            "embedding.backend": "onnx", "embedding.quantize": "int8"})
    ingest(shared_subset / "routerbench_subset_long.csv.gz", config)
    split = load_split(config)
    # RouterDC's test part (with the 6 test/train prompts), less the 2 whose text a train prompt repeats.
    assert split.holdout["query_id"].nunique() == 950
    router = MixLLMRouter(config, progress=False).fit(split.train)
    assert router.encoder_.fine_tuned_ and len(router.llms_) == 11
    assert router.tag_report_["method"] == "source", "the log's benchmarks are the domains"
    assert router.domain_model_.classes_ == ["arc-challenge", "mbpp", "winogrande"]
    # Every third holdout prompt (317 of 950): the reload check needs no more.
    holdout = query_frame(split.holdout)["query"].tolist()[::3]
    before = [d.to_dict() for d in router.route(holdout, lambda_=0.2)]
    router.save(tmp_path / "router")
    loaded = MixLLMRouter.load(tmp_path / "router", progress=False)
    after = [d.to_dict() for d in loaded.route(holdout, lambda_=0.2)]
    assert after == before, "the loaded router decides exactly as the trained one on every query"
    chosen = {d["llm"] for d in before}
    assert len(chosen) >= 2, "a router that sends everything to one LLM learned nothing"
    manifest = json.loads((tmp_path / "router/router.json").read_text())
    assert manifest["n_training_queries"] == split.train["query_id"].nunique()
