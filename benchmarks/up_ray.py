"""`pdctl up` until ready on the Ray launcher against the local launcher, for the same profile, side by side.

A Ray cluster of two nodes runs on this machine (head 127.0.0.2 on core 0, a worker on 127.0.0.3 on core 1,
as the local launcher pins the two instances of profiles/local.yaml to cores 0 and 1). Runs alternate
between the launchers, so the machine's drift falls on both; each `up` is followed by `down`. The figure is
the ratio of the medians, Ray over local (aim: at most 1.2). The Ray cluster's own start is not counted: it
runs before pdctl, as an operator's would.

    python benchmarks/up_ray.py [PROFILE] [--runs N]

The sim engine (a profile with engine.kind sim) isolates what the launchers add: its instances start in
about a second, so Ray's actor placement shows in full.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.raynodes import RayNodes  # noqa: E402 - the test helper that runs Ray nodes on loopback addresses


def pdctl(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pdctl", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"pdctl {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")


def timed_up(profile: Path) -> float:
    with tempfile.TemporaryDirectory() as state:
        began = time.monotonic()
        pdctl("up", str(profile), "--state-dir", state)
        took = time.monotonic() - began
        pdctl("down", "--state-dir", state)
    return took


def on_ray(profile: Path, head: str, out: Path) -> Path:
    data = yaml.safe_load(profile.read_text())
    data["launcher"] = {"kind": "ray", "address": head, "decode": {"resources": {"decode_node": 1}}}
    out.write_text(yaml.safe_dump(data))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", nargs="?", type=Path, default=ROOT / "profiles" / "local.yaml")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    nodes = RayNodes()
    try:
        head = nodes.add("127.0.0.2", cpus=1, resources={"decode_node": 1}, cores="0")
        nodes.add("127.0.0.3", cpus=1, cores="1")
        nodes.wait_alive(2)
        with tempfile.TemporaryDirectory() as scratch:
            ray_profile = on_ray(args.profile, head, Path(scratch) / args.profile.name)
            times: dict[str, list[float]] = {"local": [], "ray": []}
            for run in range(args.runs):
                for name, profile in (("local", args.profile), ("ray", ray_profile)):
                    times[name].append(timed_up(profile))
                    print(f"run {run + 1}: {name:5s} up until ready {times[name][-1]:.1f} s", flush=True)
    finally:
        nodes.stop()
    local, ray = statistics.median(times["local"]), statistics.median(times["ray"])
    print(
        f"profile {args.profile.name}: up until ready, median of {args.runs}: local {local:.1f} s, "
        f"ray {ray:.1f} s; ray/local {ray / local:.2f} (aim <= 1.2)"
    )


if __name__ == "__main__":
    main()
