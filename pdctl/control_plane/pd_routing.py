"""The design document's PDRoutingStrategy under the name the document imports it by. It lives in the router
(`pdctl.router.pd_routing`), which decides every request through it."""

from pdctl.router.pd_routing import PDRoutingStrategy

__all__ = ["PDRoutingStrategy"]
