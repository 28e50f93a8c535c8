"""Verify placement and NVML monitoring on a host with GPUs, where vLLM itself is not installed.

Every instance runs tests/standin_engine.py (it serves /health and /v1/models and holds memory on each GPU
it sees), so this checks what pdctl controls: which GPUs each instance gets and sees, what NVML attributes
to it, the refusals, and that `down` leaves no process on any GPU. Prints every command and its output.

    python3 scripts/verify_gpu_host.py [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "tests" / "standin_engine.py"


def pdctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    print(f"\n$ pdctl {' '.join(args)}", flush=True)
    result = subprocess.run([sys.executable, "-m", "pdctl", *args], capture_output=True, text=True, cwd=ROOT)
    print(result.stdout + result.stderr, f"(exit {result.returncode})", flush=True)
    if check and result.returncode != 0:
        raise SystemExit(f"pdctl {args[0]} failed")
    return result


def profile_text(name: str, prefill_tp: int, decoders: int, base_port: int) -> str:
    return f"""\
name: {name}
model: {{path: standin-model}}
device: cuda
engine:
  command: [{sys.executable}, {STANDIN}]
  env: {{STANDIN_GPU_MIB: "2048"}}
  start_timeout_s: 120
router: {{port: {base_port}}}
ports: {{instances: {base_port + 1}, nixl_side_channel: {base_port + 100}}}
pd: {{prefilling_min_instances: 1, decoding_min_instances: {decoders}, decoding_max_instances: {max(decoders, 6)},
      enable_dynamic_scaling: false}}
prefill: {{tensor_parallel_size: {prefill_tp}}}
decode: {{tensor_parallel_size: 1}}
"""


def check(condition: bool, what: str) -> bool:
    print(("PASS " if condition else "FAIL ") + what, flush=True)
    return condition


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state-dir", type=Path, default=Path(tempfile.mkdtemp()) / "state")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    inventory = json.loads(pdctl("gpus", "--json").stdout)
    pdctl("gpus")
    count = len(inventory["gpus"])
    if count == 0:
        print("no GPU here")
        return 1
    ok = True
    # A prefill instance at tensor parallel 4 (or half the host) and decoders at 1 on the rest.
    prefill_tp = 4 if count >= 6 else max(1, count // 2)
    decoders = count - prefill_tp
    profile = work / "gpu-host.yaml"
    profile.write_text(profile_text("gpuhost", prefill_tp, decoders, 27000))
    plan = json.loads(pdctl("plan", str(profile), "--json").stdout)
    pdctl("plan", str(profile))
    assigned = [g["uuid"] for i in plan["instances"] for g in i["gpus"]]
    ok &= check(len(assigned) == len(set(assigned)) == count, f"{count} distinct GPUs assigned")

    too_big = work / "too-big.yaml"
    too_big.write_text(profile_text("toobig", 4, count, 27200))
    refused = pdctl("plan", str(too_big), check=False)
    ok &= check(refused.returncode == 2 and f"this host has {count}" in refused.stderr, "too many GPUs refused")

    state = ["--state-dir", str(args.state_dir)]
    pdctl("up", str(profile), *state)
    try:
        for instance in plan["instances"]:
            seen = httpx.get(f"http://127.0.0.1:{instance['port']}/standin", timeout=10).json()
            wanted = sorted(g["uuid"] for g in instance["gpus"])
            ok &= check(sorted(seen["uuids"]) == wanted, f"{instance['id']} sees exactly {wanted}")
        time.sleep(5)  # the daemon samples NVML every 2 s
        snapshot = json.loads(pdctl("status", *state, "--json").stdout)
        pdctl("status", *state)
        pdctl("gpus")
        for instance, planned in zip(snapshot["status"]["instances"], plan["instances"], strict=True):
            used = sorted(u["index"] for u in instance["gpu_use"])
            wanted = sorted(g["index"] for g in planned["gpus"])
            ok &= check(used == wanted, f"NVML attributes GPUs {used} to {instance['id']} (placed on {wanted})")
        figures = {i["id"]: i["gpu"] for i in (snapshot["stats"] or {}).get("instances", [])}
        for planned in plan["instances"]:
            gpu = figures.get(planned["id"]) or {}
            held = 2048 * len(planned["gpus"])
            ok &= check(
                gpu.get("utilization_percent") is not None and (gpu.get("memory_used_mib") or 0) >= held,
                f"the router's stats show NVML figures of {planned['id']}'s GPUs: {gpu} (holds {held} MiB)",
            )

        # A GPU another process fills is refused, naming that process.
        filler = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import torch,time; x=torch.empty(int(torch.cuda.mem_get_info()[0]*0.9),"
                "dtype=torch.uint8,device='cuda'); print('filled', flush=True); time.sleep(600)",
            ],
            env={**os.environ, "CUDA_VISIBLE_DEVICES": inventory["gpus"][0]["uuid"]},
            stdout=subprocess.PIPE,
            text=True,
        )
        filler.stdout.readline()
        other = work / "other.yaml"
        other.write_text(profile_text("other", 1, count - 1, 27400))
        busy = pdctl("plan", str(other), check=False)
        ok &= check(
            busy.returncode == 2 and f"pid {filler.pid}" in busy.stderr, "a filled GPU is refused, naming its pid"
        )
        filler.kill()
        filler.wait()
    finally:
        pdctl("down", *state)
    time.sleep(1)
    after = json.loads(pdctl("gpus", "--json").stdout)
    leftover = [p for g in after["gpus"] for p in g["processes"]]
    ok &= check(leftover == [], "no process left on any GPU after down")
    pdctl("gpus")
    print("\nALL PASSED" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
