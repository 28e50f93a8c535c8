# 文档问答特点：长输入，相对短输出
pd_config_qa = PDSeparationConfig(
    enabled=True,
    prefilling_threshold_input_tokens=2000,  # 更高阈值
    prefilling_threshold_ratio=10.0,         # 更高比例
    routing_policy="threshold",              # 用阈值而不是自适应
    prefilling_min_instances=2,
    decoding_min_instances=1,
)
