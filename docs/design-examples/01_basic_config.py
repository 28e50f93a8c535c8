from pdctl.control_plane.types import (
    ExecutionInstance,
    ExecutionInstanceType,
    PDSeparationConfig,
    PreffillingConfig,
    DecodingConfig,
)
from pdctl.control_plane.pd_routing import PDRoutingStrategy
from pdctl.control_plane.manager import ControlPlaneManager

# 步骤1：定义PD分离配置
pd_config = PDSeparationConfig(
    enabled=True,
    enable_dynamic_scaling=True,
    prefilling_min_instances=1,
    prefilling_max_instances=3,
    decoding_min_instances=2,
    decoding_max_instances=6,
    routing_policy="adaptive",
    prefilling_threshold_input_tokens=800,
    prefilling_threshold_ratio=4.0,
    kv_cache_storage="gpu",
    kv_cache_eviction_policy="lru",
)

# 步骤2：创建Prefilling优化的实例
prefilling_config = PreffillingConfig(
    target_batch_size=64,
    target_throughput_tokens_per_sec=1000.0,
    tensor_parallel_size=4,
    pipeline_parallel_size=1,
    enable_chunked_prefill=True,
    max_chunk_size_tokens=4096,
)

prefilling_instance = ExecutionInstance(
    instance_id="prefill-0",
    host="10.0.0.1",
    port=8000,
    model_name="meta-llama/Llama-2-70b",
    instance_type=ExecutionInstanceType.PREFILLING,
    gpu_count=8,
    tensor_parallel_size=4,
    pipeline_parallel_size=1,
    prefilling_config=prefilling_config,
)

# 步骤3：创建Decoding优化的实例
decoding_config = DecodingConfig(
    target_latency_ms=50.0,
    target_tokens_per_sec_per_gpu=100.0,
    tensor_parallel_size=1,
    pipeline_parallel_size=1,
    enable_prefix_caching=True,
    max_parallel_requests=200,
    kv_cache_memory_fraction=0.85,
)

decoding_instance = ExecutionInstance(
    instance_id="decode-0",
    host="10.0.0.2",
    port=8001,
    model_name="meta-llama/Llama-2-70b",
    instance_type=ExecutionInstanceType.DECODING,
    gpu_count=8,
    tensor_parallel_size=1,
    pipeline_parallel_size=1,
    decoding_config=decoding_config,
)

# 步骤4：初始化PD路由策略
pd_router = PDRoutingStrategy(pd_config)

# 步骤5：初始化Control Plane Manager
manager = ControlPlaneManager(
    scheduling_policy="slo_aware",
    routing_strategy="load_balanced",
)

# 注册实例
manager.executor.register_instance(prefilling_instance)
manager.executor.register_instance(decoding_instance)

# 启动管理器
import asyncio
asyncio.run(manager.start())
