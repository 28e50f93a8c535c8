"""A stand-in for an engine where vLLM cannot run: it takes vLLM's arguments, serves /health and
/v1/models, and, where PyTorch sees GPUs, holds memory on each so NVML attributes it to this process.

Used by the supervisor tests (`engine.command`) and on the multi-GPU device host, where no vLLM exists.
GET /standin reports what the process was given: its pid, CUDA_VISIBLE_DEVICES and the UUIDs it sees.
Knobs (environment): STANDIN_STARTUP_DELAY_S, STANDIN_EXIT_AFTER_S, STANDIN_EXIT_CODE, STANDIN_GPU_MIB, and
STANDIN_CORE_CHILD: start a child as vLLM's API server starts its EngineCore (same process group, without the
environment pdctl gave the server) that holds the NIXL side-channel port until it is killed.
STANDIN_FATAL_PORT: the instance on this port logs vLLM's "EngineCore failed to start." and then answers /health
with 503 for ever, as vLLM's API server does when its engine core died while it loads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _gpus(mib: int) -> tuple[list[str], list[object]]:
    try:
        import torch
    except ImportError:
        return [], []
    if not torch.cuda.is_available():
        return [], []
    uuids, held = [], []
    for index in range(torch.cuda.device_count()):
        uuids.append("GPU-" + str(torch.cuda.get_device_properties(index).uuid))
        held.append(torch.empty(mib * 1024 * 1024, dtype=torch.uint8, device=f"cuda:{index}"))
    return uuids, held


_CORE = """
import socket, sys, time
holder = socket.socket()
holder.bind((sys.argv[1], int(sys.argv[2])))
holder.listen()
print("core child holds", sys.argv[2], flush=True)
while True:
    time.sleep(1)
"""


def _core_child(host: str) -> None:
    port = os.environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT")
    if os.environ.get("STANDIN_CORE_CHILD") and port:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PDCTL_")}
        subprocess.Popen([sys.executable, "-c", _CORE, host, port], env=environ)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?")
    parser.add_argument("--model", dest="model_flag")
    parser.add_argument("--served-model-name", default="standin")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args, _unknown = parser.parse_known_args()
    time.sleep(float(os.environ.get("STANDIN_STARTUP_DELAY_S", "0")))
    uuids, held = _gpus(int(os.environ.get("STANDIN_GPU_MIB", "1024")))
    report = {
        "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "uuids": uuids,
        "argv": sys.argv[1:],
    }

    dead_inside = os.environ.get("STANDIN_FATAL_PORT") == str(args.port)
    if dead_inside:
        print(f"(EngineCore_DP0 pid={os.getpid()}) ERROR EngineCore failed to start.", flush=True)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/health" and dead_inside:
                self.send_error(503)
            elif self.path == "/health":
                self._send({})
            elif self.path == "/v1/models":
                self._send({"object": "list", "data": [{"id": args.served_model_name, "object": "model"}]})
            elif self.path == "/standin":
                self._send(report)
            else:
                self.send_error(404)

        def _send(self, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    _core_child(args.host)
    exit_after = os.environ.get("STANDIN_EXIT_AFTER_S")
    if exit_after:
        code = int(os.environ.get("STANDIN_EXIT_CODE", "3"))
        threading.Timer(float(exit_after), lambda: os._exit(code)).start()
    print(f"standin engine on {args.host}:{args.port}, gpus {uuids}", flush=True)
    server.serve_forever()
    del held


if __name__ == "__main__":
    main()
