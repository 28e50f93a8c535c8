# 代码生成特点：中等输入，长输出
pd_config_code = PDSeparationConfig(
    enabled=True,
    prefilling_threshold_input_tokens=500,
    prefilling_threshold_ratio=0.5,         # 输出为主
    routing_policy="adaptive",
    prefilling_min_instances=1,
    decoding_min_instances=4,              # 长输出需要更多资源
    enable_dynamic_scaling=True,
    decoding_max_instances=8,
)
