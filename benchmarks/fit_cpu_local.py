"""Fit the cpu-local hardware profile to real vLLM CPU runs of the builtin tiny model, and check it.

    flock /tmp/pdctl-real-vllm.lock python benchmarks/fit_cpu_local.py measure [--fresh]  # real vLLM, 3 minutes
    python benchmarks/fit_cpu_local.py fit        # writes pdctl/perfmodel/data/hardware/cpu-local.json, fidelity too
    python benchmarks/fit_cpu_local.py compare    # the fidelity table: simulated against the stored real runs
    python benchmarks/fit_cpu_local.py sim-check  # the same for the sim engine itself (processes, HTTP): 7 minutes

`measure` (pdctl.simulate.cpumeasure, which `pdctl calibrate` runs too) brings up one real vLLM CPU instance
(PD off, the builtin model) with `pdctl up` pinned to one core and the client on the others, sends calibration
requests (single requests over prompt lengths; decode batches of 1 to 16; bursts of arrivals; requests joining
running ones) and validation runs (fixed lengths and chat-, qa- and code-like lengths at three concurrency
levels), records every request's TTFT, chunk gaps and end-to-end latency with the machine's load average, and
takes the cluster down; each measurement is added to the stored ones (--fresh, or another machine, starts
over). The fit uses only the calibration requests of all of them together; the validation runs are the
held-out check (tests/test_perfmodel_cpu.py), and the odd measurements against the
even ones say how far real vLLM is from itself."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pdctl.perfmodel.hardware import HARDWARE_DIR, get_hardware
from pdctl.simulate.calibration import cpu_machine
from pdctl.simulate.cpufit import (
    RUNS_PATH,
    VALIDATION,
    Comparison,
    calibrated_profile,
    compare_runs,
    figures,
    held_out,
    noise_floor,
    pooled,
    render_comparison,
    render_held_out,
    replica_speeds,
)
from pdctl.simulate.cpumeasure import instance, measure, run_all, write_runs

# The sim engine timed by the shipped cpu-local profile, at a given speed (HardwareProfile.noise).
SIM = "{{kind: sim, sim: {{hardware: cpu-local, speed: {speed}}}}}"


def measure_into(out: Path, fresh: bool) -> None:
    """A measurement added to the stored ones (or the first, --fresh), with the machine they were measured on:
    a machine other than the stored one's starts over, since the fit pools them."""
    stored = {} if fresh or not out.is_file() else json.loads(out.read_text())
    machine = cpu_machine("benchmarks/fit_cpu_local.py measure").model_dump(exclude_none=True)
    earlier = stored.get("measurements", []) if stored.get("machine", machine) == machine else []
    result = measure("benchmarks/fit_cpu_local.py measure")
    write_runs(out, {"machine": machine, "measurements": [*earlier, result]})


def sim_check(runs: dict[str, Any], replicas: int) -> list[Comparison]:
    """The sim engine itself (a real process over HTTP, timed by the shipped cpu-local) against the stored real
    runs: the validation runs sent the same way, `replicas` times, each a fresh instance at a speed spread over
    the profile's noise as `compare` spreads them."""
    instances = []
    for speed in replica_speeds(get_hardware("cpu-local").noise, replicas):
        with instance(SIM.format(speed=round(speed, 4))) as endpoint:
            instances.append({"validation": run_all(endpoint, VALIDATION, print)})
    real, simulated = pooled(runs, "validation"), pooled({"measurements": instances}, "validation")
    return [Comparison(name, figures(real[name]), figures(simulated[name])) for name in VALIDATION]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["measure", "fit", "compare", "sim-check"])
    parser.add_argument("--runs", type=Path, default=RUNS_PATH)
    parser.add_argument("--fresh", action="store_true", help="measure: replace the stored measurements, not add one")
    parser.add_argument("--fitted-on", type=int, help="compare: the held-out check fits the first N measurements "
                        "(default half) and checks the rest")  # fmt: skip
    parser.add_argument("--replicas", type=int, default=4, help="sim-check: sim engine instances, one at a time")
    args = parser.parse_args()
    if args.step == "measure":
        measure_into(args.runs, args.fresh)
        return
    runs = json.loads(args.runs.read_text())
    if args.step == "fit":
        profile = calibrated_profile(runs)
        path = HARDWARE_DIR / "cpu-local.json"
        path.write_text(profile.model_dump_json(indent=1) + "\n")
        assert profile.fidelity is not None
        print(f"wrote {path}: {profile.overhead}\nfidelity: {profile.fidelity.summary()}")
    elif args.step == "sim-check":
        print(render_comparison(sim_check(runs, args.replicas), noise_floor(runs)))
    else:
        print(render_comparison(compare_runs(runs), noise_floor(runs)))
        total = len(runs["measurements"])
        fitted_on = args.fitted_on or total // 2
        print(render_held_out(*held_out(runs, fitted_on), fitted_on, total))


if __name__ == "__main__":
    main()
