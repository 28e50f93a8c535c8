"""The daemon's watchdog: `pdctl up` starts it detached, and it runs the control-plane daemon as its child.

A daemon that dies (SIGKILL, an out-of-memory kill, a crash) is started again within a second, told to adopt
the engines that still run (through the launcher), so the router is back without restarting any engine and
nothing is orphaned. The watchdog keeps the profile and plan it was given through its stdin in memory only:
they carry secrets that never touch the state directory. It does nothing else, so there is little in it to
fail. `pdctl down` stops it first (SIGTERM: it exits at once and leaves its daemon to `down`), finding it by its
command line, which names the cluster's state directory.
"""

from __future__ import annotations

import argparse
import collections
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from pdctl.state import ClusterDir, ClusterPhase

log = logging.getLogger("pdctl.watchdog")
# A daemon that keeps dying is not helped by starting it again: after this many deaths in the window, stop.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


class Watchdog:
    def __init__(self, cluster_dir: ClusterDir, given: bytes):
        self.dir = cluster_dir
        self.given = given
        self.stopping = False
        self.deaths: collections.deque[float] = collections.deque()

    def run(self) -> int:
        adopt = False
        while True:
            code = self._run_daemon(adopt)
            if self.stopping or code == 0:
                return 0
            if not self._worth_restarting(code):
                return 1
            log.warning("the daemon died (exit code %d); starting it again to adopt the running engines", code)
            adopt = True

    def _run_daemon(self, adopt: bool) -> int:
        argv = [sys.executable, "-m", "pdctl.daemon", "--cluster-dir", str(self.dir.path)]
        argv += ["--adopt"] if adopt else []
        daemon = subprocess.Popen(argv, stdin=subprocess.PIPE, cwd=self.dir.path)
        assert daemon.stdin is not None
        daemon.stdin.write(self.given)
        daemon.stdin.close()
        while True:
            try:
                return daemon.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if self.stopping:
                    return 0  # `down` stops the daemon itself, after this watchdog is gone

    def _worth_restarting(self, code: int) -> bool:
        state = self.dir.read_state()
        if state is None or state.phase in (ClusterPhase.FAILED, ClusterPhase.STOPPING):
            phase = state.phase.value if state else "stopped"
            log.error("the daemon exited with code %d; the cluster is %s: not starting it again", code, phase)
            return False
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths and now - self.deaths[0] > RESTART_WINDOW_S:
            self.deaths.popleft()
        if len(self.deaths) > MAX_RESTARTS:
            log.error("the daemon died %d times in %g s: giving up", len(self.deaths), RESTART_WINDOW_S)
            return False
        return True

    def stop(self, *_: object) -> None:
        self.stopping = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdctl-watchdog")
    parser.add_argument("--cluster-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    watchdog = Watchdog(ClusterDir(args.cluster_dir.parent, args.cluster_dir.name), sys.stdin.buffer.read())
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, watchdog.stop)
    return watchdog.run()


if __name__ == "__main__":
    sys.exit(main())
