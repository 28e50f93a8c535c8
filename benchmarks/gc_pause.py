"""The daemon's full garbage collections: how long one stalls the router, with the objects alive after
start-up left to the collector against frozen (pdctl.router.server.freeze_startup_heap, which the daemon calls
once its router listens). Both in one process: a router is built from a sim profile as the daemon builds it,
a full collection is timed, the heap frozen, a full collection timed again.

    python benchmarks/gc_pause.py [--repeat N]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pdctl import cli, daemon  # noqa: F401  (what the daemon process holds)
from pdctl.cluster import plan_profile
from pdctl.router.server import build_router, freeze_startup_heap

PROFILE = """name: gcpause
model: {path: sim-model}
device: cpu
engine: {kind: sim}
pd: {prefilling_min_instances: 2, decoding_min_instances: 6, enable_dynamic_scaling: false}
"""


def full_collections(repeat: int) -> list[float]:
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        gc.collect()
        timings.append((time.perf_counter() - started) * 1000)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gcpause.yaml"
        path.write_text(PROFILE)
        planned = plan_profile(path)
        router = build_router(planned.profile, planned.plan)
        gc.collect()
        tracked = len(gc.get_objects())
        left = full_collections(args.repeat)
        freeze_startup_heap()
        frozen = full_collections(args.repeat)
        assert router.pool.all()  # alive through both
    print(f"a full collection, {tracked} tracked objects after start-up, median of {args.repeat}:")
    print(f"  left to the collector  {statistics.median(left) * 1000:9.0f} us")
    print(f"  frozen                 {statistics.median(frozen) * 1000:9.0f} us   ({gc.get_freeze_count()} frozen)")


if __name__ == "__main__":
    main()
