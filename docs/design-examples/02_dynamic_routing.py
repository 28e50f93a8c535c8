from pdctl.control_plane.types import RequestMetadata, RequestPriority

async def submit_request_with_pd_routing(prompt: str, max_tokens: int):
    """
    提交请求并利用PD分离自动路由
    """
    request = RequestMetadata(
        request_id=f"req-{id(prompt)}",
        priority=RequestPriority.HIGH,
        slo_deadline_ms=200.0,
        max_tokens=max_tokens,
    )
    request.prompt = prompt  # 不是类定义中的属性，但可动态添加
    
    # 决定请求应该路由到哪个阶段
    target_type = pd_router.determine_request_phase(
        request, 
        avg_output_tokens=100.0
    )
    
    print(f"Request will be routed to: {target_type}")
    
    # 获取合适的实例
    instances = [prefilling_instance, decoding_instance]
    suitable_instances = pd_router.filter_instances_by_type(instances, target_type)
    
    print(f"Suitable instances: {[i.instance_id for i in suitable_instances]}")
    
    # 提交请求
    request_id = await manager.submit_request(request)
    
    return request_id

# 使用
request_id = asyncio.run(submit_request_with_pd_routing(
    "Explain the concept of PD separation in LLM inference.",
    max_tokens=500
))
