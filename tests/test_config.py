from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from mixllm.config import config_from_dict, find_params_file, load_config, parse_override
from mixllm.core.errors import ConfigError

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def test_repo_params_load_with_every_section():
    config = load_config(REPO_PARAMS)
    assert len(config.llms) == 11, "the shipped catalogue lists RouterBench's 11 LLMs"
    assert config.decision.lambda_ is None, "null: calibrated to the cost budget at training"
    assert config.root == REPO_PARAMS.parent
    assert config.mlflow_tracking_uri.startswith("sqlite:////"), "relative sqlite paths are made absolute"


def _write(tmp_path, raw) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_unknown_key_names_key_and_file(tmp_path):
    path = _write(tmp_path, {"decision": {"lambdaa": 0.3}})
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "decision.lambdaa" in str(error.value)
    assert str(path) in str(error.value)
    assert "unknown key" in str(error.value)


def test_wrong_type_names_key_and_value(tmp_path):
    path = _write(tmp_path, {"embedding": {"batch_size": "lots"}})
    with pytest.raises(ConfigError, match=r"embedding\.batch_size.*'lots'"):
        load_config(path)


def test_nested_llm_error_points_into_the_list(tmp_path):
    path = _write(tmp_path, {"llms": [{"name": "a", "input_usd_per_1k": -1, "output_usd_per_1k": 0}]})
    with pytest.raises(ConfigError, match=r"llms\.0\.input_usd_per_1k"):
        load_config(path)


def test_duplicate_llm_names_rejected():
    llm = {"name": "a", "input_usd_per_1k": 0.1, "output_usd_per_1k": 0.1}
    with pytest.raises(ConfigError, match="repeated: a"):
        config_from_dict({"llms": [llm, llm]})


def test_reference_llm_must_be_in_catalogue():
    llm = {"name": "a", "input_usd_per_1k": 0.1, "output_usd_per_1k": 0.1}
    with pytest.raises(ConfigError, match="reference_llm 'b'"):
        config_from_dict({"llms": [llm], "evaluation": {"reference_llm": "b"}})


def test_split_fractions_must_leave_training_data():
    with pytest.raises(ConfigError, match="leave rows for training"):
        config_from_dict({"split": {"validation_fraction": 0.6, "holdout_fraction": 0.5}})


def test_the_proxys_failover_must_end_before_the_servers_request_timeout():
    """Otherwise the server cancels the proxy's last attempts before the proxy can answer."""
    with pytest.raises(ConfigError, match="failover.deadline_s .* must be below service.request_timeout_s"):
        config_from_dict({"service": {"request_timeout_s": 60, "failover": {"deadline_s": 60}}})
    config = config_from_dict({"service": {"request_timeout_s": 61, "failover": {"deadline_s": 60}}})
    assert config.service.failover.deadline_s < config.service.request_timeout_s


def test_not_a_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- just\n- a list\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path)


def test_overrides_and_lambda_alias(tmp_path):
    path = _write(tmp_path, {"decision": {"lambda": 0.2}})
    assert load_config(path).decision.lambda_ == 0.2
    key, value = parse_override("decision.lambda=0.7")
    assert load_config(path, overrides={key: value}).decision.lambda_ == 0.7
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("novalue")


def test_config_is_frozen(tmp_path):
    config = load_config(_write(tmp_path, {}))
    with pytest.raises(ValidationError, match="frozen"):
        config.decision.exploration = 3.0  # type: ignore[misc]
    assert config.decision.exploration == 0.0, "the refused assignment left the config unchanged"


def test_find_params_walks_up_and_honours_env(tmp_path, monkeypatch):
    path = _write(tmp_path, {})
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    monkeypatch.delenv("MIXLLM_PARAMS", raising=False)
    assert find_params_file(nested) == path
    monkeypatch.setenv("MIXLLM_PARAMS", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="MIXLLM_PARAMS"):
        find_params_file(nested)


def test_relative_paths_resolve_against_params_folder(tmp_path, monkeypatch):
    config = load_config(_write(tmp_path, {"data": {"store_dir": "somewhere/store"}}))
    monkeypatch.chdir("/")
    assert config.path(config.data.store_dir) == tmp_path / "somewhere/store"


def test_routerbench_env_wins(tmp_path, monkeypatch):
    config = load_config(_write(tmp_path, {"data": {"routerbench_path": "local.pkl"}}))
    monkeypatch.delenv("MIXLLM_ROUTERBENCH", raising=False)
    assert config.routerbench_path() == tmp_path / "local.pkl"
    monkeypatch.setenv("MIXLLM_ROUTERBENCH", "/elsewhere/rb.csv")
    assert config.routerbench_path() == Path("/elsewhere/rb.csv")


def test_the_benchmark_datasets_file_is_valid_and_each_entry_is_complete():
    from pathlib import Path

    from mixllm.io.benchmark_config import load_benchmark_config

    root = Path(__file__).resolve().parents[1]
    bench = load_benchmark_config(root / "benchmarks/datasets.yaml")
    assert set(bench.datasets) >= {"routerbench_subset", "llmrouter_dc", "routellm_2llm"}
    for name, entry in bench.datasets.items():
        path = bench.data_path(entry)
        assert path.parts[-len(entry.path.parts):] == entry.path.parts, name
        assert not entry.path.is_absolute(), "the project names no path of the build machine"


def test_a_benchmark_entry_with_a_reference_outside_its_catalogue_is_refused(tmp_path):
    from mixllm.io.benchmark_config import load_benchmark_config

    path = tmp_path / "datasets.yaml"
    path.write_text("datasets:\n  mine:\n    path: mine.csv\n    reference_llm: gpt-5\n"
                    "    llms: [{name: small, input_usd_per_1k: 0.1, output_usd_per_1k: 0.1}]\n")
    with pytest.raises(ConfigError, match="reference_llm 'gpt-5' is not in llms"):
        load_benchmark_config(path)
    path.write_text("datasets:\n  mine:\n    path: mine.csv\n    reference_llm: small\n    colour: blue\n")
    with pytest.raises(ConfigError, match="datasets.mine.colour: unknown key"):
        load_benchmark_config(path)


def test_estimators_built_from_the_default_config_equal_their_own_defaults():
    """Defaults live in the config package: an estimator built by hand behaves like the configured one, so
    their constructor defaults must agree. Arguments that come from the data are left out."""
    from mixllm.config import LLMConfig
    from mixllm.core import estimators

    config = config_from_dict({})
    from_data = {"ridge", "input_usd_per_1k", "output_usd_per_1k", "cost_scale_usd", "prior_cost_usd", "progress"}
    built = [
        estimators.query_encoder(config), estimators.tagger(config), estimators.tag_clusterer(config),
        estimators.query_featurizer(config), estimators.domain_model(config),
        estimators.quality_predictor(config, ridge=10.0),
        estimators.cost_predictor(config, LLMConfig(name="m", input_usd_per_1k=1, output_usd_per_1k=2), 1.0, 0.5),
    ]
    for estimator in built:
        defaults = type(estimator)().get_params()
        configured = estimator.get_params()
        differ = {k: (configured[k], defaults[k]) for k in configured if k not in from_data and configured[k] != defaults[k]}
        assert not differ, f"{type(estimator).__name__}: config vs constructor default {differ}"
    assert estimators.quality_predictor(config, ridge=10.0).ridge == 10.0, "a chosen ridge is passed through"


def test_the_service_parts_default_to_the_config_settings():
    """Classes the service builds from its config read their keyword defaults from the config
    models, so a part built without one behaves as a default config (a hard-coded 64 once stood
    for max_batch_size's 256)."""
    import inspect

    from mixllm.config.operations import BudgetsConfig, FailoverConfig, ServiceConfig
    from mixllm.io.ledger import TenantLedger
    from mixllm.service.circuit import CircuitBreakers
    from mixllm.service.live_traffic import LiveTraffic
    from mixllm.service.middleware import BodyLimit
    from mixllm.service.request_batching import RequestCoalescer

    cases = [
        (LiveTraffic, ServiceConfig, {"max_age_s": "in_flight_max_age_s", "window": "latency_window",
                                   "max_client_share": "latency_client_share"}),
        (CircuitBreakers, FailoverConfig, {"failures": "breaker_failures", "window_s": "breaker_window_s",
                                           "cooldown_s": "breaker_cooldown_s"}),
        (BodyLimit, ServiceConfig, {"max_bytes": "max_body_bytes", "read_timeout_s": "body_read_timeout_s"}),
        (RequestCoalescer, ServiceConfig, {"max_batch_size": "max_batch_size"}),
        (TenantLedger, BudgetsConfig, {"key_cache_s": "key_cache_s"}),
    ]
    for part, model, settings in cases:
        parameters = inspect.signature(part).parameters
        for parameter, setting in settings.items():
            assert parameters[parameter].default == model.model_fields[setting].default, (part.__name__, parameter)
