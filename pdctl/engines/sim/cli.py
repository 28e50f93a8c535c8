"""`python -m pdctl.engines.sim`: the command line the launchers build, read into a SimConfig."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from pdctl.auth import VLLM_KEY_ENV
from pdctl.engines.sim.config import SimConfig
from pdctl.engines.sim.server import serve
from pdctl.httpserver import DEFAULT_MAX_BODY_BYTES


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: the KV reads would drown the engine's own lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    asyncio.run(serve(parse_args(argv)))
    return 0


def parse_args(argv: list[str] | None = None) -> SimConfig:
    parser = _parser()
    # Unknown arguments are an error (exit 2), as they are to vLLM.
    args = parser.parse_args(argv)
    if args.hardware:
        _check_model_args(parser, args)
    return SimConfig(
        model=args.served_model_name,
        host=args.host,
        port=args.port,
        role=args.role,
        prefill_ms_per_token=args.prefill_ms_per_token,
        decode_ms_per_token=args.decode_ms_per_token,
        startup_delay_s=args.startup_delay_s,
        max_num_seqs=args.max_num_seqs,
        kv_cache_blocks=args.kv_cache_blocks,
        max_body_bytes=args.max_body_bytes,
        hardware=args.hardware,
        architecture=args.architecture,
        tensor_parallel_size=args.tensor_parallel_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        scheduling_policy=args.scheduling_policy,
        speed=args.speed,
        stream_interval=args.stream_interval,
        # As vLLM: the flag, else the environment; an empty key is none.
        api_keys=tuple(key for key in (args.api_key or [os.environ.get(VLLM_KEY_ENV)]) if key),
    )


def _parser() -> argparse.ArgumentParser:
    from pdctl.engines import sim  # the package, whose docstring describes the command

    parser = argparse.ArgumentParser(prog="python -m pdctl.engines.sim", description=sim.__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--role", choices=["prefill", "decode", "hybrid"], default="hybrid")
    parser.add_argument("--prefill-ms-per-token", type=float, default=0.05)
    parser.add_argument("--decode-ms-per-token", type=float, default=10.0)
    parser.add_argument("--startup-delay-s", type=float, default=0.0)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--kv-cache-blocks", type=int, default=4096)
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--hardware", help="a hardware profile: time steps with pdctl's engine model")
    parser.add_argument("--architecture", help="the model architecture the engine model computes")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--max-num-batched-tokens", type=int)
    parser.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs")
    parser.add_argument("--speed", type=float, help="steps take this many times the model's time")
    parser.add_argument("--api-key", nargs="+", help="keys /v1 asks for, as vLLM's (default $VLLM_API_KEY)")
    parser.add_argument("--stream-interval", type=_positive, default=1, help="as vLLM's: tokens per stream event")
    return parser


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be 1 or more")
    return number


def _check_model_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from pdctl.perfmodel.arch import UnknownModel, get_model
    from pdctl.perfmodel.hardware import UnknownHardware, get_hardware

    try:
        get_hardware(args.hardware)
        get_model(args.architecture or args.served_model_name)
    except (UnknownHardware, UnknownModel) as error:
        parser.error(error.args[0])
