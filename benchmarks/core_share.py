"""Where each engine's model runs under PD load: the cores its Worker's model thread may use, the share of
wall time it ran and the share it waited for a core (the kernel's /proc/<tid>/schedstat), beside the prefill
hop and the TTFT the clients saw. Twice, on the same profile: with pdctl's runtime hook keeping that thread on
its instance's cores (`cpu.keep_worker_cores: true`, the default) and with vLLM's own behaviour, where its NIXL
connector moves the thread to the host's last core.

    python benchmarks/core_share.py [--profile profiles/local.yaml] [-n 80] [--concurrency 4]
        [--input-len 800] [--output-len 32] [--policy threshold]

Each variant is brought up, warmed with a few requests, measured under `pdctl bench`'s load, and stopped.
Real vLLM: run it under the machine-wide lock.
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
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdctl.bench.compare import each_variant
from pdctl.bench.run import Target
from pdctl.state import state_root

WORKER = "VLLM::Worker"


def model_threads(target: Target) -> dict[str, int]:
    """Each instance's Worker main thread (its pid), found under the API server listening on its port."""
    found = {}
    for instance, url in target.engines.items():
        flag = f"--port {urlsplit(url).port}"
        api = next(p for p in psutil.process_iter(["cmdline"]) if flag in " ".join(p.info["cmdline"] or []))
        found[instance] = next(p.pid for p in api.children(recursive=True) if p.name() == WORKER)
    return found


def schedstat(tid: int) -> tuple[float, float]:
    """Seconds the thread has run, and waited runnable for a core, since it started."""
    ran, waited, _ = (int(v) for v in Path(f"/proc/{tid}/schedstat").read_text().split())
    return ran / 1e9, waited / 1e9


def bench(target: Target, args: argparse.Namespace, num_prompts: int, out: Path | None = None) -> None:
    argv = [sys.executable, "-m", "pdctl", "bench", "--url", target.url, "--tokenizer", str(target.model_dir)]
    argv += ["-n", str(num_prompts), "--concurrency", str(args.concurrency)]
    argv += ["--input-len", str(args.input_len), "--output-len", str(args.output_len)]
    argv += ["--json", str(out)] if out else []
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    bench(target, args, 8)  # the engines' first steps are slow: not what is measured
    threads = model_threads(target)
    before = {instance: schedstat(tid) for instance, tid in threads.items()}
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "bench.json"
        bench(target, args, args.num_prompts, out)
        result = json.loads(out.read_text())
    wall = time.monotonic() - began
    stats = httpx.get(f"{target.url}/pdctl/stats", timeout=10).json()["windows"]["60s"]
    figures: dict[str, Any] = {
        "TTFT median ms": result["median_ttft_ms"],
        "prefill hop median ms": stats["prefill_hop"]["p50_ms"],
        "output tok/s": result["output_throughput"],
    }
    for instance, tid in threads.items():
        ran, waited = (after - start for after, start in zip(schedstat(tid), before[instance], strict=True))
        cores = ",".join(str(core) for core in sorted(os.sched_getaffinity(tid)))
        figures[f"{instance} model thread: cores"] = cores
        figures[f"{instance} model thread: ran"] = f"{ran / wall:.0%}"
        figures[f"{instance} model thread: waited for a core"] = f"{waited / wall:.0%}"
    return figures


def keep_cores(keep: bool, policy: str):
    def variant(data: dict[str, Any], plan: Any) -> dict[str, Any]:
        data.setdefault("cpu", {})["keep_worker_cores"] = keep
        data.setdefault("pd", {})["routing_policy"] = policy
        return data

    return variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=Path, default=Path("profiles/local.yaml"))
    parser.add_argument("-n", "--num-prompts", type=int, default=80)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=800)
    parser.add_argument("--output-len", type=int, default=32)
    # threshold: every long prompt takes the prefill hop, so the prefill instance's core is what is measured.
    parser.add_argument("--policy", default="threshold", help="pd.routing_policy of both variants")
    args = parser.parse_args()
    variants = [("kept", keep_cores(True, args.policy)), ("vllm-own", keep_cores(False, args.policy))]
    columns = {
        name: figures
        for name, _, figures in each_variant(
            args.profile, variants, state_root(), lambda target: measure(target, args), _Quiet()
        )
    }
    print("\nkept: cpu.keep_worker_cores true (pdctl's hook); vllm-own: false (the NIXL connector moves the thread)")
    print(f"{args.profile}, PD, {args.policy}: {args.num_prompts} requests of {args.input_len} in / "
          f"{args.output_len} out, {args.concurrency} clients; prefill hop over the router's last 60 s")  # fmt: skip
    names = list(columns)
    print(f"{'':40}" + "".join(f"{name:>20}" for name in names))
    for row in columns[names[0]]:
        cells = [columns[name][row] for name in names]
        print(f"{row:40}" + "".join(f"{c:>20.1f}" if isinstance(c, float) else f"{c:>20}" for c in cells))


class _Quiet:
    def print(self, *parts: object) -> None:
        print(*parts, file=sys.stderr)


if __name__ == "__main__":
    main()
