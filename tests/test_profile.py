from __future__ import annotations

import pytest

from pdctl.control_plane.types import ExecutionInstanceType, PDSeparationConfig, PreffillingConfig, PrefillingConfig
from pdctl.errors import ProfileError
from pdctl.profile import load_profile
from pdctl.templates import profile_template
from tests.conftest import PROFILES

MINIMAL = "name: t\nmodel:\n  path: some/model\n"


def error_of(write_profile, text: str) -> str:
    path = write_profile(text)
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    return str(caught.value).replace(str(path), "P")


def test_base_defaults_are_the_design_documents_example(write_profile):
    profile = load_profile(write_profile(MINIMAL))
    assert profile.pd.routing_policy == "adaptive"
    assert profile.pd.prefilling_threshold_input_tokens == 800
    assert profile.pd.prefilling_threshold_ratio == 4.0
    assert (profile.pd.prefilling_min_instances, profile.pd.prefilling_max_instances) == (1, 3)
    assert (profile.pd.decoding_min_instances, profile.pd.decoding_max_instances) == (2, 6)
    assert profile.prefill.tensor_parallel_size == 4 and profile.prefill.max_chunk_size_tokens == 4096
    assert profile.decode.max_parallel_requests == 200 and profile.decode.kv_cache_memory_fraction == 0.85
    assert profile.router.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("scenario", "threshold", "ratio", "policy", "prefill_min", "decode_min"),
    [("qa", 2000, 10.0, "threshold", 2, 1), ("chat", 200, 1.0, "adaptive", 1, 3), ("code", 500, 0.5, "adaptive", 1, 4)],
)
def test_scenario_presets(write_profile, scenario, threshold, ratio, policy, prefill_min, decode_min):
    profile = load_profile(write_profile(MINIMAL + f"scenario: {scenario}\n"))
    assert profile.pd.prefilling_threshold_input_tokens == threshold
    assert profile.pd.prefilling_threshold_ratio == ratio
    assert profile.pd.routing_policy == policy
    assert profile.pd.prefilling_min_instances == prefill_min
    assert profile.pd.decoding_min_instances == decode_min
    roles = [i.instance_type for i in profile.resolved_instances()]
    assert roles.count(ExecutionInstanceType.PREFILLING) == prefill_min
    assert roles.count(ExecutionInstanceType.DECODING) == decode_min


def test_code_scenario_scales_decode_to_eight(write_profile):
    profile = load_profile(write_profile(MINIMAL + "scenario: code\n"))
    assert profile.pd.enable_dynamic_scaling and profile.pd.decoding_max_instances == 8


def test_profile_fields_override_the_preset(write_profile):
    profile = load_profile(write_profile(MINIMAL + "scenario: qa\npd:\n  prefilling_threshold_input_tokens: 3000\n"))
    assert profile.pd.prefilling_threshold_input_tokens == 3000
    assert profile.pd.prefilling_threshold_ratio == 10.0


def test_pd_config_reaches_role_configs_as_the_document_does(write_profile):
    profile = load_profile(write_profile(MINIMAL + "decode:\n  kv_cache_memory_fraction: 0.9\n"))
    assert profile.pd.decoding_config is profile.decode
    assert profile.pd.prefilling_config is profile.prefill
    assert profile.pd.decoding_config.kv_cache_memory_fraction == 0.9


def test_document_spelling_is_the_same_class():
    assert PreffillingConfig is PrefillingConfig


def test_config_validates_on_assignment():
    config = PDSeparationConfig()
    config.prefilling_max_instances = 6
    with pytest.raises(ValueError, match="prefilling_min_instances \\(1\\) is above prefilling_max_instances \\(0\\)"):
        config.prefilling_max_instances = 0


@pytest.mark.parametrize("name", ["local", "qa", "chat", "code"])
def test_shipped_profiles_load(name):
    profile = load_profile(PROFILES / f"{name}.yaml")
    assert profile.name == name


@pytest.mark.parametrize("scenario", ["qa", "chat", "code"])
def test_init_template_loads_to_the_scenario(write_profile, scenario):
    profile = load_profile(write_profile(profile_template(scenario)))
    preset = load_profile(write_profile(MINIMAL + f"scenario: {scenario}\n", name="preset.yaml"))
    assert profile.pd == preset.pd
    assert profile.router.slo == preset.router.slo


def test_unknown_key_suggests_the_nearest(write_profile):
    message = error_of(write_profile, MINIMAL + "pd:\n  routng_policy: threshold\n")
    assert message == "P:5:3: pd.routng_policy: unknown key; did you mean 'routing_policy'?"


def test_unknown_top_level_key(write_profile):
    assert error_of(write_profile, MINIMAL + "decoder: {}\n") == "P:4:1: decoder: unknown key; did you mean 'decode'?"


def test_wrong_type(write_profile):
    message = error_of(write_profile, MINIMAL + "prefill:\n  tensor_parallel_size: four\n")
    assert message.startswith("P:5:3: prefill.tensor_parallel_size: Input should be a valid integer")


def test_min_above_max_points_at_the_field(write_profile):
    message = error_of(write_profile, MINIMAL + "pd:\n  decoding_min_instances: 9\n")
    assert message == (
        "P:5:3: pd.decoding_min_instances: decoding_min_instances (9) is above decoding_max_instances (6)"
    )


def test_negative_threshold(write_profile):
    message = error_of(write_profile, MINIMAL + "pd:\n  prefilling_threshold_input_tokens: -5\n")
    assert message == "P:5:3: pd.prefilling_threshold_input_tokens: Input should be greater than or equal to 0"


def test_port_used_twice(write_profile):
    text = MINIMAL + (
        "instances:\n  - {id: p, type: PREFILLING, port: 9000}\n  - {id: d, type: DECODING, port: 9000}\n"
    )
    assert error_of(write_profile, text) == "P:6:29: instances[1].port: port 9000 is used twice: by p and by d"


def test_instance_port_clashing_with_router(write_profile):
    text = MINIMAL + "router:\n  port: 8100\n"
    assert error_of(write_profile, text) == (
        "P:5:3: router.port: port 8100 is used twice: by the router and by prefill-0"
    )


def test_gpu_count_must_be_a_multiple_of_parallelism(write_profile):
    text = MINIMAL + "instances:\n  - {id: p, type: PREFILLING, gpu_count: 6, tensor_parallel_size: 4}\n"
    assert error_of(write_profile, text) == (
        "P:5:31: instances[0].gpu_count: gpu_count 6 is not a multiple of "
        "tensor_parallel_size x pipeline_parallel_size = 4"
    )


def test_missing_model(write_profile):
    assert error_of(write_profile, "name: t\n") == "P:1:1: model: required field is missing"


def test_invalid_yaml(write_profile):
    message = error_of(write_profile, MINIMAL + "pd: [unclosed\n")
    assert message.startswith("P:5:1: invalid YAML:") or message.startswith("P:4:")


def test_duplicate_key(write_profile):
    assert error_of(write_profile, MINIMAL + "router: {}\nrouter: {}\n") == "P:5:1: router: key written twice"


def test_unreadable_file(tmp_path):
    with pytest.raises(ProfileError, match="cannot read the profile"):
        load_profile(tmp_path / "nope.yaml")


def test_not_a_mapping(write_profile):
    assert error_of(write_profile, "- a\n- b\n") == "P:1:1: the profile must be a mapping of sections, not list"


def test_bad_scenario_name(write_profile):
    message = error_of(write_profile, MINIMAL + "scenario: batch\n")
    assert message == "P:4:1: scenario: Input should be 'qa', 'chat' or 'code', got 'batch'"


def test_an_unknown_routing_strategy_is_named_with_the_registrys_names(write_profile):
    message = error_of(write_profile, MINIMAL + "router:\n  routing_strategy: cache_awre\n")
    assert message.startswith(
        "P:5:3: router.routing_strategy: unknown routing strategy 'cache_awre' (did you mean 'cache_aware'?); "
        "known: load_balanced, round_robin, cache_aware; or compose one"
    )


def test_a_strategy_registered_in_one_class_is_a_name_a_profile_may_use(write_profile):
    from pdctl.routing.pieces import Composition, Strategy

    class Fewest(Strategy, name="fewest_tokens"):
        composition = Composition(scorers={"outstanding_tokens": 1.0})

    text = MINIMAL + "router: {routing_strategy: fewest_tokens}\n"
    try:
        assert load_profile(write_profile(text)).router.routing_strategy == Fewest.name
        assert "fewest_tokens" in profile_template("chat")  # `pdctl init` lists what the registry holds
    finally:
        del Strategy.registry["fewest_tokens"]
    assert "known: load_balanced, round_robin, cache_aware;" in error_of(write_profile, text)


def test_an_unknown_routing_policy_is_named_with_the_registrys_names(write_profile):
    message = error_of(write_profile, MINIMAL + "pd:\n  routing_policy: adaptve\n")
    assert message == (
        "P:5:3: pd.routing_policy: unknown routing policy 'adaptve' (did you mean 'adaptive'?); "
        "known: threshold, adaptive, conditional, always, never"
    )


def test_a_phase_policy_registered_in_one_class_is_a_name_a_profile_may_use(write_profile):
    from pdctl.routing.phase import PhaseDecision, PhasePolicy

    class Split(PhasePolicy, name="split_all"):
        def decide(self, features, load):
            return PhaseDecision(ExecutionInstanceType.PREFILLING, "every request")

    text = MINIMAL + "pd: {routing_policy: split_all}\n"
    try:
        profile = load_profile(write_profile(text))
        assert profile.pd.routing_policy == Split.name
        assert "split_all" in profile_template("chat")  # `pdctl init` lists what the registry holds
        profile.pd.routing_policy = "never"  # the running system's remedy is checked against it too
        with pytest.raises(ValueError, match="unknown routing policy 'slpit_all' \\(did you mean 'split_all'"):
            profile.pd.routing_policy = "slpit_all"
        assert profile.pd.routing_policy == "never"
    finally:
        del PhasePolicy.registry["split_all"]
    assert "known: threshold, adaptive, conditional, always, never" in error_of(write_profile, text)


def test_a_composed_strategy_loads_in_the_registrys_order(write_profile):
    from pdctl.routing.pieces import CacheAware, Composition

    scorers = "{kv_cache_usage: 0.5, prefix_affinity: 2, outstanding_tokens: 1, running_sequences: 1}"
    text = MINIMAL + f"router:\n  routing_strategy:\n    scorers: {scorers}\n"
    strategy = load_profile(write_profile(text)).router.routing_strategy
    assert isinstance(strategy, Composition) and strategy == CacheAware.composition
    assert list(strategy.scorers) == list(CacheAware.composition.scorers)
    assert strategy.picker == "best_score"


def test_a_composed_strategys_errors_name_each_field(write_profile):
    text = MINIMAL + (
        "router:\n  routing_strategy:\n    scorers:\n      prefix_afinity: 2\n      kv_cache_usage: 0\n"
        "    picker: best\n"
    )
    assert error_of(write_profile, text).splitlines() == [
        "P:7:7: router.routing_strategy.scorers.prefix_afinity: unknown scorer 'prefix_afinity' (did you mean "
        "'prefix_affinity'?); known: prefix_affinity, outstanding_tokens, running_sequences, kv_cache_usage",
        "P:8:7: router.routing_strategy.scorers.kv_cache_usage: Input should be greater than 0",
        "P:9:5: router.routing_strategy.picker: unknown picker 'best'; known: best_score, round_robin",
    ]
    ignored = MINIMAL + "router: {routing_strategy: {scorers: {kv_cache_usage: 1}, picker: round_robin}}\n"
    assert error_of(write_profile, ignored) == (
        "P:4:59: router.routing_strategy.picker: picker round_robin ignores scores: leave out scorers, or pick one "
        "that reads them"
    )
    assert error_of(write_profile, MINIMAL + "router: {routing_strategy: [a]}\n") == (
        "P:4:10: router.routing_strategy: write a strategy's name, or {scorers: {NAME: WEIGHT}, picker: NAME}"
    )
