"""`pdctl init`: a commented profile to start from, with the scenario's values written out."""

from __future__ import annotations

from pdctl.profile import SCENARIO_PRESETS, RouterSpec, deep_merge
from pdctl.routing.phase import PhasePolicy
from pdctl.routing.pieces import Strategy
from pdctl.types import DecodingConfig, PDSeparationConfig, PrefillingConfig

_SCENARIO_LINES = {
    "qa": "document Q&A: long input, short output",
    "chat": "real-time chat: short input, medium output, low latency",
    "code": "code generation: medium input, long output",
}


def profile_template(scenario: str, name: str | None = None, model: str = "meta-llama/Llama-3.1-8B-Instruct") -> str:
    preset = SCENARIO_PRESETS[scenario]
    pd = PDSeparationConfig.model_validate(preset.get("pd", {}))
    prefill = PrefillingConfig()
    decode = DecodingConfig()
    router = RouterSpec.model_validate(deep_merge({}, preset.get("router", {})))
    strategies, policies = ", ".join(Strategy.registry), ", ".join(PhasePolicy.registry)
    return f"""\
# pdctl cluster profile: {_SCENARIO_LINES[scenario]}.
# `pdctl validate FILE` checks it, `pdctl plan FILE` shows what `pdctl up FILE` would run.
name: {name or scenario}
# Starts from the design document's values for this scenario; every field below overrides them.
scenario: {scenario}

model:
  path: {model}            # a local directory, a hub id, or builtin:tiny-llama
  # served_name: my-model  # the name clients ask for (the path when unset)
  # max_model_len: 8192

engine:
  kind: vllm                # vllm, or sim (an emulator of vLLM's HTTP API for tests)
  # python: /opt/vllm/bin/python   # the engine runtime; `pdctl engine install`'s when unset
  # extra_args: ["--enforce-eager"]
  # env: {{HF_TOKEN: "${{HF_TOKEN}}"}}   # ${{VAR}} is read from the environment at launch

device: auto                # auto (GPUs when NVML sees any), cuda, cpu

router:
  host: 127.0.0.1           # the only entry point; 127.0.0.1 keeps it off the network
  port: 8000
  # api_keys: ['${{PD_API_KEY}}']   # clients send `Authorization: Bearer KEY`; needed beyond 127.0.0.1
  # tls: {{cert: cert.pem, key: key.pem}}
  scheduling_policy: {router.scheduling_policy}   # slo_aware (priorities, deadlines) or fifo
  routing_strategy: {router.routing_strategy}  # {strategies}, or {{scorers: {{NAME: WEIGHT}}, picker: NAME}}
  slo:
    ttft_ms: {router.slo.ttft_ms:g}
    tpot_ms: {router.slo.tpot_ms:g}

cost:
  gpu_hour_usd: 2.0

pd:                         # PDSeparationConfig
  enabled: {str(pd.enabled).lower()}
  routing_policy: {pd.routing_policy}          # {policies}
  prefilling_threshold_input_tokens: {pd.prefilling_threshold_input_tokens}
  prefilling_threshold_ratio: {pd.prefilling_threshold_ratio:g}       # input tokens / expected output tokens
  prefilling_min_instances: {pd.prefilling_min_instances}
  prefilling_max_instances: {pd.prefilling_max_instances}
  decoding_min_instances: {pd.decoding_min_instances}
  decoding_max_instances: {pd.decoding_max_instances}
  enable_dynamic_scaling: {str(pd.enable_dynamic_scaling).lower()}
  kv_cache_storage: {pd.kv_cache_storage}             # gpu, or cpu (NIXL through host memory)
  kv_cache_eviction_policy: {pd.kv_cache_eviction_policy}      # lru or lfu
  kv_cache_memory_fraction: {pd.kv_cache_memory_fraction:g}

prefill:                    # PrefillingConfig
  tensor_parallel_size: {prefill.tensor_parallel_size}
  pipeline_parallel_size: {prefill.pipeline_parallel_size}
  target_batch_size: {prefill.target_batch_size}
  target_throughput_tokens_per_sec: {prefill.target_throughput_tokens_per_sec:g}
  enable_chunked_prefill: {str(prefill.enable_chunked_prefill).lower()}
  max_chunk_size_tokens: {prefill.max_chunk_size_tokens}

decode:                     # DecodingConfig
  tensor_parallel_size: {decode.tensor_parallel_size}
  pipeline_parallel_size: {decode.pipeline_parallel_size}
  target_latency_ms: {decode.target_latency_ms:g}
  target_tokens_per_sec_per_gpu: {decode.target_tokens_per_sec_per_gpu:g}
  enable_prefix_caching: {str(decode.enable_prefix_caching).lower()}
  max_parallel_requests: {decode.max_parallel_requests}
  kv_cache_memory_fraction: {decode.kv_cache_memory_fraction:g}

# Explicit instances replace the pools' minimum sizes; `launch: false` attaches to a running engine.
# instances:
#   - {{id: prefill-0, type: PREFILLING, tensor_parallel_size: 4}}
#   - {{id: decode-0, type: DECODING}}
#   - {{id: remote-decode, type: DECODING, host: 10.0.0.2, port: 8001, launch: false}}
"""
