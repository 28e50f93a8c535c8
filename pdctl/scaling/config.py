"""The profile's `scaling:` section: the scaler's knobs, validated like the rest of the profile.

The pools' bounds are the design document's (`pd.prefilling_min_instances` ... `decoding_max_instances`);
the latency targets are the router's SLOs. This section only says how fast and how carefully to move.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
