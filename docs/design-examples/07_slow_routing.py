# 使用缓存的路由决策
route_cache = {}

def get_cached_route(request):
    # 基于prompt长度的简单缓存
    key = len(request.prompt) // 100
    if key not in route_cache:
        route_cache[key] = pd_router.determine_request_phase(request)
    return route_cache[key]
