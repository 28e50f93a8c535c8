from pdctl.control_plane.types import PDMetrics

def monitor_pd_performance():
    """
    监控PD分离的性能指标
    """
    metrics = manager.executor.metrics
    
    print("=== PD分离性能指标 ===")
    print(f"Prefilling吞吐量: {metrics.prefilling_throughput_tokens_per_sec} token/s")
    print(f"Prefilling P99延迟: {metrics.prefilling_latency_p99_ms} ms")
    print(f"Decoding平均延迟: {metrics.decoding_latency_avg_ms} ms")
    print(f"Decoding P99延迟: {metrics.decoding_latency_p99_ms} ms")
    print(f"KV缓存命中率: {metrics.kv_cache_hit_rate:.2%}")
    print(f"成本优化: {metrics.total_cost_optimization_percent:.1f}%")
    
    # 路由统计
    print(f"\n=== 路由统计 ===")
    print(f"路由到Prefilling: {metrics.requests_routed_to_prefilling}")
    print(f"路由到Decoding: {metrics.requests_routed_to_decoding}")
    print(f"路由到Hybrid: {metrics.requests_routed_to_hybrid}")

# 启动监控
import threading

def monitoring_loop():
    while manager._running:
        monitor_pd_performance()
        time.sleep(10)

monitor_thread = threading.Thread(target=monitoring_loop, daemon=True)
monitor_thread.start()
