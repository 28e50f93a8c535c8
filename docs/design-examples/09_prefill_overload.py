# 增加Prefilling实例
pd_config.prefilling_max_instances = 6  # 从3增加到6
pd_config.enable_dynamic_scaling = True # 启用自动扩展

# 或者降低目标吞吐量
prefilling_config.target_throughput_tokens_per_sec = 800  # 从1000降低
