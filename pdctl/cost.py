"""What serving costs: dollars per million output tokens at the profile's GPU-hour price, and the measured
comparison of a PD layout against the same devices serving colocated.

The comparison is never estimated: it exists only once `pdctl bench PROFILE --compare` has run one workload on
both layouts of the same devices, and it is stored beside the cluster's state under the profile's name.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, Field

from pdctl.state import write_atomic


def usd_per_million_tokens(devices: int, gpu_hour_usd: float, tokens_per_s: float) -> float | None:
    """The price of the devices for the time one million tokens take at this rate; None without tokens."""
    if tokens_per_s <= 0:
        return None
    return devices * gpu_hour_usd / 3600 / tokens_per_s * 1e6


class CostComparison(BaseModel):
    """One workload measured on the PD layout and on the colocated layout of the same devices."""

    profile: str
    measured_at: datetime
    workload: str = Field(description="what load was offered, as bench describes it")
    engine: str
    devices: int = Field(gt=0, description="GPUs (on a CPU host: instances) in each layout")
    gpu_hour_usd: float = Field(ge=0)
    pd_output_tokens_per_s: float = Field(gt=0)
    colocated_output_tokens_per_s: float = Field(gt=0)

    @property
    def pd_usd_per_million(self) -> float:
        return self.devices * self.gpu_hour_usd / 3600 / self.pd_output_tokens_per_s * 1e6

    @property
    def colocated_usd_per_million(self) -> float:
        return self.devices * self.gpu_hour_usd / 3600 / self.colocated_output_tokens_per_s * 1e6

    @property
    def optimization_percent(self) -> float:
        """How much cheaper per token the PD layout is than colocated (negative: dearer). The price cancels
        out: it is the throughput ratio seen as a cost."""
        return (1 - self.colocated_output_tokens_per_s / self.pd_output_tokens_per_s) * 100


def comparison_path(state_root: Path, profile: str) -> Path:
    return state_root / "comparisons" / f"{profile}.json"


def save_comparison(state_root: Path, comparison: CostComparison) -> Path:
    path = comparison_path(state_root, comparison.profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, comparison.model_dump_json(indent=2))
    return path


def load_comparison(state_root: Path, profile: str) -> CostComparison | None:
    path = comparison_path(state_root, profile)
    try:
        return CostComparison.model_validate_json(path.read_bytes())
    except (OSError, ValueError):
        return None
