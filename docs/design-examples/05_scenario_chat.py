# 对话特点：短输入，中等输出，低延迟要求
pd_config_chat = PDSeparationConfig(
    enabled=True,
    prefilling_threshold_input_tokens=200,  # 低阈值
    prefilling_threshold_ratio=1.0,         # 低比例
    routing_policy="adaptive",              # 自适应路由
    prefilling_min_instances=1,
    decoding_min_instances=3,              # 更多Decoding实例
    kv_cache_storage="gpu",
)
