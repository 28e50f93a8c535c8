"""The design document's PDRoutingStrategy: which phase a request takes, and which instances can serve it.

The daemon's router decides every request through this class, so a decision made here with the same
figures is the decision the cluster makes. The policy is looked up on each decision from
`pd_config.routing_policy`, so changing it on a running system takes effect at the next request.
"""

from __future__ import annotations

from collections.abc import Iterable

from pdctl.errors import MissingPrompt
from pdctl.router.tokens import TokenCounter
from pdctl.routing.phase import (
    PhaseDecision,
    PhasePolicy,
    PoolLoad,
    RequestFeatures,
    instances_for_phase,
    make_phase_policy,
    with_availability,
)
from pdctl.types import ExecutionInstance, ExecutionInstanceType, PDSeparationConfig, RequestMetadata

EVERY_POOL = frozenset(ExecutionInstanceType)


class PDRoutingStrategy:
    def __init__(self, pd_config: PDSeparationConfig, token_counter: TokenCounter | None = None):
        self.pd_config = pd_config
        self.token_counter = token_counter or TokenCounter()
        self.last_decision: PhaseDecision | None = None
        self._policy_name = ""
        self._policy: PhasePolicy | None = None

    @property
    def policy(self) -> PhasePolicy:
        name = self.pd_config.routing_policy
        if self._policy is None or name != self._policy_name:
            self._policy, self._policy_name = make_phase_policy(self.pd_config), name
        return self._policy

    def decide(
        self, features: RequestFeatures, load: PoolLoad, available: Iterable[ExecutionInstanceType] = EVERY_POOL
    ) -> PhaseDecision:
        """The policy's decision, then what the pools can do now (PD disabled, a pool without a healthy
        instance): the same for every policy."""
        decision = self.policy.decide(features, load)
        return with_availability(decision, self.pd_config.enabled, set(available))

    def input_tokens(self, request: RequestMetadata) -> int:
        if request.input_tokens is not None:
            return request.input_tokens
        prompt = getattr(request, "prompt", None)
        if not isinstance(prompt, str):
            raise MissingPrompt(
                f"request {request.request_id!r} has no prompt: set `request.prompt = ...` or `input_tokens`"
            )
        return self.token_counter.count(prompt)

    def determine_request_phase(
        self,
        request: RequestMetadata,
        avg_output_tokens: float = 128.0,
        load: PoolLoad | None = None,
        available: Iterable[ExecutionInstanceType] = EVERY_POOL,
    ) -> ExecutionInstanceType:
        """PREFILLING (prefill instance, then decode with the KV cache moved), DECODING or HYBRID.

        Expected output is `request.max_tokens`, else `avg_output_tokens`. Without `load` the pools are taken
        as idle, which is what the adaptive policy's cut-off starts from. `last_decision` keeps the reason and
        the figures compared."""
        expected_output = float(request.max_tokens) if request.max_tokens else avg_output_tokens
        features = RequestFeatures(self.input_tokens(request), expected_output)
        self.last_decision = self.decide(features, load or PoolLoad(), available)
        return self.last_decision.phase

    @staticmethod
    def filter_instances_by_type(
        instances: Iterable[ExecutionInstance], instance_type: ExecutionInstanceType
    ) -> list[ExecutionInstance]:
        """The instances a request of this phase can go to, as the router chooses among them."""
        by_role: dict[ExecutionInstanceType, list[ExecutionInstance]] = {role: [] for role in ExecutionInstanceType}
        for instance in instances:
            by_role[instance.instance_type].append(instance)
        return instances_for_phase(ExecutionInstanceType(instance_type), by_role)
