"""How much `pdctl up` adds to the engines' own start, and how long `pdctl down` takes.

Instances start in parallel, so `up` until ready should take little more than the slowest instance's own
start (process launch to first healthy answer, as the daemon recorded it): the ratio should stay under 1.15.
`down` is timed until no process of the cluster remains.

    python benchmarks/up_down.py [PROFILE] [--runs N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def pdctl(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pdctl", *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def marked(token: str) -> int:
    count = 0
    for process in psutil.process_iter():
        try:
            count += process.environ().get("PDCTL_CLUSTER_TOKEN") == token
        except (psutil.Error, OSError):
            continue
    return count


def one_run(profile: Path, state_root: Path) -> tuple[float, float, float]:
    began = time.monotonic()
    pdctl("up", str(profile), "--state-dir", str(state_root))
    up_s = time.monotonic() - began
    cluster = next(p for p in state_root.iterdir() if (p / "state.json").exists())
    state = json.loads((cluster / "state.json").read_text())
    slowest = max(i["healthy_at"] - i["started_at"] for i in state["instances"].values() if i["started_at"])
    began = time.monotonic()
    pdctl("down", cluster.name, "--state-dir", str(state_root))
    while marked(state["token"]):
        time.sleep(0.05)
    down_s = time.monotonic() - began
    return up_s, slowest, down_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", nargs="?", type=Path, default=ROOT / "profiles" / "local.yaml")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    results = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as state_root:
            up_s, slowest, down_s = one_run(args.profile, Path(state_root))
        results.append((up_s, slowest, down_s))
        print(
            f"run {run + 1}: up {up_s:.1f} s, slowest instance {slowest:.1f} s, "
            f"ratio {up_s / slowest:.3f}; down {down_s:.2f} s"
        )
    ratios = [up / slowest for up, slowest, _ in results]
    print(
        f"profile {args.profile.name}: up/slowest-instance ratio median {statistics.median(ratios):.3f} "
        f"(target < 1.15); down median {statistics.median(d for *_, d in results):.2f} s over {len(results)} runs"
    )


if __name__ == "__main__":
    main()
