"""The cluster profile: one YAML file describing the whole cluster, validated into typed parts.

Its sections are the design document's own types (``pdctl.types``); the rest says what
those types leave open on a real host: the model, the engine, devices, ports, the router, the cost.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pdctl.auth import VLLM_KEY_ENV
from pdctl.engines.adapter import DEFAULT_ENGINE, engine_adapter
from pdctl.errors import ProfileError
from pdctl.routing.phase import registered_policy
from pdctl.routing.pieces import DEFAULT_STRATEGY, StrategyChoice
from pdctl.types import (
    DecodingConfig,
    ExecutionInstance,
    ExecutionInstanceType,
    PDSeparationConfig,
    PrefillingConfig,
)
from pdctl.yaml_source import Loc, YamlSource, dotted, load_yaml

ScenarioName = Literal["qa", "chat", "code"]
BUILTIN_TINY_MODEL = "builtin:tiny-llama"

# The design document's values for each scenario; the base example gives every other default.
SCENARIO_PRESETS: dict[str, dict[str, Any]] = {
    "qa": {
        "pd": {
            "prefilling_threshold_input_tokens": 2000,
            "prefilling_threshold_ratio": 10.0,
            "routing_policy": "threshold",
            "prefilling_min_instances": 2,
            "decoding_min_instances": 1,
        },
        "router": {"slo": {"ttft_ms": 3000.0, "tpot_ms": 100.0}},
    },
    "chat": {
        "pd": {
            "prefilling_threshold_input_tokens": 200,
            "prefilling_threshold_ratio": 1.0,
            "routing_policy": "adaptive",
            "prefilling_min_instances": 1,
            "decoding_min_instances": 3,
            "kv_cache_storage": "gpu",
        },
        "router": {"slo": {"ttft_ms": 500.0, "tpot_ms": 50.0}},
    },
    "code": {
        "pd": {
            "prefilling_threshold_input_tokens": 500,
            "prefilling_threshold_ratio": 0.5,
            "routing_policy": "adaptive",
            "prefilling_min_instances": 1,
            "decoding_min_instances": 4,
            "enable_dynamic_scaling": True,
            "decoding_max_instances": 8,
        },
        "router": {"slo": {"ttft_ms": 1000.0, "tpot_ms": 50.0}},
    },
}

# `${VAR}`: a value read from the environment where it is used, so the secret itself is never in a file.
ENV_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")

_SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIALS?)(_|$)")
# Counts, rates and lists of names, such as max_num_batched_tokens and --prefill-ms-per-token.
_NOT_SECRET = re.compile(r"(^|_)(TOKENS|KEYS)$|_PER_TOKEN$")


def is_secret_name(name: str) -> bool:
    """HF_TOKEN, OPENAI_API_KEY, --hf-token, --api-key, AWS_SECRET_ACCESS_KEY: names whose values are secret."""
    normal = name.strip("-").replace("-", "_").upper()
    return bool(_SECRET_NAME.search(normal)) and not _NOT_SECRET.search(normal)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Section):
    path: str = Field(description=f"a local directory, a hub id, or {BUILTIN_TINY_MODEL}")
    served_name: str | None = Field(None, description="the name clients ask for; the path when unset")
    max_model_len: int | None = Field(None, ge=16)
    dtype: str | None = None

    @property
    def is_builtin_tiny(self) -> bool:
        return self.path == BUILTIN_TINY_MODEL


class SimTiming(_Section):
    prefill_ms_per_token: float = Field(0.05, ge=0)
    decode_ms_per_token: float = Field(10.0, ge=0)
    hardware: str | None = Field(
        None,
        description="a hardware profile (h100-sxm, cpu-local, a name `pdctl calibrate` wrote, or a .json path): model "
        "time, not the delays above",
    )
    architecture: str | None = Field(None, description="the model architecture to model; from model.path when unset")
    speed: float | None = Field(
        None,
        gt=0,
        description="with a hardware profile: steps take this many times the model's time (a slower or "
        "faster machine); drawn from the profile's noise when unset",
    )


class RestartSpec(_Section):
    """How the daemon restarts an instance that exits after start-up."""

    backoff_initial_s: float = Field(1.0, gt=0, description="first delay; doubles after each failure")
    backoff_max_s: float = Field(30.0, gt=0)
    max_failures: int = Field(5, ge=1, description="failures within window_s that mark the instance failed")
    window_s: float = Field(300.0, gt=0)


class EngineSpec(_Section):
    kind: str = Field(DEFAULT_ENGINE, description="the engine, by its adapter's name (`pdctl.engines.adapter`)")
    python: Path | None = Field(None, description="the engine runtime's python; `pdctl engine install`'s when unset")
    command: list[str] | None = Field(
        None, description="replaces the launch prefix (python -m vllm...) with a program of your own"
    )
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    load_format: str | None = Field(None, description="`dummy` for random weights (the builtin model)")
    seed: int | None = None
    start_timeout_s: float = Field(600.0, gt=0)
    restart: RestartSpec = Field(default_factory=RestartSpec)
    sim: SimTiming = Field(default_factory=SimTiming)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        engine_adapter(kind)  # UnknownEngine, a ValueError, names the known kinds
        return kind

    @model_validator(mode="after")
    def _no_key_of_its_own(self) -> Self:
        # Either would replace the key pdctl gives each engine, and the router could no longer reach it.
        why = "it would replace the key pdctl gives each launched engine; clients' keys go in router.api_keys"
        if any(arg == "--api-key" or arg.startswith("--api-key=") for arg in self.extra_args):
            raise ValueError(f"extra_args has --api-key: {why}")
        if VLLM_KEY_ENV in self.env:
            raise ValueError(f"env has {VLLM_KEY_ENV}: {why}")
        return self


class CpuSpec(_Section):
    kv_cache_space_gib: float = Field(1.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE per instance")
    nixl_progress_delay_us: int = Field(
        100,
        ge=0,
        description="pause of NIXL's progress thread between polls; 0 keeps NIXL's own busy polling, a core each",
    )
    keep_worker_cores: bool = Field(
        True,
        description="keep each Worker's model thread on the instance's cores; false lets vLLM's NIXL connector move "
        "it to the host's last core (vLLM's own behaviour), another instance's on a small host",
    )
    pin_processes: bool = Field(
        False,
        description="run all of an instance's processes (its API server and EngineCore too, not only the "
        "Worker's compute threads) on its own cores: a prefill instance's TTFT is not slowed by a decode "
        "instance's processes, but a busy decode instance cannot borrow an idle prefill core",
    )
    shm_spin_us: int = Field(
        1000,
        ge=0,
        description="how long vLLM's processes spin on their shared-memory queues after a message before they "
        "sleep; 0 keeps vLLM's 1 s, a core per process under steady traffic",
    )


class PortsSpec(_Section):
    instances: int = Field(8100, ge=1024, le=65000, description="first port of launched instances")
    nixl_side_channel: int = Field(5600, ge=1024, le=65000, description="first VLLM_NIXL_SIDE_CHANNEL_PORT")


class SLOSpec(_Section):
    ttft_ms: float = Field(1000.0, gt=0)
    tpot_ms: float | None = Field(None, gt=0, description="decode.target_latency_ms when unset")


def _variable(reference: str) -> str:
    match = ENV_REFERENCE.match(reference)
    assert match is not None, "checked when the profile was read"
    return match.group(1)


def _env_reference(value: str) -> str:
    # The value is a secret: the message must not repeat it.
    if not ENV_REFERENCE.match(value):
        raise ValueError(
            "write each key as ${VAR}, the name of an environment variable that holds it: a key written in the "
            "profile would be copied into the state directory"
        )
    return value


class TLSSpec(_Section):
    cert: Path = Field(description="PEM certificate (chain) the router presents; relative to the profile file")
    key: Path = Field(description="PEM private key of the certificate; relative to the profile file")


class RouterSpec(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    scheduling_policy: Literal["slo_aware", "fifo"] = "slo_aware"
    routing_strategy: StrategyChoice = Field(
        DEFAULT_STRATEGY, description="a registered strategy's name, or {scorers: {NAME: WEIGHT}, picker: NAME}"
    )
    slo: SLOSpec = Field(default_factory=SLOSpec)
    metrics: bool = Field(True, description="record per-request metrics (off only to measure what they cost)")
    stall_timeout_s: float | None = Field(
        None,
        gt=0,
        description="a stream with no token for this long, or an instance with requests in flight and no "
        "progress for this long, is stalled: its streams move to another instance, it is restarted; default 50 x "
        "the TPOT SLO, at least 10 s",
    )
    warm_kv_paths: bool = Field(
        True,
        description="make each prefill/decode pair's NIXL handshake (one small KV transfer) when an instance "
        "becomes healthy, so no user request pays it (about 0.6 s on the CPU)",
    )
    max_migrations: int = Field(
        3,
        ge=0,
        description="how many times one stream may move to another instance when its engine fails or stalls "
        "mid-stream (0: never; the stream then ends with an error event)",
    )
    api_keys: list[Annotated[str, AfterValidator(_env_reference)]] = Field(
        default_factory=list,
        description="${VAR} references to the keys clients send as `Authorization: Bearer KEY`; none: no check",
    )
    allow_unauthenticated: bool = Field(
        False, description="serve without api_keys on an address other machines can reach"
    )
    metrics_need_key: bool = Field(False, description="/metrics and /pdctl/stats need a key too (/health never)")
    tls: TLSSpec | None = Field(None, description="serve HTTPS with this certificate")

    @model_validator(mode="after")
    def _keys_beyond_loopback(self) -> Self:
        if not self.api_keys and not self.allow_unauthenticated and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host} is reachable from other machines and router.api_keys is empty: anyone who "
                "reaches it could use the cluster. Set router.api_keys (${VAR} references), bind 127.0.0.1, or "
                "say router.allow_unauthenticated: true"
            )
        return self

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def key_variables(self) -> list[str]:
        """The environment variables api_keys name."""
        return [_variable(reference) for reference in self.api_keys]


def is_loopback(host: str) -> bool:
    """Only this machine can reach the address (a name other than localhost may resolve anywhere)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class NodeSelector(_Section):
    """Where instances may run on a launcher with several nodes: node resources each one asks for (Ray's
    custom resources, such as `ray start --resources '{"decode_node": 1}'`), so pools can use different
    node types (the design document's heterogeneous prefill and decode)."""

    resources: dict[str, float] = Field(default_factory=dict)


class LauncherSpec(_Section):
    """Where and how instances run: `local` child processes of the daemon, or `ray` actors on a Ray
    cluster's nodes (vLLM picks its executor backend by name the same way)."""

    # Checked against the launchers' registry a layer up, by the check `load_profile` is given there.
    kind: str = Field("local", description="the launcher, by its class's kind (`pdctl.launchers`)")
    address: str | None = Field(None, description="ray: the head node's HOST:PORT (what `ray start --head` printed)")
    cpus_per_instance: float = Field(1.0, gt=0, description="ray: Ray CPUs each instance on the CPU reserves")
    prefill: NodeSelector = Field(default_factory=NodeSelector)
    decode: NodeSelector = Field(default_factory=NodeSelector, description="decode and hybrid instances")
    instances: dict[str, NodeSelector] = Field(
        default_factory=dict, description="per instance id, in place of its role's selector"
    )

    @field_validator("address")
    @classmethod
    def _host_port(cls, address: str | None) -> str | None:
        if address and not re.fullmatch(r"[^\s:]+:\d{1,5}", address):
            raise ValueError(f"address {address!r} is not HOST:PORT")
        return address

    def selector(self, instance_id: str, role: ExecutionInstanceType) -> NodeSelector:
        if instance_id in self.instances:
            return self.instances[instance_id]
        return self.prefill if role is ExecutionInstanceType.PREFILLING else self.decode


# The `scaling:` section: how fast and how carefully the scaler moves. The pools' bounds are the design
# document's (`pd.prefilling_min_instances` ... `decoding_max_instances`); the latency targets are the router's SLOs.
ScalingMode = Literal["auto", "advisory", "off"]


class ScalingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    mode: ScalingMode = Field(
        "auto",
        description="auto acts; advisory logs and shows decisions without acting; off (also when "
        "pd.enable_dynamic_scaling is false) keeps the pools as started",
    )
    interval_s: float = Field(5.0, gt=0, description="reactive loop period")
    forecast_interval_s: float = Field(30.0, gt=0, description="predictive loop period")
    predictive: bool = Field(True, description="forecast the arrival rate and lengths and hold a floor under the pools")
    scale_out_after_s: float = Field(20.0, ge=0, description="a scale-out signal must hold this long")
    scale_in_after_s: float = Field(90.0, ge=0, description="a scale-in signal must hold this long")
    warmup_s: float = Field(20.0, ge=0, description="samples of an instance this young are ignored")
    window_s: float = Field(30.0, gt=0, description="window of the client-observed latency percentiles")
    percentile: float = Field(90.0, gt=0, lt=100, description="the latency percentile compared with the SLO")
    drain_timeout_s: float = Field(120.0, gt=0, description="a scale-in drain cuts what is left after this")
    scale_in_margin: float = Field(
        0.6,
        gt=0,
        le=1,
        description="scale in only if the load spread over one instance fewer stays below this share of every limit",
    )
    prefill_backlog_s: float | None = Field(
        None, gt=0, description="prompt-token backlog that calls for prefill +1; half the TTFT SLO when unset"
    )
    decode_busy_high: float = Field(
        0.8, gt=0, le=1, description="decode +1 above this share of slots (running and queued) or KV cache in use"
    )
    blocked_retry_s: float = Field(120.0, gt=0, description="after no device was free, wait this long to try again")

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        # YAML 1.1 reads a bare `off` as false: that is what the user wrote.
        return "off" if value is False else value

    @model_validator(mode="after")
    def _in_waits_longer(self) -> Self:
        if self.scale_in_after_s < self.scale_out_after_s:
            raise ValueError(
                f"scale_in_after_s ({self.scale_in_after_s:g}) is below scale_out_after_s "
                f"({self.scale_out_after_s:g}): scale-in must wait at least as long as scale-out"
            )
        return self


class PDSpec(PDSeparationConfig):
    """The design document's PD config with its routing_policy checked against the registered phase policies,
    when loaded and when assigned on a running system: pdctl.types, below the policies, cannot know them."""

    @field_validator("routing_policy")
    @classmethod
    def _registered(cls, name: str) -> str:
        return registered_policy(name)


class CostSpec(_Section):
    gpu_hour_usd: float = Field(2.0, ge=0, description="price of one GPU-hour, for cost figures")


class ClusterProfile(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    scenario: ScenarioName | None = None
    model: ModelSpec
    engine: EngineSpec = Field(default_factory=EngineSpec)
    launcher: LauncherSpec = Field(default_factory=LauncherSpec)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    cpu: CpuSpec = Field(default_factory=CpuSpec)
    ports: PortsSpec = Field(default_factory=PortsSpec)
    router: RouterSpec = Field(default_factory=RouterSpec)
    cost: CostSpec = Field(default_factory=CostSpec)
    pd: PDSpec = Field(default_factory=PDSpec)
    prefill: PrefillingConfig = Field(default_factory=PrefillingConfig)
    decode: DecodingConfig = Field(default_factory=DecodingConfig)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    instances: list[ExecutionInstance] | None = Field(
        None, description="explicit instances; when unset, the pools' minimum sizes are launched"
    )

    @model_validator(mode="after")
    def _link_and_check(self) -> Self:
        # The document reaches the role configs through the PD config: make those the same objects.
        object.__setattr__(self.pd, "prefilling_config", self.prefill)
        object.__setattr__(self.pd, "decoding_config", self.decode)
        return self

    @property
    def served_model_name(self) -> str:
        return self.model.served_name or ("pdctl-tiny-llama" if self.model.is_builtin_tiny else self.model.path)

    @property
    def slo_tpot_ms(self) -> float:
        return self.router.slo.tpot_ms or self.decode.target_latency_ms

    def resolved_instances(self) -> list[ExecutionInstance]:
        """Every instance with nothing left unset: the explicit list, or the pools at their minimum."""
        specs = self.instances if self.instances is not None else self._pool_instances()
        return [self._resolve(spec, index) for index, spec in enumerate(specs)]

    def added_instance(
        self, instance_id: str, role: ExecutionInstanceType, port: int | None = None
    ) -> ExecutionInstance:
        """An instance the scaler adds to a running pool, with its role's settings like the pool's own."""
        return self._resolve(ExecutionInstance(id=instance_id, type=role, port=port), 0)

    def _pool_instances(self) -> list[ExecutionInstance]:
        if not self.pd.enabled:
            count = max(1, self.pd.decoding_min_instances)
            return [ExecutionInstance(id=f"hybrid-{i}", type="HYBRID") for i in range(count)]
        prefill = [
            ExecutionInstance(id=f"prefill-{i}", type="PREFILLING") for i in range(self.pd.prefilling_min_instances)
        ]
        decode = [ExecutionInstance(id=f"decode-{i}", type="DECODING") for i in range(self.pd.decoding_min_instances)]
        return prefill + decode

    def _resolve(self, spec: ExecutionInstance, index: int) -> ExecutionInstance:
        role_config = self.prefill if spec.instance_type is ExecutionInstanceType.PREFILLING else self.decode
        tp = spec.tensor_parallel_size or role_config.tensor_parallel_size
        pp = spec.pipeline_parallel_size or role_config.pipeline_parallel_size
        return ExecutionInstance(
            id=spec.instance_id,
            type=spec.instance_type,
            host=spec.host,
            port=spec.port or self.ports.instances + index,
            model_name=spec.model_name or self.served_model_name,
            gpu_count=spec.gpu_count or tp * pp,
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            launch=spec.launch,
            prefilling_config=spec.prefilling_config
            or (self.prefill if spec.instance_type is ExecutionInstanceType.PREFILLING else None),
            decoding_config=spec.decoding_config
            or (None if spec.instance_type is ExecutionInstanceType.PREFILLING else self.decode),
        )


def instance_problems(profile: ClusterProfile) -> list[tuple[Loc, str]]:
    """Instance ids and ports used twice, GPU counts that don't fit, each with the field that caused it."""
    explicit = profile.instances is not None
    specs = profile.instances if explicit else profile._pool_instances()
    owners: dict[tuple[str, int], str] = {("127.0.0.1", profile.router.port): "the router"}
    ids: set[str] = set()
    problems: list[tuple[Loc, str]] = []
    for index, spec in enumerate(specs):
        here: Loc = ("instances", index) if explicit else ()
        if spec.instance_id in ids:
            problems.append(((*here, "id"), f"instance id {spec.instance_id!r} is used twice"))
        ids.add(spec.instance_id)
        port = spec.port or profile.ports.instances + index
        key = (_local_alias(spec.host), port)
        if key in owners:
            field = (*here, "port") if spec.port else ("ports", "instances")
            loc = ("router", "port") if owners[key] == "the router" and not spec.port else field
            problems.append((loc, f"port {port} is used twice: by {owners[key]} and by {spec.instance_id}"))
        owners[key] = spec.instance_id
        problems += _gpu_count_problem(profile, spec, here)
    return problems


def _gpu_count_problem(profile: ClusterProfile, spec: ExecutionInstance, here: Loc) -> list[tuple[Loc, str]]:
    role = profile.prefill if spec.instance_type is ExecutionInstanceType.PREFILLING else profile.decode
    per_replica = (spec.tensor_parallel_size or role.tensor_parallel_size) * (
        spec.pipeline_parallel_size or role.pipeline_parallel_size
    )
    if spec.gpu_count is None or spec.gpu_count % per_replica == 0:
        return []
    return [
        (
            (*here, "gpu_count"),
            f"gpu_count {spec.gpu_count} is not a multiple of tensor_parallel_size x pipeline_parallel_size "
            f"= {per_replica}",
        )
    ]


def _local_alias(host: str) -> str:
    return "127.0.0.1" if host in ("localhost", "127.0.0.1", "0.0.0.0", "::1") else host


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# What a layer above checks of a loaded profile against what it alone knows (the launchers' registry): its
# problems are reported as the profile's own, with file, line and field.
ProfileCheck = Callable[[ClusterProfile], list[tuple[Loc, str]]]


def load_profile(path: Path | str, checks: Sequence[ProfileCheck] = ()) -> ClusterProfile:
    """Load and validate a profile file, or raise ProfileError naming file, line, column and field."""
    source = load_yaml(Path(path))
    if not isinstance(source.data, dict):
        raise ProfileError(
            [f"{source.path}:1:1: the profile must be a mapping of sections, not {type(source.data).__name__}"]
        )
    return profile_from_data(source.data, source, checks)


def profile_from_data(data: dict[str, Any], source: YamlSource, checks: Sequence[ProfileCheck] = ()) -> ClusterProfile:
    raw = dict(data)
    raw.setdefault("name", source.path.stem)
    scenario = raw.get("scenario")
    if isinstance(scenario, str) and scenario in SCENARIO_PRESETS:
        raw = deep_merge(SCENARIO_PRESETS[scenario], raw)
    try:
        profile = ClusterProfile.model_validate(raw)
    except ValidationError as error:
        raise ProfileError([_describe(item, source) for item in error.errors()]) from None
    problems = instance_problems(profile) + [problem for check in checks for problem in check(profile)]
    if problems:
        raise ProfileError([f"{source.where(loc)}: {dotted(loc)}: {message}" for loc, message in problems])
    _anchor_tls(profile, source.path.parent)
    return profile


def _anchor_tls(profile: ClusterProfile, base: Path) -> None:
    # The daemon runs in the state directory: a path relative to the profile would not be found from there.
    tls = profile.router.tls
    if tls is not None:
        tls.cert, tls.key = (base / path.expanduser() for path in (tls.cert, tls.key))


def _describe(item: Any, source: YamlSource) -> str:
    message = item["msg"].removeprefix("Value error, ")
    loc = _user_loc(tuple(item["loc"]))
    # A model-level check names its field first ("x_min_instances (4) is above ..."): point at that field.
    first_word = message.split(" ", 1)[0]
    if first_word in _known_keys(loc):
        loc = (*loc, first_word)
    field = dotted(loc)
    if item["type"] == "extra_forbidden":
        message = f"unknown key{_suggestion(loc)}"
    elif item["type"] == "missing":
        message = "required field is missing"
    elif item["type"] == "literal_error":
        message = f"{message}, got {item['input']!r}"
    return f"{source.where(loc)}: {field}: {message}"


def _user_loc(loc: Loc) -> Loc:
    # pydantic puts validator names and union branches into locs; users only know their own keys.
    return tuple(part for part in loc if not (isinstance(part, str) and ("[" in part or part.startswith("function-"))))


def _suggestion(loc: Loc) -> str:
    known = _known_keys(loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else (f"; valid keys: {', '.join(sorted(known))}" if known else "")


def _known_keys(parent: Loc) -> list[str]:
    model: Any = ClusterProfile
    for part in parent:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = _model_of(field.annotation)
        if model is None:
            return []
    names: list[str] = []
    for name, field in model.model_fields.items():
        names.append(field.alias or name)
        if field.alias:
            names.append(name)
    return names


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found:
            return found
    return None
