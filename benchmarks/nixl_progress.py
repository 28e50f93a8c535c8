"""What NIXL's progress thread costs an idle engine, and what pdctl's hook (pdctl/engines/nixl_progress.py) saves:
the CPU share of one process holding one NIXL agent (UCX backend, as vLLM's NixlConnector creates it), with
NIXL's own busy polling and with each pause between polls, side by side in one run, in the engine runtime.

    python benchmarks/nixl_progress.py [--seconds S] [--delays 0,10,100,1000]

A PD instance holds one agent for its life: on a CPU host the busy-polling figure is a core taken from the
engine's compute, its API server and the router, idle or not.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pdctl.engines import runtime  # noqa: E402
from pdctl.engines.commands import NIXL_PROGRESS_ENV  # noqa: E402

AGENT = """
import sys, time
from nixl._api import nixl_agent, nixl_agent_config
agent = nixl_agent("bench", nixl_agent_config(num_threads=4, capture_telemetry=True))
time.sleep(0.5)  # the progress thread started
cpu, wall = time.process_time(), time.monotonic()
time.sleep(float(sys.argv[1]))
print((time.process_time() - cpu) / (time.monotonic() - wall))
"""


def cpu_share(python: Path, seconds: float, delay_us: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != NIXL_PROGRESS_ENV}
    if delay_us:
        env[NIXL_PROGRESS_ENV] = str(delay_us)
    done = subprocess.run([str(python), "-c", AGENT, str(seconds)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the agent failed: {done.stderr.strip().splitlines()[-1:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--delays", default="0,10,100,1000", help="pauses between polls, us (0: NIXL's own)")
    args = parser.parse_args()
    info = runtime.check_runtime()
    runtime.install_hooks(info.dir)
    print(f"one idle NIXL agent in {info.python} (nixl {info.nixl_version}), {args.seconds:g} s each")
    print(f"{'pause between polls':<22} {'CPU share of one core':>22}")
    for delay in (int(d) for d in args.delays.split(",")):
        label = "0 (NIXL's own)" if delay == 0 else f"{delay} us"
        print(f"{label:<22} {cpu_share(info.python, args.seconds, delay):>21.1%}")


if __name__ == "__main__":
    main()
