# 增大KV缓存内存分配
pd_config.kv_cache_memory_fraction = 0.95  # 从0.85提高到0.95
pd_config.decoding_config.kv_cache_memory_fraction = 0.95

# 改用LFU驱逐策略
pd_config.kv_cache_eviction_policy = "lfu"
